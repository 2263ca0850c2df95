"""Retry without calling twice, with real worker processes dialing through the fake provider
(outbound_heartbeat.fake_provider) and its status callbacks reaching a real HTTP app.

A worker stops itself (SIGSTOP, tests/stalling_worker.py ``--pause-at``) at each point of a call
and is SIGKILLed there: after next_job, before dialing; after the provider placed the call,
before it ended; after the call ended, before its callback reached the app; after the callback,
before finish_job; after finish_job, before the next next_job. Its run is then stale-stopped by
a reader, or resumed by a new process with the same worker id (the case where a requeued call is
dialed again); the provider's reconcile hook and its callbacks settle the orphaned call; with
the retry opt-in on and off. Every job ends completed or failed, nobody is rung by two placed
calls, no key is dialed by two processes, a requeued call goes out under a new key, and the
audit trail says how each call was settled.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from outbound_heartbeat import service
from outbound_heartbeat.fake_provider import FakeProvider

from ..helpers import (
    call_events,
    call_jobs,
    callback_app,
    check_invariants,
    run_row,
    settled_how,
    wait_paused,
    wait_stale,
)
from ..workers import Worker

STALE_AFTER = 2.0
BUSINESS = 7
JOBS = 3
POINTS = ["next_job", "placed", "call_ended", "callback", "finish_job"]


@pytest.fixture
def fast(conn: psycopg.Connection[Any]) -> psycopg.Connection[Any]:
    conn.execute(
        "UPDATE outbound_heartbeat.settings SET stale_after = make_interval(secs => %s),"
        " call_orphan_timeout = interval '10 minutes'",
        (STALE_AFTER,),
    )
    return conn


@pytest.fixture
def callback_url(dsn: str) -> Iterator[str]:
    with callback_app(dsn) as url:
        yield url


@pytest.fixture
def provider(tmp_path: Path) -> FakeProvider:
    return FakeProvider(tmp_path / "provider.sqlite")


@pytest.fixture
def workers(dsn: str, provider: FakeProvider, callback_url: str) -> Iterator[Any]:
    started: list[Worker] = []

    def start(*args: str) -> Worker:
        w = Worker(dsn, "--provider", provider.path, "--callback-url", callback_url, *args)
        started.append(w)
        return w

    yield start
    for w in started:
        if w.proc.poll() is None:
            w.signal(signal.SIGCONT)
        w.close()


def reconcile(conn: psycopg.Connection[Any], provider: FakeProvider) -> Any:
    return service.reconcile_calls(conn, provider.reconcile)


# What each kill point's call ends as, (status, how), by retry opt-in and recovery.
def expected(point: str, retry: bool, recovery: str) -> tuple[str, str]:
    if point == "next_job":
        if retry and recovery == "resume":
            return "completed", "requeued then callback"
        return "failed", "provider"
    if point == "placed":
        return "completed", "callback"
    if point == "call_ended":
        return "completed", "provider"
    return "completed", "callback"


@pytest.mark.parametrize("recovery", ["stale", "resume"])
@pytest.mark.parametrize("retry", [False, True], ids=["no_retry", "retry"])
@pytest.mark.parametrize("point", POINTS)
def test_kill_point(
    fast: psycopg.Connection[Any],
    provider: FakeProvider,
    workers: Callable[..., Worker],
    point: str,
    retry: bool,
    recovery: str,
) -> None:
    run_id = service.create_run(
        fast, BUSINESS, [{"to": f"+1202555{i:04d}"} for i in range(JOBS)], retry_unplaced=retry
    ).id
    worker_id = f"kp-{point}-{retry}-{recovery}"
    a = workers("--run-id", str(run_id), "--worker-id", worker_id, "--pause-at", point)
    job_id = wait_paused(a, point)["job_id"]
    first_key = next(s["call_key"] for s in a.seen if s["step"] == "next_job")
    a.signal(signal.SIGKILL)
    a.wait_exit(10)
    procs = [a]

    wait_stale(fast, run_id, STALE_AFTER)
    if recovery == "stale":
        # A reader (the web app's active endpoint) stops the stale run: its call is orphaned.
        assert service.get_active_run(fast, BUSINESS) is None
        assert run_row(fast, run_id)["status"] == "stopped"
        b = None
    else:
        # The same worker id comes back: its claim resumes the run under a new epoch, which
        # orphans the call the dead incarnation held. It pauses right after claiming.
        b = workers("--run-id", str(run_id), "--worker-id", worker_id, "--pause-at", "claimed")
        assert wait_paused(b, "claimed")["resumed"] is True
        procs.append(b)

    orphan = call_jobs(fast, run_id)[job_id]
    if point in ("next_job", "placed", "call_ended"):
        assert orphan["status"] == "in_progress" and orphan["orphaned_at"] is not None
    else:
        assert orphan["status"] == "completed"  # the callback came first: nothing orphaned

    # The provider's side: what reconciliation and the callbacks say.
    reconcile(fast, provider)
    if point == "placed":
        # Still ringing: the provider does not know yet, nothing is settled.
        assert call_jobs(fast, run_id)[job_id]["status"] == "in_progress"
        provider.finish(first_key, "completed")
        assert provider.send_callback(first_key) == 200
    elif point == "call_ended":
        # The provider knew (reconcile settled it); its callback comes late, changes nothing.
        assert call_jobs(fast, run_id)[job_id]["status"] == "completed"
        assert provider.send_callback(first_key) == 200

    if b is not None:
        b.signal(signal.SIGCONT)
        assert b.wait_exit(60) == 0, (b.steps(), b.stderr_tail())
        assert run_row(fast, run_id)["status"] == "completed"

    rows = check_invariants(fast, provider, run_id, procs)
    events = call_events(fast, run_id, job_id)
    how = settled_how(events)
    got = (rows[job_id]["status"], how)
    print(f"KILL-POINT {point} retry={retry} {recovery}: {got}")
    assert got == expected(point, retry, recovery), events

    first = provider.lookup(first_key)
    if point == "next_job":
        assert first is not None and not first.placed  # voided by reconciliation
        if got[1].startswith("requeued"):
            retried = rows[job_id]["call_key"]
            assert retried != first_key
            assert rows[job_id]["call_attempt"] >= 2
            assert [c.call_key for c in provider.calls(rows[job_id]["payload"]["to"])
                    if c.placed] == [retried]
            assert any(s["step"] == "placed" and s["call_key"] == retried for s in b.seen)
        else:
            assert rows[job_id]["call_outcome"] == "not_placed"
    else:
        assert first is not None and first.placed
    # The other jobs: dialed by the resumed worker, or failed with the stopped run.
    others = {r["status"] for i, r in rows.items() if i != job_id and i > job_id}
    assert others == ({"completed"} if recovery == "resume" else {"failed"})


@pytest.mark.parametrize("retry", [False, True], ids=["no_retry", "retry"])
def test_a_call_nobody_settles_times_out(
    fast: psycopg.Connection[Any],
    provider: FakeProvider,
    workers: Callable[..., Worker],
    retry: bool,
) -> None:
    """The worker dies while the call rings and the provider never says how it ended: after
    call_orphan_timeout the read path fails it; the callback that comes after changes nothing."""
    fast.execute("UPDATE outbound_heartbeat.settings SET call_orphan_timeout = interval '2 s'")
    run_id = service.create_run(
        fast, BUSINESS, [{"to": f"+1202556{i:04d}"} for i in range(JOBS)], retry_unplaced=retry
    ).id
    a = workers("--run-id", str(run_id), "--worker-id", "kp-timeout", "--pause-at", "placed")
    line = wait_paused(a, "placed")
    a.signal(signal.SIGKILL)
    a.wait_exit(10)
    wait_stale(fast, run_id, STALE_AFTER)
    assert service.get_active_run(fast, BUSINESS) is None
    reconcile(fast, provider)  # still ringing: nothing to say
    assert call_jobs(fast, run_id)[line["job_id"]]["status"] == "in_progress"
    deadline = time.monotonic() + 20
    while call_jobs(fast, run_id)[line["job_id"]]["status"] == "in_progress":
        assert time.monotonic() < deadline, "the orphan never timed out"
        service.get_active_run(fast, BUSINESS)  # the read path expires the business's orphans
        time.sleep(0.2)
    provider.finish(line["call_key"], "completed")
    provider.send_callback(line["call_key"])
    rows = check_invariants(fast, provider, run_id, [a])
    assert rows[line["job_id"]]["status"] == "failed"
    assert settled_how(call_events(fast, run_id, line["job_id"])) == "timeout"


@pytest.mark.parametrize(
    ("route", "mode"),
    [("direct", "sync"), ("direct", "async"), ("pgbouncer", "sync")],
    indirect=["route"],
)
def test_a_paused_worker_cannot_ring_a_requeued_call_under_its_old_key(
    fast: psycopg.Connection[Any],
    provider: FakeProvider,
    workers: Callable[..., Worker],
    mode: str,
) -> None:
    """The old worker is SIGSTOPped (not killed) between next_job and dialing; the same worker
    id resumes the run, reconciliation voids the old key and requeues the call, the new
    incarnation rings it under a new key. When the old process wakes and dials its old key,
    the provider refuses it: the customer is rung once."""
    run_id = service.create_run(
        fast, BUSINESS, [{"to": f"+1202557{i:04d}"} for i in range(JOBS)], retry_unplaced=True
    ).id
    a = workers("--run-id", str(run_id), "--worker-id", "kp-phoenix", "--mode", mode,
                "--pause-at", "next_job")
    line = wait_paused(a, "next_job")
    old_key = line["call_key"]
    wait_stale(fast, run_id, STALE_AFTER)
    b = workers("--run-id", str(run_id), "--worker-id", "kp-phoenix", "--mode", mode,
                "--pause-at", "claimed")
    wait_paused(b, "claimed")
    reconcile(fast, provider)
    assert call_jobs(fast, run_id)[line["job_id"]]["status"] == "queued"  # requeued
    b.signal(signal.SIGCONT)
    assert b.wait_exit(60) == 0, (b.steps(), b.stderr_tail())

    a.signal(signal.SIGCONT)  # wakes between next_job and its dial
    voided = a.wait_for("key_voided", timeout=30)
    assert voided["call_key"] == old_key
    assert a.wait_exit(30) == 3  # then learns its lease is lost
    assert "placed" not in a.steps()

    rows = check_invariants(fast, provider, run_id, [a, b])
    job = rows[line["job_id"]]
    assert job["status"] == "completed" and job["call_key"] != old_key
    # The customer's only call is the new key's; the old key is void, it never rang.
    assert [(c.call_key, c.placed) for c in provider.calls(job["payload"]["to"])] == [
        (job["call_key"], True)
    ]
    old = provider.lookup(old_key)
    assert old is not None and old.status == "voided"
    assert settled_how(call_events(fast, run_id, line["job_id"])) == "requeued then callback"
