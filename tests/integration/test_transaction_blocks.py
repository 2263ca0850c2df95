"""The library's transaction block where guarantees cross: a nested block that rolls back, work
fanned out inside a block (threads, futures, asyncio.gather), a committed call whose connection
moves on (closed, or back to a pool), and a fork of a process whose connections hold locks and
unsettled events.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import gc
import logging
import os
import threading
import time
from typing import Any

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from outbound_heartbeat import Event, calls, locks, outbox, service, service_async

from ..helpers import run_row
from ..proxy import proxy_for

Conn = psycopg.Connection[Any]
ACONN = psycopg.AsyncConnection


def running_run(conn: Conn, business: int, jobs: int = 2) -> int:
    run = service.create_run(conn, business, [{"n": i} for i in range(jobs)])
    assert service.claim_run(conn, f"w{run.id}", run.id) is not None
    return run.id


def status_of(dsn: str, run_id: int) -> str:
    with psycopg.connect(dsn, autocommit=True) as other:
        return str(run_row(other, run_id)["status"])


def force_cancel_logs(caplog: pytest.LogCaptureFixture, run_id: int) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if "[FORCE_CANCEL]" in r.getMessage() and f"run {run_id} " in r.getMessage()]


# -- a nested block that rolls back ------------------------------------------------------------


class AppError(Exception):
    pass


@pytest.mark.parametrize("how", ["exception", "rollback"])
def test_nested_block_rolled_back_fires_nothing(
    conn: Conn, dsn: str, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    caplog.set_level(logging.INFO, logger="outbound_heartbeat")
    kept, undone = running_run(conn, 21), running_run(conn, 21)
    fired: list[int] = []
    with psycopg.connect(dsn, autocommit=True) as app_conn:
        with service.transaction(app_conn):
            first = service.execute_call(app_conn, calls.force_cancel(kept, 21)).pending
            assert first is not None
            first.on_commit(lambda events: fired.extend(e.run_id for e in events))
            with (pytest.raises(AppError) if how == "exception" else _nothing(),
                  service.transaction(app_conn) as inner):
                second = service.execute_call(inner, calls.force_cancel(undone, 21)).pending
                assert second is not None
                second.on_commit(lambda events: fired.extend(e.run_id for e in events))
                if how == "exception":
                    raise AppError
                raise psycopg.Rollback()
            assert second.state == "rolled_back"  # at once, not at the outer commit
        assert first.state == "committed" and second.state == "rolled_back"
    assert fired == [kept]
    assert force_cancel_logs(caplog, undone) == []
    assert status_of(dsn, kept) == "cancelled" and status_of(dsn, undone) == "running"


def test_nested_async_block_rolled_back_fires_nothing(
    conn: Conn, dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="outbound_heartbeat")
    kept, undone = running_run(conn, 22), running_run(conn, 22)
    fired: list[int] = []

    async def scenario() -> None:
        async with await ACONN.connect(dsn, autocommit=True) as app_conn, \
                service_async.transaction(app_conn):
            first = (await service_async.execute_call(
                app_conn, calls.force_cancel(kept, 22))).pending
            first.on_commit(lambda events: fired.extend(e.run_id for e in events))
            with pytest.raises(AppError):
                async with service_async.transaction(app_conn):
                    second = (await service_async.execute_call(
                        app_conn, calls.force_cancel(undone, 22))).pending
                    second.on_commit(lambda events: fired.extend(e.run_id for e in events))
                    raise AppError
            assert second.state == "rolled_back"

    asyncio.run(scenario())
    assert fired == [kept]
    assert force_cancel_logs(caplog, undone) == []
    assert status_of(dsn, undone) == "running"


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


# -- fan-out inside a block: completes, in the block's transaction -----------------------------

#: A hang fails the test instead of hanging the suite.
DEADLINE = 20.0


def _in_thread(target: Any) -> Any:
    """Runs ``target`` in a daemon thread; fails if it has not returned within DEADLINE."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = target()
        except BaseException as exc:  # handed to the test
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(DEADLINE)
    assert not t.is_alive(), "hung: the fan-out inside the transaction block never completed"
    if "error" in box:
        raise box["error"]
    return box.get("result")


