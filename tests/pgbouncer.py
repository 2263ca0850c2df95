"""A PgBouncer in transaction pooling mode in front of the test server: the suites that also
run through it prove the library keeps no session state (docs/embedding.md). Test-only:
it is not part of the installed package."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from psycopg.conninfo import conninfo_to_dict, make_conninfo

# The server chain's own helpers: a free port, the unprivileged user, readiness, failure logs.
from outbound_heartbeat.testing import (
    NoServerAvailable,
    _free_port,
    _log_failure,
    _unprivileged_user,
    _wait_ready,
)


@dataclass
class PgBouncer:
    """A PgBouncer in transaction pooling mode in front of a server (tests of PgBouncer safety).

    Connections through it must use psycopg's ``prepare_threshold=None``: a transaction-mode
    pooler hands each transaction to any server connection.
    """

    root: Path
    port: int
    process: subprocess.Popen[bytes]

    def dsn_for(self, dsn: str) -> str:
        """``dsn`` (a database on the fronted server) routed through this PgBouncer."""
        return make_conninfo(dsn, host="127.0.0.1", port=str(self.port))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        shutil.rmtree(self.root, ignore_errors=True)


def find_pgbouncer() -> Path | None:
    for candidate in (shutil.which("pgbouncer"), "/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"):
        if candidate and Path(candidate).exists():
            return Path(candidate)
    return None


def start_pgbouncer(
    server_dsn: str,
    pool_size: int = 20,
    *,
    databases: Mapping[str, str] | None = None,
    settings: Mapping[str, str | int | float] | None = None,
) -> PgBouncer:
    """Starts PgBouncer (transaction mode) on 127.0.0.1 for every database of the server.

    ``databases``: extra named entries (alias -> connection string after the server's host and
    port, e.g. ``"dbname=app pool_size=2"``), each with a pool of its own; ``settings``: extra
    ``[pgbouncer]`` settings (``query_wait_timeout``, ``reserve_pool_size`` ...)."""
    binary = find_pgbouncer()
    if binary is None:
        raise NoServerAvailable("pgbouncer not found (Debian: apt-get install pgbouncer)")
    params = conninfo_to_dict(server_dsn)
    run_as = _unprivileged_user()  # PgBouncer refuses to run as root
    root = Path(tempfile.mkdtemp(prefix="outbound-heartbeat-pgbouncer-"))
    port = _free_port()
    user = str(params.get("user") or "postgres")
    (root / "users.txt").write_text(f'"{user}" ""\n')
    target = f"host={params.get('host') or '127.0.0.1'} port={params.get('port') or 5432}"
    (root / "pgbouncer.ini").write_text(
        "[databases]\n"
        + "".join(f"{alias} = {target} {entry}\n" for alias, entry in (databases or {}).items())
        + f"* = {target}\n"
        "[pgbouncer]\n"
        "listen_addr = 127.0.0.1\n"
        f"listen_port = {port}\n"
        "unix_socket_dir =\n"
        "auth_type = trust\n"
        f"auth_file = {root / 'users.txt'}\n"
        "pool_mode = transaction\n"
        "max_client_conn = 2000\n"
        f"default_pool_size = {pool_size}\n"
        "server_reset_query =\n"
        "ignore_startup_parameters = extra_float_digits,options\n"
        f"logfile = {root / 'pgbouncer.log'}\n"
        f"pidfile = {root / 'pgbouncer.pid'}\n"
        + "".join(f"{key} = {value}\n" for key, value in (settings or {}).items())
    )
    kwargs: dict[str, Any] = {}
    if run_as is not None:
        for path in (root, *root.iterdir()):
            os.chown(path, *run_as)
        kwargs.update(user=run_as[0], group=run_as[1], extra_groups=[])
    process = subprocess.Popen(
        [str(binary), str(root / "pgbouncer.ini")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=root,
        **kwargs,
    )
    bouncer = PgBouncer(root, port, process)
    try:
        dbname = str(params.get("dbname") or "postgres")
        _wait_ready(bouncer.dsn_for(make_conninfo(server_dsn, dbname=dbname)), 20)
    except BaseException:
        _log_failure("PgBouncer", root / "pgbouncer.log")
        bouncer.stop()
        raise
    return bouncer
