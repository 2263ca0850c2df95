"""Every call accounted for: call keys, orphaned calls, resolve_call(), the orphan timeout and
the upgrade's adoption of legacy in-progress jobs, on a real PostgreSQL."""

from __future__ import annotations

import functools
import json
import re
import signal
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.rows import dict_row

from outbound_heartbeat import errors, service, upgrade
from outbound_heartbeat.records import Claim, Job

from ..helpers import backdate_heartbeat, events, hand_out, leased, snapshot, start
from ..workers import Worker

Conn = psycopg.Connection[Any]

KEY = re.compile(r"^oh1-(\d+)-(\d+)-(\d+)-[0-9a-f]{32}$")
SQL_DIR = Path(__file__).resolve().parents[2] / "sql"



def job_row(conn: Conn, job_id: int) -> dict[str, Any]:
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute("SELECT * FROM outbound_call_jobs WHERE id = %s", (job_id,)).fetchone()
    assert row is not None
    return row


def backdate_orphan(conn: Conn, job_id: int, age: str = "2 hours") -> None:
    conn.execute("UPDATE outbound_call_jobs SET orphaned_at = now() - %s::interval WHERE id = %s",
                 (age, job_id))


def rows_only(conn: Conn) -> tuple[Any, ...]:
    """snapshot() but the audit trail: the runs, the jobs and the settings."""
    runs, jobs, _, settings = snapshot(conn)
    return runs, jobs, settings


def new_events(conn: Conn, after: tuple[Any, ...]) -> list[tuple[str, dict[str, Any]]]:
    """The audit events written since the snapshot ``after`` was taken: (event, detail)."""
    last = max((row[0] for row in after[2]), default=0)
    return [(r[0], r[1]) for r in conn.execute(
        "SELECT event, detail FROM outbound_heartbeat.run_events WHERE id > %s ORDER BY id", (last,))]


def settled_events(conn: Conn, job_id: int) -> list[str]:
    rows = conn.execute(
        "SELECT event FROM outbound_heartbeat.run_events"
        " WHERE event IN ('call_resolved', 'call_timed_out') AND (detail ->> 'job_id')::bigint = %s"
        " ORDER BY id", (job_id,)).fetchall()
    return [r[0] for r in rows]


# -- 1. the call key ---------------------------------------------------------------------------

def test_each_call_gets_a_key_and_a_retried_next_job_the_same_one(conn: Conn) -> None:
    claim = start(conn)
    query = ("SELECT id, call_key FROM outbound_heartbeat.next_job(%s, %s, %s, %s)")
    args = (claim.run_id, claim.worker_id, claim.lease_epoch)
    first = conn.execute(query, (*args, "req-1")).fetchone()
    again = conn.execute(query, (*args, "req-1")).fetchone()
    other = conn.execute(query, (*args, "req-2")).fetchone()
    assert first is not None and again is not None and other is not None
    assert again == first  # same request id: the same job, the same key
    assert other[0] != first[0] and other[1] != first[1]
    match = KEY.match(first[1])
    assert match is not None, first[1]
    assert (int(match[1]), int(match[2]), int(match[3])) == (first[0], claim.lease_epoch, 1)
    row = job_row(conn, first[0])
    assert (row["call_key"], row["call_attempt"], row["lease_epoch"]) == (first[1], 1, claim.lease_epoch)
    # And through Python: Job.call_key.
    job = hand_out(conn, claim)
    assert KEY.match(job.call_key or "") and job.call_key == job_row(conn, job.id)["call_key"]


def test_a_job_handed_out_again_under_the_same_lease_is_a_new_attempt(conn: Conn) -> None:
    claim = start(conn, jobs=1)
    job = hand_out(conn, claim)
    # The app puts the job back in the queue (its own right): the same lease takes it again.
    conn.execute("UPDATE outbound_call_jobs SET status = 'queued' WHERE id = %s", (job.id,))
    again = hand_out(conn, claim)
    assert again.id == job.id and again.call_key != job.call_key
    assert job_row(conn, job.id)["call_attempt"] == 2
    before = snapshot(conn)
    # The first attempt's late callback is fenced: it changes nothing of the second.
    old = service.resolve_call(conn, job.call_key or "", "completed")
    assert old.answer == "superseded" and old.status == "in_progress" and old.call_outcome is None
    assert snapshot(conn) == before
    new = service.resolve_call(conn, again.call_key or "", "failed", "busy")
    assert (new.answer, new.status, new.call_outcome) == ("resolved", "failed", "failed")
    assert job_row(conn, job.id)["error_message"] == "busy"


def test_a_key_is_a_credential(conn: Conn) -> None:
    claim = start(conn, jobs=1)
    job = hand_out(conn, claim)
    assert job.call_key is not None
    forged = job.call_key[:-32] + "0" * 32  # the right numbers, a guessed random part
    newer = f"oh1-{job.id}-{claim.lease_epoch + 1}-1-" + "a" * 32
    before = snapshot(conn)
    for key in (forged, newer, f"oh1-{10**12}-1-1-" + "b" * 32):
        with pytest.raises(errors.CallNotFound):
            service.resolve_call(conn, key, "completed")
    for key in ("", "oh1-1-1-1", job.call_key.upper(), job.call_key + "0",
                f"oh1-{2**63}-1-1-" + "c" * 32):
        with pytest.raises(errors.InvalidArgument):
            service.resolve_call(conn, key, "completed")
    with pytest.raises(errors.InvalidArgument):
        service.resolve_call(conn, job.call_key, "timed_out")  # the sweep's own outcome
    assert snapshot(conn) == before


# -- 2. orphaned calls -------------------------------------------------------------------------

def end_by(conn: Conn, how: str, claim: Claim) -> str:
    """Ends the claim's run the given way; returns the event the end wrote."""
    if how == "force_cancel":
        service.force_cancel(conn, claim.run_id, 1)
        return "force_cancelled"
    if how == "stale_stop":
        backdate_heartbeat(conn, claim.run_id, 3600)
        assert service.get_active_run(conn, 1) is None
        return "stale_stopped"
    if how == "sweep":
        backdate_heartbeat(conn, claim.run_id, 3600)
        assert [r.reason for r in service.cleanup_stuck_runs(conn)] == ["stale_heartbeat"]
        return "cleaned_up"
    assert how == "startup"
    backdate_heartbeat(conn, claim.run_id, 3600)  # its dead incarnation's run: stale
    assert [r.reason for r in service.cleanup_stuck_runs(conn, True, claim.worker_id)] == ["on_startup"]
    return "cleaned_up"


