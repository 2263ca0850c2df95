"""Retries and races at the end of a lease (docs/worker-lease.md), with real workers:

- a lost answer to next_job (the server committed, the answer never arrived; a TCP proxy
  swallows it and resets the connection): the lease re-sends the call with the same retry key
  and gets the job the lost call took, so every job is dialed and none stays in_progress unseen;
- the empty-run rule completing a run between the worker's last job and its next call: the
  worker ends as success (Lease, AsyncLease, and exit 0 for the example worker)."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import psycopg
import pytest

from outbound_heartbeat import service
from outbound_heartbeat.lease import Lease
from outbound_heartbeat.lease_async import AsyncLease

from ..helpers import events, job_statuses, run_row
from ..proxy import proxy_for
from ..workers import Worker

MODES = ["sync", "async"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.direct_only
def test_lost_answer_to_next_job_strands_no_job(
    dsn: str, conn: psycopg.Connection[Any], mode: str
) -> None:
    run = service.create_run(conn, 1, [{"n": i} for i in range(6)])
    with proxy_for(dsn) as (proxy, worker_dsn):
        # The second next_job's answer is lost after the server has committed it.
        proxy.drop_answer_to(b"outbound_heartbeat.next_job", nth=2)
        worker = Worker(worker_dsn, "--run-id", str(run.id), "--mode", mode,
                        "--dial-seconds", "0.05", "--worker-id", f"lossy-{mode}")
        try:
            worker.wait_for("released", timeout=60)
            code = worker.wait_exit(10)
            assert code == 0, (worker.steps(), worker.stderr_tail())
            assert proxy.dropped == 1  # exactly one answer was lost, and the call was retried
            assert "work connection failed" in worker.stderr_tail()
        finally:
            worker.close()
    dialed = [s["job_id"] for s in worker.seen if s["step"] == "dialing"]
    statuses = job_statuses(conn, run.id)
    assert sorted(dialed) == sorted(statuses), "a job was never seen by the dial loop"
    assert len(dialed) == len(set(dialed))  # and none was dialed twice
    assert set(statuses.values()) == {"completed"}
    assert run_row(conn, run.id)["status"] == "completed"


def finish_then_sweep_sync(dsn: str, conn: psycopg.Connection[Any], run_id: int) -> Lease:
    with Lease(dsn, "last-job", run_id, interval=1.0) as lease:
        job = lease.next_job()
        assert job is not None
        lease.finish_job(job)
        # The sweep sees a running run with nothing left: the empty-run rule completes it.
        swept = service.cleanup_stuck_runs(conn)
        assert [(r.run_id, r.reason) for r in swept] == [(run_id, "empty")]
        assert lease.next_job() is None
    return lease


async def finish_then_sweep_async(
    dsn: str, conn: psycopg.Connection[Any], run_id: int
) -> AsyncLease:
    async with AsyncLease(dsn, "last-job", run_id, interval=1.0) as lease:
        job = await lease.next_job()
        assert job is not None
        await lease.finish_job(job)
        swept = service.cleanup_stuck_runs(conn)
        assert [(r.run_id, r.reason) for r in swept] == [(run_id, "empty")]
        assert await lease.next_job() is None
    return lease


@pytest.mark.parametrize("mode", MODES)
def test_run_completed_by_the_empty_rule_is_success(
    dsn: str, conn: psycopg.Connection[Any], mode: str
) -> None:
    run = service.create_run(conn, 1, [{}])
    if mode == "sync":
        lease: Any = finish_then_sweep_sync(dsn, conn, run.id)
    else:
        lease = asyncio.run(finish_then_sweep_async(dsn, conn, run.id))
    assert not lease.lost and lease.completed
    assert run_row(conn, run.id)["status"] == "completed"
    assert events(conn, run.id) == ["created", "claimed", "cleaned_up"]  # no second ending


@pytest.mark.parametrize("mode", MODES)
def test_example_worker_exits_0_when_the_sweep_completed_its_run(
    conn: psycopg.Connection[Any], dsn: str, mode: str
) -> None:
    run = service.create_run(conn, 1, [{}])
    worker = Worker(dsn, "--run-id", str(run.id), "--mode", mode, "--dial-seconds", "5")
    try:
        job_id = worker.wait_for("dialing")["job_id"]
        # While it dials, the app's status callback records the call's end, and a sweep finds
        # the run with nothing queued or in progress: completed under the worker's lease.
        conn.execute("UPDATE outbound_call_jobs SET status = 'completed' WHERE id = %s", (job_id,))
        swept = service.cleanup_stuck_runs(conn)
        assert [(r.run_id, r.reason) for r in swept] == [(run.id, "empty")]
        assert worker.wait_exit(30) == 0, (worker.steps(), worker.stderr_tail())
        steps = worker.steps()
        assert "dialed" in steps and steps[-1] == "released" and worker.seen[-1]["lost"] is False
    finally:
        worker.close()
    assert run_row(conn, run.id)["status"] == "completed"
    assert job_statuses(conn, run.id) == {job_id: "completed"}


def test_lease_without_a_name_gets_one_unique_to_the_process(
    dsn: str, conn: psycopg.Connection[Any]
) -> None:
    first = service.create_run(conn, 1, [])
    second = service.create_run(conn, 2, [])
    with Lease(dsn, run_id=first.id, interval=1.0) as a:
        async_lease = AsyncLease(dsn, run_id=second.id, interval=1.0)
        assert a.worker_id != async_lease.worker_id
        assert a.worker_id.startswith("dialer-") and f"-{os.getpid()}-" in a.worker_id
        assert run_row(conn, first.id)["locked_by_worker"] == a.worker_id
    assert run_row(conn, first.id)["status"] == "completed"
