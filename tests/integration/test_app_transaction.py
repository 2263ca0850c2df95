"""Calls made inside the app's own open transaction (docs/embedding.md).

Their release hooks and event logs wait for the app's COMMIT and never follow a ROLLBACK,
whichever way the app ends its transaction (the library's ``service.transaction`` block, a
plain psycopg transaction settled later, a web adapter's connection context), sync and async;
and the session is left exactly as found after every API call (every setting in pg_settings).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import psycopg
import pytest

from outbound_heartbeat import Event, calls, service, service_async, web

from ..helpers import run_row

Conn = psycopg.Connection[Any]


def running_run(conn: Conn, business: int, jobs: int = 3) -> int:
    run = service.create_run(conn, business, [{"n": i} for i in range(jobs)])
    assert service.claim_run(conn, f"w{run.id}", run.id) is not None
    return run.id


def force_cancel_logs(caplog: pytest.LogCaptureFixture, run_id: int) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if "[FORCE_CANCEL]" in r.getMessage() and f"run {run_id} " in r.getMessage()]


def seen_from_outside(dsn: str, run_id: int) -> str:
    with psycopg.connect(dsn, autocommit=True) as other:
        return str(run_row(other, run_id)["status"])


# -- the library's transaction block ---------------------------------------------------------


@pytest.mark.parametrize("autocommit", [True, False])
def test_transaction_block_hooks_after_commit_never_after_rollback(
    conn: Conn, dsn: str, caplog: pytest.LogCaptureFixture, autocommit: bool
) -> None:
    caplog.set_level(logging.INFO, logger="outbound_heartbeat")
    committed_run, rolled_back_run = running_run(conn, 5), running_run(conn, 5)
    fired: list[tuple[int, str]] = []

    def hook(events: list[Event]) -> None:  # sees the database as others will
        fired.extend((e.run_id, seen_from_outside(dsn, e.run_id)) for e in events)

    with psycopg.connect(dsn, autocommit=autocommit) as app_conn:
        with service.transaction(app_conn):
            outcome = service.execute_call(app_conn, calls.force_cancel(committed_run, 5))
            assert outcome.pending is not None
            outcome.pending.on_commit(hook)
            assert fired == [] and force_cancel_logs(caplog, committed_run) == []
            assert seen_from_outside(dsn, committed_run) == "running"  # not committed yet
        assert fired == [(committed_run, "cancelled")]  # after COMMIT, and it is visible
        assert len(force_cancel_logs(caplog, committed_run)) == 1

        class AppError(Exception):
            pass

        with pytest.raises(AppError), service.transaction(app_conn):
            outcome = service.execute_call(app_conn, calls.force_cancel(rolled_back_run, 5))
            assert outcome.pending is not None
            outcome.pending.on_commit(hook)
            raise AppError
        assert outcome.pending.state == "rolled_back"
        assert fired == [(committed_run, "cancelled")]  # nothing after the ROLLBACK
        assert force_cancel_logs(caplog, rolled_back_run) == []
        assert seen_from_outside(dsn, rolled_back_run) == "running"
        assert app_conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


def test_plain_psycopg_transaction_is_judged_by_the_server(
    conn: Conn, dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The app ends its transaction its own way; the next call (or settle) asks the server."""
    caplog.set_level(logging.INFO, logger="outbound_heartbeat")
    first, second, third = running_run(conn, 6), running_run(conn, 6), running_run(conn, 6)
    fired: list[int] = []
    with psycopg.connect(dsn) as app_conn:  # psycopg's default: not autocommit
        app_conn.execute("SELECT 1")  # the app's transaction is open
        kept = service.execute_call(app_conn, calls.force_cancel(first, 6)).pending
        assert kept is not None
        kept.on_commit(lambda events: fired.extend(e.run_id for e in events))
        service.settle(app_conn)  # still open: nothing to say yet
        assert kept.state == "pending" and fired == []
        app_conn.commit()
        service.get_active_run(app_conn, 6)  # any later call settles what waited
        assert kept.state == "committed" and fired == [first]
        assert len(force_cancel_logs(caplog, first)) == 1

        app_conn.execute("SELECT 1")
        dropped = service.execute_call(app_conn, calls.force_cancel(second, 6)).pending
        assert dropped is not None
        dropped.on_commit(lambda events: fired.extend(e.run_id for e in events))
        app_conn.rollback()
        service.settle(app_conn)
        assert dropped.state == "rolled_back" and fired == [first]
        assert force_cancel_logs(caplog, second) == []
        assert seen_from_outside(dsn, second) == "running"

        # A call on an idle non-autocommit connection is its own transaction: final at once.
        outcome = service.execute_call(app_conn, calls.force_cancel(third, 6))
        assert outcome.pending is None and seen_from_outside(dsn, third) == "cancelled"
        assert app_conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