@pytest.mark.parametrize("how", ["threads", "executor", "copied_context"])
def test_threads_inside_block_complete(conn: Conn, dsn: str, how: str) -> None:
    runs = [running_run(conn, 23) for _ in range(4)]
    fired: list[int] = []
    with psycopg.connect(dsn) as app_conn:

        def cancel(run_id: int) -> None:
            outcome = service.execute_call(app_conn, calls.force_cancel(run_id, 23))
            assert outcome.pending is not None  # joined the block's transaction
            outcome.pending.on_commit(lambda events: fired.extend(e.run_id for e in events))

        def scenario() -> None:
            with service.transaction(app_conn):
                if how == "threads":
                    threads = [threading.Thread(target=cancel, args=(r,)) for r in runs]
                    for t in threads:
                        t.start()
                    for t in threads:
                        t.join()
                elif how == "executor":
                    with concurrent.futures.ThreadPoolExecutor(4) as pool:
                        list(pool.map(cancel, runs))
                else:
                    threads = [threading.Thread(target=contextvars.copy_context().run,
                                                args=(cancel, r)) for r in runs]
                    for t in threads:
                        t.start()
                    for t in threads:
                        t.join()
                assert [status_of(dsn, r) for r in runs] == ["running"] * 4  # not yet committed

        _in_thread(scenario)
        assert app_conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    assert sorted(fired) == sorted(runs)
    assert [status_of(dsn, r) for r in runs] == ["cancelled"] * 4


def test_threads_inside_block_roll_back_with_it(conn: Conn, dsn: str) -> None:
    runs = [running_run(conn, 24) for _ in range(3)]
    fired: list[int] = []
    with psycopg.connect(dsn, autocommit=True) as app_conn:

        def cancel(run_id: int) -> None:
            outcome = service.execute_call(app_conn, calls.force_cancel(run_id, 24))
            outcome.pending.on_commit(lambda events: fired.extend(e.run_id for e in events))

        def scenario() -> None:
            with pytest.raises(AppError), service.transaction(app_conn):
                with concurrent.futures.ThreadPoolExecutor(3) as pool:
                    for f in [pool.submit(cancel, r) for r in runs]:
                        f.result()
                raise AppError

        _in_thread(scenario)
    assert fired == []
    assert [status_of(dsn, r) for r in runs] == ["running"] * 3


def test_other_threads_still_wait_for_the_block(conn: Conn, dsn: str) -> None:
    """A thread the block does not wait for (another request sharing the connection) still
    waits for the block to end: its call is its own transaction, after the block's commit."""
    mine, theirs = running_run(conn, 25), running_run(conn, 25)
    order: list[str] = []
    with psycopg.connect(dsn, autocommit=True) as app_conn:
        entered = threading.Event()

        def other_request() -> None:
            entered.wait()
            outcome = service.execute_call(app_conn, calls.force_cancel(theirs, 25))
            order.append(f"other pending={outcome.pending is not None}")

        t = threading.Thread(target=other_request)
        t.start()
        with service.transaction(app_conn):
            service.force_cancel(app_conn, mine, 25)
            entered.set()
            time.sleep(0.5)  # the other request is waiting now
            order.append("block")
        t.join(DEADLINE)
        assert not t.is_alive()
    assert order == ["block", "other pending=False"]
    assert status_of(dsn, theirs) == "cancelled"


def test_gather_inside_async_block_completes(conn: Conn, dsn: str) -> None:
    runs = [running_run(conn, 26) for _ in range(4)]
    fired: list[int] = []

    async def cancel(app_conn: Any, run_id: int) -> None:
        outcome = await service_async.execute_call(app_conn, calls.force_cancel(run_id, 26))
        assert outcome.pending is not None
        outcome.pending.on_commit(lambda events: fired.extend(e.run_id for e in events))

    async def scenario() -> None:
        async with await ACONN.connect(dsn, autocommit=True) as app_conn:
            async with service_async.transaction(app_conn):
                await asyncio.gather(*(cancel(app_conn, r) for r in runs))
                assert fired == []
            with pytest.raises(AppError):
                async with service_async.transaction(app_conn):
                    await asyncio.gather(cancel(app_conn, extra), cancel(app_conn, extra2))
                    raise AppError

    extra, extra2 = running_run(conn, 26), running_run(conn, 26)
    asyncio.run(asyncio.wait_for(scenario(), DEADLINE))
    assert sorted(fired) == sorted(runs)
    assert [status_of(dsn, r) for r in runs] == ["cancelled"] * 4
    assert status_of(dsn, extra) == "running" and status_of(dsn, extra2) == "running"


def test_async_other_tasks_still_wait_for_the_block(conn: Conn, dsn: str) -> None:
    mine, theirs = running_run(conn, 27), running_run(conn, 27)
    order: list[str] = []

    async def scenario() -> None:
        async with await ACONN.connect(dsn, autocommit=True) as app_conn:
            entered = asyncio.Event()

            async def other_request() -> None:  # created outside the block
                await entered.wait()
                outcome = await service_async.execute_call(
                    app_conn, calls.force_cancel(theirs, 27))
                order.append(f"other pending={outcome.pending is not None}")

            other = asyncio.create_task(other_request())
            async with service_async.transaction(app_conn):
                await service_async.force_cancel(app_conn, mine, 27)
                entered.set()
                await asyncio.sleep(0.3)
                order.append("block")
            await other

    asyncio.run(asyncio.wait_for(scenario(), DEADLINE))
    assert order == ["block", "other pending=False"]


