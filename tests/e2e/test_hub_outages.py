"""The shared heartbeat (a process's hub, docs/worker-lease.md "Many leases in one process")
meets what a dedicated lease survives: a server that answers read-only (a primary set
read-only, a standby not yet promoted), on any hub connection including its very first; and
a fork: a child of a process holding shared leases takes its own lease on a hub of its own,
and the parent's hub is never touched from the child. (The failover through a real standby:
tests/e2e/test_failover.py.)"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import threading
import time
import traceback
from typing import Any

import psycopg
import pytest
from psycopg import sql

from outbound_heartbeat import hub, service
from outbound_heartbeat.connections import CONNECT_OPTIONS
from outbound_heartbeat.lease import Lease
from outbound_heartbeat.lease_async import AsyncLease

from ..helpers import run_row

Conn = psycopg.Connection[Any]
STALE_AFTER = 3.0
INTERVAL = 0.5


def set_read_only(conn: Conn, on: bool) -> None:
    """New sessions of this database start read-only (or not); the hub's sessions are ended,
    so every connection it opens meets the server's new state."""
    name = sql.Identifier(conn.info.dbname)
    if on:
        conn.execute(sql.SQL("ALTER DATABASE {} SET default_transaction_read_only = on").format(name))
    else:
        conn.execute(sql.SQL("ALTER DATABASE {} RESET default_transaction_read_only").format(name))
    conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                 " WHERE datname = current_database() AND application_name LIKE 'oh-%%'")


def heartbeats(conn: Conn, run_ids: list[int]) -> dict[int, Any]:
    return dict(conn.execute("SELECT id, last_heartbeat_at FROM outbound_call_runs WHERE id = ANY(%s)",
                             (run_ids,)).fetchall())


def ages(conn: Conn, run_ids: list[int]) -> dict[int, float]:
    return dict(conn.execute(
        "SELECT id, extract(epoch FROM clock_timestamp() - last_heartbeat_at)::float8"
        " FROM outbound_call_runs WHERE id = ANY(%s)", (run_ids,)).fetchall())


def stale_after(conn: Conn, seconds: float) -> None:
    conn.execute("UPDATE outbound_heartbeat.settings SET stale_after = make_interval(secs => %s)",
                 (seconds,))


# -- a read-only answer --------------------------------------------------------------------------

@pytest.mark.direct_only
@pytest.mark.parametrize("twin", ["sync", "async"])
def test_a_read_only_server_for_two_seconds_loses_no_shared_lease(dsn: str, conn: Conn,
                                                                  twin: str) -> None:
    """Every hub connection (the heartbeat one and the pool) meets ReadOnlyServer for 2 s:
    the leases retry with their backoff, as a dedicated lease does, and all 5 hold; a
    next_job() sent meanwhile waits and gets its job once the server takes writes again."""
    stale_after(conn, STALE_AFTER)
    runs = [service.create_run(conn, 20 + i, [{"n": 1}, {"n": 2}]).id for i in range(5)]
    got: list[Any] = []

    def read_only_window(dial: Any) -> float:
        set_read_only(conn, True)
        started = time.monotonic()
        time.sleep(0.3)  # every beat and work call now meets a read-only server
        dialer = threading.Thread(target=lambda: got.append(dial()), daemon=True)
        dialer.start()
        time.sleep(1.7)
        set_read_only(conn, False)
        ended = time.monotonic()
        assert ended - started >= 2.0
        dialer.join(10)
        return ended

    def check(leases: list[Any], before: dict[int, Any]) -> None:
        after = heartbeats(conn, runs)
        assert all(after[r] > before[r] for r in runs)  # beaten again after the window
        assert [lease.lost for lease in leases] == [False] * 5
        assert not any(lease.suspended for lease in leases)
        assert service.cleanup_stuck_runs(conn) == []

    if twin == "sync":
        leases = [Lease(dsn, f"ro-{i}", r, interval=INTERVAL) for i, r in enumerate(runs)]
        for lease in leases:
            lease.__enter__()
        try:
            stop = threading.Event()

            def touch() -> None:  # the dial loop is alive: only the server is read-only
                while not stop.wait(0.1):
                    for lease in leases:
                        lease.touch()

            threading.Thread(target=touch, daemon=True).start()
            read_only_window(leases[0].next_job)
            before = heartbeats(conn, runs)
            time.sleep(3 * INTERVAL)
            check(leases, before)
            stop.set()
        finally:
            for lease in leases:
                lease.__exit__(None, None, None)
    else:
        async def main() -> None:
            leases = [AsyncLease(dsn, f"aro-{i}", r, interval=INTERVAL) for i, r in enumerate(runs)]
            for lease in leases:
                await lease.__aenter__()
            loop = asyncio.get_running_loop()
            try:
                def dial() -> Any:
                    return asyncio.run_coroutine_threadsafe(leases[0].next_job(), loop).result(15)

                window = loop.run_in_executor(None, read_only_window, dial)
                while not window.done():
                    for lease in leases:
                        lease.touch()
                    await asyncio.sleep(0.1)
                await window
                before = heartbeats(conn, runs)
                await asyncio.sleep(3 * INTERVAL)
                check(leases, before)
            finally:
                for lease in leases:
                    await lease.__aexit__(None, None, None)

        asyncio.run(main())
    assert len(got) == 1 and got[0] is not None  # the job sent during the window
    assert {run_row(conn, r)["status"] for r in runs} == {"completed"}


