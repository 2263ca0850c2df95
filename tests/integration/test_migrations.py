"""Migrations: on an empty database, on the app's legacy tables (a legacy migration
that added last_heartbeat_at as TIMESTAMP, under non-UTC session time zones), applied twice,
through `yoyo apply` and migrate(); and a database built by them equals one built straight
from sql/."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest

from outbound_heartbeat import cli, migrate, schema, service

from ..helpers import TEST_SETTINGS, build_from_sql, catalog, job_statuses, run_row, seed_legacy

ROOT = Path(__file__).resolve().parents[2]


def table_dump(conn: psycopg.Connection[Any], table: str) -> list[Any]:
    return conn.execute(f"SELECT * FROM {table} ORDER BY id").fetchall()


def test_migrated_equals_built_from_sql(make_db: Any) -> None:
    from_sql, migrated, legacy = make_db(), make_db(), make_db()
    build_from_sql(from_sql)
    assert migrate(migrated).applied == ["0001.install-sql", "0002.monitoring", "0003.online-upgrade",
                                         "0004.guarantees-cross", "0005.call-keys-and-orphans"]
    seed_legacy(legacy)
    migrate(legacy)
    reference = catalog(from_sql, include_app_tables=True)
    assert reference["functions"] and reference["types"]
    assert catalog(migrated, include_app_tables=True) == reference
    legacy_snap = catalog(legacy, include_app_tables=False)
    assert legacy_snap == {k: v for k, v in reference.items() if k != "app_tables"}


def test_yoyo_cli_installs_the_same_as_migrate(make_db: Any) -> None:
    by_cli, by_python = make_db(), make_db()
    env = dict(os.environ)
    done = subprocess.run(
        [str(Path(sys.executable).parent / "yoyo"), "apply", "--config", str(ROOT / "yoyo.ini"),
         "--database", schema.yoyo_url(by_cli)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    migrate(by_python)
    assert catalog(by_cli, include_app_tables=True) == catalog(by_python, include_app_tables=True)
    assert migrate(by_cli).applied == []  # yoyo's history is shared with migrate()


def test_migrate_twice_changes_nothing(make_db: Any) -> None:
    dsn = make_db()
    seed_legacy(dsn)
    migrate(dsn)
    with psycopg.connect(dsn) as conn:
        before = (table_dump(conn, "outbound_call_runs"), table_dump(conn, "outbound_call_jobs"))
        cat = catalog(dsn, include_app_tables=True)
    build_from_sql(dsn)  # re-running every sql/ file is a no-op too
    assert migrate(dsn).applied == []
    with psycopg.connect(dsn) as conn:
        after = (table_dump(conn, "outbound_call_runs"), table_dump(conn, "outbound_call_jobs"))
    assert after == before
    assert catalog(dsn, include_app_tables=True) == cat


@pytest.mark.parametrize("timezone", ["Asia/Jerusalem", "America/Los_Angeles"])
def test_legacy_tables_keep_rows_and_detect_by_utc(make_db: Any, timezone: str) -> None:
    dsn = make_db()
    dbname = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    ids = seed_legacy(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            psycopg.sql.SQL("ALTER DATABASE {} SET TimeZone = {}").format(
                psycopg.sql.Identifier(str(dbname)), psycopg.sql.Literal(timezone)
            )
        )
        before_runs = table_dump(conn, "outbound_call_runs")
        before_jobs = table_dump(conn, "outbound_call_jobs")
    migrate(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("SHOW TimeZone").fetchone() == (timezone,)
        conn.execute(TEST_SETTINGS)
        runs = table_dump(conn, "outbound_call_runs")
        jobs = table_dump(conn, "outbound_call_jobs")
        # Every row and every app column survived, values unchanged (new columns appended).
        assert [r[: len(before_runs[0])] for r in runs] == before_runs
        assert [j[: len(before_jobs[0])] for j in jobs] == before_jobs
        types = dict(
            conn.execute(
                "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute"
                " WHERE attrelid = 'outbound_call_runs'::regclass AND attnum > 0"
            ).fetchall()
        )
        assert types["lock_ts"] == "timestamp without time zone"
        assert types["last_heartbeat_at"] == "timestamp with time zone"
        # Migration 114: heartbeat initialised from lock_ts (as UTC) for running and pending runs.
        ages = dict(
            conn.execute(
                "SELECT business_id, extract(epoch FROM now() - last_heartbeat_at)::int"
                " FROM outbound_call_runs"
            ).fetchall()
        )
        assert 5 <= ages[1] <= 60, ages
        assert 590 <= ages[2] <= 700, ages
        assert ages[3] is not None and ages[4] is None

        fresh = service.get_active_run(conn, 1)
        assert fresh is not None and fresh.id == ids[1] and not fresh.stale
        assert service.get_active_run(conn, 2) is None
        assert run_row(conn, ids[2])["status"] == "stopped"
        assert sorted(job_statuses(conn, ids[2]).values()) == ["failed", "failed", "in_progress"]
        pending = service.get_active_run(conn, 3)
        assert pending is not None and pending.status == "pending"
        # The worker of the legacy app can carry on: its jobs flow through the API. Its name
        # resumes the run once the old process is dead (stale), never while it may be alive.
        assert service.claim_run(conn, "w-fresh", ids[1]) is None
        conn.execute("UPDATE outbound_call_runs SET last_heartbeat_at = now() - interval '31 s'"
                     " WHERE id = %s", (ids[1],))
        claim = service.claim_run(conn, "w-fresh")
        assert claim is not None and claim.run_id == ids[1] and claim.resumed
        job = service.next_job(conn, ids[1], "w-fresh", claim.lease_epoch)
        assert job is not None and job.business_id == 1
        assert (
            service.finish_job(conn, job.id, "w-fresh", claim.lease_epoch, "completed").outcome
            == "finished"
        )
        naive = conn.execute(
            "SELECT lock_ts FROM outbound_call_runs WHERE id = %s", (ids[1],)
        ).fetchone()
        utc_now = conn.execute("SELECT now() AT TIME ZONE 'UTC'").fetchone()
        assert naive is not None and utc_now is not None
        assert abs((utc_now[0] - naive[0]).total_seconds()) < 60  # written as UTC, not local


def test_seeds_own_naive_heartbeat_column_stays_utc(make_db: Any) -> None:
    """An app's legacy migration added last_heartbeat_at as TIMESTAMP (naive, written with
    utcnow()). The library keeps the column and reads and writes it as UTC, whatever the
    session's time zone, on heartbeat()'s fast path as everywhere else."""
    dsn = make_db()
    dbname = str(psycopg.conninfo.conninfo_to_dict(dsn)["dbname"])
    ids = seed_legacy(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE outbound_call_runs ADD COLUMN last_heartbeat_at timestamp")
        conn.execute("UPDATE outbound_call_runs SET last_heartbeat_at = lock_ts WHERE status = 'running'")
        conn.execute(psycopg.sql.SQL("ALTER DATABASE {} SET TimeZone = 'Asia/Jerusalem'").format(
            psycopg.sql.Identifier(dbname)))
    migrate(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("SHOW TimeZone").fetchone() == ("Asia/Jerusalem",)
        conn.execute(TEST_SETTINGS)
        # The 10 s old run of business 1 is resumed by its worker's name once stale.
        conn.execute("UPDATE outbound_call_runs SET last_heartbeat_at = last_heartbeat_at"
                     " - interval '31 seconds' WHERE id = %s", (ids[1],))
        claim = service.claim_run(conn, "w-fresh")
        assert claim is not None and claim.run_id == ids[1]
        for _ in range(3):
            assert service.heartbeat(conn, ids[1], "w-fresh", claim.lease_epoch) == "ok"
        naive = conn.execute("SELECT last_heartbeat_at, now() AT TIME ZONE 'UTC' FROM outbound_call_runs"
                             " WHERE id = %s", (ids[1],)).fetchone()
        assert naive is not None and abs((naive[1] - naive[0]).total_seconds()) < 5  # UTC, not local
        active = service.get_active_run(conn, 1)
        assert active is not None and not active.stale and active.heartbeat_age is not None
        assert active.heartbeat_age.total_seconds() < 5
        conn.execute("UPDATE outbound_call_runs SET last_heartbeat_at = last_heartbeat_at - interval '31 seconds'"
                     " WHERE id = %s", (ids[1],))
        assert service.heartbeat(conn, ids[1], "w-fresh", claim.lease_epoch) == "lost"
        assert run_row(conn, ids[1])["status"] == "stopped"


def test_migrate_accepts_both_url_forms(make_db: Any) -> None:
    plain = make_db()
    params = psycopg.conninfo.conninfo_to_dict(plain)
    url = (f"postgresql+psycopg://{params.get('user') or 'postgres'}@{params['host']}:"
           f"{params['port']}/{params['dbname']}")
    assert migrate(url).applied[:1] == ["0001.install-sql"]
    assert migrate(plain).applied == []  # the same database, by its libpq DSN
    assert cli.main(["status", "--dsn", url], out=io.StringIO()) == 0
