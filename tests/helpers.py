"""Small helpers shared by the tests: they read and backdate rows, never reimplement a rule."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from outbound_heartbeat import migrate, schema, service, testing, web
from outbound_heartbeat.lease import Lease
from outbound_heartbeat.lease_async import AsyncLease
from outbound_heartbeat.records import Claim, Job
from outbound_heartbeat.upgrade import apply_sql_online

Conn = psycopg.Connection[Any]
T = TypeVar("T")

TEST_SETTINGS = "UPDATE outbound_heartbeat.settings SET restart_grace = interval '0'"
#: The heartbeat interval of the in-process leases of the mode tests (leased()).
LEASE_INTERVAL = 0.5

#: The frozen copy of each released migration's sql/ (migrations/frozen/<number>/).
FROZEN_SQL = Path(__file__).resolve().parent.parent / "migrations" / "frozen"

#: Each released migration, oldest first: installing up to one of them builds that release.
RELEASES = ["0001.install-sql", "0002.monitoring", "0003.online-upgrade", "0004.guarantees-cross"]


def install_release(dsn: str, last: str) -> list[str]:
    """Builds an earlier release's schema from the repository (no git), as that release's own
    install did: its sql/ (the frozen copy of migration ``last``) applied online, and its
    migrations recorded as applied (each of them re-applied those same files). Returns the ids
    recorded."""
    from yoyo import get_backend, read_migrations
    from yoyo.migrations import MigrationList

    frozen = FROZEN_SQL / last.split(".")[0]
    assert sorted(frozen.glob("*.sql")), f"{last} is not a released migration"
    with psycopg.connect(dsn, autocommit=True) as conn:
        apply_sql_online(conn, frozen)
    backend = get_backend(schema.yoyo_url(dsn), migration_table=schema.MIGRATION_TABLE)
    try:
        wanted = MigrationList([m for m in read_migrations(str(schema.migrations_dir()))
                                if m.id <= last])
        with backend.lock():
            todo = backend.to_apply(wanted)
            backend.mark_migrations(todo)
        return [m.id for m in todo]
    finally:
        backend.connection.close()



def start(conn: psycopg.Connection[Any], business_id: int = 1, jobs: int = 3, worker: str = "w1",
          retry_unplaced: bool = False) -> Claim:
    """A new run of ``jobs`` calls, claimed by ``worker``."""
    run = service.create_run(conn, business_id, [{"n": i} for i in range(jobs)], retry_unplaced)
    claim = service.claim_run(conn, worker, run.id)
    assert claim is not None
    return claim


def hand_out(conn: psycopg.Connection[Any], claim: Claim) -> Job:
    """The next call of the claimed run, with its key."""
    job = service.next_job(conn, claim.run_id, claim.worker_id, claim.lease_epoch)
    assert job is not None and job.call_key is not None
    return job


def backdate_heartbeat(conn: psycopg.Connection[Any], run_id: int, seconds: float) -> None:
    """Moves a run's heartbeat into the past on the database clock."""
    conn.execute(
        "UPDATE outbound_call_runs SET last_heartbeat_at = now() - make_interval(secs => %s)"
        " WHERE id = %s",
        (seconds, run_id),
    )


def old_events(
    conn: psycopg.Connection[Any], run_id: int, business_id: int, names: list[str], age: str = "1 year"
) -> list[int]:
    """Audit events written ``age`` ago, oldest first (a superuser's insert; the chain trigger
    hashes each row as it is). Editing an event's created_at afterwards is tampering instead:
    verify_events() reports it and prune_events() keeps the row."""
    ids = []
    for i, name in enumerate(names):
        row = conn.execute(
            "INSERT INTO outbound_heartbeat.run_events (run_id, business_id, event, created_at)"
            " VALUES (%s, %s, %s, now() - %s::interval + make_interval(secs => %s)) RETURNING id",
            (run_id, business_id, name, age, i),
        ).fetchone()
        assert row is not None
        ids.append(row[0])
    return ids


def create_runs(
    conn: psycopg.Connection[Any], business_ids: Sequence[int], jobs: Sequence[Any] = ({},)
) -> list[int]:
    """One run per business id given (in that order), each with ``jobs``, made by the API's
    create_run in one statement: the setup of a test about many runs, not one call per run."""
    rows = conn.execute(
        "SELECT r.id FROM unnest(%s::bigint[]) WITH ORDINALITY AS b(business_id, n),"
        " LATERAL outbound_heartbeat.create_run(b.business_id, %s::jsonb) AS r ORDER BY b.n",
        (list(business_ids), Jsonb(list(jobs))),
    ).fetchall()
    assert len(rows) == len(business_ids)
    return [row[0] for row in rows]