# -- a committed call whose connection moves on ------------------------------------------------


def test_commit_then_close_is_reported(
    conn: Conn, dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="outbound_heartbeat")
    run_id = running_run(conn, 28)
    app_conn = psycopg.connect(dsn)
    app_conn.execute("SELECT 1")
    pending = service.execute_call(app_conn, calls.force_cancel(run_id, 28)).pending
    assert pending is not None
    pending.on_commit(lambda events: None)
    app_conn.commit()
    app_conn.close()
    del app_conn
    gc.collect()
    # Only this transaction's report: a connection an earlier test of this worker left behind
    # may be finalized during this collection too, and report its own transaction.
    ours = f"of transaction {pending.xid} were never settled"
    reports = [r.getMessage() for r in caplog.records if ours in r.getMessage()]
    assert len(reports) == 1, caplog.text
    assert f"force_cancelled run {run_id})" in reports[0]


def test_pool_hook_settled_by_another_request_is_reported(
    conn: Conn, dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="outbound_heartbeat")
    run_id = running_run(conn, 29)
    fired: list[str] = []
    with ConnectionPool(dsn, min_size=1, max_size=1, open=True) as pool:

        def first_request() -> None:
            with pool.connection() as c:  # the pool commits at the block's end
                c.execute("SELECT 1")
                outcome = service.execute_call(c, calls.force_cancel(run_id, 29))
                outcome.pending.on_commit(
                    lambda events: fired.append(threading.current_thread().name))

        t = threading.Thread(target=first_request, name="first-request")
        t.start()
        t.join()
        assert fired == []
        with pool.connection() as c:  # the next request on the same connection
            service.get_active_run(c, 29)
    assert fired == [threading.current_thread().name]
    late = [r.getMessage() for r in caplog.records if "run late" in r.getMessage()]
    assert len(late) == 1 and f"force_cancelled run {run_id}" in late[0]


def test_async_commit_then_close_is_reported_and_late_settle_warns(
    conn: Conn, dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="outbound_heartbeat")
    # Connections that earlier tests of this process left unreferenced are finalized here, not
    # inside the scenario below: their never-settled warnings are not this test's.
    gc.collect()
    caplog.clear()
    dropped, late = running_run(conn, 33), running_run(conn, 33)
    fired: list[int] = []
    xids: dict[int, int | None] = {}

    async def first_request(app_conn: Any, run_id: int) -> None:
        await app_conn.execute("SELECT 1")
        outcome = await service_async.execute_call(app_conn, calls.force_cancel(run_id, 33))
        outcome.pending.on_commit(lambda events: fired.extend(e.run_id for e in events))
        xids[run_id] = outcome.pending.xid
        await app_conn.commit()

    async def scenario() -> None:
        app_conn = await ACONN.connect(dsn)
        await first_request(app_conn, dropped)
        await app_conn.close()
        del app_conn
        gc.collect()
        async with await ACONN.connect(dsn) as shared:
            await asyncio.create_task(first_request(shared, late))  # one request's task
            await service_async.get_active_run(shared, 33)  # another's, later

    asyncio.run(scenario())
    assert fired == [late]
    never = [r.getMessage() for r in caplog.records
             if f"of transaction {xids[dropped]} were never settled" in r.getMessage()]
    assert len(never) == 1 and f"force_cancelled run {dropped}" in never[0], caplog.text
    ran_late = [r.getMessage() for r in caplog.records if "run late" in r.getMessage()]
    assert len(ran_late) == 1 and f"force_cancelled run {late}" in ran_late[0]


