"""Bad input: a clear OH400 error naming the argument, and nothing written. Called through SQL
directly, as a DBA would, so NULLs the Python signatures would not allow are covered too."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from outbound_heartbeat import InvalidArgument, errors, service

from ..helpers import snapshot

Conn = psycopg.Connection[Any]

CASES = [
    ("create_run(NULL, '[]')", "business_id"),
    ("create_run(1, '{{\"a\": 1}}')", "jobs"),
    ("create_run(1, '\"x\"')", "jobs"),
    ("create_run(1, NULL)", "jobs"),
    ("create_run(1, '[]', NULL)", "retry_unplaced"),
    ("resolve_call('oh1-1-1-1-' || repeat('0', 32), 'completed', NULL, NULL, 'webhook')", "source"),
    ("resolve_call('oh1-1-1-1-' || repeat('0', 32), 'completed', NULL, NULL, NULL)", "source"),
    ("resolve_call('oh1-1-1-1-' || repeat('0', 32), 'timed_out')", "outcome"),
    ("audit_call_access_denied('oh1-1-1-1-' || repeat('0', 32), NULL)", "business_id"),
    ("claim_run(NULL)", "worker_id"),
    ("claim_run('')", "worker_id"),
    ("claim_run('   ')", "worker_id"),
    ("claim_run(repeat('w', 201))", "worker_id"),
    ("heartbeat(NULL, 'w', 1)", "run_id"),
    ("heartbeat({run}, NULL, 1)", "worker_id"),
    ("heartbeat({run}, 'w1', NULL)", "lease_epoch"),
    ("heartbeat({run}, 'w1', -1)", "lease_epoch"),
    ("next_job({run}, '', 1)", "worker_id"),
    ("next_job(NULL, 'w1', 1)", "run_id"),
    ("finish_job({job}, 'w1', {epoch}, 'done')", "status"),
    ("finish_job({job}, 'w1', {epoch}, NULL)", "status"),
    ("finish_job(NULL, 'w1', {epoch}, 'completed')", "job_id"),
    ("finish_run({run}, 'w1', {epoch}, 'stopped')", "status"),
    ("finish_run({run}, 'w1', {epoch}, 'pending')", "status"),
    ("get_active_run(NULL)", "business_id"),
    ("get_active_run(1, interval '0')", "stale_after"),
    ("get_active_run(1, interval '-5 seconds')", "stale_after"),
    ("request_cancel(NULL)", "run_id"),
    ("force_cancel(NULL)", "run_id"),
    ("cleanup_stuck_runs(true, NULL)", "worker_id"),
    ("cleanup_stuck_runs(NULL)", "on_startup"),
    ("cleanup_stuck_runs(false, 'w1')", "worker_id"),
    ("health_check(interval '0')", "alert_after"),
    ("health_check(interval '1 min', -1)", "max_stuck"),
    ("health_check(NULL)", "alert_after"),
    ("list_events(NULL, NULL, 0)", "max_rows"),
    ("list_events({run}, NULL, NULL)", "max_rows"),
    ("list_events(NULL, 1, 100001)", "max_rows"),
]


@pytest.mark.parametrize(("call", "argument"), CASES)
def test_bad_argument_is_oh400_and_writes_nothing(conn: Conn, call: str, argument: str) -> None:
    run = service.create_run(conn, 1, [{}, {}])
    claim = service.claim_run(conn, "w1", run.id)
    assert claim is not None
    job = service.next_job(conn, run.id, "w1", claim.lease_epoch)
    assert job is not None
    before = snapshot(conn)
    text = call.format(run=run.id, job=job.id, epoch=claim.lease_epoch)
    with pytest.raises(psycopg.Error) as raised:
        conn.execute("SELECT * FROM outbound_heartbeat." + text)
    assert raised.value.sqlstate == "OH400"
    assert raised.value.diag.column_name == argument
    assert argument in (raised.value.diag.message_primary or "")
    mapped = errors.from_psycopg(raised.value)
    assert isinstance(mapped, InvalidArgument) and mapped.argument == argument
    assert snapshot(conn) == before


def test_python_layer_raises_invalid_argument(conn: Conn) -> None:
    with pytest.raises(InvalidArgument) as err:
        service.create_run(conn, 1, {"not": "an array"})
    assert err.value.argument == "jobs" and err.value.http_status == 400
    with pytest.raises(InvalidArgument):
        service.claim_run(conn, "")


def test_unknown_sqlstate_passes_through_as_psycopg_error(conn: Conn) -> None:
    conn.execute("ALTER TABLE outbound_call_jobs ADD COLUMN must_have int NOT NULL DEFAULT 0")
    conn.execute("ALTER TABLE outbound_call_jobs ALTER COLUMN must_have DROP DEFAULT")
    with pytest.raises(psycopg.errors.NotNullViolation):
        service.create_run(conn, 1, [{}])
    assert conn.execute("SELECT count(*) FROM outbound_call_runs").fetchone() == (0,)
