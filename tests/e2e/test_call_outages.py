"""No call open for ever, across an outage: an orphaned call that no callback settles is still
failed by the sweep once call_orphan_timeout has passed, after the server restarted, recovered
from a crash, or failed over to a promoted standby (private servers)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from outbound_heartbeat import service

from ..helpers import primary_and_standby, private_server, wait_replayed


@contextlib.contextmanager
def servers(outage: str) -> Iterator[tuple[str, Any]]:
    """The DSN the app starts on, and the outage to cause: it returns the DSN the app uses after."""
    if outage == "failover":
        with primary_and_standby() as (primary, dsn, standby, standby_dsn):
            def fail_over() -> str:
                wait_replayed(dsn, standby_dsn)
                primary.stop("immediate")
                standby.promote()
                return standby_dsn
            yield dsn, fail_over
    else:
        # Commits flushed at once: a crash must not take the last ones with it (the suite's
        # servers run with synchronous_commit off).
        with private_server(synchronous_commit="on") as (cluster, dsn):
            def restart_or_crash() -> str:
                if outage == "restart":
                    cluster.restart()
                else:
                    cluster.crash_backend()
                return dsn
            yield dsn, restart_or_crash


@pytest.mark.parametrize("outage", ["restart", "crash", "failover"])
def test_an_orphan_is_timed_out_after_an_outage(outage: str) -> None:
    with servers(outage) as (dsn, cause):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("UPDATE outbound_heartbeat.settings SET call_orphan_timeout = interval '2 seconds'")
            run = service.create_run(conn, 1, [{"n": i} for i in range(2)])
            claim = service.claim_run(conn, "w", run.id)
            assert claim is not None
            job = service.next_job(conn, run.id, "w", claim.lease_epoch)
            assert job is not None
            service.force_cancel(conn, run.id)  # the call in flight is orphaned
        after = cause()
        deadline = time.monotonic() + 60
        while True:  # the server may still be recovering, a promoted standby opening for writes
            with contextlib.suppress(psycopg.OperationalError), psycopg.connect(
                    after, autocommit=True, connect_timeout=5) as probe:
                if probe.execute("SELECT NOT pg_is_in_recovery()").fetchone() == (True,):
                    break
            assert time.monotonic() < deadline, f"the server never came back after the {outage}"
            time.sleep(0.5)
        with psycopg.connect(after, autocommit=True) as conn:
            orphaned = conn.execute(
                "SELECT job_id, orphan_reason FROM outbound_heartbeat.orphaned_calls").fetchall()
            assert orphaned == [(job.id, "run force-cancelled")]  # the mark survived the outage
            time.sleep(2.1)  # past call_orphan_timeout, counted from orphaned_at
            service.cleanup_stuck_runs(conn)
            service.cleanup_stuck_runs(conn)
            row = conn.execute("SELECT status, call_outcome FROM outbound_call_jobs WHERE id = %s",
                               (job.id,)).fetchone()
            events = conn.execute(
                "SELECT event FROM outbound_heartbeat.run_events WHERE run_id = %s"
                " AND event IN ('call_resolved', 'call_timed_out')", (run.id,)).fetchall()
        assert row == ("failed", "timed_out")
        assert events == [("call_timed_out",)]  # failed once