def claim_runs(conn: psycopg.Connection[Any], claims: Sequence[tuple[str, int]]) -> list[int]:
    """Each (worker id, run id) claimed by the API's claim_run, in one statement; returns the
    lease epochs in that order (every claim must succeed)."""
    rows = conn.execute(
        "SELECT c.run_id, c.lease_epoch FROM unnest(%s::text[], %s::bigint[]) WITH ORDINALITY"
        " AS x(worker_id, run_id, n), LATERAL outbound_heartbeat.claim_run(x.worker_id, x.run_id)"
        " AS c ORDER BY x.n",
        ([worker for worker, _ in claims], [run_id for _, run_id in claims]),
    ).fetchall()
    assert [row[0] for row in rows] == [run_id for _, run_id in claims]
    return [row[1] for row in rows]


def run_rows(conn: psycopg.Connection[Any], run_ids: Sequence[int]) -> dict[int, dict[str, Any]]:
    """The rows of these runs, as run_row() reads them, in one query."""
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            "SELECT * FROM outbound_call_runs WHERE id = ANY(%s)", (list(run_ids),)
        ).fetchall()
    found = {row["id"]: row for row in rows}
    assert set(found) == set(run_ids)
    return found


def run_row(conn: psycopg.Connection[Any], run_id: int) -> dict[str, Any]:
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute("SELECT * FROM outbound_call_runs WHERE id = %s", (run_id,)).fetchone()
    assert row is not None
    return row


def job_statuses(conn: psycopg.Connection[Any], run_id: int) -> dict[int, str]:
    rows = conn.execute(
        "SELECT id, status FROM outbound_call_jobs WHERE run_id = %s ORDER BY id", (run_id,)
    ).fetchall()
    return {r[0]: r[1] for r in rows}


def events(conn: psycopg.Connection[Any], run_id: int) -> list[str]:
    rows = conn.execute(
        "SELECT event FROM outbound_heartbeat.run_events WHERE run_id = %s ORDER BY id", (run_id,)
    ).fetchall()
    return [r[0] for r in rows]


def snapshot(conn: psycopg.Connection[Any]) -> tuple[Any, ...]:
    """Everything the library can write, to prove a refused call wrote nothing."""
    return tuple(
        conn.execute(query).fetchall()
        for query in (
            "SELECT * FROM outbound_call_runs ORDER BY id",
            "SELECT * FROM outbound_call_jobs ORDER BY id",
            "SELECT * FROM outbound_heartbeat.run_events ORDER BY id",
            "SELECT * FROM outbound_heartbeat.settings",
        )
    )


def audit_job_failures(conn: psycopg.Connection[Any]) -> None:
    """Test-only trigger recording every UPDATE that makes a job 'failed' (to catch doubles)."""
    conn.execute(
        """
        CREATE TABLE test_job_failures (job_id bigint NOT NULL);
        -- SECURITY DEFINER: the API writes jobs as outbound_heartbeat_owner, which has no
        -- right on this test table (an app's own triggers need the same, docs/security.md).
        CREATE FUNCTION test_record_failure() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER
            SET search_path = pg_catalog, pg_temp AS $$
        BEGIN INSERT INTO public.test_job_failures VALUES (NEW.id); RETURN NEW; END $$;
        CREATE TRIGGER test_record_failure AFTER UPDATE ON outbound_call_jobs
            FOR EACH ROW WHEN (NEW.status = 'failed') EXECUTE FUNCTION test_record_failure();
        """
    )


def jobs_failed_more_than_once(conn: psycopg.Connection[Any]) -> list[int]:
    rows = conn.execute(
        "SELECT job_id FROM test_job_failures GROUP BY job_id HAVING count(*) > 1"
    ).fetchall()
    return [r[0] for r in rows]


