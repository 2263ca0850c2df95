"""The worker lease with real worker subprocesses (outbound_heartbeat.example_worker), sync and async:
SIGKILL, SIGSTOP/SIGCONT, cancel, force-cancel, a killed heartbeat connection, a stalled loop."""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import psycopg
import pytest

from outbound_heartbeat import InvalidArgument, RunNotFound, service
from outbound_heartbeat.lease import Lease, NothingToClaim, check_interval

from ..helpers import job_statuses, run_row
from ..workers import Worker

STALE_AFTER = 2.0
MODES = ["sync", "async"]


@pytest.fixture
def fast(conn: psycopg.Connection[Any]) -> psycopg.Connection[Any]:
    conn.execute(
        "UPDATE outbound_heartbeat.settings SET stale_after = make_interval(secs => %s)",
        (STALE_AFTER,),
    )
    return conn


@pytest.fixture
def workers(dsn: str) -> Iterator[Any]:
    started: list[Worker] = []

    def start(*args: str) -> Worker:
        w = Worker(dsn, *args)
        started.append(w)
        return w

    yield start
    for w in started:
        w.close()


def wait_inactive(conn: psycopg.Connection[Any], business_id: int, limit: float) -> float:
    """Polls get_active_run until it returns no row; the seconds it took (bounded by limit)."""
    start = time.monotonic()
    while service.get_active_run(conn, business_id) is not None:
        assert time.monotonic() - start < limit, "run still active"
        time.sleep(0.05)
    return time.monotonic() - start


def new_run(conn: psycopg.Connection[Any], jobs: int, business_id: int = 1) -> int:
    return service.create_run(conn, business_id, [{"n": i} for i in range(jobs)]).id


@pytest.mark.parametrize("mode", MODES)
def test_sigkill_worker_is_detected_within_threshold(fast: Any, workers: Any, mode: str) -> None:
    run_id = new_run(fast, 30)
    w = workers("--run-id", str(run_id), "--mode", mode, "--dial-seconds", "0.3")
    w.wait_for("dialing")
    dialing = w.wait_for("dialing")["job_id"]
    w.signal(signal.SIGKILL)
    w.wait_exit(5)
    took = wait_inactive(fast, 1, STALE_AFTER + 3)
    assert took <= STALE_AFTER + 1
    statuses = job_statuses(fast, run_id)
    assert statuses[dialing] == "in_progress"  # handed to telephony: left alone
    assert list(statuses.values()).count("completed") >= 1
    assert "queued" not in statuses.values()
    reasons = fast.execute(
        "SELECT DISTINCT error_message FROM outbound_call_jobs WHERE run_id = %s AND status = 'failed'",
        (run_id,),
    ).fetchall()
    assert reasons == [("run stopped: worker heartbeat stale",)]


@pytest.mark.parametrize("mode", MODES)
def test_sigstop_past_threshold_then_sigcont_changes_nothing(
    fast: Any, workers: Any, mode: str
) -> None:
    run_id = new_run(fast, 30)
    w = workers("--run-id", str(run_id), "--mode", mode, "--dial-seconds", "0.3")
    w.wait_for("dialing")
    w.signal(signal.SIGSTOP)
    wait_inactive(fast, 1, STALE_AFTER + 5)
    assert run_row(fast, run_id)["status"] == "stopped"
    before = job_statuses(fast, run_id)
    w.signal(signal.SIGCONT)
    assert w.wait_exit(15) == 3
    last = w.seen[-1] if w.steps() else {}
    assert last.get("step") == "lost" or (last.get("step") == "released" and last.get("lost"))
    assert job_statuses(fast, run_id) == before
    assert run_row(fast, run_id)["status"] == "stopped"


@pytest.mark.parametrize("mode", MODES)
def test_cancel_request_finishes_current_job_and_exits_cleanly(
    fast: Any, workers: Any, mode: str
) -> None:
    run_id = new_run(fast, 10)
    w = workers("--run-id", str(run_id), "--mode", mode, "--dial-seconds", "0.6")
    job_id = w.wait_for("dialing")["job_id"]
    service.request_cancel(fast, run_id, business_id=1)
    assert w.wait_exit(15) == 0
    steps = w.steps()
    assert steps[-1] == "released" and "lost" not in steps
    assert run_row(fast, run_id)["status"] == "cancelled"
    statuses = job_statuses(fast, run_id)
    assert statuses[job_id] == "completed"
    assert "queued" not in statuses.values() and "in_progress" not in statuses.values()


