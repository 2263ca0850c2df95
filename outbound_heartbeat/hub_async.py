"""The asyncio twin of :mod:`outbound_heartbeat.hub`: one hub per event loop and connection
options, with a beat task, a watcher task, one heartbeat connection and an async pool. Every
decision lives in the shared :class:`~outbound_heartbeat.hub.HubCore`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from . import errors, pooler, service_async
from .connections import cut_connection
from .hub import (
    BEAT_FAILURES,
    CONNECTION_FAILURES,
    DEFAULT_POOL_SIZE,
    MAX_BATCH,
    MAX_NAP,
    PARALLEL_BATCHES,
    WATCH_EVERY,
    HubCore,
    Member,
    application_name,
    hub_key,
    locked_apart,
    process_label,
)
from .lease_state import LeaseState

__all__ = ["AsyncBatcher", "AsyncLeaseHub", "acquire_hub", "release_hub", "send_beat"]

logger = logging.getLogger("outbound_heartbeat.lease")


class AsyncBatcher:
    """The twin of :class:`outbound_heartbeat.hub.Batcher`, as a task of the hub's loop."""

    def __init__(
        self, pool: AsyncConnectionPool[Any],
        send: Callable[[psycopg.AsyncConnection[Any], list[Any]], Awaitable[list[Any]]],
    ) -> None:
        self.pool = pool
        self.send = send
        self._pending: list[tuple[Any, asyncio.Future[Any]]] = []
        self._wake = asyncio.Event()
        self._stop = False
        self._slots = asyncio.Semaphore(PARALLEL_BATCHES)
        self._running: set[asyncio.Task[None]] = set()
        self._task = asyncio.create_task(self._loop(), name="oh-batcher")

    async def call(self, arg: Any) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((arg, future))
        self._wake.set()
        return await future

    async def close(self, timeout: float) -> None:
        self._stop = True
        self._wake.set()
        with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(self._task, timeout)

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
            if not self._pending:
                self._wake.clear()
            if not batch:
                if self._stop:
                    return
                continue
            await self._slots.acquire()
            task = asyncio.create_task(self._run_in_slot(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run_in_slot(self, batch: list[tuple[Any, asyncio.Future[Any]]]) -> None:
        try:
            await self._run(batch)
        finally:
            self._slots.release()

    async def _run(self, batch: list[tuple[Any, asyncio.Future[Any]]]) -> None:
        args = [arg for arg, _ in batch]
        try:
            async with pooled(self.pool) as conn:
                results = await self.send(conn, args)
        except CONNECTION_FAILURES as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        except Exception as exc:
            if len(batch) == 1:
                if not batch[0][1].done():
                    batch[0][1].set_exception(exc)
                return
            for item in batch:
                await self._run([item])
            return
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():  # its caller was cancelled
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)


@contextlib.asynccontextmanager
async def pooled(pool: AsyncConnectionPool[Any]) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """The twin of :func:`outbound_heartbeat.hub.pooled`."""
    async with pool.connection() as conn:
        try:
            yield conn
        except CONNECTION_FAILURES:
            await conn.close()
            raise


async def send_beat(conn: psycopg.AsyncConnection[Any], leases: list[tuple[int, str, int]], *,
                    wait: bool = True) -> list[tuple[int, str]]:
    """The twin of :func:`outbound_heartbeat.hub.send_beat`."""
    if len(leases) == 1 and wait:
        run_id, worker_id, lease_epoch = leases[0]
        try:
            return [(run_id, await service_async.heartbeat(conn, run_id, worker_id, lease_epoch))]
        except errors.RunLocked:
            return [(run_id, "locked")]
    return await service_async.heartbeat_leases(conn, leases)


async def final_beats(conn: psycopg.AsyncConnection[Any], leases: list[Any]) -> list[Any]:
    """The twin of :func:`outbound_heartbeat.hub.final_beats`."""
    return [locked_apart(lease[0], status == "locked", status)
            for lease, (_, status) in zip(
                leases, await service_async.heartbeat_leases(conn, leases), strict=True)]


async def finish_runs(conn: psycopg.AsyncConnection[Any], leases: list[Any]) -> list[Any]:
    """The twin of :func:`outbound_heartbeat.hub.finish_runs`."""
    return [locked_apart(o.run_id, o.outcome == "locked", o)
            for o in await service_async.finish_runs(conn, leases)]


class AsyncLeaseHub:
    """The async hub; create it with :func:`acquire_hub` inside the loop that will use it."""

    def __init__(self, dsn: str, connect_options: dict[str, Any],
                 pool_size: int = DEFAULT_POOL_SIZE, heartbeat_dsn: str | None = None) -> None:
        self.dsn = dsn
        # Heartbeats on a pool of their own (see LeaseHub); None: the work connections' DSN.
        self.heartbeat_dsn = heartbeat_dsn
        self.connect_options = connect_options
        self.core = HubCore()
        self.users = 0
        #: The process that started the hub: its tasks and sockets exist only there.
        self.pid = os.getpid()
        label = self.label = process_label()
        self._beat_conn: psycopg.AsyncConnection[Any] | None = None
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self.pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            dsn,
            kwargs={**connect_options, "application_name": application_name("work", label)},
            min_size=1, max_size=pool_size,
            timeout=float(connect_options.get("connect_timeout", 5)) * 2,
            name=f"outbound-heartbeat-{label}", open=False,
        )
        self._tasks: list[asyncio.Task[None]] = []
        self.started = asyncio.Event()

    async def start(self) -> None:
        await self.pool.open()

        # A release storm: every lease's last heartbeat and finish_run, gathered.
        self.final_beats = AsyncBatcher(self.pool, final_beats)
        self.finish_runs = AsyncBatcher(self.pool, finish_runs)
        self._tasks = [asyncio.create_task(self._beat_loop(), name="oh-heartbeat-hub"),
                       asyncio.create_task(self._watch(), name="oh-lease-watch-hub")]
        self.started.set()

    # -- membership ---------------------------------------------------------------------------
    def register(self, state: LeaseState) -> Member:
        member = self.core.add(state)
        self._wake.set()
        return member

    def unregister(self, member: Member) -> None:
        self.core.remove(member)

    @contextlib.asynccontextmanager
    async def work_connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        async with pooled(self.pool) as conn:
            yield conn

    async def close(self) -> None:
        self._stop.set()
        self._wake.set()
        for task in self._tasks:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(
                    task, float(self.connect_options.get("connect_timeout", 5)) + 5)
        for batcher in (self.final_beats, self.finish_runs):
            await batcher.close(float(self.connect_options.get("connect_timeout", 5)) + 5)
        await self.pool.close()
        if self._beat_conn is not None:
            await self._beat_conn.close()

    # -- the beat loop --------------------------------------------------------------------------
    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        conn = await psycopg.AsyncConnection.connect(
            self.heartbeat_dsn or self.dsn,
            application_name=application_name("heartbeat", self.label), **self.connect_options)
        try:
            if self.heartbeat_dsn is None:  # sharing the work connections' pool behind a pooler?
                row = await (await conn.execute(pooler.SERVER_PID)).fetchone()
                pooler.warn_if_pooled(self.dsn, conn.info.backend_pid, row[0] if row else 0)
            await service_async.heartbeat_leases(conn, [])  # warm start (see LeaseHub._connect)
        except BaseException:
            await conn.close()
            raise
        return conn

    async def _nap(self, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)
        self._wake.clear()

    async def _beat_loop(self) -> None:
        # The first connection is a courtesy (see LeaseHub._beat_loop): the loop starts anyway.
        try:
            self._beat_conn = await self._connect()
        except Exception as exc:
            logger.warning("[HEARTBEAT] heartbeat hub: first connection failed (%s: %s); the"
                           " first beat connects again", type(exc).__name__,
                           str(exc).strip()[:200])
        while not self._stop.is_set():
            await self._nap(self.core.next_wake())
            if self._stop.is_set():
                break
            try:
                batch = self.core.take_due()
                if batch:
                    await self._beat(batch)
            except Exception:  # never the end of the beat task: the leases depend on it
                logger.exception("[HEARTBEAT] heartbeat hub: unexpected error in the beat loop")
                await self._nap(MAX_NAP)
        if self._beat_conn is not None:
            await self._beat_conn.close()

    async def _beat(self, batch: list[Member]) -> None:
        try:
            if self._beat_conn is None or self._beat_conn.closed:
                # Connecting (and warming) is bounded by connect_timeout and the keepalives,
                # not the watcher: only the beat statement itself counts as in flight.
                self._beat_conn = await self._connect()
            sent_at = self.core.clock()
            self.core.sending(batch)
            answers = await send_beat(
                self._beat_conn,
                [(m.state.claim.run_id, m.state.claim.worker_id, m.state.claim.lease_epoch)
                 for m in batch],
                wait=not any(m.state.releasing for m in batch))
        except BEAT_FAILURES as exc:
            self.core.failed(batch, exc)
            if self._beat_conn is not None:
                await self._beat_conn.close()
                self._beat_conn = None
            return
        except Exception:
            logger.exception("[HEARTBEAT] heartbeat hub crashed on a beat")
            self.core.crashed(batch)
            return
        finally:
            self.core.in_flight = []
        self.core.answered(batch, answers, sent_at)

    async def _watch(self) -> None:
        while not self._stop.is_set():
            await asyncio.sleep(WATCH_EVERY)
            work, beat = self.core.to_cut()
            for conn in work:
                cut_connection(conn)
            if beat and self._beat_conn is not None:
                cut_connection(self._beat_conn)