def test_async_transaction_block(conn: Conn, dsn: str) -> None:
    committed_run, rolled_back_run = running_run(conn, 7), running_run(conn, 7)
    fired: list[int] = []

    async def hook(events: list[Event]) -> None:
        await asyncio.sleep(0)
        fired.extend(e.run_id for e in events)

    async def scenario() -> None:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as app_conn:
            async with service_async.transaction(app_conn):
                outcome = await service_async.execute_call(
                    app_conn, calls.force_cancel(committed_run, 7))
                assert outcome.pending is not None
                outcome.pending.on_commit(hook)
                assert fired == []
            assert fired == [committed_run]
            with pytest.raises(ZeroDivisionError):
                async with service_async.transaction(app_conn):
                    outcome = await service_async.execute_call(
                        app_conn, calls.force_cancel(rolled_back_run, 7))
                    outcome.pending.on_commit(hook)
                    1 / 0  # noqa: B018
            assert fired == [committed_run]

    asyncio.run(scenario())
    assert seen_from_outside(dsn, committed_run) == "cancelled"
    assert seen_from_outside(dsn, rolled_back_run) == "running"


# -- the web adapters handed a connection inside the app's transaction ------------------------


@pytest.mark.parametrize("commit", [True, False], ids=["commit", "rollback"])
def test_endpoints_hooks_follow_the_apps_commit(conn: Conn, dsn: str, commit: bool) -> None:
    run_id = running_run(conn, 8)
    hooked: list[tuple[int, int, str]] = []

    @contextlib.contextmanager
    def app_transaction() -> Iterator[Conn]:
        """The app's unit of work: it wrote something of its own before lending the connection."""
        with psycopg.connect(dsn) as c, c.transaction() as tx:
            c.execute("UPDATE outbound_call_runs SET updated_at = now() WHERE id = %s", (run_id,))
            yield c
            if not commit:
                raise psycopg.Rollback(tx)

    endpoints = web.Endpoints(
        locale="en", connections=app_transaction,
        hooks=web.ReleaseHooks([lambda r, b: hooked.append((r, b, seen_from_outside(dsn, r)))]),
    )
    reply = endpoints.cancel(str(run_id), 8, force=True)
    assert reply.status == 200 and reply.body["status"] == "cancelled"
    if commit:
        assert hooked == [(run_id, 8, "cancelled")]
    else:
        assert hooked == [] and seen_from_outside(dsn, run_id) == "running"


@pytest.mark.parametrize("commit", [True, False], ids=["commit", "rollback"])
def test_async_endpoints_hooks_follow_the_apps_commit(conn: Conn, dsn: str, commit: bool) -> None:
    run_id = running_run(conn, 9)
    hooked: list[tuple[int, int]] = []

    @contextlib.asynccontextmanager
    async def app_transaction() -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        async with await psycopg.AsyncConnection.connect(dsn) as c, c.transaction() as tx:
            await c.execute("SELECT 1")
            yield c
            if not commit:
                raise psycopg.Rollback(tx)

    async def hook(run: int, business: int) -> None:
        hooked.append((run, business))

    endpoints = web.AsyncEndpoints(locale="en", connections=app_transaction,
                                   hooks=web.ReleaseHooks([hook]))
    reply = asyncio.run(endpoints.cancel(str(run_id), 9, force=True))
    assert reply.status == 200
    assert hooked == ([(run_id, 9)] if commit else [])
    assert seen_from_outside(dsn, run_id) == ("cancelled" if commit else "running")