@pytest.mark.parametrize("how", ["force_cancel", "stale_stop", "sweep", "startup"])
def test_a_run_ending_under_its_calls_marks_them_orphaned(conn: Conn, how: str) -> None:
    claim = start(conn, jobs=4)
    calls = [hand_out(conn, claim), hand_out(conn, claim)]
    event = end_by(conn, how, claim)
    for call in calls:
        row = job_row(conn, call.id)
        # The app's status domain is not extended: still in_progress, marked by the library.
        assert row["status"] == "in_progress" and row["orphaned_at"] is not None
        assert row["orphan_reason"].startswith("run ")
    queued = conn.execute("SELECT count(*) FROM outbound_call_jobs WHERE run_id = %s AND status = 'failed'"
                          " AND orphaned_at IS NULL", (claim.run_id,)).fetchone()
    assert queued == (2,)  # queued jobs are failed as before, never marked orphaned
    detail = conn.execute("SELECT detail FROM outbound_heartbeat.run_events WHERE run_id = %s AND event = %s",
                          (claim.run_id, event)).fetchone()
    assert detail is not None and detail[0]["calls_orphaned"] == 2
    per_run = conn.execute("SELECT run_id, business_id, orphaned_calls FROM outbound_heartbeat.orphaned_runs"
                           ).fetchall()
    assert per_run == [(claim.run_id, 1, 2)]
    listed = conn.execute("SELECT job_id FROM outbound_heartbeat.orphaned_calls ORDER BY job_id").fetchall()
    assert listed == [(c.id,) for c in calls]


@pytest.mark.parametrize("status", ["completed", "failed", "cancelled"])
@pytest.mark.parametrize("how", ["finish_run", "finish_runs"])
def test_a_run_its_worker_finishes_orphans_its_calls_in_progress(conn: Conn, how: str, status: str) -> None:
    claim = start(conn, jobs=3)
    call, done = hand_out(conn, claim), hand_out(conn, claim)
    service.finish_job(conn, done.id, claim.worker_id, claim.lease_epoch, "completed")
    if how == "finish_run":
        outcome = service.finish_run(conn, claim.run_id, claim.worker_id, claim.lease_epoch, status)
    else:
        (outcome,) = service.finish_runs(conn, [(claim.run_id, claim.worker_id, claim.lease_epoch, status)])
    assert outcome.outcome == "finished"
    row = job_row(conn, call.id)
    assert row["status"] == "in_progress" and row["orphaned_at"] is not None
    assert row["orphan_reason"] == f"run finished ({status}) by its worker with the call in progress"
    assert job_row(conn, done.id)["orphaned_at"] is None  # settled before: not an orphan
    detail = conn.execute("SELECT detail FROM outbound_heartbeat.run_events WHERE run_id = %s"
                          " AND event = 'finished'", (claim.run_id,)).fetchone()
    assert detail is not None and detail[0]["calls_orphaned"] == 1
    assert conn.execute("SELECT job_id FROM outbound_heartbeat.orphaned_calls").fetchall() == [(call.id,)]
    # No callback: the timeout fails it, as any orphan.
    backdate_orphan(conn, call.id)
    service.cleanup_stuck_runs(conn)
    assert (job_row(conn, call.id)["status"], job_row(conn, call.id)["call_outcome"]) == ("failed", "timed_out")


def test_metrics_and_health_check_show_orphans_and_their_age(conn: Conn) -> None:
    claim = start(conn, jobs=2)
    first, second = hand_out(conn, claim), hand_out(conn, claim)

    def gauges() -> dict[str, float]:
        return {m.name: m.value for m in service.metrics(conn) if "orphaned" in m.name}

    assert gauges() == {"outbound_heartbeat_orphaned_calls": 0,
                        "outbound_heartbeat_oldest_orphaned_call_age_seconds": 0}
    service.force_cancel(conn, claim.run_id)
    backdate_orphan(conn, first.id, "10 minutes")
    seen = gauges()
    assert seen["outbound_heartbeat_orphaned_calls"] == 2
    assert 600 <= seen["outbound_heartbeat_oldest_orphaned_call_age_seconds"] < 700
    alerts = [a for a in service.health_check(conn) if "orphan" in a.check_name]
    assert [(a.severity, a.check_name, a.run_id) for a in alerts] == [("warning", "orphaned_calls", claim.run_id)]
    assert "2 orphaned call(s)" in alerts[0].detail
    # Past call_orphan_timeout with nobody sweeping: critical.
    backdate_orphan(conn, second.id, "2 hours")
    alerts = [a for a in service.health_check(conn) if "orphan" in a.check_name]
    assert [(a.severity, a.check_name) for a in alerts] == [("critical", "orphan_timeout_overdue")]


# -- 3. resolve_call ---------------------------------------------------------------------------

def orphaned_call(conn: Conn, business_id: int = 1) -> tuple[Claim, Job]:
    claim = start(conn, business_id, jobs=2)
    call = hand_out(conn, claim)
    service.force_cancel(conn, claim.run_id)
    return claim, call


def test_duplicate_callbacks_settle_once(conn: Conn) -> None:
    claim, call = orphaned_call(conn)
    key = call.call_key or ""
    first = service.resolve_call(conn, key, "completed", "answered, 42 s", 1)
    assert (first.answer, first.status, first.call_outcome) == ("resolved", "completed", "completed")
    row = job_row(conn, call.id)
    assert (row["status"], row["call_outcome"], row["error_message"]) == ("completed", "completed", None)
    assert row["orphaned_at"] is not None  # the history of the call stays readable
    before = snapshot(conn)
    for _ in range(3):
        again = service.resolve_call(conn, key, "completed", "answered, 42 s", 1)
        assert again.answer == "already_resolved"
        assert (again.status, again.call_outcome, again.settled_at) == ("completed", "completed", first.settled_at)
    assert snapshot(conn) == before  # nothing written twice
    assert settled_events(conn, call.id) == ["call_resolved"]
    assert conn.execute("SELECT * FROM outbound_heartbeat.verify_events()").fetchall() == []
    assert conn.execute("SELECT count(*) FROM outbound_heartbeat.orphaned_calls").fetchone() == (0,)
    del claim


def test_out_of_order_callbacks_keep_the_first_outcome(conn: Conn) -> None:
    _, call = orphaned_call(conn)
    key = call.call_key or ""
    assert service.resolve_call(conn, key, "not_placed").answer == "resolved"
    row = job_row(conn, call.id)
    assert (row["status"], row["call_outcome"], row["error_message"]) == ("failed", "not_placed", "call never placed")
    before = snapshot(conn)
    for _ in range(2):  # the same late report twice: audited once
        late = service.resolve_call(conn, key, "completed", "a contradicting late callback")
        assert (late.answer, late.status, late.call_outcome) == ("already_resolved", "failed", "not_placed")
    assert rows_only(conn) == before[:2] + before[3:]  # the job is never changed
    assert new_events(conn, before) == [("call_late_callback", {
        "job_id": late.job_id, "lease_epoch": 1, "call_attempt": 1, "source": "callback",
        "reported": "completed", "status": "failed", "call_outcome": "not_placed",
        "detail": "a contradicting late callback"})]
    # A repeat of the settled outcome contradicts nothing: no event.
    assert service.resolve_call(conn, key, "not_placed").answer == "already_resolved"
    # Another distinct late report (from the provider) is one more event.
    assert service.resolve_call(conn, key, "completed", None, None, "provider").answer == "already_resolved"
    assert [e for e, _ in new_events(conn, before)] == ["call_late_callback"] * 2
    assert rows_only(conn) == before[:2] + before[3:]


