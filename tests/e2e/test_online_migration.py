"""Online migrations under app traffic, with an app session left idle in a transaction:

- the upgrade from release 2 (built from this repository: migrations/ up to 0002.monitoring,
  each applying its frozen copy of that release's sql/; rows in it) locks none of the app's tables: it completes while the idle session holds its locks,
  heartbeats keep answering 'ok', and the result equals a database built from sql/;
- adopting legacy tables needs ACCESS EXCLUSIVE for a moment: each attempt waits at most
  lock_timeout, so app reads and a legacy worker's writes are never held longer than one
  attempt; the migration retries (each wait reported, naming the idle session) and completes
  once the session ends, or stops with a clear message when the attempts run out;
- `outbound-heartbeat migrate` and `yoyo apply` report the same.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest

from outbound_heartbeat import cli, migrate, schema, service
from outbound_heartbeat.upgrade import LockPolicy, MigrationBlocked, apply_sql_online

from ..helpers import build_from_sql, catalog, idle_in_transaction, install_release, seed_legacy

ROOT = Path(__file__).resolve().parents[2]
#: An earlier release: the one before migration 0003 (which added columns to the app's tables).
PREVIOUS_RELEASE = "0002.monitoring"
ATTEMPT = 0.3  # seconds: the lock attempt of these tests
SLACK = 0.9  # seconds a statement may take on two busy cores, lock or no lock




class Traffic:
    """App statements in a loop on their own connections, each kind's longest wait recorded."""

    def __init__(self, dsn: str, statements: dict[str, Callable[[psycopg.Connection[Any]], Any]]) -> None:
        self.longest = dict.fromkeys(statements, 0.0)
        self.count = dict.fromkeys(statements, 0)
        self.results: dict[str, set[Any]] = {name: set() for name in statements}
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(dsn, name, fn), daemon=True)
                         for name, fn in statements.items()]

    def _loop(self, dsn: str, name: str, fn: Callable[[psycopg.Connection[Any]], Any]) -> None:
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                while not self._stop.is_set():
                    started = time.monotonic()
                    result = fn(conn)
                    self.longest[name] = max(self.longest[name], time.monotonic() - started)
                    self.count[name] += 1
                    self.results[name].add(result)
                    time.sleep(0.02)
        except BaseException as exc:  # reported by stop()
            self.errors.append(exc)

    @contextmanager
    def running(self) -> Iterator[Traffic]:
        for t in self._threads:
            t.start()
        try:
            time.sleep(0.3)
            yield self
        finally:
            self._stop.set()
            for t in self._threads:
                t.join(30)
        assert not self.errors, self.errors


def read_run(conn: psycopg.Connection[Any]) -> Any:
    row = conn.execute("SELECT status FROM outbound_call_runs ORDER BY id LIMIT 1").fetchone()
    return row[0] if row else None


def read_jobs(conn: psycopg.Connection[Any]) -> Any:
    row = conn.execute("SELECT count(*) FROM outbound_call_jobs WHERE run_id = 1").fetchone()
    return row[0] if row else None


def test_upgrade_from_previous_release_under_traffic(make_db: Any) -> None:
    """This release adds columns (the lost-answer retry key) and counting triggers to the app's
    tables. Behind an app session idle in its transaction, the upgrade waits one short attempt
    at a time (each reported) and completes once that session ends; app statements and
    heartbeats never wait longer than one attempt. A no-op re-apply behind the same kind of
    session then waits for nothing: it locks no app table."""
    dsn, reference = make_db(), make_db()
    assert install_release(dsn, PREVIOUS_RELEASE) == ["0001.install-sql", "0002.monitoring"]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE outbound_heartbeat.settings SET restart_grace = interval '0'")
        runs = [service.create_run(conn, b, [{"n": i} for i in range(50)]) for b in (1, 2, 3)]
        claim = service.claim_run(conn, "w-1", runs[0].id)
        assert claim is not None
        before = conn.execute("SELECT id, status FROM outbound_call_jobs ORDER BY id").fetchall()
    traffic = Traffic(dsn, {
        "read runs": read_run,
        "read jobs": read_jobs,
        "heartbeat": lambda c: service.heartbeat(c, runs[0].id, "w-1", claim.lease_epoch),
    })
    policy = LockPolicy(lock_timeout=ATTEMPT, attempts=40, max_pause=0.5)
    # The idle session holds ROW EXCLUSIVE on the jobs and ACCESS SHARE on the runs: any
    # ALTER TABLE or CREATE TRIGGER queues behind it.
    statement = ("UPDATE outbound_call_jobs SET updated_at = updated_at WHERE id ="
                 " (SELECT min(id) FROM outbound_call_runs)")
    with traffic.running():
        with idle_in_transaction(dsn, statement) as (idle, pid):
            ends = threading.Timer(2.0, idle.rollback)  # the app's session finally ends
            ends.start()
            try:
                report = migrate(dsn, policy)
            finally:
                ends.cancel()
        assert report.applied == ["0003.online-upgrade", "0004.guarantees-cross", "0005.call-keys-and-orphans"]
        assert report.waits and {w.attempt for w in report.waits} >= {1, 2}
        assert all(w.waited < ATTEMPT + SLACK for w in report.waits)
        assert all(str(pid) in w.holders for w in report.waits)
        with idle_in_transaction(dsn, statement), psycopg.connect(dsn, autocommit=True) as conn:
            assert apply_sql_online(conn, schema.sql_dir(), policy) == []
        time.sleep(0.3)
    assert traffic.results["heartbeat"] == {"ok"}
    for name, longest in traffic.longest.items():
        assert traffic.count[name] > 0
        assert longest < SLACK, (name, longest)
    build_from_sql(reference)
    with psycopg.connect(reference, autocommit=True) as conn:
        conn.execute("UPDATE outbound_heartbeat.settings SET restart_grace = interval '0'")
    assert catalog(dsn, include_app_tables=True) == catalog(reference, include_app_tables=True)
    with psycopg.connect(dsn, autocommit=True) as conn:
        after = conn.execute("SELECT id, status FROM outbound_call_jobs ORDER BY id").fetchall()
        assert after == before  # every row kept
        active = service.get_active_run(conn, 1)
        assert active is not None and active.status == "running" and not active.stale
        assert service.force_cancel(conn, runs[1].id).jobs_cancelled == 50