class Cluster(testing.LocalCluster):
    """A private cluster with what only the tests do to a server: restart it, crash a backend,
    promote a standby (:func:`start_standby`)."""

    @classmethod
    def of(cls, cluster: testing.LocalCluster) -> Cluster:
        """The same running cluster (same directory, port and user) seen as a test cluster."""
        return cls(cluster.bindir, cluster.root, cluster.port, cluster.run_as, cluster.settings)

    def restart(self, outage: float = 0.0, mode: str = "fast") -> None:
        """Stops the server, stays down for ``outage`` seconds, starts it again."""
        self.stop(mode)
        time.sleep(outage)
        self.start()

    def promote(self) -> None:
        """Promotes this streaming standby to a primary (``pg_ctl promote``, waits for it)."""
        self._run("pg_ctl", "promote", "-w", "-t", "60", "-D", str(self.datadir))

    def crash_backend(self) -> int:
        """SIGKILLs one client backend: the postmaster ends every session and runs crash
        recovery (the server stays up, ``pg_postmaster_start_time()`` does not move).
        Returns the killed pid."""
        with psycopg.connect(self.dsn, autocommit=True) as victim:
            pid = victim.info.backend_pid
            os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(psycopg.Error):
                victim.execute("SELECT 1")
        return pid


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_standby(primary: testing.LocalCluster, settings: dict[str, str] | None = None) -> Cluster:
    """A hot standby streaming from ``primary`` (``pg_basebackup -R``), on its own free port in
    its own temporary directory, run as the same unprivileged user. Destroy it like any
    cluster; :meth:`Cluster.promote` turns it into a primary."""
    root = Path(tempfile.mkdtemp(prefix="outbound-heartbeat-standby-"))
    if primary.run_as is not None:
        os.chown(root, *primary.run_as)
    standby = Cluster(
        primary.bindir, root, _free_port(), primary.run_as,
        {**primary.settings, "hot_standby": "on", **(settings or {})},
    )
    try:
        standby._run(
            "pg_basebackup", "-D", str(standby.datadir), "-R", "-X", "stream", "-c", "fast",
            "-h", "127.0.0.1", "-p", str(primary.port), "-U", "postgres",
        )
        standby.start_on_a_free_port()
    except BaseException:
        log = root / "server.log"
        if log.exists():
            logging.getLogger(__name__).error(
                "PostgreSQL standby failed to start:\n%s", log.read_text(errors="replace"))
        standby.destroy()
        raise
    return standby


@contextlib.contextmanager
def private_server(**settings: str) -> Iterator[tuple[Cluster, str]]:
    """A server of the test's own (to restart, to log, to size), with a migrated database
    ``app``; yields the cluster and that database's DSN."""
    cluster = Cluster.of(testing.start_local_cluster(
        testing.find_bindir() or testing.embedded_bindir(), settings=settings
    ))
    try:
        with psycopg.connect(cluster.dsn, autocommit=True) as admin:
            admin.execute("CREATE DATABASE app")
        dsn = psycopg.conninfo.make_conninfo(cluster.dsn, dbname="app")
        migrate(dsn)
        yield cluster, dsn
    finally:
        cluster.destroy()


@contextlib.contextmanager
def primary_and_standby(**settings: str) -> Iterator[tuple[Cluster, str, Cluster, str]]:
    """A private primary with a migrated database ``app`` and a hot standby streaming from it
    (pg_basebackup), both destroyed after; yields (primary, its DSN, standby, its DSN)."""
    with private_server(**settings) as (primary, dsn):
        standby = start_standby(primary)
        try:
            yield primary, dsn, standby, psycopg.conninfo.make_conninfo(
                standby.dsn, dbname="app")
        finally:
            standby.destroy()


def wait_replayed(primary_dsn: str, standby_dsn: str, timeout: float = 30.0) -> None:
    """Waits until the standby has replayed everything the primary has written so far."""
    with psycopg.connect(primary_dsn, autocommit=True) as conn:
        # The insert position: with synchronous_commit off, commits may not be written yet.
        row = conn.execute("SELECT pg_current_wal_insert_lsn()").fetchone()
    assert row is not None
    deadline = time.monotonic() + timeout
    with psycopg.connect(standby_dsn, autocommit=True) as conn:
        while True:
            done = conn.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (row[0],)).fetchone()
            if done and done[0]:
                return
            assert time.monotonic() < deadline, "the standby never caught up"
            time.sleep(0.05)


# -- from test_counters.py ----------------------------------------------------


