"""Races on real threads, each with its own connection: exactly one transition wins and the
others see its result. The threads start together behind a barrier to maximise contention."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

import psycopg
import pytest

from outbound_heartbeat import service

from ..helpers import (
    audit_job_failures,
    backdate_heartbeat,
    events,
    job_statuses,
    jobs_failed_more_than_once,
    run_row,
)

Conn = psycopg.Connection[Any]


def race(dsn: str, tasks: list[Any]) -> list[Any]:
    """Runs each task(conn) on its own thread and connection at the same instant."""
    barrier = threading.Barrier(len(tasks))
    results: list[Any] = [None] * len(tasks)

    def run(i: int) -> None:
        with psycopg.connect(dsn, autocommit=True) as c:
            barrier.wait()
            try:
                results[i] = tasks[i](c)
            except Exception as exc:  # collected and asserted on by the caller
                results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(tasks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
        assert not t.is_alive()
    return results


def test_twenty_concurrent_force_cancels_make_one_transition(conn: Conn, dsn: str) -> None:
    run = service.create_run(conn, 1, [{} for _ in range(50)])
    claim = service.claim_run(conn, "w1", run.id)
    assert claim is not None
    results = race(dsn, [lambda c: service.force_cancel(c, run.id, 1) for _ in range(20)])
    assert not [r for r in results if isinstance(r, Exception)]
    counts = sorted(r.jobs_cancelled for r in results)
    assert counts == [0] * 19 + [50]
    assert Counter(r.status for r in results) == {"cancelled": 20}
    assert events(conn, run.id).count("force_cancelled") == 1
    assert run_row(conn, run.id)["lease_epoch"] == claim.lease_epoch + 1


def test_concurrent_stale_readers_stop_once(conn: Conn, dsn: str) -> None:
    claim = service.claim_run(conn, "w1", service.create_run(conn, 1, [{}, {}, {}]).id)
    assert claim is not None
    audit_job_failures(conn)
    backdate_heartbeat(conn, claim.run_id, 40)
    results = race(
        dsn,
        [lambda c: service.get_active_run(c, 1) for _ in range(10)]
        + [lambda c: service.cleanup_stuck_runs(c) for _ in range(5)],
    )
    assert not [r for r in results if isinstance(r, Exception)]
    assert all(r is None for r in results[:10])
    assert sum(len(r) for r in results[10:]) <= 1
    evs = events(conn, claim.run_id)
    assert evs.count("stale_stopped") + evs.count("cleaned_up") == 1
    assert jobs_failed_more_than_once(conn) == []


@pytest.mark.parametrize("stale", [False, True])
def test_claim_vs_force_cancel_vs_reader_100_rounds(conn: Conn, dsn: str, stale: bool) -> None:
    audit_job_failures(conn)
    for round_no in range(50):
        business = round_no + 1
        run = service.create_run(conn, business, [{} for _ in range(5)])
        if stale:
            first = service.claim_run(conn, f"old-{round_no}", run.id)
            assert first is not None
            backdate_heartbeat(conn, run.id, 45)
        worker = f"old-{round_no}" if stale else f"w-{round_no}"
        claim_r, cancel_r, read_r = race(
            dsn,
            [
                lambda c, w=worker, r=run.id: service.claim_run(c, w, r),
                lambda c, r=run.id, b=business: service.force_cancel(c, r, b),
                lambda c, b=business: service.get_active_run(c, b),
            ],
        )
        for r in (claim_r, cancel_r, read_r):
            assert not isinstance(r, Exception), r
        row = run_row(conn, run.id)
        evs = events(conn, run.id)
        terminal = [e for e in evs if e in ("force_cancelled", "stale_stopped")]
        assert len(terminal) == 1, evs  # exactly one ending
        assert row["status"] in ("cancelled", "stopped")
        assert row["locked_by_worker"] is None
        if cancel_r.jobs_cancelled:
            assert row["status"] == "cancelled"
        if claim_r is not None:
            # The claimer got a lease that the later ending revoked: its writes are refused.
            assert service.heartbeat(conn, run.id, worker, claim_r.lease_epoch) == "lost"
        assert set(job_statuses(conn, run.id).values()) == {"failed"}
        # Every claim and the one ending bumped the epoch, nothing else did.
        claims = [e for e in evs if e in ("claimed", "resumed")]
        assert row["lease_epoch"] == len(claims) + 1
    assert jobs_failed_more_than_once(conn) == []


def test_claims_race_for_pending_runs_each_once(conn: Conn, dsn: str) -> None:
    for b in range(10):
        service.create_run(conn, b, [{}])
    results = race(dsn, [lambda c, i=i: service.claim_run(c, f"w{i}") for i in range(16)])
    won = [r for r in results if r is not None]
    assert not [r for r in won if isinstance(r, Exception)]
    assert len(won) == 10 and len({r.run_id for r in won}) == 10