def test_legacy_adoption_waits_one_short_attempt_at_a_time(make_db: Any) -> None:
    dsn = make_db()
    seed_legacy(dsn)
    traffic = Traffic(dsn, {
        "read runs": read_run,
        "read jobs": read_jobs,
        # A legacy worker's own heartbeat: it writes lock_ts.
        "legacy heartbeat": lambda c: c.execute(
            "UPDATE outbound_call_runs SET lock_ts = now() AT TIME ZONE 'UTC'"
            " WHERE id = (SELECT min(id) FROM outbound_call_runs WHERE status = 'running')").rowcount,
    })
    with traffic.running():
        # Out of attempts: a clear stop naming the idle session, nothing of the step changed.
        with idle_in_transaction(dsn, "SELECT count(*) FROM outbound_call_runs") as (_, pid):
            started = time.monotonic()
            with pytest.raises(MigrationBlocked) as blocked:
                migrate(dsn, LockPolicy(lock_timeout=ATTEMPT, attempts=3, first_pause=0.3))
            assert time.monotonic() - started >= 3 * ATTEMPT
        message = str(blocked.value)
        assert "02_tables.sql" in message and f"pid {pid}" in message and "idle in transaction" in message
        assert [w.attempt for w in blocked.value.waits] == [1, 2, 3]
        with psycopg.connect(dsn) as conn:
            column = conn.execute("SELECT count(*) FROM pg_attribute WHERE attrelid = 'outbound_call_runs'"
                                  "::regclass AND attname = 'last_heartbeat_at'").fetchone()
            assert column == (0,)
        # Only the released migrations are recorded: without the library they do nothing.
        assert schema.status(dsn).pending == ["0005.call-keys-and-orphans"]

        # Retries until the session ends: completes, every wait reported.
        outcome: dict[str, Any] = {}
        with idle_in_transaction(dsn, "SELECT count(*) FROM outbound_call_jobs") as (idle, pid):
            worker = threading.Thread(target=lambda: outcome.update(
                report=migrate(dsn, LockPolicy(lock_timeout=ATTEMPT, attempts=40, max_pause=0.5))))
            worker.start()
            time.sleep(2.5)
            assert worker.is_alive()  # still retrying ...
            idle.commit()  # ... until the app's transaction ends
        worker.join(60)
        report = outcome["report"]
        assert report.applied == ["0005.call-keys-and-orphans"]
        assert len(report.waits) >= 3
        assert all(f"pid {pid}" in w.holders for w in report.waits[:3])
        assert all(w.waited < ATTEMPT + SLACK for w in report.waits)
    for name, longest in traffic.longest.items():
        assert traffic.count[name] > 20, name
        assert longest < ATTEMPT + SLACK, (name, longest)
    with psycopg.connect(dsn, autocommit=True) as conn:
        valid = conn.execute("SELECT count(*) FROM pg_index WHERE indisvalid AND indexrelid IN"
                             " ('outbound_call_runs_active_idx'::regclass,"
                             "  'outbound_call_jobs_open_idx'::regclass)").fetchone()
        assert valid == (2,)  # built CONCURRENTLY, valid


def test_cli_and_yoyo_report_what_they_waited_for(make_db: Any, capsys: pytest.CaptureFixture[str]) -> None:
    dsn = make_db()
    seed_legacy(dsn)
    with idle_in_transaction(dsn, "SELECT count(*) FROM outbound_call_runs") as (_, pid):
        out = io.StringIO()
        code = cli.main(["migrate", "--dsn", dsn, "--lock-timeout", "0.2", "--lock-attempts", "2"], out)
        assert code == 1
        err = capsys.readouterr().err
        assert "migration stopped at 02_tables.sql" in err and f"pid {pid}" in err

        env = {**os.environ,
               "OUTBOUND_HEARTBEAT_MIGRATE_LOCK_TIMEOUT": "0.2", "OUTBOUND_HEARTBEAT_MIGRATE_ATTEMPTS": "2"}
        done = subprocess.run(
            [str(Path(sys.executable).parent / "yoyo"), "apply", "--config", str(ROOT / "yoyo.ini"),
             "--database", schema.yoyo_url(dsn)],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode != 0
        assert "02_tables.sql: lock attempt 1 gave up" in done.stderr + done.stdout
        assert f"pid {pid}" in done.stderr + done.stdout
    out = io.StringIO()
    assert cli.main(["migrate", "--dsn", dsn], out) == 0
    assert "applied 0005.call-keys-and-orphans" in out.getvalue()
