"""One heartbeat connection and one small work pool for all the leases of a process (asyncio).

A process holding many leases would otherwise open two connections per lease (1,000 leases:
2,000 backends). A hub, one per (dsn, connect options) for threads and one per event loop and
(dsn, connect options) for asyncio, owns:

- one heartbeat connection that beats every due lease in ONE statement (``heartbeat()`` for a
  lone lease, ``heartbeat_leases()`` for more: :func:`send_beat`);
- a ``psycopg_pool`` pool (``pool_size`` connections) for the leases' work calls;
- one watcher that cuts, once a lease is suspended, its in-flight work calls, and the shared
  heartbeat statement when a lease it carries is suspended (a dead network path).

Each lease keeps its own :class:`~outbound_heartbeat.lease_state.LeaseState`: its interval, stall
watchdog, self-expiry, suspension and answers are exactly those of a lease with its own
connection. A lease due for a beat takes along every lease due within half its interval, so
the beats of a process fall into one statement per interval. An answer is per lease ('lost'
ends one lease only); a failed statement is a failed heartbeat for every lease it carried.
:class:`~outbound_heartbeat.hub_core.HubCore` holds those rules, free of I/O, for both twins.
The twin is :mod:`outbound_heartbeat.hub`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from . import calls, errors, pooler, service_async, telemetry
from .compat import (
    AEvent,
    AFuture,
    ALock,
    ARunner,
    ASemaphore,
    AWorker,
    ajoin,
    asleep,
    aspawn,
    await_result,
)
from .connections import cut_connection
from .hub_core import (
    BEAT_FAILURES,
    BURST_GAP,
    BURST_LINGER,
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
    inherited,
    locked_apart,
    loop_hubs,
    process_label,
)
from .lease_state import LeaseState

__all__ = [
    "DEFAULT_POOL_SIZE",
    "AsyncBatcher",
    "AsyncLeaseHub",
    "HubCore",
    "Member",
    "acquire_hub",
    "process_label",
    "release_hub",
    "send_beat",
]

logger = logging.getLogger("outbound_heartbeat.lease")

T = TypeVar("T")
IDLE = psycopg.pq.TransactionStatus.IDLE


async def send_beat(
    conn: psycopg.AsyncConnection[Any], leases: list[tuple[int, str, int]], *, wait: bool = True
) -> list[tuple[int, str]]:
    """The statement that beats these leases: ``heartbeat()`` for a lone lease (a process with
    one worker holds one lease, the common case, and it is the cheapest beat there is: no
    arrays, no set to answer), ``heartbeat_leases()`` for more. Either way one
    (run_id, status) per lease; heartbeat()'s OH423 (its row stayed locked past lock_timeout)
    is the set call's 'locked'. A lone lease waits on its row as a dedicated lease does (up to
    lock_timeout). ``wait=False`` (a lease releasing: its own release calls and the app's
    transaction may hold its row, and the hub's rule is that a held row holds up nothing) sends
    the set call even for one lease, which answers 'locked' within 100 ms."""
    if len(leases) == 1 and wait:
        run_id, worker_id, lease_epoch = leases[0]
        try:
            status = await _beat(conn, calls.heartbeat(run_id, worker_id, lease_epoch))
            return [(run_id, status)]
        except errors.RunLocked:
            return [(run_id, "locked")]
    return await _beat(conn, calls.beat_leases(leases))


async def _beat(conn: psycopg.AsyncConnection[Any], call: calls.Call[T]) -> T:
    """A beat statement as :func:`service_async.execute_call` runs it, less what a connection of
    the hub's own never needs and a beat would pay every 1-3 s (about a third of a raw
    UPDATE's round trip for a lone lease): the connection's lock (the heartbeat connection is
    the beat loop's alone, the watcher only shuts its socket; a pooled one is its batch's
    alone) and the outbox (autocommit and idle: no app transaction to wait for, none ever
    opened on it). The same statement, answers, errors (translated) and events (logged and
    traced). A connection in any other state takes the service's way."""
    if not conn.autocommit or conn.info.transaction_status != IDLE:
        return (await service_async.execute(conn, call))[0]
    collector = calls.EventCollector()
    conn.add_notice_handler(collector)
    try:
        async with conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(call.query, call.params)
            rows = await cur.fetchall()
    except psycopg.Error as exc:
        raise calls.translate(call, exc) from exc
    finally:
        conn.remove_notice_handler(collector)
    if collector.events:
        calls.log_events(collector.events)
        telemetry.record_events(call.name, collector.events)
    return call.decode(rows)


async def final_beats(
    conn: psycopg.AsyncConnection[Any], leases: list[tuple[int, str, int]]
) -> list[Any]:
    """The last heartbeat of many leases leaving at once. A lease whose row stayed locked is
    answered RunLocked on its own, at once: its caller sends it again after its backoff (the
    release rules), and no other lease of the batch waits for that row."""
    answers = await _beat(conn, calls.beat_leases(leases))
    return [locked_apart(lease[0], status == "locked", status)
            for lease, (_, status) in zip(leases, answers, strict=True)]


async def finish_runs(
    conn: psycopg.AsyncConnection[Any], leases: list[tuple[int, str, int, str]]
) -> list[Any]:
    """The finish_run of many leases leaving at once; a lease whose row stayed locked
    (outcome 'locked', nothing written for it) is answered RunLocked on its own, as above."""
    return [locked_apart(o.run_id, o.outcome == "locked", o)
            for o in await service_async.finish_runs(conn, leases)]


class AsyncBatcher:
    """Sends the same call of many leases as one statement on the hub's pool: while batches
    run, the next gathers (no waiting window; a lone call goes at once). A connection error or
    a read-only server fails every call of its batch (each lease retries as it would alone);
    any other error sends that batch's calls one by one, so only the culprit's caller sees it."""

    def __init__(
        self, pool: AsyncConnectionPool[Any],
        send: Callable[[psycopg.AsyncConnection[Any], list[Any]], Awaitable[list[Any]]],
        name: str,
    ) -> None:
        self.pool = pool
        self.send = send
        self._pending: list[tuple[Any, AFuture[Any]]] = []
        self._lock = ALock()
        self._wake = AEvent()
        self._stop = False
        self._slots = ASemaphore(PARALLEL_BATCHES)
        self._taken_at = 0.0
        self._runner = ARunner(PARALLEL_BATCHES, name)
        self._worker = aspawn(self._loop, name)

    async def call(self, arg: Any) -> Any:
        future: AFuture[Any] = AFuture()
        async with self._lock:
            self._pending.append((arg, future))
        self._wake.set()
        return await await_result(future)

    async def close(self, timeout: float) -> None:
        self._stop = True
        self._wake.set()
        await ajoin(self._worker, timeout)
        self._runner.shutdown()

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            if self._stop and not self._pending:
                return  # closing with nothing to send: no need to wait for a slot
            # A slot first, then the batch: the calls that arrived while every slot was busy
            # go together.
            await self._slots.acquire()
            if time.monotonic() - self._taken_at < BURST_GAP:
                # Calls back to back (a storm: 1,000 threads reach this one by one, as fast as
                # the GIL lets them): a moment more makes them a few large statements rather
                # than hundreds of small ones, each of which needs the GIL several times. A
                # lone call after a quiet moment goes at once.
                await asleep(BURST_LINGER)
            async with self._lock:
                batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
                if not self._pending:
                    self._wake.clear()
            if not batch:
                self._slots.release()
                if self._stop:
                    return
                continue
            self._taken_at = time.monotonic()
            self._runner.submit(self._run_in_slot, batch)

    async def _run_in_slot(self, batch: list[tuple[Any, AFuture[Any]]]) -> None:
        try:
            await self._run(batch)
        finally:
            self._slots.release()

    async def _run(self, batch: list[tuple[Any, AFuture[Any]]]) -> None:
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
    """A work connection of the pool; after a connection failure or a read-only answer it is
    closed, so the pool drops it and the next call connects again (to the new primary)."""
    async with pool.connection() as conn:
        try:
            yield conn
        except CONNECTION_FAILURES:
            await conn.close()
            raise


class AsyncLeaseHub:
    """A hub: a beat loop and a watcher, one heartbeat connection, one pool. Get it with
    :func:`acquire_hub`, which starts it (for asyncio, in the loop that will use it)."""

    def __init__(self, dsn: str, connect_options: dict[str, Any],
                 pool_size: int = DEFAULT_POOL_SIZE, heartbeat_dsn: str | None = None) -> None:
        self.dsn = dsn
        # Heartbeats on a pool of their own (a PgBouncer entry, or PostgreSQL directly), so they
        # never queue behind the app's queries; None: the same DSN as the work connections.
        self.heartbeat_dsn = heartbeat_dsn
        self.connect_options = connect_options
        self.core = HubCore()
        self.users = 0
        #: The process that started the hub: its workers and sockets exist only there.
        self.pid = os.getpid()
        label = self.label = process_label()
        self._beat_conn: psycopg.AsyncConnection[Any] | None = None
        self._stop = AEvent()
        self._wake = AEvent()
        self.pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            dsn,
            kwargs={**connect_options, "application_name": application_name("work", label)},
            min_size=1, max_size=pool_size,
            timeout=float(connect_options.get("connect_timeout", 5)) * 2,
            name=f"outbound-heartbeat-{label}", open=False,
        )
        self._workers: list[AWorker] = []

    async def start(self) -> None:
        """Opens the pool and starts the batchers, the beat loop and the watcher."""
        await self.pool.open()
        # A release storm: every lease's last heartbeat and finish_run, gathered.
        self.final_beats = AsyncBatcher(self.pool, final_beats, "oh-final-beats")
        self.finish_runs = AsyncBatcher(self.pool, finish_runs, "oh-finish-runs")
        self._workers = [aspawn(self._beat_loop, "oh-heartbeat-hub"),
                         aspawn(self._watch, "oh-lease-watch-hub")]

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
        wait = float(self.connect_options.get("connect_timeout", 5)) + 5
        for worker in self._workers:
            await ajoin(worker, wait)
        await self.final_beats.close(wait)
        await self.finish_runs.close(wait)
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
            # Warm start: the backend's caches and the function's plans are built before any
            # lease depends on them, so a lease's first heartbeat costs what its hundredth does.
            await service_async.heartbeat_leases(conn, [])
        except BaseException:
            await conn.close()  # a standby, say: the next beat connects again
            raise
        return conn

    async def _beat_loop(self) -> None:
        # The first connection is a courtesy (the warm start): whatever it meets (no server
        # yet, a standby, a read-only primary) the loop starts, and the first due beat
        # connects again, as after any failure.
        try:
            self._beat_conn = await self._connect()
        except Exception as exc:
            logger.warning("[HEARTBEAT] heartbeat hub: first connection failed (%s: %s); the"
                           " first beat connects again", type(exc).__name__,
                           str(exc).strip()[:200])
        while not self._stop.is_set():
            await self._wake.wait_timeout(self.core.next_wake())
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                batch = self.core.take_due()
                if batch:
                    await self._beat(batch)
            except Exception:  # never the end of the beat loop: the leases depend on it
                logger.exception("[HEARTBEAT] heartbeat hub: unexpected error in the beat loop")
                await self._stop.wait_timeout(MAX_NAP)
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
        while not await self._stop.wait_timeout(WATCH_EVERY):
            work, beat = self.core.to_cut()
            for conn in work:
                cut_connection(conn)
            if beat and self._beat_conn is not None:
                cut_connection(self._beat_conn)