@pytest.mark.parametrize("mode", MODES)
def test_force_cancel_alive_worker_stops_within_an_interval(
    fast: Any, workers: Any, mode: str
) -> None:
    run_id = new_run(fast, 50)
    w = workers("--run-id", str(run_id), "--mode", mode, "--dial-seconds", "0.2")
    interval = w.wait_for("claimed")["interval"]
    w.wait_for("dialing")
    result = service.force_cancel(fast, run_id, business_id=1)
    assert result.jobs_cancelled > 0
    frozen = job_statuses(fast, run_id)
    assert w.wait_exit(interval + 0.2 + 3) == 3
    assert "dialed" not in w.steps()[-1:]  # its last word is not another dial
    assert job_statuses(fast, run_id) == frozen  # the zombie's finish_job was refused
    assert run_row(fast, run_id)["status"] == "cancelled"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.direct_only
def test_killed_heartbeat_connection_reconnects_and_keeps_lease(
    fast: Any, workers: Any, mode: str
) -> None:
    run_id = new_run(fast, 3)
    # Each dial outlasts stale_after: only the heartbeat connection keeps the lease alive.
    w = workers(
        "--run-id",
        str(run_id),
        "--mode",
        mode,
        "--dial-seconds",
        "2.5",
        "--worker-id",
        f"hb-{mode}",
    )
    w.wait_for("dialing")
    killed = set()
    deadline = time.monotonic() + 10
    while len(killed) < 2 and time.monotonic() < deadline:
        rows = fast.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s",
            # The worker's hub names its heartbeat connection after the process.
            (f"oh-heartbeat:pid-{w.pid}@{socket.gethostname()}"[:63],),
        ).fetchall()
        for (pid,) in rows:
            if pid not in killed:
                fast.execute("SELECT pg_terminate_backend(%s)", (pid,))
                killed.add(pid)
        time.sleep(0.3)
    assert len(killed) == 2, (killed, w.steps(), w.stderr_tail())  # it came back
    assert w.wait_exit(20) == 0, w.stderr_tail()
    assert run_row(fast, run_id)["status"] == "completed"
    assert set(job_statuses(fast, run_id).values()) == {"completed"}


@pytest.mark.parametrize("mode", MODES)
def test_stalled_dial_loop_stops_heartbeating_and_goes_stale(
    fast: Any, workers: Any, mode: str
) -> None:
    run_id = new_run(fast, 5)
    w = workers("--run-id", str(run_id), "--mode", mode, "--hang-on-job", "1", "--stall-after", "1")
    job_id = w.wait_for("dialing")["job_id"]
    wait_inactive(fast, 1, 1 + STALE_AFTER + 3)
    assert w.proc.poll() is None  # still hung: nobody but the watchdog gave up
    assert run_row(fast, run_id)["status"] == "stopped"
    assert job_statuses(fast, run_id)[job_id] == "in_progress"


def wait_stale(conn: psycopg.Connection[Any], run_id: int, limit: float) -> None:
    """Polls (read-only: list_active_runs stops nothing) until the run's heartbeat is stale."""
    deadline = time.monotonic() + limit
    while not any(r.id == run_id and r.stale for r in service.list_active_runs(conn)):
        assert time.monotonic() < deadline, "the run never went stale"
        time.sleep(0.05)


def test_crash_resume_with_same_worker_id(fast: Any, workers: Any) -> None:
    run_id = new_run(fast, 40)
    first = workers("--run-id", str(run_id), "--worker-id", "phoenix", "--dial-seconds", "0.2")
    epoch = first.wait_for("claimed")["epoch"]
    first.wait_for("dialing")
    first.signal(signal.SIGKILL)
    first.wait_exit(5)
    # The dead incarnation's run is resumed by the next process of that name once stale.
    wait_stale(fast, run_id, STALE_AFTER + 5)
    second = workers("--worker-id", "phoenix", "--dial-seconds", "0.01")
    claimed = second.wait_for("claimed")
    assert (claimed["run_id"], claimed["resumed"], claimed["epoch"]) == (run_id, True, epoch + 1)
    assert second.wait_exit(30) == 0
    assert run_row(fast, run_id)["status"] == "completed"


