"""The app's, web's and operator's side of the SQL API: create, read with stale detection,
cancel, force-cancel, cleanup, health, the view, events and NOTIFY."""

from __future__ import annotations

import json
import threading
from datetime import timedelta
from typing import Any

import psycopg
import pytest

from outbound_heartbeat import AccessDenied, InvalidArgument, RunLocked, RunNotFound, calls, service

from ..helpers import backdate_heartbeat, events, job_statuses, run_row, snapshot

Conn = psycopg.Connection[Any]


def running(
    conn: Conn, jobs: int = 4, business_id: int = 1, worker: str = "w1", take: int = 0
) -> Any:
    run = service.create_run(conn, business_id, [{"n": i} for i in range(jobs)])
    claim = service.claim_run(conn, worker, run.id)
    assert claim is not None
    for _ in range(take):
        assert service.next_job(conn, claim.run_id, worker, claim.lease_epoch) is not None
    return claim


def test_create_run_with_jobs_and_empty(conn: Conn) -> None:
    run = service.create_run(conn, 7, [{"phone": "1"}, {"phone": "2"}])
    assert (run.business_id, run.status, run.queued_jobs, run.in_progress_jobs) == (
        7,
        "pending",
        2,
        0,
    )
    payloads = conn.execute(
        "SELECT payload FROM outbound_call_jobs WHERE run_id = %s ORDER BY id", (run.id,)
    ).fetchall()
    assert [p[0] for p in payloads] == [{"phone": "1"}, {"phone": "2"}]
    empty = service.create_run(conn, 7, [])
    assert empty.queued_jobs == 0 and empty.status == "pending"
    assert events(conn, run.id) == ["created"]


def test_get_active_run_prefers_running_then_oldest_pending(conn: Conn) -> None:
    assert service.get_active_run(conn, 1) is None
    p1 = service.create_run(conn, 1, [{}])
    service.create_run(conn, 1, [{}])
    active = service.get_active_run(conn, 1)
    assert active is not None and active.id == p1.id and active.status == "pending"
    claim = running(conn, business_id=1, take=1)
    active = service.get_active_run(conn, 1)
    assert active is not None and active.id == claim.run_id
    assert (active.status, active.queued_jobs, active.in_progress_jobs) == ("running", 3, 1)
    assert active.locked_by_worker == "w1" and not active.stale
    assert active.heartbeat_age is not None and active.heartbeat_age < timedelta(seconds=5)
    assert service.get_active_run(conn, 2) is None  # another business sees nothing


def test_stale_detection_at_the_threshold(conn: Conn) -> None:
    claim = running(conn, jobs=4, take=1)
    backdate_heartbeat(conn, claim.run_id, 29)
    assert service.get_active_run(conn, 1) is not None
    assert run_row(conn, claim.run_id)["status"] == "running"
    backdate_heartbeat(conn, claim.run_id, 31)
    assert service.get_active_run(conn, 1) is None
    row = run_row(conn, claim.run_id)
    assert row["status"] == "stopped" and row["ended_at"] is not None
    assert row["locked_by_worker"] is None and row["lock_ts"] is None
    assert row["lease_epoch"] == claim.lease_epoch + 1
    statuses = job_statuses(conn, claim.run_id)
    assert sorted(statuses.values()) == ["failed", "failed", "failed", "in_progress"]
    reasons = conn.execute(
        "SELECT DISTINCT error_message FROM outbound_call_jobs WHERE status = 'failed'"
    ).fetchall()
    assert reasons == [("run stopped: worker heartbeat stale",)]
    assert events(conn, claim.run_id)[-1] == "stale_stopped"


def test_stale_after_argument_and_setting(conn: Conn) -> None:
    claim = running(conn)
    backdate_heartbeat(conn, claim.run_id, 12)
    assert service.get_active_run(conn, 1, stale_after=timedelta(seconds=20)) is not None
    conn.execute("UPDATE outbound_heartbeat.settings SET stale_after = interval '10 seconds'")
    active = service.get_active_run(conn, 1, stale_after=timedelta(seconds=20))
    assert active is not None  # the argument wins over the setting
    assert service.get_active_run(conn, 1) is None  # the setting: 12 s > 10 s