# One table of hubs per event loop: a hub's tasks and connections belong to its loop.
_hubs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Any, AsyncLeaseHub]] = (
    weakref.WeakKeyDictionary())
#: Hubs a forked child inherited (see outbound_heartbeat.hub._inherited): never touched.
_inherited: list[Any] = []


def _forget_hubs_after_fork() -> None:
    for table in list(_hubs.values()):
        _inherited.extend(table.values())
    _hubs.clear()


os.register_at_fork(after_in_child=_forget_hubs_after_fork)


async def acquire_hub(dsn: str, connect_options: dict[str, Any],
                      heartbeat_dsn: str | None = None) -> AsyncLeaseHub:
    """This loop's hub for these connections (started on first use); pair with release_hub.
    A hub another process started is never used (see outbound_heartbeat.hub.acquire_hub)."""
    table = _hubs.setdefault(asyncio.get_running_loop(), {})
    key = hub_key(dsn, connect_options, heartbeat_dsn)
    hub = table.get(key)
    if hub is not None and hub.pid != os.getpid():
        _inherited.append(table.pop(key))
        hub = None
    if hub is None:
        hub = table[key] = AsyncLeaseHub(dsn, connect_options, heartbeat_dsn=heartbeat_dsn)
        hub.users += 1  # held while starting, so a concurrent release cannot close it
        try:
            await hub.start()
        except BaseException:
            hub.users -= 1
            del table[key]
            raise
        return hub
    hub.users += 1
    await hub.started.wait()  # another lease of this loop may still be starting it
    return hub


async def release_hub(hub: AsyncLeaseHub) -> None:
    """Drops one use; the last user closes the hub (its connections and tasks). A hub of
    another process (inherited at a fork) is never closed here: its sockets are the parent's."""
    if hub.pid != os.getpid():
        return
    hub.users -= 1
    if hub.users > 0:
        return
    table = _hubs.get(asyncio.get_running_loop(), {})
    key = hub_key(hub.dsn, hub.connect_options, hub.heartbeat_dsn)
    if table.get(key) is hub:
        del table[key]
    await hub.close()
