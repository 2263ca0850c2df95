"""Calls across an outage (private servers): the server restarts, recovers from a crash, or
fails over to a promoted standby.

No call open for ever: an orphaned call that no callback settles is still failed by the sweep
once call_orphan_timeout has passed. No one rung twice: a real worker paused between next_job
and its dial across the outage, its run resumed by a new process with the same worker id and
its call requeued by reconciliation, rings no one when it wakes; the new process rings the
customer once, under a new key.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from outbound_heartbeat import service
from outbound_heartbeat.fake_provider import FakeProvider

from ..helpers import (
    both_hosts,
    call_events,
    call_jobs,
    callback_app,
    check_invariants,
    primary_and_standby,
    private_server,
    run_row,
    settled_how,
    wait_paused,
    wait_replayed,
    wait_stale,
)
from ..workers import Worker

#: The scenarios' stale_after, short: each waits for a run to go stale once.
STALE_AFTER = 2.0

@contextlib.contextmanager
def servers(outage: str) -> Iterator[tuple[str, Any]]:
    """The DSN the app starts on, and the outage to cause: it returns the DSN the app uses after."""
    with servers_and_workers_dsn(outage) as (dsn, _, cause):
        yield dsn, cause


@contextlib.contextmanager
def servers_and_workers_dsn(outage: str) -> Iterator[tuple[str, str, Any]]:
    """As :func:`servers`, with a DSN that reaches the writable server before and after the
    outage (both hosts, read-write, for a failover), for processes that live across it."""
    if outage == "failover":
        with primary_and_standby() as (primary, dsn, standby, standby_dsn):
            def fail_over() -> str:
                wait_replayed(dsn, standby_dsn)
                primary.stop("immediate")
                standby.promote()
                return standby_dsn
            yield dsn, both_hosts(dsn, standby_dsn), fail_over
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
            yield dsn, dsn, restart_or_crash


def wait_writable_primary(dsn: str, outage: str) -> None:
    """Until the server is back and accepts writes (a promoted standby may still be opening)."""
    deadline = time.monotonic() + 60
    while True:
        with contextlib.suppress(psycopg.OperationalError), psycopg.connect(
                dsn, autocommit=True, connect_timeout=5) as probe:
            if probe.execute("SELECT NOT pg_is_in_recovery()").fetchone() == (True,):
                return
        assert time.monotonic() < deadline, f"the server never came back after the {outage}"
        time.sleep(0.5)


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
        wait_writable_primary(after, outage)
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


@pytest.mark.parametrize("outage", ["restart", "crash", "failover"])
def test_no_one_is_rung_twice_across_an_outage(outage: str, tmp_path: Path) -> None:
    """A worker SIGSTOPped right after next_job (key handed out, not dialed) sleeps through the
    outage; the same worker id resumes the run on the server that is writable after it,
    reconciliation answers not_placed (voiding the old key) and requeues the call, the new
    process rings it under a new key. The old process, woken, rings no one: its old key is
    refused by the provider, then it learns its lease is lost."""
    provider = FakeProvider(tmp_path / "provider.sqlite")
    business = 7
    with servers_and_workers_dsn(outage) as (dsn, workers_dsn, cause), \
            callback_app(workers_dsn, check_connections=True) as callback_url:
        started: list[Worker] = []

        def worker(*args: str) -> Worker:
            w = Worker(workers_dsn, "--provider", provider.path, "--callback-url", callback_url,
                       *args)
            started.append(w)
            return w

        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(
                    "UPDATE outbound_heartbeat.settings SET stale_after = make_interval(secs =>"
                    " %s), call_orphan_timeout = interval '10 minutes'", (STALE_AFTER,))
                run_id = service.create_run(
                    conn, business, [{"to": f"+1202558{i:04d}"} for i in range(2)],
                    retry_unplaced=True,
                ).id
            worker_id = f"outage-{outage}"
            a = worker("--run-id", str(run_id), "--worker-id", worker_id, "--pause-at", "next_job")
            line = wait_paused(a, "next_job")
            job_id, old_key = line["job_id"], line["call_key"]

            with psycopg.connect(dsn, autocommit=True) as sentinel:
                after = cause()  # while the old worker sleeps between next_job and its dial
                # Wait until the outage has ended every session: the postmaster resets a moment
                # after a backend is killed, and a probe that got in before would be ended too.
                deadline = time.monotonic() + 30
                while True:
                    try:
                        sentinel.execute("SELECT 1")
                    except psycopg.OperationalError:
                        break
                    assert time.monotonic() < deadline, f"the {outage} ended no session"
                    time.sleep(0.05)
            wait_writable_primary(after, outage)
            with psycopg.connect(after, autocommit=True) as conn:
                # The key handed out before the outage survived it.
                assert call_jobs(conn, run_id)[job_id]["call_key"] == old_key
                wait_stale(conn, run_id, STALE_AFTER)
                b = worker("--run-id", str(run_id), "--worker-id", worker_id,
                           "--pause-at", "claimed")
                assert wait_paused(b, "claimed")["resumed"] is True  # a new epoch: orphaned
                assert call_jobs(conn, run_id)[job_id]["orphaned_at"] is not None
                service.reconcile_calls(conn, provider.reconcile)
                assert call_jobs(conn, run_id)[job_id]["status"] == "queued"  # requeued
                b.signal(signal.SIGCONT)
                assert b.wait_exit(60) == 0, (b.steps(), b.stderr_tail())
                assert run_row(conn, run_id)["status"] == "completed"

                a.signal(signal.SIGCONT)  # wakes between next_job and its dial
                voided = a.wait_for("key_voided", timeout=30)
                assert voided["call_key"] == old_key
                assert a.wait_exit(60) == 3, (a.steps(), a.stderr_tail())  # its lease is lost
                assert "placed" not in a.steps()

                rows = check_invariants(conn, provider, run_id, [a, b])
                job = rows[job_id]
                assert {r["status"] for r in rows.values()} == {"completed"}
                assert job["call_key"] != old_key and job["call_attempt"] >= 2
                # The customer's only call is the new key's, placed by the new process.
                assert [(c.call_key, c.placed) for c in provider.calls(job["payload"]["to"])] == [
                    (job["call_key"], True)]
                assert any(s["step"] == "placed" and s["call_key"] == job["call_key"]
                           for s in b.seen)
                old = provider.lookup(old_key)
                assert old is not None and old.status == "voided"
                assert settled_how(call_events(conn, run_id, job_id)) == "requeued then callback"
        finally:
            for w in started:
                if w.proc.poll() is None:
                    w.signal(signal.SIGCONT)
                w.close()