def test_restart_grace_holds_back_stale_detection(conn: Conn) -> None:
    claim = running(conn)
    backdate_heartbeat(conn, claim.run_id, 600)
    conn.execute("UPDATE outbound_heartbeat.settings SET restart_grace = interval '100 years'")
    assert service.get_active_run(conn, 1) is not None
    assert service.cleanup_stuck_runs(conn) == []
    conn.execute("UPDATE outbound_heartbeat.settings SET restart_grace = interval '0'")
    assert service.get_active_run(conn, 1) is None


def test_legacy_run_without_heartbeat_uses_lock_ts(conn: Conn) -> None:
    claim = running(conn)
    conn.execute(
        "UPDATE outbound_call_runs SET last_heartbeat_at = NULL, lock_ts = now() - interval '4 min'"
        " WHERE id = %s",
        (claim.run_id,),
    )
    assert service.get_active_run(conn, 1) is not None
    conn.execute(
        "UPDATE outbound_call_runs SET lock_ts = now() - interval '6 min' WHERE id = %s",
        (claim.run_id,),
    )
    assert service.get_active_run(conn, 1) is None
    assert run_row(conn, claim.run_id)["status"] == "stopped"


def test_request_cancel_running_then_pending(conn: Conn) -> None:
    claim = running(conn)
    result = service.request_cancel(conn, claim.run_id, business_id=1)
    assert (result.previous_status, result.status, result.jobs_cancelled) == (
        "running",
        "running",
        0,
    )
    assert run_row(conn, claim.run_id)["cancel_requested_at"] is not None
    service.request_cancel(conn, claim.run_id)  # idempotent: one event only
    assert events(conn, claim.run_id).count("cancel_requested") == 1
    pending = service.create_run(conn, 1, [{}, {}])
    result = service.request_cancel(conn, pending.id)
    assert (result.previous_status, result.status, result.jobs_cancelled) == (
        "pending",
        "cancelled",
        2,
    )


def test_force_cancel_dead_worker(conn: Conn) -> None:
    claim = running(conn, jobs=15, take=2)
    result = service.force_cancel(conn, claim.run_id, business_id=1)
    assert (result.previous_status, result.status, result.jobs_cancelled) == (
        "running",
        "cancelled",
        13,
    )
    row = run_row(conn, claim.run_id)
    assert row["status"] == "cancelled" and row["locked_by_worker"] is None
    assert row["lease_epoch"] == claim.lease_epoch + 1 and row["ended_at"] is not None
    assert list(job_statuses(conn, claim.run_id).values()).count("in_progress") == 2
    again = service.force_cancel(conn, claim.run_id)
    assert (again.previous_status, again.status, again.jobs_cancelled) == (
        "cancelled",
        "cancelled",
        0,
    )
    assert events(conn, claim.run_id).count("force_cancelled") == 1


def test_force_cancel_pending_run(conn: Conn) -> None:
    run = service.create_run(conn, 3, [{}, {}, {}])
    result = service.force_cancel(conn, run.id)
    assert (result.previous_status, result.jobs_cancelled) == ("pending", 3)


def test_cross_business_is_refused_and_changes_nothing(conn: Conn) -> None:
    claim = running(conn, business_id=1)
    before = snapshot(conn)
    for call in (service.force_cancel, service.request_cancel):
        with pytest.raises(AccessDenied) as err:
            call(conn, claim.run_id, business_id=2)
        assert err.value.http_status == 403 and err.value.argument == "business_id"
    after = snapshot(conn)
    # Nothing changed but the audit trail, which now holds each refusal (docs/security.md).
    assert after[:2] == before[:2] and after[3:] == before[3:]
    assert after[2][:len(before[2])] == before[2]
    assert [(e[3], e[2], e[5]["action"]) for e in after[2][len(before[2]):]] == [
        ("access_denied", 2, "force_cancel"), ("access_denied", 2, "request_cancel")]


def test_unknown_run_is_not_found(conn: Conn) -> None:
    for call in (service.force_cancel, service.request_cancel):
        with pytest.raises(RunNotFound) as err:
            call(conn, 404404)
        assert err.value.http_status == 404


