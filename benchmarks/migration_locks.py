"""6. Lock waits of migrations under steady app traffic: the longest app-statement wait and the
longest heartbeat wait while (a) legacy tables (20k runs, N jobs) are adopted and (b) an
installed database has every sql/ file re-applied (the no-op upgrade), each with and without an
app transaction left open for a while. "before" is the previous release's code path (main at
a6c8adf: its sql/ and migrations/, one transaction, no lock_timeout), "after" this one
(outbound_heartbeat.upgrade: per-file transactions, 0.5 s lock attempts retried, catalog
guards, indexes built CONCURRENTLY), measured one after the other in this run."""

from __future__ import annotations

import io
import random
import subprocess
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg

from outbound_heartbeat import migrate, schema, service
from outbound_heartbeat.upgrade import LockPolicy, apply_sql_online

from .common import Results, Server

ROOT = Path(__file__).resolve().parent.parent
PREVIOUS_RELEASE = "a6c8adf"
RUNS = 20_000

LEGACY = """
CREATE TABLE outbound_call_runs (
    id serial PRIMARY KEY, business_id integer NOT NULL,
    status varchar(20) NOT NULL DEFAULT 'pending', locked_by_worker varchar(100),
    lock_ts timestamp, started_at timestamp, ended_at timestamp,
    created_at timestamp NOT NULL DEFAULT (now() AT TIME ZONE 'UTC'), updated_at timestamp);
CREATE TABLE outbound_call_jobs (
    id serial PRIMARY KEY, run_id integer NOT NULL REFERENCES outbound_call_runs (id),
    business_id integer NOT NULL, phone_number varchar(32),
    status varchar(20) NOT NULL DEFAULT 'queued', error_message text,
    created_at timestamp DEFAULT (now() AT TIME ZONE 'UTC'), updated_at timestamp);
INSERT INTO outbound_call_runs (business_id, status, locked_by_worker, lock_ts)
SELECT g % 500, CASE WHEN g % 100 = 0 THEN 'running' ELSE 'completed' END,
       CASE WHEN g % 100 = 0 THEN 'legacy-' || g END,
       CASE WHEN g % 100 = 0 THEN now() AT TIME ZONE 'UTC' END
  FROM generate_series(1, %(runs)s) AS g;
INSERT INTO outbound_call_jobs (run_id, business_id, phone_number, status)
SELECT 1 + g % %(runs)s, (1 + g % %(runs)s) % 500, '+9725' || g,
       CASE WHEN g % 10 = 0 THEN 'queued' ELSE 'completed' END
  FROM generate_series(1, %(jobs)s) AS g;
ANALYZE;
"""


def previous_release(dest: Path) -> Path:
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", PREVIOUS_RELEASE,
                              "sql", "migrations"], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def migrate_previous(dsn: str, release: Path) -> None:
    from yoyo import get_backend, read_migrations

    backend = get_backend(schema.yoyo_url(dsn), migration_table=schema.MIGRATION_TABLE)
    try:
        with backend.lock():
            backend.apply_migrations(backend.to_apply(read_migrations(str(release / "migrations"))))
    finally:
        backend.connection.close()


def reapply_previous(dsn: str, release: Path) -> None:
    """The previous release's upgrade step: every sql/ file in one transaction, no lock_timeout."""
    with psycopg.connect(dsn) as conn:
        conn.execute("SET LOCAL client_min_messages = warning")
        for path in sorted((release / "sql").glob("*.sql")):
            conn.execute(path.read_bytes())


class Traffic:
    """Steady app statements, one connection each, every ~10 ms; the longest wait per kind."""

    def __init__(self, dsn: str, statements: dict[str, Callable[[psycopg.Connection[Any]], Any]]) -> None:
        self.longest = dict.fromkeys(statements, 0.0)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(dsn, n, f), daemon=True)
                         for n, f in statements.items()]

    def _loop(self, dsn: str, name: str, fn: Callable[[psycopg.Connection[Any]], Any]) -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            while not self._stop.is_set():
                started = time.monotonic()
                fn(conn)
                self.longest[name] = max(self.longest[name], time.monotonic() - started)
                time.sleep(0.01)

    @contextmanager
    def running(self) -> Iterator[Traffic]:
        for t in self._threads:
            t.start()
        time.sleep(0.5)
        try:
            yield self
        finally:
            time.sleep(0.3)
            self._stop.set()
            for t in self._threads:
                t.join(60)


@contextmanager
def app_transaction(dsn: str, statement: str, hold: float) -> Iterator[None]:
    """An app transaction that ran ``statement`` and stays open ``hold`` seconds (0: none)."""
    if hold <= 0:
        yield
        return
    conn = psycopg.connect(dsn)
    conn.execute(statement)
    timer = threading.Timer(hold, conn.commit)
    timer.start()
    try:
        yield
    finally:
        timer.join()
        conn.close()