def test_cross_tenant_callback_is_refused_and_audited(conn: Conn) -> None:
    claim, call = orphaned_call(conn, business_id=1)
    before = snapshot(conn)
    with pytest.raises(errors.AccessDenied) as err:
        service.resolve_call(conn, call.call_key or "", "completed", None, 2)
    # The caller learns nothing but that this call is not its business's (no run id).
    assert err.value.message == "this call does not belong to business 2"
    assert err.value.argument == "business_id"
    assert rows_only(conn) == before[:2] + before[3:]
    assert new_events(conn, before) == [("access_denied", {
        "action": "resolve_call", "owner_business_id": 1, "job_id": call.id})]
    (denied,) = [e for e in service.list_events(conn, run_id=claim.run_id) if e.event == "access_denied"]
    assert denied.business_id == 2
    # A forged key of the same job: OH404 as for any unknown key, no tenant answer, no audit.
    after = snapshot(conn)
    forged = (call.call_key or "")[:-32] + "f" * 32
    with pytest.raises(errors.CallNotFound):
        service.resolve_call(conn, forged, "completed", None, 2)
    # Nor can the audit function be made to record a refusal for a forged key, or for the owner.
    with pytest.raises(psycopg.Error) as refused:
        conn.execute("SELECT outbound_heartbeat.audit_call_access_denied(%s, 2)", (forged,))
    assert refused.value.sqlstate == "OH404"
    with pytest.raises(psycopg.Error) as refused:
        conn.execute("SELECT outbound_heartbeat.audit_call_access_denied(%s, 1)", (call.call_key,))
    assert refused.value.sqlstate == "OH400"
    assert snapshot(conn) == after
    assert service.resolve_call(conn, call.call_key or "", "completed", None, 1).answer == "resolved"


def test_a_callback_while_the_worker_lives_then_its_finish_job(conn: Conn) -> None:
    claim = start(conn, jobs=2)
    call = hand_out(conn, claim)
    assert service.resolve_call(conn, call.call_key or "", "completed").answer == "resolved"
    done = service.finish_job(conn, call.id, claim.worker_id, claim.lease_epoch, "completed")
    assert done.outcome == "already_finished"
    # And the worker first, the callback after: settled once, by the worker.
    other = hand_out(conn, claim)
    service.finish_job(conn, other.id, claim.worker_id, claim.lease_epoch, "failed", "no answer")
    late = service.resolve_call(conn, other.call_key or "", "completed")
    assert (late.answer, late.status, late.call_outcome) == ("already_resolved", "failed", None)
    assert settled_events(conn, other.id) == []


def test_an_app_check_constraint_on_status_keeps_working(conn: Conn) -> None:
    conn.execute("ALTER TABLE outbound_call_jobs ADD CONSTRAINT app_status_check"
                 " CHECK (status IN ('queued', 'in_progress', 'completed', 'failed'))")
    _, resolved = orphaned_call(conn)
    _, timed_out = orphaned_call(conn)
    assert service.resolve_call(conn, resolved.call_key or "", "failed").answer == "resolved"
    backdate_orphan(conn, timed_out.id)
    service.cleanup_stuck_runs(conn)
    assert job_row(conn, timed_out.id)["status"] == "failed"


# -- 4. the orphan timeout ---------------------------------------------------------------------

def test_default_timeout_and_its_bounds(conn: Conn) -> None:
    assert conn.execute("SELECT call_orphan_timeout FROM outbound_heartbeat.current_settings()"
                        ).fetchone() == (timedelta(hours=1),)
    for bad in ("0", "-1 minute", "101 years"):
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("UPDATE outbound_heartbeat.settings SET call_orphan_timeout = %s::interval", (bad,))


def test_the_sweep_fails_an_orphan_past_the_timeout_then_a_late_callback_changes_nothing(conn: Conn) -> None:
    claim, call = orphaned_call(conn)
    fresh = orphaned_call(conn)[1]
    service.cleanup_stuck_runs(conn)
    assert job_row(conn, call.id)["status"] == "in_progress"  # not yet due
    backdate_orphan(conn, call.id)
    assert service.cleanup_stuck_runs(conn) == []  # no run reclaimed: calls are not runs
    row = job_row(conn, call.id)
    assert (row["status"], row["call_outcome"]) == ("failed", "timed_out")
    assert row["error_message"] == "call orphaned (run force-cancelled) and not resolved within 01:00:00"
    assert job_row(conn, fresh.id)["status"] == "in_progress"
    assert events(conn, claim.run_id)[-1] == "call_timed_out"
    before = snapshot(conn)
    late = service.resolve_call(conn, call.call_key or "", "completed")
    assert (late.answer, late.status, late.call_outcome) == ("already_resolved", "failed", "timed_out")
    assert rows_only(conn) == before[:2] + before[3:]  # the job is never changed
    # The contradiction (the timeout failed it, the call completed) is on the record.
    assert [(e, d["reported"], d["call_outcome"]) for e, d in new_events(conn, before)] == \
        [("call_late_callback", "completed", "timed_out")]
    service.cleanup_stuck_runs(conn)
    assert settled_events(conn, call.id) == ["call_timed_out"]
    totals = {m.labels.get("event"): m.value for m in service.metrics(conn)
              if m.name == "outbound_heartbeat_events_total"}
    assert totals["call_timed_out"] == 1


def test_the_read_path_fails_its_business_orphans_only(conn: Conn) -> None:
    _, mine = orphaned_call(conn, business_id=1)
    _, theirs = orphaned_call(conn, business_id=2)
    backdate_orphan(conn, mine.id)
    backdate_orphan(conn, theirs.id)
    service.get_active_run(conn, 1)
    assert job_row(conn, mine.id)["call_outcome"] == "timed_out"
    assert job_row(conn, theirs.id)["status"] == "in_progress"


