"""docs/scheduling.md's recipe, for real: on a private cluster with pg_cron in
shared_preload_libraries, an operator role made by grant_dba_role() schedules the jobs as
itself, the scheduled sweep reclaims a stale run with no worker alive and the scheduled prune
deletes events past retention. Needs the postgresql-15-cron package (.ci/run
installs it); without it the cluster does not start and this test fails."""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest

from outbound_heartbeat import service

from ..helpers import TEST_SETTINGS, backdate_heartbeat, private_server
from ..helpers import old_events as write_old_events

CRON_SETTINGS = {
    "shared_preload_libraries": "pg_cron",
    "cron.database_name": "app",
    # Jobs run in background workers: no libpq connection, so no password or pg_hba entry.
    "cron.use_background_workers": "on",
    "max_worker_processes": "16",
}

# slow: the scheduler is real time. pg_cron before 1.5 (Debian's for PostgreSQL 15 is 1.4)
# runs a job once a minute at the earliest, so the sweep comes up to a minute after the setup.
pytestmark = [pytest.mark.needs("pg_cron"), pytest.mark.slow]


def every_few_seconds(conn: psycopg.Connection[Any]) -> str:
    """The shortest schedule the installed pg_cron accepts: '[1-59] seconds' from 1.5 on,
    otherwise once a minute."""
    row = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'pg_cron'").fetchone()
    assert row is not None
    major, minor = (int(p) for p in row[0].split("-")[0].split(".")[:2])
    return "2 seconds" if (major, minor) >= (1, 5) else "* * * * *"


def test_pg_cron_heals_a_queue_with_no_worker_alive() -> None:
    with private_server(**CRON_SETTINGS) as (_cluster, dsn), psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(TEST_SETTINGS)
        # The recipe of docs/scheduling.md, as written: the extension, then the operator role.
        conn.execute("CREATE EXTENSION pg_cron")
        conn.execute("CREATE ROLE queue_ops LOGIN")
        conn.execute("SELECT outbound_heartbeat.grant_dba_role('queue_ops')")
        schedule = every_few_seconds(conn)
        with psycopg.connect(psycopg.conninfo.make_conninfo(dsn, user="queue_ops"), autocommit=True) as ops:
            ops.execute("SELECT cron.schedule('outbound-heartbeat-sweep', %s,"
                        " 'SELECT count(*) FROM outbound_heartbeat.cleanup_stuck_runs()')", (schedule,))
            ops.execute("SELECT cron.schedule('outbound-heartbeat-prune', %s,"
                        " 'SELECT outbound_heartbeat.prune_events(10000, 10)')", (schedule,))
        jobs_of = conn.execute("SELECT DISTINCT username FROM cron.job").fetchall()
        assert jobs_of == [("queue_ops",)]  # the jobs run as the operator, not as a superuser

        # A worker claimed a run, dialed one job and died: nobody is left to poll or sweep.
        run = service.create_run(conn, 1, [{}, {}, {}])
        claim = service.claim_run(conn, "dead-worker", run.id)
        assert claim is not None
        assert service.next_job(conn, run.id, "dead-worker", claim.lease_epoch) is not None
        backdate_heartbeat(conn, run.id, 3600)
        write_old_events(conn, run.id, 1, ["note"])  # a year old: the prune job deletes it

        deadline = time.monotonic() + 150
        status = old_events = None
        while time.monotonic() < deadline:
            row = conn.execute("SELECT status FROM outbound_call_runs WHERE id = %s", (run.id,)).fetchone()
            status = row[0] if row else None
            count = conn.execute("SELECT count(*) FROM outbound_heartbeat.run_events"
                                 " WHERE created_at < now() - interval '1 day'").fetchone()
            old_events = count[0] if count else None
            if status == "stopped" and old_events == 0:
                break
            time.sleep(0.5)
        details = conn.execute("SELECT command, status, return_message, username FROM cron.job_run_details"
                               " ORDER BY runid").fetchall()
        assert status == "stopped", details
        assert old_events == 0, details
        jobs = dict(conn.execute("SELECT status, count(*) FROM outbound_call_jobs WHERE run_id = %s"
                                 " GROUP BY status", (run.id,)).fetchall())
        assert jobs == {"failed": 2, "in_progress": 1}  # nothing lost: the dialed job is left alone
        reclaims = conn.execute("SELECT event, detail->>'reason' FROM outbound_heartbeat.run_events"
                                " WHERE run_id = %s AND event = 'cleaned_up'", (run.id,)).fetchall()
        assert reclaims == [("cleaned_up", "stale_heartbeat")]
        assert all(d[1] == "succeeded" and d[3] == "queue_ops" for d in details), details