def test_force_cancel_behind_idle_transaction_raises_run_locked(conn: Conn, dsn: str) -> None:
    claim = running(conn)
    conn.execute("UPDATE outbound_heartbeat.settings SET lock_timeout = interval '200 ms'")
    with psycopg.connect(dsn) as blocker:
        blocker.execute(
            "SELECT 1 FROM outbound_call_runs WHERE id = %s FOR UPDATE", (claim.run_id,)
        )
        # The server's pid (behind PgBouncer, info.backend_pid is the pooler's, not the server's).
        row = blocker.execute("SELECT pg_backend_pid()").fetchone()
        assert row is not None
        pid = row[0]
        with pytest.raises(RunLocked) as err:
            service.force_cancel(conn, claim.run_id)
        assert f"pid {pid}" in err.value.message and err.value.http_status == 423
        blocker.rollback()
    assert run_row(conn, claim.run_id)["status"] == "running"
    assert service.force_cancel(conn, claim.run_id).status == "cancelled"


def test_cleanup_reasons(conn: Conn) -> None:
    stale = running(conn, business_id=1, worker="a")
    legacy = running(conn, business_id=2, worker="b")
    empty = running(conn, jobs=0, business_id=3, worker="c")
    alive = running(conn, business_id=4, worker="d", take=1)
    mine = running(conn, business_id=5, worker="me")
    backdate_heartbeat(conn, stale.run_id, 40)
    conn.execute(
        "UPDATE outbound_call_runs SET last_heartbeat_at = NULL, lock_ts = now() - interval '10 min'"
        " WHERE id = %s",
        (legacy.run_id,),
    )
    reclaimed = {r.run_id: (r.reason, r.status) for r in service.cleanup_stuck_runs(conn)}
    assert reclaimed == {
        stale.run_id: ("stale_heartbeat", "stopped"),
        legacy.run_id: ("legacy_lock_timeout", "stopped"),
        empty.run_id: ("empty", "completed"),
    }
    assert service.cleanup_stuck_runs(conn) == []  # idempotent
    # A live run of this name may be another live process's: on_startup leaves it alone.
    assert service.cleanup_stuck_runs(conn, on_startup=True, worker_id="me") == []
    assert run_row(conn, mine.run_id)["status"] == "running"
    backdate_heartbeat(conn, mine.run_id, 40)  # the old incarnation died
    on_start = service.cleanup_stuck_runs(conn, on_startup=True, worker_id="me")
    assert [(r.run_id, r.reason, r.worker_id) for r in on_start] == [
        (mine.run_id, "on_startup", "me")
    ]
    assert run_row(conn, alive.run_id)["status"] == "running"
    assert "in_progress" in job_statuses(conn, alive.run_id).values()
    assert events(conn, stale.run_id)[-1] == "cleaned_up"


def test_cleanup_skips_rows_another_transaction_holds(conn: Conn, dsn: str) -> None:
    claim = running(conn)
    backdate_heartbeat(conn, claim.run_id, 60)
    with psycopg.connect(dsn) as holder:
        holder.execute("SELECT 1 FROM outbound_call_runs WHERE id = %s FOR UPDATE", (claim.run_id,))
        assert service.cleanup_stuck_runs(conn) == []
        holder.rollback()
    assert [r.run_id for r in service.cleanup_stuck_runs(conn)] == [claim.run_id]


def test_in_progress_jobs_never_touched_by_any_reclaim(conn: Conn) -> None:
    runs = [running(conn, jobs=3, business_id=b, worker=f"w{b}", take=2) for b in (1, 2, 3)]
    for c in runs:
        backdate_heartbeat(conn, c.run_id, 100)
    service.get_active_run(conn, 1)
    service.force_cancel(conn, runs[1].run_id)
    service.cleanup_stuck_runs(conn)
    for c in runs:
        assert run_row(conn, c.run_id)["status"] in {"stopped", "cancelled"}
        assert sorted(job_statuses(conn, c.run_id).values()) == [
            "failed",
            "in_progress",
            "in_progress",
        ]