def race_once(dsn: str, conn: Conn) -> str:
    """One orphan past its timeout; its callback and the sweep released at the same instant.
    Returns the event that settled it."""
    _, call = orphaned_call(conn)
    backdate_orphan(conn, call.id)
    barrier = threading.Barrier(2)
    answers: dict[str, Any] = {}

    def callback() -> None:
        with psycopg.connect(dsn, autocommit=True) as c:
            barrier.wait()
            answers["callback"] = service.resolve_call(c, call.call_key or "", "completed")

    def sweep() -> None:
        with psycopg.connect(dsn, autocommit=True) as c:
            barrier.wait()
            answers["sweep"] = service.cleanup_stuck_runs(c)

    threads = [threading.Thread(target=callback), threading.Thread(target=sweep)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert set(answers) == {"callback", "sweep"}, answers
    row = job_row(conn, call.id)
    settled = settled_events(conn, call.id)
    assert len(settled) == 1, settled  # exactly one outcome, audited once
    if answers["callback"].answer == "resolved":
        assert (row["status"], row["call_outcome"], settled) == ("completed", "completed", ["call_resolved"])
    else:
        assert answers["callback"].answer == "already_resolved"
        assert answers["callback"].call_outcome == "timed_out"
        assert (row["status"], row["call_outcome"], settled) == ("failed", "timed_out", ["call_timed_out"])
    return settled[0]


def test_a_callback_racing_the_timeout_sweep_settles_once(dsn: str, conn: Conn) -> None:
    winners = [race_once(dsn, conn) for _ in range(12)]
    assert set(winners) <= {"call_resolved", "call_timed_out"}


def test_cli_status_lists_orphaned_calls(dsn: str, conn: Conn) -> None:
    import io

    from outbound_heartbeat import cli

    claim, call = orphaned_call(conn, business_id=5)
    backdate_orphan(conn, call.id, "10 minutes")
    out = io.StringIO()
    assert cli.main(["status", "--dsn", dsn], out=out) == 0
    lines = out.getvalue().splitlines()
    at = lines.index("orphaned calls (their run ended under them; no callback yet):")
    assert lines[at + 1].split()[:4] == ["run", "business", "calls", "oldest"]
    assert lines[at + 2].split()[:4] == [str(claim.run_id), "5", "1", "10.0min"]


# -- the whole lifecycle as the app role -------------------------------------------------------

def test_the_lifecycle_as_the_app_role(dsn: str, conn: Conn, roles: dict[str, str]) -> None:
    with psycopg.connect(dsn, autocommit=True) as app:
        app.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(roles["app"])))
        claim = start(app, jobs=3)
        settled, orphan = hand_out(app, claim), hand_out(app, claim)
        # The key and the library's marks are the library's: the app reads them, never writes.
        for column in ("call_key", "call_attempt", "orphaned_at", "orphan_reason", "call_outcome",
                       "call_settled_at"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                app.execute(sql.SQL("UPDATE outbound_call_jobs SET {} = NULL WHERE id = %s").format(
                    sql.Identifier(column)), (settled.id,))
        service.force_cancel(app, claim.run_id, 1)
        assert app.execute("SELECT count(*) FROM outbound_heartbeat.orphaned_calls").fetchone() == (2,)
        assert app.execute("SELECT orphaned_calls FROM outbound_heartbeat.orphaned_runs").fetchone() == (2,)
        with pytest.raises(errors.AccessDenied):
            service.resolve_call(app, settled.call_key or "", "completed", None, 2)
        assert service.resolve_call(app, settled.call_key or "", "completed", None, 1).answer == "resolved"
        app.execute("RESET ROLE")
        backdate_orphan(app, orphan.id)
        app.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(roles["app"])))
        assert service.get_active_run(app, 1) is None
        assert job_row(app, orphan.id)["call_outcome"] == "timed_out"
        assert any(m.name == "outbound_heartbeat_orphaned_calls" and m.value == 0 for m in service.metrics(app))
        assert [a for a in service.health_check(app) if "orphan" in a.check_name] == []
        assert [e.event for e in service.list_events(app, run_id=claim.run_id)][:2] == \
            ["call_timed_out", "call_resolved"]


# -- a worker process killed between next_job and the callback ---------------------------------

@pytest.mark.slow  # a real worker process, SIGKILLed
@pytest.mark.parametrize("settled_by", ["callback", "timeout"])
def test_a_worker_sigkilled_mid_call_leaves_it_orphaned_until_settled(
        dsn: str, conn: Conn, settled_by: str) -> None:
    conn.execute("UPDATE outbound_heartbeat.settings SET stale_after = interval '2 seconds'")
    run = service.create_run(conn, 1, [{"n": i} for i in range(3)])
    # The dial of the first job hangs: the worker dies after next_job, before any callback.
    worker = Worker(dsn, "--run-id", str(run.id), "--hang-on-job", "1", "--interval", "0.5",
                    "--worker-id", f"killed-{settled_by}")
    try:
        dialing = worker.wait_for("dialing", timeout=20)
        worker.signal(signal.SIGKILL)
        worker.wait_exit(10)
    finally:
        worker.close()
    job_id = dialing["job_id"]
    deadline = time.monotonic() + 10
    while service.get_active_run(conn, 1) is not None:  # the read path stops the dead run
        assert time.monotonic() < deadline, "the dead worker's run was never stopped"
        time.sleep(0.2)
    row = job_row(conn, job_id)
    assert row["status"] == "in_progress" and row["orphaned_at"] is not None
    assert row["orphan_reason"] == "run stopped: worker heartbeat stale"
    if settled_by == "callback":
        answer = service.resolve_call(conn, row["call_key"], "completed", "answered", 1)
        assert answer.answer == "resolved"
        assert job_row(conn, job_id)["status"] == "completed"
    else:
        backdate_orphan(conn, job_id)
        service.cleanup_stuck_runs(conn)
        assert (job_row(conn, job_id)["status"], job_row(conn, job_id)["call_outcome"]) == ("failed", "timed_out")
    assert conn.execute("SELECT count(*) FROM outbound_heartbeat.orphaned_calls").fetchone() == (0,)
    assert settled_events(conn, job_id) == ["call_resolved" if settled_by == "callback" else "call_timed_out"]


# -- 9. legacy rows ----------------------------------------------------------------------------

def test_the_upgrade_adopts_in_progress_jobs_of_ended_runs_in_batches(
        dsn: str, conn: Conn, monkeypatch: pytest.MonkeyPatch) -> None:
    # Rows as an earlier release left them: in-progress jobs of ended runs, never marked.
    ended = conn.execute(
        "INSERT INTO outbound_call_runs (business_id, status, ended_at)"
        " VALUES (1, 'stopped', now() - interval '3 days') RETURNING id").fetchone()
    live = conn.execute("INSERT INTO outbound_call_runs (business_id, status) VALUES (1, 'pending')"
                        " RETURNING id").fetchone()
    assert ended is not None and live is not None
    conn.execute("INSERT INTO outbound_call_jobs (run_id, business_id, status)"
                 " SELECT %s, 1, 'in_progress' FROM generate_series(1, 5)", (ended[0],))
    conn.execute("INSERT INTO outbound_call_jobs (run_id, business_id, status) VALUES (%s, 1, 'in_progress')",
                 (live[0],))
    batches: list[int] = []
    original = upgrade._adopt_orphaned_calls

    def counted(c: Conn, policy: upgrade.LockPolicy) -> bool:
        found = original(c, policy)
        batches.append(int(found))
        return found

    monkeypatch.setattr(upgrade, "ADOPTION_BATCH", 2)
    monkeypatch.setattr(upgrade, "_adopt_orphaned_calls", counted)
    with psycopg.connect(dsn, autocommit=True) as migrating:
        upgrade.apply_sql_online(migrating, SQL_DIR)
    assert batches == [1, 1, 1, 0]  # 2 + 2 + 1 rows, each batch its own transaction
    rows = conn.execute("SELECT run_id, status, orphaned_at IS NOT NULL,"
                        " orphaned_at = (SELECT ended_at FROM outbound_call_runs WHERE id = run_id),"
                        " orphan_reason FROM outbound_call_jobs ORDER BY id").fetchall()
    assert rows == [(ended[0], "in_progress", True, True,
                     "run stopped before calls were tracked (adopted by the upgrade)")] * 5 + \
        [(live[0], "in_progress", False, None, None)]
    # Adopted orphans are settled like any other: the timeout counts from the run's end.
    service.cleanup_stuck_runs(conn)
    assert conn.execute("SELECT count(*) FROM outbound_call_jobs WHERE call_outcome = 'timed_out'"
                        ).fetchone() == (5,)