# -- the session as found ----------------------------------------------------------------------

SETTINGS = "SELECT name, setting FROM pg_catalog.pg_settings ORDER BY name"


def every_api_call(conn: Conn, check: Any) -> None:
    """Each public call once, ``check()`` after each."""
    other = service.create_run(conn, 4, [{}])
    check("create_run")
    run = service.create_run(conn, 3, [{}, {}])
    check("create_run")
    claim = service.claim_run(conn, "session-worker", run.id)
    assert claim is not None
    check("claim_run")
    service.heartbeat(conn, run.id, "session-worker", claim.lease_epoch)
    check("heartbeat")
    job = service.next_job(conn, run.id, "session-worker", claim.lease_epoch)
    assert job is not None
    check("next_job")
    service.finish_job(conn, job.id, "session-worker", claim.lease_epoch, "completed")
    check("finish_job")
    service.get_active_run(conn, 3)
    check("get_active_run")
    service.request_cancel(conn, run.id, 3)
    check("request_cancel")
    service.finish_run(conn, run.id, "session-worker", claim.lease_epoch, "cancelled")
    check("finish_run")
    service.force_cancel(conn, other.id, 4)
    check("force_cancel")
    service.cleanup_stuck_runs(conn)
    check("cleanup_stuck_runs")
    service.health_check(conn)
    check("health_check")
    service.list_active_runs(conn)
    check("list_active_runs")
    service.list_events(conn, run_id=run.id)
    check("list_events")
    service.metrics(conn)
    check("metrics")


def app_session_settings(app_conn: Conn) -> None:
    """The app's own transaction-local values, none of them the library's. PL/pgSQL is loaded
    first: loading it adds its plpgsql.* settings, which is no change of a value."""
    app_conn.execute("DO $$ BEGIN END $$")
    app_conn.execute("SET LOCAL lock_timeout = '1234ms'")
    app_conn.execute("SET LOCAL search_path = public, pg_temp")
    app_conn.execute("SET LOCAL TimeZone = 'Asia/Jerusalem'")
    app_conn.execute("SET LOCAL statement_timeout = '42s'")


@pytest.mark.parametrize("setting", ["search_path", "TimeZone", "statement_timeout",
                                     "client_min_messages"])
def test_settings_unchanged_inside_app_transaction(dsn: str, setting: str) -> None:
    with psycopg.connect(dsn) as app_conn, app_conn.transaction():
        app_session_settings(app_conn)
        before = app_conn.execute(f"SHOW {setting}").fetchone()

        def check(name: str) -> None:
            assert app_conn.execute(f"SHOW {setting}").fetchone() == before, name

        every_api_call(app_conn, check)


def test_no_setting_but_lock_timeout_changes_inside_app_transaction(dsn: str) -> None:
    with psycopg.connect(dsn) as app_conn, app_conn.transaction():
        app_session_settings(app_conn)
        before = {k: v for k, v in app_conn.execute(SETTINGS).fetchall() if k != "lock_timeout"}

        def check(name: str) -> None:
            now = {k: v for k, v in app_conn.execute(SETTINGS).fetchall() if k != "lock_timeout"}
            assert now == before, name

        every_api_call(app_conn, check)


def test_lock_timeout_unchanged_inside_app_transaction(dsn: str) -> None:
    with psycopg.connect(dsn) as app_conn, app_conn.transaction():
        app_session_settings(app_conn)

        def check(name: str) -> None:
            assert app_conn.execute("SHOW lock_timeout").fetchone() == ("1234ms",), name

        every_api_call(app_conn, check)
