"""The worker's side of the SQL API through the Python service: claim, heartbeat, next_job,
finish_job, finish_run, crash resume, and fencing of every write once the lease is gone."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from outbound_heartbeat import InvalidArgument, JobNotFound, LeaseLost, RunNotFound, calls, service

from .helpers import backdate_heartbeat, events, job_statuses, run_row

Conn = psycopg.Connection[Any]


def start(conn: Conn, jobs: int = 3, business_id: int = 1, worker: str = "w1") -> Any:
    run = service.create_run(conn, business_id, [{"phone": f"+97250000{i}"} for i in range(jobs)])
    claim = service.claim_run(conn, worker, run.id)
    assert claim is not None
    return claim


def test_claim_takes_oldest_pending_and_bumps_epoch(conn: Conn) -> None:
    first = service.create_run(conn, 1, [{}])
    service.create_run(conn, 2, [{}])
    claim = service.claim_run(conn, "w1")
    assert claim is not None
    assert (claim.run_id, claim.business_id, claim.resumed) == (first.id, 1, False)
    assert claim.lease_epoch == first.lease_epoch + 1
    row = run_row(conn, first.id)
    assert row["status"] == "running" and row["locked_by_worker"] == "w1"
    assert row["last_heartbeat_at"] is not None and row["lock_ts"] is not None
    assert row["started_at"] is not None
    assert events(conn, first.id) == ["created", "claimed"]


def test_claim_with_nothing_pending_returns_none(conn: Conn) -> None:
    assert service.claim_run(conn, "w1") is None


def test_claim_given_run_of_another_worker_returns_none(conn: Conn) -> None:
    claim = start(conn)
    assert service.claim_run(conn, "w2", claim.run_id) is None
    assert run_row(conn, claim.run_id)["locked_by_worker"] == "w1"


def test_claim_unknown_run_is_not_found(conn: Conn) -> None:
    with pytest.raises(RunNotFound) as err:
        service.claim_run(conn, "w1", 424242)
    assert err.value.argument == "run_id"


def test_crash_resume_same_worker_bumps_epoch_and_fences_old_lease(conn: Conn) -> None:
    old = start(conn)
    backdate_heartbeat(conn, old.run_id, 31)  # the old incarnation is dead: its heartbeat is stale
    resumed = service.claim_run(conn, "w1")
    assert resumed is not None
    assert resumed.run_id == old.run_id and resumed.resumed
    assert resumed.lease_epoch == old.lease_epoch + 1
    # The pre-crash incarnation is a zombie now: every write of it is refused.
    assert service.heartbeat(conn, old.run_id, "w1", old.lease_epoch) == "lost"
    with pytest.raises(LeaseLost):
        service.next_job(conn, old.run_id, "w1", old.lease_epoch)
    assert service.heartbeat(conn, old.run_id, "w1", resumed.lease_epoch) == "ok"
    assert events(conn, old.run_id)[-1] == "resumed"


@pytest.mark.parametrize("given_run", [False, True])
def test_live_run_of_the_same_name_is_never_taken_over(conn: Conn, given_run: bool) -> None:
    """A worker name is not an incarnation: another live process with the same name (two
    containers whose worker is PID 1) gets no row, and the live lease keeps working."""
    live = start(conn, jobs=2)
    backdate_heartbeat(conn, live.run_id, 25)  # old, but younger than stale_after (30 s)
    before = run_row(conn, live.run_id)
    other = service.claim_run(conn, "w1", live.run_id if given_run else None)
    assert other is None
    assert run_row(conn, live.run_id) == before
    assert service.cleanup_stuck_runs(conn, on_startup=True, worker_id="w1") == []
    assert run_row(conn, live.run_id) == before
    assert service.heartbeat(conn, live.run_id, "w1", live.lease_epoch) == "ok"
    # Once that incarnation is dead (stale), the name's next process resumes its run.
    backdate_heartbeat(conn, live.run_id, 31)
    resumed = service.claim_run(conn, "w1", live.run_id if given_run else None)
    assert resumed is not None and resumed.resumed and resumed.run_id == live.run_id


def test_on_startup_recovers_only_a_dead_incarnations_run(conn: Conn) -> None:
    dead = start(conn, jobs=2, worker="w1")
    backdate_heartbeat(conn, dead.run_id, 31)
    reclaimed = service.cleanup_stuck_runs(conn, on_startup=True, worker_id="w1")
    assert [(r.run_id, r.reason, r.status) for r in reclaimed] == [
        (dead.run_id, "on_startup", "stopped")
    ]


def test_heartbeat_writes_db_clock(conn: Conn) -> None:
    claim = start(conn)
    backdate_heartbeat(conn, claim.run_id, 10)
    assert service.heartbeat(conn, claim.run_id, "w1", claim.lease_epoch) == "ok"
    age = conn.execute(
        "SELECT now() - last_heartbeat_at FROM outbound_call_runs WHERE id = %s", (claim.run_id,)
    ).fetchone()
    assert age is not None and age[0].total_seconds() < 1


def test_heartbeat_unknown_run_is_lost(conn: Conn) -> None:
    assert service.heartbeat(conn, 99999, "w1", 1) == "lost"


def test_heartbeat_reports_cancel_request(conn: Conn) -> None:
    claim = start(conn)
    service.request_cancel(conn, claim.run_id)
    assert service.heartbeat(conn, claim.run_id, "w1", claim.lease_epoch) == "cancel_requested"
    # After a cancel request next_job hands out nothing, so the worker winds down.
    assert service.next_job(conn, claim.run_id, "w1", claim.lease_epoch) is None
    assert set(job_statuses(conn, claim.run_id).values()) == {"queued"}


def test_next_job_hands_out_jobs_in_order_then_none(conn: Conn) -> None:
    claim = start(conn, jobs=3)
    got = []
    while (job := service.next_job(conn, claim.run_id, "w1", claim.lease_epoch)) is not None:
        assert job.status == "in_progress" and job.business_id == 1
        got.append(job)
        outcome = service.finish_job(conn, job.id, "w1", claim.lease_epoch, "completed")
        assert outcome.outcome == "finished"
    assert [j.payload["phone"] for j in got] == ["+972500000", "+972500001", "+972500002"]
    assert set(job_statuses(conn, claim.run_id).values()) == {"completed"}


def heartbeat_age(conn: Conn, run_id: int) -> float:
    row = conn.execute(
        "SELECT extract(epoch FROM now() - last_heartbeat_at) FROM outbound_call_runs"
        " WHERE id = %s", (run_id,)
    ).fetchone()
    assert row is not None
    return float(row[0])


def test_next_job_is_a_heartbeat(conn: Conn) -> None:
    claim = start(conn, jobs=2)
    for _ in range(2):  # with a job to hand out, and with none left (no row)
        backdate_heartbeat(conn, claim.run_id, 20)
        assert heartbeat_age(conn, claim.run_id) >= 20
        job = service.next_job(conn, claim.run_id, "w1", claim.lease_epoch)
        assert heartbeat_age(conn, claim.run_id) < 5
        if job is not None:
            service.finish_job(conn, job.id, "w1", claim.lease_epoch, "completed")
    # Two 20 s gaps, each bridged by next_job alone: more than stale_after, still alive.
    backdate_heartbeat(conn, claim.run_id, 20)
    service.next_job(conn, claim.run_id, "w1", claim.lease_epoch)
    assert service.get_active_run(conn, 1) is not None


def retry_next_job(conn: Conn, claim: Any, request_id: str) -> Any:
    return service.execute(
        conn, calls.next_job(claim.run_id, claim.worker_id, claim.lease_epoch, request_id)
    )[0]


def test_retried_next_job_returns_the_job_the_lost_call_took(conn: Conn) -> None:
    claim = start(conn, jobs=3)
    first = retry_next_job(conn, claim, "req-1")
    assert first is not None
    # The answer was lost; the same request again gets the same job, not the next one.
    again = retry_next_job(conn, claim, "req-1")
    assert again is not None and again.id == first.id and again.status == "in_progress"
    # A worker dialing several at once: another key is another job.
    second = retry_next_job(conn, claim, "req-2")
    assert second is not None and second.id != first.id
    assert retry_next_job(conn, claim, "req-2").id == second.id
    # Even after a cancel request the retry returns the job its lost call took.
    service.request_cancel(conn, claim.run_id)
    assert retry_next_job(conn, claim, "req-1").id == first.id
    assert retry_next_job(conn, claim, "req-3") is None
    statuses = job_statuses(conn, claim.run_id)
    assert list(statuses.values()).count("in_progress") == 2
    row = conn.execute(
        "SELECT lease_epoch, lease_request_id FROM outbound_call_jobs WHERE id = %s", (first.id,)
    ).fetchone()
    assert row == (claim.lease_epoch, "req-1")


def test_retry_key_belongs_to_one_lease_and_one_open_job(conn: Conn) -> None:
    claim = start(conn, jobs=3)
    first = retry_next_job(conn, claim, "k")
    assert first is not None
    service.finish_job(conn, first.id, "w1", claim.lease_epoch, "completed")
    # Finished (by the loop or the app's callback): the key takes a fresh job.
    fresh = retry_next_job(conn, claim, "k")
    assert fresh is not None and fresh.id != first.id
    # A resumed lease (new epoch) never gets the old lease's job for the same key.
    backdate_heartbeat(conn, claim.run_id, 31)
    resumed = service.claim_run(conn, "w1", claim.run_id)
    assert resumed is not None
    third = retry_next_job(conn, resumed, "k")
    assert third is not None and third.id not in (first.id, fresh.id)


@pytest.mark.parametrize("request_id", ["", "   ", "x" * 201])
def test_bad_request_id_is_refused(conn: Conn, request_id: str) -> None:
    claim = start(conn)
    with pytest.raises(InvalidArgument) as err:
        retry_next_job(conn, claim, request_id)
    assert err.value.argument == "request_id"
    assert set(job_statuses(conn, claim.run_id).values()) == {"queued"}


def test_finish_job_retry_after_the_lease_ended_is_already_finished(conn: Conn) -> None:
    claim = start(conn, jobs=2)
    job = service.next_job(conn, claim.run_id, "w1", claim.lease_epoch)
    assert job is not None
    assert service.finish_job(conn, job.id, "w1", claim.lease_epoch, "failed", "busy").outcome \
        == "finished"
    service.force_cancel(conn, claim.run_id)  # the lease ends before the retry arrives
    again = service.finish_job(conn, job.id, "w1", claim.lease_epoch, "failed", "busy")
    assert (again.status, again.outcome) == ("failed", "already_finished")
    # A different final status is still refused as a lost lease, and nothing changes.
    other = service.finish_job(conn, job.id, "w1", claim.lease_epoch, "completed")
    assert other.outcome == "lease_lost"
    assert job_statuses(conn, claim.run_id)[job.id] == "failed"


def test_next_job_unknown_run_is_not_found(conn: Conn) -> None:
    with pytest.raises(RunNotFound):
        service.next_job(conn, 31337, "w1", 1)


def test_finish_job_failed_keeps_error_and_repeat_is_noop(conn: Conn) -> None:
    claim = start(conn)
    job = service.next_job(conn, claim.run_id, "w1", claim.lease_epoch)
    assert job is not None
    first = service.finish_job(conn, job.id, "w1", claim.lease_epoch, "failed", "busy line")
    again = service.finish_job(conn, job.id, "w1", claim.lease_epoch, "failed", "other")
    assert (first.outcome, again.outcome) == ("finished", "already_finished")
    row = conn.execute(
        "SELECT status, error_message FROM outbound_call_jobs WHERE id = %s", (job.id,)
    ).fetchone()
    assert row == ("failed", "busy line")


def test_finish_job_other_final_status_or_queued_job_is_invalid(conn: Conn) -> None:
    from outbound_heartbeat import InvalidArgument

    claim = start(conn, jobs=2)
    job = service.next_job(conn, claim.run_id, "w1", claim.lease_epoch)
    assert job is not None
    service.finish_job(conn, job.id, "w1", claim.lease_epoch, "completed")
    with pytest.raises(InvalidArgument):
        service.finish_job(conn, job.id, "w1", claim.lease_epoch, "failed")
    queued = max(job_statuses(conn, claim.run_id))
    with pytest.raises(InvalidArgument) as err:
        service.finish_job(conn, queued, "w1", claim.lease_epoch, "completed")
    assert err.value.argument == "job_id"
    assert job_statuses(conn, claim.run_id) == {job.id: "completed", queued: "queued"}


def test_finish_job_unknown_job_is_not_found(conn: Conn) -> None:
    with pytest.raises(JobNotFound) as err:
        service.finish_job(conn, 777, "w1", 1, "completed")
    assert err.value.argument == "job_id"


def test_finish_run_completes_and_fails_leftover_queued_jobs(conn: Conn) -> None:
    claim = start(conn, jobs=3)
    job = service.next_job(conn, claim.run_id, "w1", claim.lease_epoch)
    assert job is not None
    outcome = service.finish_run(conn, claim.run_id, "w1", claim.lease_epoch)
    assert (outcome.status, outcome.outcome, outcome.jobs_failed) == ("completed", "finished", 2)
    row = run_row(conn, claim.run_id)
    assert row["ended_at"] is not None and row["locked_by_worker"] is None
    assert row["lock_ts"] is None and row["lease_epoch"] == claim.lease_epoch + 1
    # The job already handed to telephony stays in progress for the app's callbacks.
    assert job_statuses(conn, claim.run_id)[job.id] == "in_progress"
    again = service.finish_run(conn, claim.run_id, "w1", claim.lease_epoch)
    assert (again.status, again.outcome) == ("completed", "already_finished")
    assert events(conn, claim.run_id) == ["created", "claimed", "finished"]


@pytest.mark.parametrize("status", ["failed", "cancelled"])
def test_finish_run_other_statuses(conn: Conn, status: str) -> None:
    claim = start(conn, jobs=1)
    assert service.finish_run(conn, claim.run_id, "w1", claim.lease_epoch, status).status == status
    assert run_row(conn, claim.run_id)["status"] == status


def test_finish_run_unknown_run_is_not_found(conn: Conn) -> None:
    with pytest.raises(RunNotFound):
        service.finish_run(conn, 5555, "w1", 1)


@pytest.mark.parametrize("how", ["stale", "force_cancel", "takeover", "finished"])
def test_fencing_after_lease_loss(conn: Conn, how: str) -> None:
    claim = start(conn, jobs=3)
    held = service.next_job(conn, claim.run_id, "w1", claim.lease_epoch)
    assert held is not None
    if how == "stale":
        backdate_heartbeat(conn, claim.run_id, 31)
        assert service.get_active_run(conn, 1) is None
    elif how == "force_cancel":
        service.force_cancel(conn, claim.run_id)
    elif how == "takeover":
        backdate_heartbeat(conn, claim.run_id, 31)  # dead, then resumed by a new incarnation
        assert service.claim_run(conn, "w1", claim.run_id) is not None
    else:
        service.finish_run(conn, claim.run_id, "w1", claim.lease_epoch, "failed")
    before_runs = run_row(conn, claim.run_id)
    before_jobs = job_statuses(conn, claim.run_id)

    assert service.heartbeat(conn, claim.run_id, "w1", claim.lease_epoch) == "lost"
    with pytest.raises(LeaseLost):
        service.next_job(conn, claim.run_id, "w1", claim.lease_epoch)
    job_out = service.finish_job(conn, held.id, "w1", claim.lease_epoch, "completed")
    assert job_out.outcome == "lease_lost" and job_out.status == "in_progress"
    run_out = service.finish_run(conn, claim.run_id, "w1", claim.lease_epoch, "completed")
    assert run_out.outcome == "lease_lost"

    assert run_row(conn, claim.run_id) == before_runs
    assert job_statuses(conn, claim.run_id) == before_jobs


def test_stale_lease_is_stopped_by_its_own_heartbeat(conn: Conn) -> None:
    claim = start(conn, jobs=2)
    backdate_heartbeat(conn, claim.run_id, 45)
    assert service.heartbeat(conn, claim.run_id, "w1", claim.lease_epoch) == "lost"
    assert run_row(conn, claim.run_id)["status"] == "stopped"
    assert set(job_statuses(conn, claim.run_id).values()) == {"failed"}
    assert events(conn, claim.run_id)[-1] == "stale_stopped"


def test_empty_run_completed_by_cleanup_is_success_for_worker(conn: Conn) -> None:
    claim = start(conn, jobs=1)
    job = service.next_job(conn, claim.run_id, "w1", claim.lease_epoch)
    assert job is not None
    service.finish_job(conn, job.id, "w1", claim.lease_epoch, "completed")
    reclaimed = service.cleanup_stuck_runs(conn)
    assert [(r.run_id, r.reason, r.status) for r in reclaimed] == [
        (claim.run_id, "empty", "completed")
    ]
    # The worker's next calls: no more jobs, the heartbeat says 'completed', release succeeds.
    assert service.next_job(conn, claim.run_id, "w1", claim.lease_epoch) is None
    assert service.heartbeat(conn, claim.run_id, "w1", claim.lease_epoch) == "completed"
    outcome = service.finish_run(conn, claim.run_id, "w1", claim.lease_epoch)
    assert (outcome.status, outcome.outcome) == ("completed", "already_finished")
    # Only this lease: an older epoch or another worker is still told the lease is lost.
    with pytest.raises(LeaseLost):
        service.next_job(conn, claim.run_id, "w1", claim.lease_epoch - 1)
    with pytest.raises(LeaseLost):
        service.next_job(conn, claim.run_id, "w2", claim.lease_epoch)
    assert service.heartbeat(conn, claim.run_id, "w2", claim.lease_epoch) == "lost"


def test_force_cancelled_run_is_still_lost_not_completed(conn: Conn) -> None:
    claim = start(conn, jobs=1)
    job = service.next_job(conn, claim.run_id, "w1", claim.lease_epoch)
    assert job is not None
    service.finish_job(conn, job.id, "w1", claim.lease_epoch, "completed")
    service.force_cancel(conn, claim.run_id)
    with pytest.raises(LeaseLost):
        service.next_job(conn, claim.run_id, "w1", claim.lease_epoch)
    assert service.heartbeat(conn, claim.run_id, "w1", claim.lease_epoch) == "lost"


@pytest.mark.parametrize("beat", ["heartbeat", "heartbeat_leases"])
def test_a_beat_beside_the_apps_job_insert_takes_the_fast_path(conn: Conn, dsn: str, beat: str) -> None:
    """The app adding calls to a running run holds its row FOR KEY SHARE (the foreign key's
    check) until it commits: the beat's row lock (FOR NO KEY UPDATE, what its UPDATE needs
    anyway) does not conflict with it, so the beat stays on its fast path instead of falling
    to the slow one, and the app's insert never waits for a beat either."""
    claim = start(conn, jobs=1)
    with psycopg.connect(dsn) as app:
        app.execute("INSERT INTO outbound_call_jobs (run_id, business_id, status) VALUES (%s, %s, 'queued')",
                    (claim.run_id, claim.business_id))
        with psycopg.connect(dsn) as worker:
            worker.execute("SET LOCAL track_functions = 'all'")
            answer: str
            if beat == "heartbeat":
                answer = service.heartbeat(worker, claim.run_id, "w1", claim.lease_epoch)
            else:
                [(_, answer)] = service.heartbeat_leases(worker, [(claim.run_id, "w1", claim.lease_epoch)])
            slow, fast = worker.execute(
                "SELECT pg_stat_get_xact_function_calls('outbound_heartbeat._heartbeat_slow'::regproc),"
                " pg_stat_get_xact_function_calls('outbound_heartbeat._heartbeat_leases'::regproc)"
            ).fetchone() or (None, None)
            calls_made = worker.execute(
                "SELECT pg_stat_get_xact_function_calls(%s::regproc)", (f"outbound_heartbeat.{beat}",)
            ).fetchone()
            worker.rollback()
        app.rollback()
    assert answer == "ok"
    assert calls_made == (1,)  # the counting works: the beat itself was counted
    assert (slow or 0, fast or 0) == (0, 0)
