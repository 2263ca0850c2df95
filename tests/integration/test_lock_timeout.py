"""A good guest inside the app's own transaction (docs/embedding.md): every API function
leaves the session's settings exactly as it found them (lock_timeout above all, which the
functions lower for their own waits), and a lock wait still ends as OH423 with the app's
transaction usable and its own lock_timeout in force for its next statement."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from outbound_heartbeat import RunLocked, service

Conn = psycopg.Connection[Any]
SETTINGS = ("lock_timeout", "search_path", "TimeZone", "client_min_messages", "statement_timeout")


def show(conn: Conn) -> dict[str, str]:
    values = {}
    for name in SETTINGS:
        row = conn.execute(psycopg.sql.SQL("SHOW {}").format(psycopg.sql.Identifier(name))).fetchone()
        assert row is not None
        values[name] = row[0]
    return values


def api_calls(conn: Conn) -> list[tuple[str, str, tuple[Any, ...]]]:
    """(name, SQL, params) for every API function, in an order that exercises each one."""
    run = service.create_run(conn, 7, [{}, {}, {}])
    other = service.create_run(conn, 7, [{}])
    claim = service.claim_run(conn, "guest", run.id)
    assert claim is not None
    job = service.next_job(conn, run.id, "guest", claim.lease_epoch)
    assert job is not None
    lease = (run.id, "guest", claim.lease_epoch)
    # A second lease for the set-based calls of a process's hub, ended by finish_runs().
    many = service.create_run(conn, 7, [{}])
    many_claim = service.claim_run(conn, "guests", many.id)
    assert many_claim is not None
    ids, epochs = [many.id, many.id], [many_claim.lease_epoch] * 2
    return [
        ("heartbeat_leases", "SELECT * FROM outbound_heartbeat.heartbeat_leases(%s, %s, %s)",
         (ids, ["guests", "zombie"], epochs)),
        ("finish_runs", "SELECT * FROM outbound_heartbeat.finish_runs(%s, %s, %s, %s)",
         (ids, ["zombie", "guests"], epochs, ["completed", "completed"])),
        ("create_run", "SELECT * FROM outbound_heartbeat.create_run(8, '[{}]')", ()),
        ("claim_run", "SELECT * FROM outbound_heartbeat.claim_run('nobody', %s)", (run.id,)),
        ("heartbeat fast path", "SELECT outbound_heartbeat.heartbeat(%s, %s, %s)", lease),
        ("heartbeat slow path", "SELECT outbound_heartbeat.heartbeat(%s, 'zombie', %s)",
         (run.id, claim.lease_epoch)),
        ("next_job", "SELECT * FROM outbound_heartbeat.next_job(%s, %s, %s)", lease),
        ("next_job retry", "SELECT * FROM outbound_heartbeat.next_job(%s, %s, %s, 'r1')", lease),
        ("next_job retry again", "SELECT * FROM outbound_heartbeat.next_job(%s, %s, %s, 'r1')",
         lease),
        ("finish_job", "SELECT * FROM outbound_heartbeat.finish_job(%s, %s, %s, 'completed')",
         (job.id, "guest", claim.lease_epoch)),
        ("finish_job again", "SELECT * FROM outbound_heartbeat.finish_job(%s, %s, %s, 'completed')",
         (job.id, "guest", claim.lease_epoch)),
        ("finish_job lease lost", "SELECT * FROM outbound_heartbeat.finish_job(%s, 'x', 1, 'failed')",
         (job.id,)),
        ("get_active_run", "SELECT * FROM outbound_heartbeat.get_active_run(7)", ()),
        ("request_cancel pending",
         "SELECT * FROM outbound_heartbeat.request_cancel(%s, 7)", (other.id,)),
        ("request_cancel running", "SELECT * FROM outbound_heartbeat.request_cancel(%s)", (run.id,)),
        ("cleanup_stuck_runs", "SELECT * FROM outbound_heartbeat.cleanup_stuck_runs()", ()),
        ("health_check", "SELECT * FROM outbound_heartbeat.health_check()", ()),
        ("list_active_runs", "SELECT * FROM outbound_heartbeat.list_active_runs()", ()),
        ("list_events", "SELECT * FROM outbound_heartbeat.list_events(%s)", (run.id,)),
        ("metrics", "SELECT * FROM outbound_heartbeat.metrics()", ()),
        ("finish_run", "SELECT * FROM outbound_heartbeat.finish_run(%s, %s, %s, 'cancelled')", lease),
        ("finish_run again",
         "SELECT * FROM outbound_heartbeat.finish_run(%s, %s, %s, 'cancelled')", lease),
        ("force_cancel finished", "SELECT * FROM outbound_heartbeat.force_cancel(%s)", (run.id,)),
        ("force_cancel pending", "SELECT * FROM outbound_heartbeat.force_cancel(%s)",
         (service.create_run(conn, 9, [{}]).id,)),
    ]


@pytest.fixture
def app(dsn: str) -> Iterator[Conn]:
    """The app's own connection: not autocommit, so every statement is in its transaction."""
    with psycopg.connect(dsn) as c:
        yield c