# -- the status-callback endpoint (Flask and FastAPI) ------------------------------------------

def post_status(client: Any, path_key: str, body: Any, business: int | None = 1) -> tuple[int, Any]:
    headers = {} if business is None else {"X-Business-Id": str(business)}
    response = client.raw.post(f"{client.prefix}/calls/{path_key}/status", json=body, headers=headers)
    return response.status_code, response.get_json() if client.kind == "flask" else response.json()


@pytest.mark.parametrize("kind", ["flask", "fastapi"])
def test_the_status_callback_endpoint(kind: str, dsn: str, conn: Conn) -> None:
    from ..helpers import make_client

    _, call = orphaned_call(conn, business_id=1)
    key = call.call_key or ""
    for client in make_client(kind, dsn, "en"):
        post = functools.partial(post_status, client)
        before = snapshot(conn)
        assert post(key, {"outcome": "completed"}, business=None)[0] == 401
        status, body = post(key, {"outcome": "completed"}, business=2)
        assert (status, body["code"]) == (403, "OH403")
        assert post(key, {"outcome": "hung up"})[1]["code"] == "OH400"
        assert post(key, ["completed"])[1]["code"] == "OH400"
        assert post(key, {"outcome": "completed", "detail": 7})[0] == 400
        assert post("oh1-1-1-1-" + "0" * 32, {"outcome": "completed"})[0] == 404
        assert post("not-a-key", {"outcome": "completed"})[0] == 400
        # Every refusal wrote nothing but the cross-business one's audit event.
        assert rows_only(conn) == before[:2] + before[3:]
        assert [e for e, _ in new_events(conn, before)] == ["access_denied"]
        status, body = post(key, {"outcome": "completed", "detail": "answered"})
        assert status == 200
        assert (body["answer"], body["job_id"], body["status"], body["call_outcome"]) == \
            ("resolved", call.id, "completed", "completed")
        status, again = post(key, {"outcome": "failed"})  # a late, contradicting repeat
        assert (status, again["answer"], again["status"]) == (200, "already_resolved", "completed")
        assert settled_events(conn, call.id) == ["call_resolved"]
        late = conn.execute("SELECT detail ->> 'source' FROM outbound_heartbeat.run_events"
                            " WHERE event = 'call_late_callback'").fetchall()
        assert late == [("callback",)]  # the endpoint reports as the status callback


@pytest.mark.parametrize("kind", ["flask", "fastapi"])
def test_a_status_callback_body_past_the_cap_is_refused_unread(kind: str, dsn: str, conn: Conn) -> None:
    """The endpoint faces the internet: a body past MAX_CALLBACK_BODY is refused (400 naming
    ``body``) having read one byte more, nothing written; a JSON body just under it (spaces
    after a detail of 2,000 characters with a CR LF) still settles the call."""
    from outbound_heartbeat.web import MAX_CALLBACK_BODY
    from outbound_heartbeat.web.endpoints import status_call

    from ..helpers import make_client

    _, call = orphaned_call(conn, business_id=1)
    key = call.call_key or ""
    url = f"/calls/{key}/status"
    for client in make_client(kind, dsn, "en"):
        def send(raw: bytes, client: Any = client) -> Any:
            payload = {"content": raw} if kind == "fastapi" else {"data": raw}
            return client.raw.post(client.prefix + url, **payload, headers={
                "X-Business-Id": "1", "Content-Type": "application/json"})

        before = snapshot(conn)
        huge = b'{"outcome": "completed", "detail": "' + b"x" * (8 * MAX_CALLBACK_BODY) + b'"}'
        response = send(huge)
        body = response.get_json() if kind == "flask" else response.json()
        assert (response.status_code, body["code"]) == (400, "OH400")
        with pytest.raises(errors.InvalidArgument) as refused:
            status_call(key, 1, huge[: MAX_CALLBACK_BODY + 1])  # what the adapters read
        assert refused.value.argument == "body"
        assert snapshot(conn) == before
        detail = "line one\r\nline two " + "y" * 1980
        padded = (b'{"outcome": "completed", "detail": ' + json.dumps(detail).encode() + b"}").ljust(
            MAX_CALLBACK_BODY, b" ")
        assert len(padded) == MAX_CALLBACK_BODY
        assert send(padded).status_code == 200
        assert job_row(conn, call.id)["error_message"] is None  # completed: no error text
        stored = conn.execute("SELECT detail ->> 'detail' FROM outbound_heartbeat.run_events"
                              " WHERE event = 'call_resolved' AND (detail ->> 'job_id')::bigint = %s",
                              (call.id,)).fetchone()
        assert stored == (detail,)  # CR LF kept as data, in the JSON detail of the audit row


# -- a run resumed, or ended, under its calls: every path orphans them -------------------------

def test_a_resumed_run_orphans_the_calls_of_its_dead_incarnation(conn: Conn) -> None:
    claim = start(conn, jobs=3)
    old, done = hand_out(conn, claim), hand_out(conn, claim)
    service.finish_job(conn, done.id, claim.worker_id, claim.lease_epoch, "completed")
    backdate_heartbeat(conn, claim.run_id, 3600)  # the incarnation died mid-call
    resumed = service.claim_run(conn, claim.worker_id)
    assert resumed is not None and resumed.resumed and resumed.lease_epoch == claim.lease_epoch + 1
    row = job_row(conn, old.id)
    assert row["status"] == "in_progress" and row["orphaned_at"] is not None
    assert row["orphan_reason"] == (f"lease resumed by worker {claim.worker_id} under epoch {resumed.lease_epoch}:"
                                    " the call was handed out by a previous incarnation")
    detail = conn.execute("SELECT detail FROM outbound_heartbeat.run_events WHERE run_id = %s"
                          " AND event = 'resumed'", (claim.run_id,)).fetchone()
    assert detail is not None and detail[0]["calls_orphaned"] == 1
    # The resumed worker is never handed the orphan again, not even by a retried request id.
    lease = (resumed.run_id, resumed.worker_id, resumed.lease_epoch)
    third = service.next_job(conn, *lease)
    assert third is not None and third.id not in (old.id, done.id)
    service.finish_job(conn, third.id, resumed.worker_id, resumed.lease_epoch, "completed")
    assert service.next_job(conn, *lease) is None
    # ... nor held back by it: the run completes, the orphan waits for its callback.
    assert service.finish_run(conn, *lease, "completed").outcome == "finished"
    assert job_row(conn, old.id)["orphan_reason"].startswith("lease resumed")  # not re-marked
    # Its callback still settles it; no callback: the timeout does.
    assert service.resolve_call(conn, old.call_key or "", "completed").answer == "resolved"