def test_health_check_alerts(conn: Conn) -> None:
    assert service.health_check(conn) == []
    old = running(conn, business_id=1)
    backdate_heartbeat(conn, old.run_id, 180)
    nohb = running(conn, business_id=2)
    conn.execute(
        "UPDATE outbound_call_runs SET last_heartbeat_at = NULL WHERE id = %s", (nohb.run_id,)
    )
    alerts = {(a.check_name, a.run_id, a.severity) for a in service.health_check(conn, max_stuck=1)}
    assert alerts == {
        ("stale_heartbeat", old.run_id, "critical"),
        ("too_many_running", None, "warning"),
        ("lock_without_heartbeat", nohb.run_id, "warning"),
    }
    assert service.health_check(conn, alert_after=timedelta(minutes=5), max_stuck=5) == [
        a for a in service.health_check(conn) if a.check_name == "lock_without_heartbeat"
    ]
    with pytest.raises(InvalidArgument) as err:
        service.health_check(conn, alert_after=timedelta(0))
    assert err.value.argument == "alert_after"


def test_active_runs_view_and_list(conn: Conn) -> None:
    a = running(conn, business_id=1, take=1)
    b = running(conn, business_id=2)
    backdate_heartbeat(conn, b.run_id, 50)
    rows = conn.execute(
        "SELECT id, stale, queued_jobs, in_progress_jobs FROM outbound_heartbeat.active_runs ORDER BY id"
    ).fetchall()
    assert rows == [(a.run_id, False, 3, 1), (b.run_id, True, 4, 0)]
    assert [r.id for r in service.list_active_runs(conn)] == [a.run_id, b.run_id]
    assert run_row(conn, b.run_id)["status"] == "running"  # the view only reads


def test_notify_payload_after_commit(conn: Conn, direct_dsn: str) -> None:
    # LISTEN is session state: a listener needs a direct connection, PgBouncer or not (the
    # library itself never listens; the transitions it notifies go through PgBouncer).
    with psycopg.connect(direct_dsn, autocommit=True) as listener:
        listener.execute("LISTEN outbound_heartbeat")
        run = service.create_run(conn, 9, [{}])
        service.force_cancel(conn, run.id)
        got = [json.loads(n.payload) for n in listener.notifies(timeout=2, stop_after=2)]
    assert got == [
        {"event": "created", "run_id": run.id, "business_id": 9},
        {"event": "force_cancelled", "run_id": run.id, "business_id": 9},
    ]


def test_events_returned_to_caller(conn: Conn) -> None:
    claim = running(conn, jobs=2)
    backdate_heartbeat(conn, claim.run_id, 31)
    result, evs = service.execute(conn, calls.get_active_run(1))
    assert result is None
    assert [(e.event, e.run_id, e.detail["reason"], e.detail["jobs_failed"]) for e in evs] == [
        ("stale_stopped", claim.run_id, "stale_heartbeat", 2)
    ]


def test_call_inside_callers_transaction_is_rolled_back_with_it(conn: Conn, dsn: str) -> None:
    claim = running(conn)
    with psycopg.connect(dsn) as tx_conn, tx_conn.transaction(force_rollback=True):
        service.force_cancel(tx_conn, claim.run_id)
        assert run_row(tx_conn, claim.run_id)["status"] == "cancelled"
    assert run_row(conn, claim.run_id)["status"] == "running"


def test_waiting_reader_sees_fresh_heartbeat_after_lock_release(conn: Conn, dsn: str) -> None:
    claim = running(conn)
    backdate_heartbeat(conn, claim.run_id, 60)
    with psycopg.connect(dsn) as worker:
        worker.execute(
            "UPDATE outbound_call_runs SET last_heartbeat_at = now() WHERE id = %s", (claim.run_id,)
        )
        result: list[Any] = []

        def read() -> None:
            with psycopg.connect(dsn, autocommit=True) as reader_conn:
                result.append(service.get_active_run(reader_conn, 1))

        reader = threading.Thread(target=read)
        reader.start()
        reader.join(0.3)
        assert reader.is_alive()  # waiting on the row lock, not acting on the old row
        worker.commit()
    reader.join(5)
    assert result and result[0] is not None and result[0].id == claim.run_id