def test_recover_on_startup_stops_leftover_run(fast: Any, workers: Any) -> None:
    run_id = new_run(fast, 40)
    first = workers("--run-id", str(run_id), "--worker-id", "fresh-start", "--dial-seconds", "0.2")
    first.wait_for("dialing")
    first.signal(signal.SIGKILL)
    first.wait_exit(5)
    wait_stale(fast, run_id, STALE_AFTER + 5)
    second = workers("--worker-id", "fresh-start", "--recover")
    assert second.wait_for("recovered")["runs"] == [run_id]
    assert second.wait_exit(10) == 2  # its old run was stopped, nothing else pending
    assert run_row(fast, run_id)["status"] == "stopped"


@pytest.mark.parametrize("mode", MODES)
def test_two_live_processes_with_one_name_never_share_a_run(
    fast: Any, workers: Any, mode: str
) -> None:
    """Two containers whose worker has the same configured name (both PID 1): the second
    never takes over, never dials and, with --recover, never stops the live run."""
    run_id = new_run(fast, 40)
    first = workers("--run-id", str(run_id), "--worker-id", "dialer-1", "--mode", mode,
                    "--dial-seconds", "0.25")
    first.wait_for("dialing")
    others = [
        workers("--run-id", str(run_id), "--worker-id", "dialer-1", "--mode", mode),
        workers("--worker-id", "dialer-1", "--mode", mode),
        workers("--worker-id", "dialer-1", "--recover"),
    ]
    for other in others:
        assert other.wait_exit(20) == 2, (other.steps(), other.stderr_tail())
        assert "dialing" not in other.steps() and "claimed" not in other.steps()
    assert [s["runs"] for s in others[2].seen if s["step"] == "recovered"] == [[]]
    assert run_row(fast, run_id)["status"] == "running"  # they met the live run, not its end
    assert first.wait_exit(60) == 0, first.stderr_tail()
    assert "lost" not in first.steps()
    assert run_row(fast, run_id)["status"] == "completed"
    assert set(job_statuses(fast, run_id).values()) == {"completed"}
    claims = fast.execute(
        "SELECT count(*) FROM outbound_heartbeat.run_events WHERE run_id = %s"
        " AND event IN ('claimed', 'resumed')", (run_id,)
    ).fetchone()
    assert claims == (1,)


def test_default_worker_ids_are_unique_per_process(fast: Any, workers: Any) -> None:
    new_run(fast, 1)
    new_run(fast, 1)
    a, b = workers(), workers()
    ids = {a.wait_for("claimed")["worker_id"], b.wait_for("claimed")["worker_id"]}
    assert len(ids) == 2
    assert all(i.startswith("dialer-") and str(socket.gethostname()) in i for i in ids), ids
    assert a.wait_exit(20) == 0 and b.wait_exit(20) == 0


def test_interval_validation_and_nothing_to_claim(fast: Any, dsn: str) -> None:
    assert check_interval(None, timedelta(seconds=30)) == 2.0
    assert check_interval(None, timedelta(seconds=3)) == 1.0
    with pytest.raises(InvalidArgument) as err:
        check_interval(1.5, timedelta(seconds=3))
    assert err.value.argument == "interval"
    new_run(fast, 1)
    with pytest.raises(InvalidArgument), Lease(dsn, "w", interval=5):
        pass
    assert run_row(fast, 1)["status"] == "pending"  # refused before claiming anything
    with pytest.raises(RunNotFound), Lease(dsn, "w", run_id=999):
        pass
    service.force_cancel(fast, 1)
    with pytest.raises(NothingToClaim), Lease(dsn, "w", run_id=1):
        pass


def test_exception_in_dial_loop_fails_the_run(fast: Any, dsn: str) -> None:
    run_id = new_run(fast, 3)
    with pytest.raises(RuntimeError), Lease(dsn, "boom", run_id) as lease:
        job = lease.next_job()
        assert job is not None
        raise RuntimeError("dialer exploded")
    assert run_row(fast, run_id)["status"] == "failed"
    statuses = sorted(job_statuses(fast, run_id).values())
    assert statuses == ["failed", "failed", "in_progress"]
