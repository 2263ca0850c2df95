"""Leases behind a PgBouncer whose app pool is saturated (docs/operations.md, "PgBouncer").

A private PgBouncer in transaction mode with ``default_pool_size = 2`` and
``query_wait_timeout = 5``; ``stale_after`` 6 s; three leases dial through it while two app
requests run 10 s statements through the same pooler. With heartbeats in the app's pool they
wait behind those statements, PgBouncer drops them after 5 s, and the leases expire: the
library says so at start (a pooler shares the heartbeats' pool) and names PgBouncer's
``query_wait_timeout`` in each failure. With the recommended setup (``heartbeat_dsn`` on a
PgBouncer database entry with a pool of its own, or straight to PostgreSQL) every lease holds.
Real time is the behaviour (10 s of saturation each), hence the e2e level (slow).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from outbound_heartbeat import service
from outbound_heartbeat.lease import Lease
from outbound_heartbeat.lease_async import AsyncLease
from outbound_heartbeat.lease_state import LeaseView
from outbound_heartbeat.pooler import describe_failure
from outbound_heartbeat.testing import Server

from ..helpers import run_row
from ..pgbouncer import PgBouncer, start_pgbouncer

Conn = psycopg.Connection[Any]

APP_STATEMENT = 10.0  # seconds each of the two app requests holds a server connection
STALE_AFTER = 6.0
HEARTBEAT_ENTRY = "oh_heartbeats"  # the PgBouncer database entry with a pool of its own


@pytest.fixture
def bouncer(pg_server: Server, dsn: str) -> Iterator[PgBouncer]:
    """PgBouncer with a saturated app pool, plus the recommended heartbeat entry (unused unless a
    lease's heartbeat_dsn names it)."""
    dbname = conninfo_to_dict(dsn)["dbname"]
    b = start_pgbouncer(
        pg_server.dsn, pool_size=2,
        databases={HEARTBEAT_ENTRY: f"dbname={dbname} pool_size=2"},
        settings={"query_wait_timeout": 5},
    )
    try:
        yield b
    finally:
        b.stop()


def saturate(app_dsn: str) -> None:
    """Two app requests, each running a 10 s statement: the app pool (2) is full throughout."""
    def request() -> None:
        with psycopg.connect(app_dsn, autocommit=True, prepare_threshold=None) as c:
            c.execute("SELECT pg_sleep(%s)", (APP_STATEMENT,))

    threads = [threading.Thread(target=request) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(APP_STATEMENT + 20)


def runs(conn: Conn, count: int, business: int) -> list[int]:
    conn.execute(
        "UPDATE outbound_heartbeat.settings SET stale_after = make_interval(secs => %s)",
        (STALE_AFTER,))
    return [service.create_run(conn, business, [{"n": i} for i in range(5)]).id
            for _ in range(count)]


def hold_leases_under_load(
    mode: str, dsn: str, heartbeat_dsn: str | None, run_ids: list[int],
    load: Callable[[], None],
) -> list[tuple[bool, bool]]:
    """Three leases (sync or async, shared hub or dedicated connections) held while ``load``
    runs; (lost, suspended) of each right after it."""
    share = mode.endswith("shared")
    options = {"prepare_threshold": None}
    # Only when given: a lease with no heartbeat_dsn is exactly what the app had before.
    extra: dict[str, Any] = {} if heartbeat_dsn is None else {"heartbeat_dsn": heartbeat_dsn}
    if mode.startswith("sync"):
        with contextlib.ExitStack() as stack:
            leases: list[LeaseView] = [
                stack.enter_context(Lease(dsn, f"w{run_id}", run_id, share=share,
                                          connect_options=options, **extra))
                for run_id in run_ids]
            load()
            return [(lease.lost, lease.suspended) for lease in leases]

    async def main() -> list[tuple[bool, bool]]:
        async with contextlib.AsyncExitStack() as stack:
            leases = [
                await stack.enter_async_context(AsyncLease(
                    dsn, f"w{run_id}", run_id, share=share, connect_options=options,
                    **extra))
                for run_id in run_ids]
            await asyncio.to_thread(load)
            return [(lease.lost, lease.suspended) for lease in leases]

    return asyncio.run(main())


def heartbeat_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "outbound_heartbeat.lease" and r.levelno >= logging.WARNING]


def test_heartbeats_in_the_app_pool_expire_and_the_logs_name_the_pool(
    conn: Conn, dsn: str, bouncer: PgBouncer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="outbound_heartbeat")
    app = bouncer.dsn_for(dsn)
    run_ids = runs(conn, 3, 3001)
    states = hold_leases_under_load("sync-shared", app, None, run_ids, lambda: saturate(app))
    # The failure the recommended setup prevents: no heartbeat got through for 10 s.
    assert all(lost or suspended for lost, suspended in states), states
    logs = heartbeat_warnings(caplog)
    # At start: the heartbeats share the app's pool behind a pooler.
    assert any("connection pooler" in m and "heartbeat_dsn" in m for m in logs), logs
    # Each failure says what happened: PgBouncer's query_wait_timeout on a full pool.
    failures = [m for m in logs if "heartbeat failed" in m]
    assert any("query_wait_timeout" in m and "PgBouncer" in m and "pool_size" in m
               for m in failures), failures
    # A statement the hub's own watcher cut is not blamed on the server.
    assert not [m for m in failures if "server closed the connection" in m], failures


@pytest.mark.parametrize("mode", ["sync-shared", "async-shared", "sync-dedicated", "async-dedicated"])
def test_heartbeats_on_their_own_pgbouncer_pool_hold_under_a_saturated_app_pool(
    conn: Conn, dsn: str, bouncer: PgBouncer, caplog: pytest.LogCaptureFixture, mode: str
) -> None:
    caplog.set_level(logging.WARNING, logger="outbound_heartbeat")
    app = bouncer.dsn_for(dsn)
    heartbeats = make_conninfo(app, dbname=HEARTBEAT_ENTRY)
    run_ids = runs(conn, 3, 3002)
    states = hold_leases_under_load(mode, app, heartbeats, run_ids, lambda: saturate(app))
    assert states == [(False, False)] * 3, (states, heartbeat_warnings(caplog))
    assert not [m for m in heartbeat_warnings(caplog)
                if "heartbeat failed" in m or "connection pooler" in m]
    # Released normally once the app's statements ended: nothing stopped, nothing failed.
    for run_id in run_ids:
        assert run_row(conn, run_id)["status"] in ("completed", "failed")
        events = [e.event for e in service.list_events(conn, run_id)]
        assert "stale_stopped" not in events


def test_heartbeats_straight_to_postgresql_hold_under_a_saturated_app_pool(
    conn: Conn, dsn: str, bouncer: PgBouncer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="outbound_heartbeat")
    app = bouncer.dsn_for(dsn)
    run_ids = runs(conn, 3, 3003)
    states = hold_leases_under_load("sync-shared", app, dsn, run_ids, lambda: saturate(app))
    assert states == [(False, False)] * 3, (states, heartbeat_warnings(caplog))


def test_describe_failure_names_the_pooler_and_the_pool() -> None:
    text = describe_failure(psycopg.errors.ProtocolViolation("query_wait_timeout"))
    assert text.startswith("ProtocolViolation: query_wait_timeout -- PgBouncer")
    assert "pool_size" in text and "heartbeat_dsn" in text
    assert describe_failure(psycopg.OperationalError("server closed the connection")) == (
        "OperationalError: server closed the connection")
