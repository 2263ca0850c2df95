"""A killed migration never blocks the next one: yoyo's lock row left by a migrate() whose
server session is gone is removed by the next migrate() (which says so); a lock nobody can
vouch for (a killed ``yoyo apply``) makes the CLI say in one line what to run, and
``migrate --break-lock`` runs it."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from outbound_heartbeat import cli, migrate, schema
from outbound_heartbeat.schema import MigrationLocked
from outbound_heartbeat.testing import Server
from outbound_heartbeat.upgrade import LockPolicy

from ..helpers import idle_in_transaction, seed_legacy

MIGRATE_FOREVER = """
import sys
from outbound_heartbeat import migrate
from outbound_heartbeat.upgrade import LockPolicy
migrate(sys.argv[1], LockPolicy(lock_timeout=0.3, attempts=1000, max_pause=0.3))
"""


def lock_rows(dsn: str) -> list[Any]:
    with psycopg.connect(dsn) as conn:
        if conn.execute("SELECT to_regclass('public.yoyo_lock')").fetchone() == (None,):
            return []  # not made yet
        return conn.execute("SELECT pid, ctime FROM yoyo_lock").fetchall()


def wait_for(predicate: Any, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture
def legacy_dsn(pg_server: Server) -> Iterator[str]:
    dsn = pg_server.create_database()
    seed_legacy(dsn)
    yield dsn
    pg_server.drop_database(str(psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]))


def test_a_killed_migration_does_not_block_the_next(legacy_dsn: str) -> None:
    dsn = legacy_dsn
    # The app holds its table: the migration retries 02_tables.sql, holding yoyo's lock.
    with idle_in_transaction(dsn, "SELECT count(*) FROM outbound_call_runs") as (idle, _):
        child = subprocess.Popen([sys.executable, "-c", MIGRATE_FOREVER, dsn])
        try:
            wait_for(lambda: bool(lock_rows(dsn)))
            time.sleep(1.0)  # a few attempts in
            assert child.poll() is None
            os.kill(child.pid, signal.SIGKILL)
            child.wait(10)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait(10)
        assert len(lock_rows(dsn)) == 1  # the dead migration's lock stays behind
        idle.commit()

    started = time.monotonic()
    report = migrate(dsn)
    took = time.monotonic() - started
    # The released migrations (nothing to do without the library) were recorded before the kill.
    assert report.applied == ["0005.call-keys-and-orphans"]
    assert len(report.notes) == 1 and "is gone" in report.notes[0], report.notes
    assert took < 8.0, took  # not yoyo's 10 s lock wait, and no LockTimeout
    assert lock_rows(dsn) == []
    assert migrate(dsn).notes == []


def test_a_live_migration_is_waited_for_never_broken(legacy_dsn: str) -> None:
    dsn = legacy_dsn
    with idle_in_transaction(dsn, "SELECT count(*) FROM outbound_call_runs") as (idle, _):
        child = subprocess.Popen([sys.executable, "-c", MIGRATE_FOREVER, dsn])
        try:
            wait_for(lambda: bool(lock_rows(dsn)))
            with pytest.raises(MigrationLocked) as locked:
                migrate(dsn, LockPolicy(migration_lock_wait=1.5))
            assert "still connected: wait for it to end" in str(locked.value)
            assert "pg_terminate_backend(" in str(locked.value), locked.value
            assert child.poll() is None and len(lock_rows(dsn)) == 1
            idle.commit()
            assert child.wait(60) == 0  # it went on and finished
        finally:
            if child.poll() is None:
                child.kill()
                child.wait(10)
    assert lock_rows(dsn) == [] and schema.status(dsn).pending == []


def test_cli_says_in_one_line_what_to_run_then_runs_it(
        legacy_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    dsn = legacy_dsn
    schema.status(dsn)  # yoyo creates its lock table
    with psycopg.connect(dsn, autocommit=True) as conn:
        # What a `yoyo apply` killed mid-way leaves: its process id, which nobody can check.
        conn.execute("INSERT INTO yoyo_lock (locked, ctime, pid) VALUES"
                     " (1, now() AT TIME ZONE 'UTC', 4242)")
    out = io.StringIO()
    assert cli.main(["migrate", "--dsn", dsn, "--lock-wait", "1"], out) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "held by process 4242" in err and "outbound-heartbeat migrate --break-lock" in err

    assert cli.main(["migrate", "--dsn", dsn, "--break-lock"], out) == 0
    assert "removed the migration lock of process 4242" in out.getvalue()
    assert lock_rows(dsn) == []
    assert cli.main(["migrate", "--dsn", dsn], out) == 0
    assert "applied 0003.online-upgrade" in out.getvalue()