def test_the_orphans_of_a_resumed_run_do_not_keep_the_sweep_from_completing_it(conn: Conn) -> None:
    claim = start(conn, jobs=1)
    old = hand_out(conn, claim)
    backdate_heartbeat(conn, claim.run_id, 3600)
    resumed = service.claim_run(conn, claim.worker_id)
    assert resumed is not None
    # Nothing queued, only the orphan in progress: the empty-run rule completes the run.
    assert [(r.run_id, r.reason, r.status) for r in service.cleanup_stuck_runs(conn)] == \
        [(claim.run_id, "empty", "completed")]
    assert job_row(conn, old.id)["status"] == "in_progress"  # still waiting for its callback
    assert service.resolve_call(conn, old.call_key or "", "failed", "no answer").answer == "resolved"


def test_resuming_a_run_with_no_call_in_flight_orphans_nothing(conn: Conn) -> None:
    claim = start(conn, jobs=1)
    backdate_heartbeat(conn, claim.run_id, 3600)
    assert service.claim_run(conn, claim.worker_id) is not None
    detail = conn.execute("SELECT detail FROM outbound_heartbeat.run_events WHERE run_id = %s"
                          " AND event = 'resumed'", (claim.run_id,)).fetchone()
    assert detail is not None and "calls_orphaned" not in detail[0]


def test_the_resumed_worker_finishing_an_orphan_the_timeout_failed_is_told_so(conn: Conn) -> None:
    claim = start(conn, jobs=2)
    old = hand_out(conn, claim)
    backdate_heartbeat(conn, claim.run_id, 3600)
    resumed = service.claim_run(conn, claim.worker_id)
    assert resumed is not None
    backdate_orphan(conn, old.id)
    service.cleanup_stuck_runs(conn)
    assert job_row(conn, old.id)["call_outcome"] == "timed_out"
    before = snapshot(conn)
    done = service.finish_job(conn, old.id, resumed.worker_id, resumed.lease_epoch, "completed")
    assert (done.outcome, done.status) == ("already_settled", "failed")
    assert rows_only(conn) == before[:2] + before[3:]
    assert [(e, d["source"], d["reported"], d["call_outcome"]) for e, d in new_events(conn, before)] == \
        [("call_late_finish", "worker", "completed", "timed_out")]
    # The same status as the settlement is no contradiction.
    assert service.finish_job(conn, old.id, resumed.worker_id, resumed.lease_epoch, "failed").outcome == \
        "already_finished"


def test_the_sweep_times_out_an_in_progress_call_of_an_ended_run_left_unmarked(conn: Conn) -> None:
    # A run ended by a path that did not mark its call (an app's own UPDATE of the run, an
    # earlier bug): the sweep marks it as of the run's end, and the timeout counts from there.
    claim = start(conn, jobs=1)
    call = hand_out(conn, claim)
    conn.execute("UPDATE outbound_call_runs SET status = 'stopped', ended_at = now() - interval '2 hours',"
                 " locked_by_worker = NULL WHERE id = %s", (claim.run_id,))
    assert job_row(conn, call.id)["orphaned_at"] is None
    service.cleanup_stuck_runs(conn)
    row = job_row(conn, call.id)
    assert (row["status"], row["call_outcome"]) == ("failed", "timed_out")
    assert row["orphan_reason"] == "run stopped without marking the call in progress (adopted by the sweep)"
    # A fresh one is marked now, failed only after the timeout.
    fresh_claim = start(conn, jobs=1)
    fresh = hand_out(conn, fresh_claim)
    conn.execute("UPDATE outbound_call_runs SET status = 'stopped', ended_at = now(),"
                 " locked_by_worker = NULL WHERE id = %s", (fresh_claim.run_id,))
    service.cleanup_stuck_runs(conn)
    assert job_row(conn, fresh.id)["status"] == "in_progress"
    assert conn.execute("SELECT job_id FROM outbound_heartbeat.orphaned_calls").fetchall() == [(fresh.id,)]


# -- the key is verified before anything about its job is answered -----------------------------

def test_a_forged_older_key_is_not_found_and_says_nothing_of_the_job(conn: Conn) -> None:
    claim = start(conn, jobs=1)
    first = hand_out(conn, claim)
    conn.execute("UPDATE outbound_call_jobs SET status = 'queued' WHERE id = %s", (first.id,))
    second = hand_out(conn, claim)  # attempt 2: attempt 1's key is older
    assert second.id == first.id
    old_numbers = (first.call_key or "")[:-32]
    forged_older = old_numbers + "0" * 32
    unknown = f"oh1-{10**12}-1-1-" + "0" * 32
    messages = []
    for key in (forged_older, unknown):
        with pytest.raises(errors.CallNotFound) as err:
            service.resolve_call(conn, key, "completed", None, 2)  # a foreign tenant: still OH404
        messages.append((err.value.sqlstate, err.value.message, err.value.argument))
    assert messages == [("OH404", "no call has this key", "call_key")] * 2
    # The genuine older key: superseded, the newer attempt untouched.
    old = service.resolve_call(conn, first.call_key or "", "completed")
    assert (old.answer, old.status) == ("superseded", "in_progress")
    assert service.resolve_call(conn, second.call_key or "", "completed").answer == "resolved"


def test_keys_are_derived_from_a_secret_only_the_owner_role_reads(
        dsn: str, conn: Conn, roles: dict[str, str]) -> None:
    claim = start(conn, jobs=1)
    job = hand_out(conn, claim)
    derived = conn.execute("SELECT outbound_heartbeat._call_key(%s, %s, 1)", (job.id, claim.lease_epoch)).fetchone()
    assert derived == (job.call_key,)
    other = conn.execute("SELECT outbound_heartbeat._call_key(%s, %s, 2)", (job.id, claim.lease_epoch)).fetchone()
    assert other is not None and other[0][-32:] != (job.call_key or "")[-32:]
    privileges = conn.execute(
        "SELECT r.rolname, has_table_privilege(r.rolname, 'outbound_heartbeat.call_key_secret', 'SELECT')"
        " FROM pg_roles AS r WHERE r.rolname = ANY (%s) ORDER BY 1",
        ([roles["app"], "outbound_heartbeat_owner"],)).fetchall()
    assert dict(privileges) == {roles["app"]: False, "outbound_heartbeat_owner": True}
    with psycopg.connect(dsn, autocommit=True) as app:
        app.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(roles["app"])))
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            app.execute("SELECT * FROM outbound_heartbeat.call_key_secret")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            app.execute("SELECT outbound_heartbeat._call_key(1, 1, 1)")


# -- settled otherwise, then the worker's finish_job -------------------------------------------

