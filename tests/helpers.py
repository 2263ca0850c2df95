"""Small helpers shared by the tests: they read and backdate rows, never reimplement a rule."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row

from outbound_heartbeat import migrate, schema, testing
from outbound_heartbeat.upgrade import apply_sql_online

TEST_SETTINGS = "UPDATE outbound_heartbeat.settings SET restart_grace = interval '0'"

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