@pytest.mark.parametrize("app_lock_timeout", [None, "250ms", "1min"])
def test_every_api_function_leaves_the_session_as_found(
    conn: Conn, app: Conn, app_lock_timeout: str | None
) -> None:
    calls = api_calls(conn)
    app.execute("SET LOCAL search_path = public, pg_temp")
    app.execute("SET LOCAL TimeZone = 'Asia/Jerusalem'")
    app.execute("SET LOCAL client_min_messages = warning")
    app.execute("SET LOCAL statement_timeout = '7s'")
    if app_lock_timeout is not None:
        app.execute("SELECT set_config('lock_timeout', %s, true)", (app_lock_timeout,))
    found = show(app)
    assert found["lock_timeout"] == (app_lock_timeout or "0")
    for name, query, params in calls:
        app.execute(query, params).fetchall()
        assert show(app) == found, f"{name} changed the session"
    app.commit()
    # After COMMIT the session is back to its own values (SET LOCAL ended), none of ours.
    after = show(app)
    assert after["lock_timeout"] == "0" and after["statement_timeout"] == "0"
    app.rollback()


def test_session_level_values_survive_calls_and_commit(conn: Conn, app: Conn) -> None:
    calls = api_calls(conn)
    app.execute("SET lock_timeout = '42s'")  # the app's own session value
    app.commit()
    for _, query, params in calls:
        app.execute(query, params).fetchall()
        assert show(app)["lock_timeout"] == "42s"
    app.commit()
    assert show(app)["lock_timeout"] == "42s"
    app.rollback()


@pytest.fixture
def locked_run(conn: Conn, dsn: str) -> Iterator[tuple[Any, Conn]]:
    """A running run whose row another session holds (an idle transaction), and that session."""
    conn.execute("UPDATE outbound_heartbeat.settings SET lock_timeout = interval '1 second'")
    run = service.create_run(conn, 5, [{}, {}])
    claim = service.claim_run(conn, "w", run.id)
    assert claim is not None
    with psycopg.connect(dsn) as holder:
        holder.execute("SELECT 1 FROM outbound_call_runs WHERE id = %s FOR UPDATE", (run.id,))
        yield claim, holder
        holder.rollback()


def blocked_calls(claim: Any) -> dict[str, Callable[[Conn], Any]]:
    return {
        "force_cancel": lambda c: service.force_cancel(c, claim.run_id, 5),
        "request_cancel": lambda c: service.request_cancel(c, claim.run_id, 5),
        "next_job": lambda c: service.next_job(c, claim.run_id, "w", claim.lease_epoch),
        "finish_run": lambda c: service.finish_run(c, claim.run_id, "w", claim.lease_epoch),
    }


@pytest.mark.parametrize("call", ["force_cancel", "request_cancel", "next_job", "finish_run"])
def test_lock_wait_inside_app_transaction_is_oh423_and_keeps_the_apps_timeout(
    app: Conn, locked_run: tuple[Any, Conn], call: str
) -> None:
    claim, _holder = locked_run
    app.execute("SET LOCAL lock_timeout = '1min'")  # laxer than ours (1 s): ours bounds the call
    started = time.monotonic()
    with pytest.raises(RunLocked) as err:
        blocked_calls(claim)[call](app)
    assert time.monotonic() - started < 30  # our 1 s, not the app's minute
    assert "locked by another transaction" in err.value.message
    # The app's transaction is still usable (the call ran in a savepoint), with its own value.
    assert show(app)["lock_timeout"] == "1min"
    assert app.execute("SELECT 1").fetchone() == (1,)
    app.rollback()


def test_apps_stricter_lock_timeout_bounds_our_wait_too(
    conn: Conn, app: Conn, locked_run: tuple[Any, Conn]
) -> None:
    claim, _holder = locked_run
    conn.execute("UPDATE outbound_heartbeat.settings SET lock_timeout = interval '20 seconds'")
    app.execute("SET LOCAL lock_timeout = '200ms'")
    started = time.monotonic()
    with pytest.raises(RunLocked):
        service.force_cancel(app, claim.run_id)
    assert time.monotonic() - started < 10  # the app's 200 ms, not our 20 s
    assert show(app)["lock_timeout"] == "200ms"
    # The app's next statement of its own waits its own 200 ms: raw 55P03 is its own business.
    with pytest.raises(psycopg.errors.LockNotAvailable):
        app.execute("SELECT 1 FROM outbound_call_runs WHERE id = %s FOR UPDATE", (claim.run_id,))
    app.rollback()
    assert service.get_active_run(conn, 5) is not None  # nothing was cancelled