def true_job_counts(conn: Conn) -> dict[int, tuple[int, int]]:
    """Open jobs per run, counted the slow way from the jobs table."""
    rows = conn.execute(
        "SELECT run_id, count(*) FILTER (WHERE status = 'queued'),"
        "       count(*) FILTER (WHERE status = 'in_progress')"
        "  FROM outbound_call_jobs WHERE status IN ('queued', 'in_progress') GROUP BY run_id"
    ).fetchall()
    return {r[0]: (r[1], r[2]) for r in rows}


def kept_job_counts(conn: Conn) -> dict[int, tuple[int, int]]:
    rows = conn.execute(
        "SELECT run_id, sum(queued), sum(in_progress) FROM outbound_heartbeat.job_counts"
        " GROUP BY run_id HAVING sum(queued) <> 0 OR sum(in_progress) <> 0"
    ).fetchall()
    return {r[0]: (int(r[1]), int(r[2])) for r in rows}


def true_run_counts(conn: Conn) -> dict[str, int]:
    rows = conn.execute("SELECT status::text, count(*) FROM outbound_call_runs GROUP BY 1").fetchall()
    return {r[0]: r[1] for r in rows}


def kept_run_counts(conn: Conn) -> dict[str, int]:
    rows = conn.execute("SELECT status, runs FROM outbound_heartbeat.count_runs() WHERE runs <> 0").fetchall()
    return {r[0]: r[1] for r in rows}


def assert_exact(conn: Conn) -> None:
    assert kept_job_counts(conn) == true_job_counts(conn)
    assert kept_run_counts(conn) == true_run_counts(conn)
    # ...and what the API reports is what the table holds.
    truth = true_job_counts(conn)
    for run in service.list_active_runs(conn):
        assert (run.queued_jobs, run.in_progress_jobs) == truth.get(run.id, (0, 0)), run.id


# -- from test_migrations.py --------------------------------------------------


LEGACY_TABLES = """
CREATE TABLE outbound_call_runs (
    id serial PRIMARY KEY,
    business_id integer NOT NULL,
    status varchar(20) NOT NULL DEFAULT 'pending',
    locked_by_worker varchar(100),
    lock_ts timestamp without time zone,
    started_at timestamp without time zone,
    ended_at timestamp without time zone,
    created_at timestamp without time zone NOT NULL DEFAULT (now() AT TIME ZONE 'UTC'),
    updated_at timestamp without time zone,
    campaign_name text,
    total_calls integer DEFAULT 0
);
CREATE TABLE outbound_call_jobs (
    id serial PRIMARY KEY,
    run_id integer NOT NULL REFERENCES outbound_call_runs (id),
    business_id integer NOT NULL,
    lead_id integer,
    phone_number varchar(32),
    status varchar(20) NOT NULL DEFAULT 'queued',
    error_message text,
    call_sid varchar(64),
    created_at timestamp without time zone DEFAULT (now() AT TIME ZONE 'UTC'),
    updated_at timestamp without time zone
);
"""


# (business, status, lock_ts age in seconds (NULL: none), worker, jobs by status)
LEGACY_ROWS = [
    (1, "running", 10, "w-fresh", ["queued", "queued", "in_progress", "completed"]),
    (2, "running", 600, "w-dead", ["queued", "in_progress", "failed"]),
    (3, "pending", None, None, ["queued", "queued"]),
    (4, "completed", None, None, ["completed"]),
    (5, "failed", None, None, ["failed"]),
    (6, "cancelled", None, None, ["failed"]),
    (7, "stopped", None, None, ["failed"]),
]


def seed_legacy(dsn: str) -> dict[int, int]:
    """The app's pre-heartbeat tables with rows in every status; returns run id by business."""
    ids: dict[int, int] = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(LEGACY_TABLES)
        for business, status, age, worker, jobs in LEGACY_ROWS:
            row = conn.execute(
                """INSERT INTO outbound_call_runs
                       (business_id, status, locked_by_worker, lock_ts, started_at, updated_at,
                        campaign_name, total_calls)
                   VALUES (%s, %s, %s,
                           (now() AT TIME ZONE 'UTC') - make_interval(secs => %s),
                           (now() AT TIME ZONE 'UTC') - interval '1 hour',
                           (now() AT TIME ZONE 'UTC') - make_interval(secs => coalesce(%s, 3600)),
                           %s, %s)
                   RETURNING id""",
                (business, status, worker, age, age, f"campaign {business}", len(jobs)),
            ).fetchone()
            assert row is not None
            ids[business] = row[0]
            for i, job_status in enumerate(jobs):
                conn.execute(
                    "INSERT INTO outbound_call_jobs (run_id, business_id, lead_id, phone_number,"
                    " status) VALUES (%s, %s, %s, %s, %s)",
                    (row[0], business, i, f"+97250{business}{i}", job_status),
                )
        conn.execute("UPDATE outbound_call_runs SET lock_ts = NULL WHERE locked_by_worker IS NULL")
    return ids