@pytest.mark.direct_only
@pytest.mark.parametrize("twin", ["sync", "async"])
def test_a_read_only_first_connection_does_not_end_the_beat_loop(dsn: str, conn: Conn,
                                                                 twin: str) -> None:
    """The hub's very first connection (its warm start) meets a read-only server: the beat
    loop goes on, and a lease that joins once the server takes writes is beaten in the
    background."""
    stale_after(conn, STALE_AFTER)
    run_id = service.create_run(conn, 30, [{}]).id

    def check_beaten(lease: Any) -> None:
        first = heartbeats(conn, [run_id])[run_id]
        time.sleep(4 * INTERVAL)
        assert heartbeats(conn, [run_id])[run_id] > first, "no background heartbeat"
        assert not lease.lost and not lease.suspended

    set_read_only(conn, True)
    if twin == "sync":
        started = hub.acquire_hub(dsn, dict(CONNECT_OPTIONS))  # the beat thread dials at once
        try:
            time.sleep(1.0)
            set_read_only(conn, False)
            with Lease(dsn, "ro-first", run_id, interval=INTERVAL) as lease:
                assert lease._hub is started  # the same hub, started while read-only
                check_beaten(lease)
        finally:
            hub.release_hub(started)
    else:
        from outbound_heartbeat import hub_async

        async def main() -> None:
            started = await hub_async.acquire_hub(dsn, dict(CONNECT_OPTIONS))
            try:
                await asyncio.sleep(1.0)
                set_read_only(conn, False)
                async with AsyncLease(dsn, "aro-first", run_id, interval=INTERVAL) as lease:
                    assert lease._hub is started
                    await asyncio.get_running_loop().run_in_executor(None, check_beaten, lease)
            finally:
                await hub_async.release_hub(started)

        asyncio.run(main())
    assert run_row(conn, run_id)["status"] == "completed"


# -- a fork --------------------------------------------------------------------------------------

def child_takes_its_own_lease(dsn: str, run_id: int, twin: str, report: Any) -> None:
    """In the child: a lease of its own (the same dsn and options as the parent's hub), beaten
    in the background while the child only touches it for longer than stale_after, then its
    two jobs dialed and the lease released."""
    try:
        async def async_lease() -> list[int]:
            async with AsyncLease(dsn, "forked-child", run_id, interval=INTERVAL) as lease:
                until = time.monotonic() + STALE_AFTER + 1.0
                while time.monotonic() < until:
                    lease.touch()
                    await asyncio.sleep(0.1)
                done = []
                while (job := await lease.next_job()) is not None:
                    await lease.finish_job(job)
                    done.append(job.id)
                return done

        if twin == "async":
            done = asyncio.run(async_lease())
        else:
            with Lease(dsn, "forked-child", run_id, interval=INTERVAL) as lease:
                assert lease._hub.pid == os.getpid()  # not the parent's hub
                until = time.monotonic() + STALE_AFTER + 1.0
                while time.monotonic() < until:
                    lease.touch()
                    time.sleep(0.1)
                done = []
                while (job := lease.next_job()) is not None:
                    lease.finish_job(job)
                    done.append(job.id)
        report.put(("ok", done))
    except BaseException:
        report.put(("error", traceback.format_exc()))