def test_finish_job_after_a_contradicting_callback_is_already_settled(conn: Conn) -> None:
    claim = start(conn, jobs=2)
    call = hand_out(conn, claim)
    assert service.resolve_call(conn, call.call_key or "", "failed", "busy").answer == "resolved"
    before = snapshot(conn)
    for _ in range(2):
        done = service.finish_job(conn, call.id, claim.worker_id, claim.lease_epoch, "completed")
        assert (done.outcome, done.status, done.job_id, done.run_id) == \
            ("already_settled", "failed", call.id, claim.run_id)
    assert rows_only(conn) == before[:2] + before[3:]
    assert new_events(conn, before) == [("call_late_finish", {
        "job_id": call.id, "lease_epoch": claim.lease_epoch, "call_attempt": 1, "source": "worker",
        "reported": "completed", "status": "failed", "call_outcome": "failed", "detail": None})]
    # Agreeing with the callback: already_finished, nothing recorded.
    assert service.finish_job(conn, call.id, claim.worker_id, claim.lease_epoch, "failed").outcome == \
        "already_finished"
    assert len(new_events(conn, before)) == 1


# -- retry without calling twice (opt-in per run) ----------------------------------------------

def test_an_unplaced_call_of_an_opted_in_run_goes_back_to_the_queue(conn: Conn) -> None:
    run = service.create_run(conn, 1, [{"n": 0}], retry_unplaced=True)
    claim = service.claim_run(conn, "w1", run.id)
    assert claim is not None
    first = hand_out(conn, claim)
    answer = service.resolve_call(conn, first.call_key or "", "not_placed", "carrier refused")
    assert (answer.answer, answer.status, answer.call_outcome) == ("requeued", "queued", "not_placed")
    row = job_row(conn, first.id)
    assert (row["status"], row["call_outcome"], row["call_key"]) == ("queued", "not_placed", first.call_key)
    assert events(conn, run.id)[-1] == "call_requeued"
    # The old key is superseded from now on, before and after the new attempt.
    assert service.resolve_call(conn, first.call_key or "", "completed").answer == "superseded"
    again = hand_out(conn, claim)
    assert again.id == first.id and again.call_key != first.call_key
    match = KEY.match(again.call_key or "")
    assert match is not None and int(match[3]) == 2
    assert service.resolve_call(conn, first.call_key or "", "completed").answer == "superseded"
    # The first attempt's late finish (its key sent with the Job) is superseded too: the second
    # attempt stays the callback's to settle.
    assert service.finish_job(conn, first, claim.worker_id, claim.lease_epoch, "failed").outcome == "superseded"
    assert service.resolve_call(conn, again.call_key or "", "completed").answer == "resolved"
    # Every key handed out for the job is distinct.
    keys = conn.execute("SELECT count(DISTINCT k) FROM unnest(%s::text[]) AS k",
                        ([first.call_key, again.call_key],)).fetchone()
    assert keys == (2,)


def test_an_unplaced_orphan_of_a_resumed_run_is_dialed_again_under_the_new_lease(conn: Conn) -> None:
    run = service.create_run(conn, 1, [{}], retry_unplaced=True)
    claim = service.claim_run(conn, "w1", run.id)
    assert claim is not None
    first = hand_out(conn, claim)
    backdate_heartbeat(conn, run.id, 3600)
    resumed = service.claim_run(conn, "w1")
    assert resumed is not None and resumed.resumed
    assert job_row(conn, first.id)["orphaned_at"] is not None
    # The provider says the dead incarnation's call never went out: the open run dials it again.
    assert service.resolve_call(conn, first.call_key or "", "not_placed").answer == "requeued"
    again = hand_out(conn, resumed)
    match = KEY.match(again.call_key or "")
    assert again.id == first.id and match is not None
    assert (int(match[2]), int(match[3])) == (resumed.lease_epoch, 2)
    row = job_row(conn, first.id)
    assert (row["status"], row["orphaned_at"], row["call_outcome"]) == ("in_progress", None, None)
    assert service.resolve_call(conn, first.call_key or "", "completed").answer == "superseded"
    assert service.resolve_call(conn, again.call_key or "", "completed").answer == "resolved"


def test_an_unplaced_call_is_failed_without_the_opt_in_or_once_the_run_ended(conn: Conn) -> None:
    plain = start(conn, jobs=1)
    call = hand_out(conn, plain)
    assert service.resolve_call(conn, call.call_key or "", "not_placed").answer == "resolved"
    assert job_row(conn, call.id)["status"] == "failed"
    # Opted in, but the run ended under the call: failed as before.
    run = service.create_run(conn, 1, [{}], retry_unplaced=True)
    claim = service.claim_run(conn, "w2", run.id)
    assert claim is not None
    ended = hand_out(conn, claim)
    service.force_cancel(conn, run.id)
    answer = service.resolve_call(conn, ended.call_key or "", "not_placed")
    assert (answer.answer, answer.status) == ("resolved", "failed")
    # An app's own INSERT of a run keeps working, and is simply not opted in.
    app_run = conn.execute("INSERT INTO outbound_call_runs (business_id) VALUES (3) RETURNING id").fetchone()
    assert app_run is not None
    conn.execute("INSERT INTO outbound_call_jobs (run_id, business_id) VALUES (%s, 3)", (app_run[0],))
    app_claim = service.claim_run(conn, "w3", app_run[0])
    assert app_claim is not None
    app_call = hand_out(conn, app_claim)
    assert service.resolve_call(conn, app_call.call_key or "", "not_placed").answer == "resolved"
    with pytest.raises(psycopg.Error) as err:
        conn.execute("SELECT outbound_heartbeat.create_run(1, '[]', NULL)")
    assert (err.value.sqlstate, err.value.diag.column_name) == ("OH400", "retry_unplaced")


# -- the settlement's source ---------------------------------------------------------------------

def test_a_provider_reconciliation_is_recorded_as_such(conn: Conn) -> None:
    _, call = orphaned_call(conn)
    with pytest.raises(errors.InvalidArgument) as err:
        service.resolve_call(conn, call.call_key or "", "completed", None, None, "webhook")
    assert err.value.argument == "source"
    answer = service.resolve_call(conn, call.call_key or "", "completed", "reconciled", 1, source="provider")
    assert answer.answer == "resolved"
    (detail,) = [d for (e, d) in conn.execute(
        "SELECT event, detail FROM outbound_heartbeat.run_events WHERE event LIKE 'call_%'")]
    assert detail["source"] == "provider"
    assert events(conn, call.run_id)[-1] == "call_reconciled"
    # Only the new signature is left (an upgrade drops the old one).
    signatures = conn.execute("SELECT p.oid::regprocedure::text FROM pg_proc AS p"
                              " WHERE p.proname = 'resolve_call'").fetchall()
    assert signatures == [("outbound_heartbeat.resolve_call(text,text,text,bigint,text)",)]


# -- finish_job tells a call's attempts apart (call_key) ---------------------------------------