def legacy_reads(conn: psycopg.Connection[Any], jobs: int) -> Any:
    conn.execute("SELECT status FROM outbound_call_runs WHERE id = %s", (random.randint(1, RUNS),))
    return conn.execute("SELECT status FROM outbound_call_jobs WHERE id = %s",
                        (random.randint(1, jobs),)).fetchone()


def legacy_heartbeat(conn: psycopg.Connection[Any]) -> Any:
    return conn.execute("UPDATE outbound_call_runs SET lock_ts = now() AT TIME ZONE 'UTC'"
                        " WHERE id = %s", (100 * random.randint(1, RUNS // 100),)).rowcount


def adopt(server: Server, release: Path, mode: str, jobs: int, hold: float) -> tuple[float, float, float]:
    name = f"bench_adopt_{mode}_{int(hold)}"
    dsn = server.database(name, library=False)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(LEGACY.replace("%(runs)s", str(RUNS)).replace("%(jobs)s", str(jobs)).encode())
        conn.execute("CHECKPOINT")
    traffic = Traffic(dsn, {"app": lambda c: legacy_reads(c, jobs), "heartbeat": legacy_heartbeat})
    with traffic.running(), app_transaction(dsn, "SELECT count(*) FROM outbound_call_runs", hold):
        started = time.monotonic()
        if mode == "before":
            migrate_previous(dsn, release)
        else:
            migrate(dsn)
        took = time.monotonic() - started
    server.drop(name)
    return traffic.longest["app"], traffic.longest["heartbeat"], took


def reapply(server: Server, release: Path, mode: str, hold: float) -> tuple[float, float, float]:
    name = f"bench_reapply_{mode}_{int(hold)}"
    dsn = server.database(name, library=False)
    if mode == "before":
        migrate_previous(dsn, release)
    else:
        migrate(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE outbound_heartbeat.settings SET restart_grace = interval '0'")
        runs = [service.create_run(conn, b, [{} for _ in range(200)]) for b in range(20)]
        claims = [service.claim_run(conn, f"w-{r.id}", r.id) for r in runs]
    leases = [(c.run_id, c.worker_id, c.lease_epoch) for c in claims if c is not None]

    def beat(conn: psycopg.Connection[Any]) -> Any:
        return service.heartbeat(conn, *random.choice(leases))

    def read(conn: psycopg.Connection[Any]) -> Any:
        return service.list_active_runs(conn) and conn.execute(
            "SELECT count(*) FROM outbound_call_jobs WHERE run_id = %s", (random.choice(leases)[0],)
        ).fetchone()

    traffic = Traffic(dsn, {"app": read, "heartbeat": beat})
    with traffic.running(), app_transaction(
            dsn, "UPDATE outbound_call_jobs SET updated_at = updated_at WHERE id = 1", hold):
        started = time.monotonic()
        if mode == "before":
            reapply_previous(dsn, release)
        else:
            with psycopg.connect(dsn, autocommit=True) as conn:
                apply_sql_online(conn, schema.sql_dir(), LockPolicy())
        took = time.monotonic() - started
    server.drop(name)
    return traffic.longest["app"], traffic.longest["heartbeat"], took


def run(server: Server, results: Results, *, jobs: int, hold: float) -> None:
    print(f"migration lock waits: legacy {RUNS} runs / {jobs} jobs, app transaction held {hold:g} s",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        release = previous_release(Path(tmp))
        for what, fn in (
            (f"adopt legacy tables ({RUNS // 1000}k runs, {jobs:,} jobs)",
             lambda mode, h: adopt(server, release, mode, jobs, h)),
            ("no-op re-apply of sql/ (installed database, 20 live leases)",
             lambda mode, h: reapply(server, release, mode, h)),
        ):
            for h in (0.0, hold):
                figures = {mode: fn(mode, h) for mode in ("before", "after")}
                (b_app, b_beat, b_took), (a_app, a_beat, a_took) = figures["before"], figures["after"]
                cond = "steady traffic" if h == 0 else f"steady traffic + an app transaction open {h:g} s"
                results.add("migration", f"{what}, {cond}: longest app statement wait",
                            f"before {b_app:.3f} s, after {a_app:.3f} s", "after <= one lock attempt (0.5 s)",
                            a_app <= 0.5 + 0.2)
                results.add("migration", f"{what}, {cond}: longest heartbeat wait",
                            f"before {b_beat:.3f} s, after {a_beat:.3f} s", "after <= one lock attempt (0.5 s)",
                            a_beat <= 0.5 + 0.2)
                results.add("migration", f"{what}, {cond}: migration took",
                            f"before {b_took:.2f} s, after {a_took:.2f} s")