def parent_dials_while(leases: list[Lease], busy: Any) -> list[str]:
    """The parent's dial loop: its leases' jobs dialed on the hub's pool, one at a time, with
    a touch of every lease between calls, for as long as busy() says so."""
    problems: list[str] = []
    while busy():
        for lease in leases:
            lease.touch()
        for lease in leases:
            try:
                job = lease.next_job()
                if job is not None:
                    lease.finish_job(job)
            except Exception as exc:  # DuplicatePreparedStatement, a foreign row, ...
                problems.append(f"{type(exc).__name__}: {exc}")
        time.sleep(0.05)
    return problems


@pytest.mark.parametrize("route", ["direct", "pgbouncer"], indirect=True)
@pytest.mark.parametrize("how", ["multiprocessing", "os.fork", "async-child"])
def test_a_forked_child_takes_its_own_lease_and_leaves_the_parents_alone(
        dsn: str, conn: Conn, how: str) -> None:
    stale_after(conn, STALE_AFTER)
    parent_runs = [service.create_run(conn, 40 + i, [{"n": j} for j in range(400)]).id
                   for i in range(3)]
    child_run = service.create_run(conn, 49, [{"n": 1}, {"n": 2}]).id
    leases = [Lease(dsn, f"parent-{i}", r, interval=INTERVAL) for i, r in enumerate(parent_runs)]
    for lease in leases:
        lease.__enter__()
    ctx = multiprocessing.get_context("fork")
    report = ctx.SimpleQueue()
    try:
        for lease in leases:  # the parent's hub has opened its pool and beaten: all in use
            lease.touch()
            job = lease.next_job()
            assert job is not None
            lease.finish_job(job)
        if how == "os.fork":
            pid = os.fork()
            if pid == 0:  # the child
                code = 1
                try:
                    # The parent's lease is the parent's: no call, and leaving it touches nothing.
                    try:
                        leases[0].next_job()
                        report.put(("error", "the child used its parent's lease"))
                    except RuntimeError:
                        leases[0].__exit__(None, None, None)
                        child_takes_its_own_lease(dsn, child_run, "sync", report)
                        code = 0
                finally:
                    os._exit(code)
            exit_code: list[int] = []

            def busy() -> bool:
                if exit_code:
                    return False
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    exit_code.append(os.waitstatus_to_exitcode(status))
                return not done and time.monotonic() < deadline

            deadline = time.monotonic() + 30
        else:
            child = ctx.Process(target=child_takes_its_own_lease,
                                args=(dsn, child_run, "async" if how == "async-child" else "sync",
                                      report))
            child.start()
            deadline = time.monotonic() + 30
            exit_code = []

            def busy() -> bool:
                if child.exitcode is not None:
                    exit_code.append(child.exitcode)
                    return False
                return time.monotonic() < deadline

        worst: dict[int, float] = {}
        sampling = threading.Event()

        def sample() -> None:
            with psycopg.connect(dsn, autocommit=True) as watcher:
                while not sampling.wait(0.1):
                    for run_id, age in ages(watcher, [*parent_runs, child_run]).items():
                        worst[run_id] = max(worst.get(run_id, 0.0), age)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        problems = parent_dials_while(leases, busy)
        sampling.set()
        sampler.join(5)
        assert exit_code == [0], (exit_code, report.get() if not report.empty() else None)
        outcome = report.get()
        assert outcome[0] == "ok", outcome[1]
        assert len(outcome[1]) == 2  # the child dialed its own run's two jobs, nobody else's
        assert problems == []
        # The parent's runs stayed fresh throughout; the child's run was beaten in the
        # background by the child's own hub while the child only touched it.
        assert max(worst[r] for r in parent_runs) < STALE_AFTER - INTERVAL, worst
        assert worst[child_run] < STALE_AFTER - INTERVAL, worst
        assert not any(lease.lost or lease.suspended for lease in leases)
        assert service.cleanup_stuck_runs(conn) == []
        assert run_row(conn, child_run)["status"] == "completed"
        assert {run_row(conn, r)["status"] for r in parent_runs} == {"running"}
        jobs = conn.execute("SELECT run_id, count(*) FILTER (WHERE status = 'completed')"
                            " FROM outbound_call_jobs WHERE run_id = ANY(%s) GROUP BY run_id",
                            (parent_runs,)).fetchall()
        assert all(n >= 2 for _, n in jobs), jobs  # the parent kept dialing on its pool
    finally:
        for lease in leases:
            lease.__exit__(None, None, None)
    assert {run_row(conn, r)["status"] for r in parent_runs} == {"completed"}