def retry_run(conn: Conn, jobs: int = 2) -> Claim:
    run = service.create_run(conn, 1, [{"n": i} for i in range(jobs)], retry_unplaced=True)
    claim = service.claim_run(conn, "w1", run.id)
    assert claim is not None
    return claim


@pytest.mark.parametrize("twin", ["sync", "async"])
def test_a_requeued_attempts_late_finish_never_settles_the_next_attempt(conn: Conn, dsn: str, twin: str) -> None:
    # Two calls in flight under one lease; the first never went out and is requeued, then handed
    # out again under the same lease as attempt 2.
    run = service.create_run(conn, 1, [{"n": 0}, {"n": 1}], retry_unplaced=True)
    with leased(twin, dsn, f"attempts-{twin}", run.id, False) as lease:
        first, other = lease.next_job(), lease.next_job()
        assert service.resolve_call(conn, first.call_key or "", "not_placed").answer == "requeued"
        again = lease.next_job()
        assert again.id == first.id and again.call_key != first.call_key
        jobs_before = conn.execute("SELECT * FROM outbound_call_jobs ORDER BY id").fetchall()
        late = lease.finish_job(first, "failed", "no answer")  # attempt 1's worker, late
        assert (late.outcome, late.status, late.job_id) == ("superseded", "in_progress", first.id)
        assert conn.execute("SELECT * FROM outbound_call_jobs ORDER BY id").fetchall() == jobs_before
        # Attempt 2's real callback settles it; attempt 2's own finish then agrees.
        assert service.resolve_call(conn, again.call_key or "", "completed").answer == "resolved"
        assert lease.finish_job(again, "completed").outcome == "already_finished"
        assert lease.finish_job(other, "completed").outcome == "finished"
    assert job_row(conn, first.id)["call_outcome"] == "completed"


def test_finish_job_with_a_key_of_the_current_attempt_finishes_it(conn: Conn) -> None:
    claim = retry_run(conn, jobs=1)
    first = hand_out(conn, claim)
    assert service.resolve_call(conn, first.call_key or "", "not_placed").answer == "requeued"
    # Requeued, not yet handed out again: the attempt is over, nothing is written.
    queued = service.finish_job(conn, first, claim.worker_id, claim.lease_epoch, "completed")
    assert (queued.outcome, queued.status) == ("superseded", "queued")
    again = hand_out(conn, claim)
    done = service.finish_job(conn, again.id, claim.worker_id, claim.lease_epoch, "failed", "busy",
                              call_key=again.call_key)
    assert (done.outcome, done.status) == ("finished", "failed")
    assert job_row(conn, again.id)["error_message"] == "busy"


def test_finish_job_refuses_a_forged_or_foreign_key_like_resolve_call(conn: Conn) -> None:
    claim = start(conn, jobs=2)
    job, other = hand_out(conn, claim), hand_out(conn, claim)
    before = snapshot(conn)
    forged = (job.call_key or "")[:-32] + "0" * 32
    lease = (claim.worker_id, claim.lease_epoch, "completed")
    for key in (forged, f"oh1-{10**12}-1-1-" + "0" * 32):
        with pytest.raises(errors.NotFound) as err:
            service.finish_job(conn, job.id, *lease, call_key=key)
        assert (err.value.sqlstate, err.value.message, err.value.argument) == \
            ("OH404", "no call has this key", "call_key")
    with pytest.raises(errors.InvalidArgument) as bad:
        service.finish_job(conn, job.id, *lease, call_key="not-a-key")
    assert bad.value.argument == "call_key"
    with pytest.raises(errors.InvalidArgument) as foreign:
        service.finish_job(conn, job.id, *lease, call_key=other.call_key)
    assert (foreign.value.argument, foreign.value.message) == ("call_key", f"call_key is not a key of job {job.id}")
    assert snapshot(conn) == before


def test_finish_job_without_a_key_on_a_retried_attempt_of_a_retry_run_is_refused(conn: Conn) -> None:
    # Without a key, attempt 1's late finish and attempt 2's own are the same request: the
    # library refuses both rather than settle attempt 2 on attempt 1's word.
    claim = retry_run(conn, jobs=1)
    first = hand_out(conn, claim)
    assert service.resolve_call(conn, first.call_key or "", "not_placed").answer == "requeued"
    again = hand_out(conn, claim)
    before = snapshot(conn)
    with pytest.raises(errors.InvalidArgument) as err:
        service.finish_job(conn, again.id, claim.worker_id, claim.lease_epoch, "completed")
    assert err.value.argument == "call_key" and "retry_unplaced" in err.value.message
    assert snapshot(conn) == before
    # A first attempt, and any job of a run not opted in, needs no key (the old callers' way).
    assert service.finish_job(conn, again, claim.worker_id, claim.lease_epoch, "completed").outcome == "finished"
    plain = start(conn, jobs=1)
    job = hand_out(conn, plain)
    conn.execute("UPDATE outbound_call_jobs SET status = 'queued' WHERE id = %s", (job.id,))
    job2 = hand_out(conn, plain)
    assert service.finish_job(conn, job2.id, plain.worker_id, plain.lease_epoch, "completed").outcome == "finished"


@pytest.mark.parametrize("with_key", [False, True])
def test_a_resumed_worker_cannot_finish_an_orphan_of_its_previous_incarnation(conn: Conn, with_key: bool) -> None:
    claim = start(conn, jobs=2)
    old = hand_out(conn, claim)
    backdate_heartbeat(conn, claim.run_id, 3600)
    resumed = service.claim_run(conn, claim.worker_id)
    assert resumed is not None and resumed.lease_epoch == claim.lease_epoch + 1
    before = snapshot(conn)
    done = service.finish_job(conn, old if with_key else old.id, resumed.worker_id, resumed.lease_epoch, "completed")
    assert (done.outcome, done.status) == ("orphaned", "in_progress")
    assert rows_only(conn) == before[:2] + before[3:] and new_events(conn, before) == []
    # Its key settles it (the callback); the new lease's own call finishes as ever.
    assert service.resolve_call(conn, old.call_key or "", "failed", "no answer").answer == "resolved"
    new = hand_out(conn, resumed)
    assert service.finish_job(conn, new, resumed.worker_id, resumed.lease_epoch, "completed").outcome == "finished"


def test_next_job_refuses_clearly_a_call_attempt_at_the_bigint_maximum(conn: Conn) -> None:
    claim = start(conn, jobs=1)
    job_id = conn.execute("SELECT id FROM outbound_call_jobs WHERE run_id = %s", (claim.run_id,)).fetchone()
    assert job_id is not None
    conn.execute("UPDATE outbound_call_jobs SET call_attempt = 9223372036854775807 WHERE id = %s", job_id)
    with pytest.raises(psycopg.errors.NumericValueOutOfRange) as err:
        service.next_job(conn, claim.run_id, claim.worker_id, claim.lease_epoch)
    assert f"a queued job ({job_id[0]}) has call_attempt at bigint's maximum" in str(err.value)
    assert err.value.diag.column_name == "call_attempt"
    assert job_row(conn, job_id[0])["status"] == "queued"
