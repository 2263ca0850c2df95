"""Two-phase commit with library calls in the prepared transaction: PostgreSQL refuses PREPARE
TRANSACTION after a NOTIFY, which every run transition sends, unless the app marks that very
transaction with ``skip_notify`` (its transaction id in ``outbound_heartbeat.skip_notify``; a
value left in the session by an earlier transaction changes nothing). On a private server with
``max_prepared_transactions`` set (the shared test server has none)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from outbound_heartbeat import Event, InvalidArgument, calls, service, service_async

from ..helpers import TEST_SETTINGS, private_server, run_row

Conn = psycopg.Connection[Any]


# One private server (a module fixture) for the module: its tests run on one xdist worker.
pytestmark = pytest.mark.xdist_group("two_phase")


@pytest.fixture(scope="module")
def tpc_dsn() -> Iterator[str]:
    with private_server(max_prepared_transactions="4") as (_cluster, dsn):
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(TEST_SETTINGS)
        yield dsn


def running_run(conn: Conn, business: int) -> int:
    run = service.create_run(conn, business, [{}, {}])
    assert service.claim_run(conn, f"w{run.id}", run.id) is not None
    return run.id


def notifications(listener: Conn) -> list[str]:
    return [n.payload for n in listener.notifies(timeout=0.5, stop_after=None)]


def test_prepare_refused_after_a_call_without_the_mark(tpc_dsn: str) -> None:
    with psycopg.connect(tpc_dsn, autocommit=True) as admin:
        run_id = running_run(admin, 1)
    with psycopg.connect(tpc_dsn) as conn:
        conn.execute("SELECT 1")  # the app's transaction
        service.force_cancel(conn, run_id, 1)
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="NOTIFY"):
            conn.execute("PREPARE TRANSACTION 'refused'")
        conn.rollback()
        service.settle(conn)
        assert run_row(conn, run_id)["status"] == "running"


def test_prepared_transaction_with_library_calls_commits(tpc_dsn: str) -> None:
    with psycopg.connect(tpc_dsn, autocommit=True) as admin, \
            psycopg.connect(tpc_dsn, autocommit=True) as listener:
        run_id = running_run(admin, 2)
        listener.execute("LISTEN outbound_heartbeat")
        fired: list[Event] = []
        with psycopg.connect(tpc_dsn) as conn:
            conn.tpc_begin("order-17")
            service.skip_notify(conn)
            created = service.execute_call(conn, calls.create_run(3, [{}])).pending
            cancelled = service.execute_call(conn, calls.force_cancel(run_id, 2)).pending
            assert created is not None and cancelled is not None
            cancelled.on_commit(fired.extend)
            conn.tpc_prepare()
            assert run_row(admin, run_id)["status"] == "running"  # prepared, not committed
            assert [x.gtrid for x in admin.tpc_recover()] == ["order-17"]
            conn.tpc_commit()  # COMMIT PREPARED 'order-17'
            assert notifications(listener) == []  # the marked transaction sent none
            service.settle(conn)
            assert cancelled.state == "committed" and [e.run_id for e in fired] == [run_id]
            # ... and the library sent them once it knew of the commit.
            sent = [json.loads(p) for p in notifications(listener)]
            assert sorted((n["event"], n["run_id"]) for n in sent) == sorted(
                [("created", created.events[0].run_id), ("force_cancelled", run_id)])
        assert run_row(admin, run_id)["status"] == "cancelled"
        assert service.verify_events(admin, run_id) == []
        # The mark was that transaction's only: the next transition notifies again.
        service.force_cancel(admin, service.get_active_run(admin, 3).id, 3)
        assert len(notifications(listener)) == 1


def test_a_stale_session_value_does_not_silence_notify(tpc_dsn: str) -> None:
    """A value set for the whole session by an earlier transaction (or left behind on a
    pooled server connection), or a role default, marks no later transaction."""
    with psycopg.connect(tpc_dsn, autocommit=True) as admin, \
            psycopg.connect(tpc_dsn, autocommit=True) as listener:
        first, second = running_run(admin, 4), running_run(admin, 4)
        listener.execute("LISTEN outbound_heartbeat")
        with psycopg.connect(tpc_dsn, autocommit=True) as conn:
            with conn.transaction():
                conn.execute("SELECT set_config('outbound_heartbeat.skip_notify',"
                             " pg_current_xact_id()::text, false)")
            service.force_cancel(conn, first, 4)
            conn.execute("SET outbound_heartbeat.skip_notify = 'on'")
            service.force_cancel(conn, second, 4)
        assert len(notifications(listener)) == 2


def test_skip_notify_needs_an_open_transaction(tpc_dsn: str) -> None:
    with psycopg.connect(tpc_dsn, autocommit=True) as conn:
        with pytest.raises(InvalidArgument) as err:
            service.skip_notify(conn)
        assert err.value.argument == "conn"
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


def test_transaction_block_without_notify(tpc_dsn: str) -> None:
    with psycopg.connect(tpc_dsn, autocommit=True) as admin, \
            psycopg.connect(tpc_dsn, autocommit=True) as listener:
        run_id = running_run(admin, 5)
        listener.execute("LISTEN outbound_heartbeat")
        with psycopg.connect(tpc_dsn, autocommit=True) as conn, \
                service.transaction(conn, notify=False):
            service.force_cancel(conn, run_id, 5)
            assert conn.execute(  # the block's transaction is the marked one
                "SELECT current_setting('outbound_heartbeat.skip_notify')"
                " = pg_current_xact_id()::text").fetchone() == (True,)
        assert run_row(admin, run_id)["status"] == "cancelled"
        # The library sent it after the block's commit.
        assert [json.loads(p)["run_id"] for p in notifications(listener)] == [run_id]


def test_async_prepared_transaction(tpc_dsn: str) -> None:
    with psycopg.connect(tpc_dsn, autocommit=True) as admin:
        run_id = running_run(admin, 6)

    async def scenario() -> None:
        async with await psycopg.AsyncConnection.connect(tpc_dsn) as conn:
            await conn.tpc_begin("order-async")
            await service_async.skip_notify(conn)
            await service_async.force_cancel(conn, run_id, 6)
            await conn.tpc_prepare()
            await conn.tpc_commit()

    asyncio.run(scenario())
    with psycopg.connect(tpc_dsn, autocommit=True) as admin:
        assert run_row(admin, run_id)["status"] == "cancelled"


def test_sqlalchemy_two_phase(tpc_dsn: str) -> None:
    from sqlalchemy import create_engine

    from outbound_heartbeat.contrib import sqlalchemy as oh

    from ..helpers import sqlalchemy_url

    with psycopg.connect(tpc_dsn, autocommit=True) as admin:
        run_id = running_run(admin, 7)
    engine = create_engine(sqlalchemy_url(tpc_dsn))
    try:
        with engine.connect() as connection:
            tx = connection.begin_twophase()
            oh.skip_notify(connection)
            oh.force_cancel(connection, run_id, 7)
            tx.prepare()
            tx.commit()
    finally:
        engine.dispose()
    with psycopg.connect(tpc_dsn, autocommit=True) as admin:
        assert run_row(admin, run_id)["status"] == "cancelled"