async def acquire_hub(
    dsn: str, connect_options: dict[str, Any], heartbeat_dsn: str | None = None
) -> AsyncLeaseHub:
    """The hub for these connections (started on first use); pair with release_hub. One per
    process for threads, one per event loop for asyncio. A hub another process started (a fork
    that bypassed ``os.fork``'s hooks) is never used."""
    table = loop_hubs()
    key = hub_key(dsn, connect_options, heartbeat_dsn)
    async with table.lock:  # held while a hub starts: a concurrent release cannot close it
        hub: AsyncLeaseHub | None = table.hubs.get(key)
        if hub is not None and hub.pid != os.getpid():
            inherited.append(hub)
            hub = None
        if hub is None:
            hub = AsyncLeaseHub(dsn, connect_options, heartbeat_dsn=heartbeat_dsn)
            await hub.start()
            table.hubs[key] = hub
        hub.users += 1
        return hub


async def release_hub(hub: AsyncLeaseHub) -> None:
    """Drops one use; the last user closes the hub (its connections and workers). A hub of
    another process (inherited at a fork) is never closed here: its sockets are the parent's."""
    if hub.pid != os.getpid():
        return
    table = loop_hubs()
    async with table.lock:
        hub.users -= 1
        if hub.users > 0:
            return
        key = hub_key(hub.dsn, hub.connect_options, hub.heartbeat_dsn)
        if table.hubs.get(key) is hub:
            del table.hubs[key]
    await hub.close()