def build_from_sql(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for path in schema.sql_files():
            conn.execute(path.read_text())


CATALOG_QUERIES = {
    "functions": """
        SELECT p.proname, pg_get_function_identity_arguments(p.oid),
               pg_get_function_result(p.oid), p.prosrc, p.proconfig, p.provolatile,
               l.lanname, p.prosecdef
          FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
         WHERE p.pronamespace = 'outbound_heartbeat'::regnamespace ORDER BY 1, 2""",
    "types": """
        SELECT t.typname, a.attnum, a.attname, format_type(a.atttypid, a.atttypmod)
          FROM pg_type t JOIN pg_attribute a ON a.attrelid = t.typrelid
         WHERE t.typnamespace = 'outbound_heartbeat'::regnamespace AND a.attnum > 0
           AND NOT a.attisdropped ORDER BY 1, 2""",
    "relations": """
        SELECT c.relname, c.relkind, pg_get_viewdef(c.oid)
          FROM pg_class c WHERE c.relnamespace = 'outbound_heartbeat'::regnamespace
         ORDER BY 1""",
    "indexes": """
        SELECT indexrelid::regclass::text, pg_get_indexdef(indexrelid)
          FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
         WHERE c.relnamespace = 'outbound_heartbeat'::regnamespace ORDER BY 1""",
    # On adopted tables the predicate's spelling follows the app's column type (varchar casts),
    # so the library's indexes there are compared by name and key columns.
    "app_indexes": """
        SELECT c.relname, i.indrelid::regclass::text,
               ARRAY(SELECT pg_get_indexdef(i.indexrelid, k, true)
                       FROM generate_series(1, i.indnatts) AS k),
               i.indpred IS NOT NULL
          FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
         WHERE c.relname IN ('outbound_call_runs_active_idx', 'outbound_call_jobs_open_idx')
         ORDER BY 1""",
    "constraints": """
        SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid)
          FROM pg_constraint WHERE connamespace = 'outbound_heartbeat'::regnamespace
         ORDER BY 1, 2""",
    "library_columns": """
        SELECT attrelid::regclass::text, attname, format_type(atttypid, atttypmod)
          FROM pg_attribute
         WHERE attrelid IN ('public.outbound_call_runs'::regclass, 'public.outbound_call_jobs'::regclass)
           AND attname IN ('last_heartbeat_at', 'lease_epoch', 'cancel_requested_at', 'payload')
         ORDER BY 1, 2""",
    "settings": "SELECT * FROM outbound_heartbeat.settings",
}


def catalog(dsn: str, *, include_app_tables: bool) -> dict[str, list[Any]]:
    with psycopg.connect(dsn) as conn:
        snap = {k: conn.execute(q).fetchall() for k, q in CATALOG_QUERIES.items()}
        if include_app_tables:
            snap["app_tables"] = conn.execute(
                """SELECT attrelid::regclass::text, attnum, attname,
                          format_type(atttypid, atttypmod), attnotnull
                     FROM pg_attribute
                    WHERE attrelid IN ('public.outbound_call_runs'::regclass,
                                       'public.outbound_call_jobs'::regclass)
                      AND attnum > 0 AND NOT attisdropped ORDER BY 1, 2"""
            ).fetchall()
    return snap


# -- from test_online_migration.py ----------------------------------------------------


@contextlib.contextmanager
def idle_in_transaction(dsn: str, statement: str) -> Iterator[tuple[psycopg.Connection[Any], int]]:
    """An app session that ran ``statement`` in a transaction and sits idle, holding its locks."""
    with psycopg.connect(dsn) as conn:
        conn.execute(statement)
        yield conn, conn.info.backend_pid
        conn.rollback()


# -- from test_failover.py ------------------------------------------------------------


def both_hosts(primary_dsn: str, standby_dsn: str) -> str:
    """One DSN listing both servers; libpq picks the one that accepts writes."""
    ports = ",".join(str(conninfo_to_dict(d)["port"]) for d in (primary_dsn, standby_dsn))
    return make_conninfo(primary_dsn, host="127.0.0.1,127.0.0.1", port=ports,
                         target_session_attrs="read-write", connect_timeout="2")


def stale_events(conn: psycopg.Connection[Any]) -> list[int]:
    rows = conn.execute("SELECT run_id FROM outbound_heartbeat.run_events"
                        " WHERE event IN ('stale_stopped', 'cleaned_up') ORDER BY id").fetchall()
    return [r[0] for r in rows]


# -- from test_modes.py -------------------------------------------------------


class AsyncDriver:
    """An AsyncLease on an event loop running in a thread of its own; the test calls it as
    it calls a Lease (each call waits for its coroutine)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def make() -> AsyncLease:
            return AsyncLease(*args, **kwargs)

        self.lease = self.run(make())

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    def __enter__(self) -> AsyncDriver:
        try:
            self.run(self.lease.__aenter__())
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self.run(self.lease.__aexit__(*exc))
        finally:
            self.close()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def next_job(self) -> Any:
        return self.run(self.lease.next_job())

    def finish_job(self, job: Any, *args: Any) -> Any:
        return self.run(self.lease.finish_job(job, *args))

    def __getattr__(self, name: str) -> Any:  # lost, cancel_requested, lease_epoch, ...
        return getattr(self.lease, name)


@contextlib.contextmanager
def leased(twin: str, dsn: str, worker_id: str, run_id: int, share: bool,
           options: dict[str, Any] | None = None) -> Iterator[Any]:
    """A lease of the given twin on ``run_id``, entered, left on the way out."""
    kwargs: dict[str, Any] = {"interval": LEASE_INTERVAL, "share": share, "connect_options": options}
    if twin == "sync":
        with Lease(dsn, worker_id, run_id, **kwargs) as lease:
            yield lease
    else:
        with AsyncDriver(dsn, worker_id, run_id, **kwargs) as driver:
            yield driver


def until(condition: Callable[[], bool], limit: float, what: str) -> float:
    """Polls ``condition`` for at most ``limit`` seconds; how long it took."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < limit, what
        time.sleep(0.05)
    return time.monotonic() - start


def written(conn: Conn, *, beats: bool = True) -> tuple[Any, ...]:
    """The rows a lease could write (runs, jobs, audit events); ``beats=False`` leaves out the
    runs' last_heartbeat_at, which a live lease's hub writes at any moment."""
    runs = ("SELECT * FROM outbound_call_runs ORDER BY id" if beats else
            "SELECT to_jsonb(r) - 'last_heartbeat_at' FROM outbound_call_runs AS r ORDER BY id")
    return tuple(
        conn.execute(query).fetchall()
        for query in (runs,
                      "SELECT * FROM outbound_call_jobs ORDER BY id",
                      "SELECT * FROM outbound_heartbeat.run_events ORDER BY id"))


# -- from test_privileges.py --------------------------------------------------


def as_role(dsn: str, role: str) -> Conn:
    conn = psycopg.connect(dsn, autocommit=True)
    conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
    return conn


def denied(conn: Conn, query: str, params: Any = None) -> bool:
    try:
        conn.execute(query, params)
    except psycopg.errors.InsufficientPrivilege:
        return True
    return False


LEASE_COLUMNS = ("locked_by_worker", "lock_ts", "last_heartbeat_at", "lease_epoch", "cancel_requested_at")


def login_dsn(dsn: str, role: str) -> str:
    return psycopg.conninfo.make_conninfo(dsn, user=role)


def refused(conn: Conn, query: str, params: Any = None) -> str | None:
    """The SQLSTATE the statement failed with, or None when it succeeded."""
    try:
        conn.execute(query, params)
    except psycopg.Error as exc:
        return exc.sqlstate
    return None


def privileges(conn: Conn, role: str) -> set[str]:
    """The role's privileges on the library's objects, as 'object PRIVILEGE' strings."""
    rows = conn.execute(
        """
        SELECT p.proname || ' EXECUTE' FROM pg_proc p
         WHERE p.pronamespace = 'outbound_heartbeat'::regnamespace
           AND has_function_privilege(%(r)s, p.oid, 'EXECUTE')
        UNION
        SELECT c.relname || ' ' || k.priv FROM pg_class c
         CROSS JOIN (VALUES ('SELECT'), ('INSERT'), ('UPDATE'), ('DELETE'), ('TRUNCATE')) k (priv)
         WHERE c.oid IN ('public.outbound_call_runs'::regclass, 'public.outbound_call_jobs'::regclass,
                         'outbound_heartbeat.run_events'::regclass, 'outbound_heartbeat.settings'::regclass,
                         'outbound_heartbeat.run_event_chain'::regclass)
           AND has_table_privilege(%(r)s, c.oid, k.priv)
        UNION
        SELECT c.relname || '.' || a.attname || ' ' || k.priv FROM pg_class c
          JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
         CROSS JOIN (VALUES ('INSERT'), ('UPDATE')) k (priv)
         WHERE c.oid IN ('public.outbound_call_runs'::regclass, 'public.outbound_call_jobs'::regclass,
                         'outbound_heartbeat.run_events'::regclass)
           AND has_column_privilege(%(r)s, c.oid, a.attnum, k.priv)
        """, {"r": role}).fetchall()
    return {r[0] for r in rows}


# -- from test_modes_outages.py -------------------------------------------------------


def wait_writable(dsn: str, limit: float = 30) -> None:
    deadline = time.monotonic() + limit
    while True:
        try:
            with psycopg.connect(dsn, autocommit=True, connect_timeout=2) as conn:
                conn.execute("SELECT outbound_heartbeat.current_settings()")
                return
        except psycopg.OperationalError:
            assert time.monotonic() < deadline, "the server never came back"
            time.sleep(0.1)


# -- from test_sqlalchemy.py --------------------------------------------------


def sqlalchemy_url(dsn: str) -> str:
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    return (f"postgresql+psycopg://{info.get('user', 'postgres')}@{info.get('host', '127.0.0.1')}"
            f":{info.get('port', 5432)}/{info['dbname']}")


# -- from test_web.py ------------------------------------------------------------


@dataclass
class Client:
    """One interface over Flask's test client and Starlette's TestClient."""

    kind: str
    raw: Any
    prefix: str
    released: list[tuple[int, int]] = field(default_factory=list)

    def call(self, method: str, path: str, business: int | None = 1) -> tuple[int, Any]:
        headers = {} if business is None else {"X-Business-Id": str(business)}
        response = getattr(self.raw, method)(self.prefix + path, headers=headers)
        body = response.get_json() if self.kind == "flask" else response.json()
        return response.status_code, body


def make_client(kind: str, dsn: str, locale: str, prefix: str = web.DEFAULT_PREFIX,
                hooks: list[Any] | web.ReleaseHooks | None = None) -> Iterator[Client]:
    """``hooks``: run after the client's own recorder (a ReleaseHooks keeps its settings)."""
    client = Client(kind, None, prefix)
    all_hooks = hooks if isinstance(hooks, web.ReleaseHooks) else web.ReleaseHooks(list(hooks or []))
    all_hooks.hooks.insert(0, lambda run_id, business_id: client.released.append((run_id, business_id)))
    if kind == "flask":
        from flask import Flask, request

        from outbound_heartbeat.contrib.flask import create_blueprint

        def flask_tenant() -> int | None:
            raw = request.headers.get("X-Business-Id")
            return int(raw) if raw else None

        with ConnectionPool(dsn, kwargs={"autocommit": True}, min_size=1, max_size=4) as pool:
            app = Flask("test")
            app.register_blueprint(create_blueprint(pool, flask_tenant, url_prefix=prefix,
                                                    locale=locale, hooks=all_hooks))
            client.raw = app.test_client()
            yield client
    else:
        from fastapi import FastAPI, Header
        from fastapi.testclient import TestClient

        from outbound_heartbeat.contrib.fastapi import create_router

        async def fastapi_tenant(x_business_id: str | None = Header(default=None)) -> int | None:
            return int(x_business_id) if x_business_id else None

        @contextlib.asynccontextmanager
        async def connect() -> AsyncIterator[psycopg.AsyncConnection[Any]]:
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                yield conn

        app = FastAPI()
        app.include_router(create_router(connect, fastapi_tenant, prefix=prefix, locale=locale,
                                         hooks=all_hooks))
        with TestClient(app) as test_client:
            client.raw = test_client
            yield client


# Calls in flight: what the kill-point and outage scenarios check (tests/e2e).

def wait_paused(w: Any, step: str) -> dict[str, Any]:
    """The line of ``step``, once the worker has stopped itself right after printing it."""
    line = w.wait_for(step, timeout=30)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{w.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
        assert time.monotonic() < deadline, f"worker never paused at {step}"
        time.sleep(0.02)
    return line


def wait_stale(conn: psycopg.Connection[Any], run_id: int, stale_after: float) -> None:
    """Polls (read-only: list_active_runs stops nothing) until the run's heartbeat is stale."""
    deadline = time.monotonic() + stale_after + 15
    while not any(r.id == run_id and r.stale for r in service.list_active_runs(conn)):
        assert time.monotonic() < deadline, "the run never went stale"
        time.sleep(0.05)


def call_jobs(conn: psycopg.Connection[Any], run_id: int) -> dict[int, dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            "SELECT id, status, payload, call_key, call_attempt, call_outcome, orphaned_at"
            " FROM outbound_call_jobs WHERE run_id = %s ORDER BY id",
            (run_id,),
        ).fetchall()
    return {r["id"]: r for r in rows}


def call_events(conn: psycopg.Connection[Any], run_id: int, job_id: int) -> list[dict[str, Any]]:
    """The audit trail's call events of one job, oldest first (event name + detail)."""
    rows = conn.execute(
        "SELECT event, detail FROM outbound_heartbeat.run_events"
        " WHERE run_id = %s AND event LIKE 'call%%' AND detail ->> 'job_id' = %s ORDER BY id",
        (run_id, str(job_id)),
    ).fetchall()
    return [{"event": e, **(d or {})} for e, d in rows]


def settled_how(events: list[dict[str, Any]]) -> str:
    """How the audit trail says the job's call ended: 'callback', 'provider', 'timeout',
    'requeued' (then how the next attempt ended), or 'worker' (finish_job alone)."""
    names = {"call_requeued": "requeued", "call_resolved": "callback",
             "call_reconciled": "provider", "call_timed_out": "timeout"}
    return " then ".join(names[e["event"]] for e in events if e["event"] in names) or "worker"


def check_invariants(
    conn: psycopg.Connection[Any], provider: Any, run_id: int, procs: list[Any]
) -> dict[int, dict[str, Any]]:
    """What holds after every scenario; the jobs, for the scenario's own checks."""
    rows = call_jobs(conn, run_id)
    # Every job ended: none left in progress for ever.
    assert {r["status"] for r in rows.values()} <= {"completed", "failed"}, rows
    # Nobody rung by two placed calls; no key dialed twice (one provider call per key).
    for r in rows.values():
        placed = [c for c in provider.calls(r["payload"]["to"]) if c.placed]
        assert len(placed) <= 1, placed
        assert all(c.dial_attempts == 1 for c in placed), placed
    # No key dialed by two processes.
    for w in procs:
        w.steps()  # every line read so far
    keys = [{s["call_key"] for s in w.seen if s["step"] == "placed"} for w in procs]
    for i, mine in enumerate(keys):
        for theirs in keys[i + 1 :]:
            assert not mine & theirs
    # A job that went out under more than one attempt did so under new keys.
    for r in rows.values():
        issued = [s["call_key"] for w in procs for s in w.seen
                  if s["step"] == "next_job" and s["job_id"] == r["id"]]
        assert len(issued) == len(set(issued)), issued
    return rows


@contextlib.contextmanager
def callback_app(dsn: str, check_connections: bool = False) -> Iterator[str]:
    """The app the fake provider's status callbacks reach: the Flask adapter on 127.0.0.1; the
    URL template names the business in its query string (the tenant) and the call key in its
    path (the credential). ``check_connections``: a pool that replaces connections an outage
    killed."""
    from flask import Flask, request
    from werkzeug.serving import make_server

    from outbound_heartbeat.contrib.flask import create_blueprint

    def tenant() -> int | None:
        raw = request.args.get("business_id")
        return int(raw) if raw else None

    check = ConnectionPool.check_connection if check_connections else None
    with ConnectionPool(dsn, kwargs={"autocommit": True}, min_size=1, max_size=4, check=check) as pool:
        app = Flask("fake-provider-callbacks")
        app.register_blueprint(create_blueprint(pool, tenant))
        server = make_server("127.0.0.1", 0, app, threaded=True)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield (
                f"http://127.0.0.1:{server.server_port}/api/outbound_calls"
                "/calls/{call_key}/status?business_id={business_id}"
            )
        finally:
            server.shutdown()
            thread.join(10)