@pytest.mark.parametrize("twin", ["sync", "async"])
def test_a_commit_whose_answer_is_lost_runs_no_hook_and_is_reported(
    conn: Conn, dsn: str, caplog: pytest.LogCaptureFixture, twin: str
) -> None:
    """The server commits the block, then its connection dies before the answer arrives (a
    restart, a crash or a failover right after the commit look so to the client): the library
    cannot know the outcome, so the hook does not run; the block raises, and the dropped
    connection's events are reported with the transaction id to check, never silently lost."""
    caplog.set_level(logging.WARNING, logger="outbound_heartbeat")
    run_id = running_run(conn, 34)
    fired: list[Event] = []
    seen: list[Any] = []
    with proxy_for(dsn) as (proxy, app_dsn):
        proxy.drop_answer_to(b"COMMIT")
        if twin == "sync":
            app_conn = psycopg.connect(app_dsn, autocommit=True)
            with pytest.raises(psycopg.OperationalError), service.transaction(app_conn):
                pending = service.execute_call(app_conn, calls.force_cancel(run_id, 34)).pending
                assert pending is not None
                pending.on_commit(fired.extend)
                seen.append(pending)
            app_conn.close()
            del app_conn
        else:

            async def scenario() -> None:
                app_conn = await ACONN.connect(app_dsn, autocommit=True)
                with pytest.raises(psycopg.OperationalError):
                    async with service_async.transaction(app_conn):
                        outcome = await service_async.execute_call(
                            app_conn, calls.force_cancel(run_id, 34))
                        assert outcome.pending is not None
                        outcome.pending.on_commit(fired.extend)
                        seen.append(outcome.pending)
                await app_conn.close()

            asyncio.run(scenario())
        gc.collect()
        assert proxy.dropped == 1
    [pending] = seen
    assert fired == [] and pending.state == "pending"
    # Only this transaction's report: gc.collect() may also finalize an earlier test's dropped
    # connections in this worker, which report their own transactions.
    ours = f"of transaction {pending.xid} were never settled"
    reports = [r.getMessage() for r in caplog.records if ours in r.getMessage()]
    assert len(reports) == 1, caplog.text
    assert f"force_cancelled run {run_id}" in reports[0]
    # What the report says to check: the server did commit it.
    row = conn.execute("SELECT pg_xact_status(%s::xid8)", (str(pending.xid),)).fetchone()
    assert row == ("committed",)
    assert status_of(dsn, run_id) == "cancelled"


def test_pool_with_transaction_block_runs_hooks_in_the_request(conn: Conn, dsn: str) -> None:
    """The documented way: service.transaction inside the pool's block."""
    run_id = running_run(conn, 30)
    fired: list[str] = []
    with ConnectionPool(dsn, min_size=1, max_size=1, open=True) as pool:

        def request() -> None:
            with pool.connection() as c, service.transaction(c):
                outcome = service.execute_call(c, calls.force_cancel(run_id, 30))
                outcome.pending.on_commit(
                    lambda events: fired.append(threading.current_thread().name))
            fired.append("returned")

        t = threading.Thread(target=request, name="the-request")
        t.start()
        t.join()
    assert fired == ["the-request", "returned"]


# -- fork ----------------------------------------------------------------------------------------


def _child(check: Any) -> int:
    """Forks; the child runs ``check()`` (True: exit 0) and never returns into pytest."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            code = 0 if check() else 3
        except BaseException:
            code = 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_fork_gives_the_child_fresh_locks_and_outbox(conn: Conn, dsn: str) -> None:
    run_id = running_run(conn, 31)
    fired: list[Event] = []
    with psycopg.connect(dsn) as app_conn:
        app_conn.execute("SELECT 1")
        pending = service.execute_call(app_conn, calls.force_cancel(run_id, 31)).pending
        assert pending is not None
        pending.on_commit(fired.extend)
        holding, release = threading.Event(), threading.Event()

        def hold_the_lock() -> None:  # another thread of the parent inside a call at the fork
            with locks.lock_for(app_conn):
                holding.set()
                release.wait()

        t = threading.Thread(target=hold_the_lock)
        t.start()
        holding.wait()
        try:

            def child_check() -> bool:
                lock = locks.lock_for(app_conn)
                got = getattr(lock, "outer", lock).acquire(timeout=2)
                return got and outbox.outbox_for(app_conn).unsettled() == []

            assert _child(child_check) == 0
            # The parent is untouched: the lock is still held by its thread, the event waits.
            parent_lock = locks.lock_for(app_conn)
            assert not getattr(parent_lock, "outer", parent_lock).acquire(timeout=0.1)
            assert outbox.outbox_for(app_conn).unsettled() == [pending]
        finally:
            release.set()
            t.join()
        app_conn.commit()
        service.settle(app_conn)
    assert [e.run_id for e in fired] == [run_id]


def test_forked_child_does_not_report_the_parents_events(conn: Conn, dsn: str) -> None:
    run_id = running_run(conn, 32)
    app_conn = psycopg.connect(dsn)
    app_conn.execute("SELECT 1")
    assert service.execute_call(app_conn, calls.force_cancel(run_id, 32)).pending is not None
    box = outbox.outbox_for(app_conn)
    read, write = os.pipe()

    def child_check() -> bool:
        handler = logging.StreamHandler(os.fdopen(write, "w"))
        logging.getLogger("outbound_heartbeat").addHandler(handler)
        box.report_unsettled()  # what the connection's finalizer runs in the child
        handler.flush()
        return True

    try:
        assert _child(child_check) == 0
        os.close(write)
        with os.fdopen(read) as child_log:
            assert child_log.read() == ""
    finally:
        app_conn.rollback()
        app_conn.close()
