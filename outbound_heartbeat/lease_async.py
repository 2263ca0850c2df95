"""The worker's lease (asyncio): claim a run, heartbeat it on a dedicated connection in the
background, fence every write, expire on its own clock, release with the right final status.

    async with AsyncLease(dsn, "dialer-1") as lease:  # the next pending run (or its own)
        while (job := await lease.next_job()) is not None:
            await dial(job)  # long work: call lease.touch() now and then
            await lease.finish_job(job)

``lost`` turns true when the database says so (``'lost'``, ``OH409``) or the background
heartbeat died. ``suspended`` turns true when the lease has gone ``stale_after - interval``
without a successful heartbeat on this process's monotonic clock (self-expiry): the worker must
stop dialing before anyone may declare it dead. ``next_job()`` and ``finish_job()`` then wait
for the database's next answer: after a network partition it is ``'lost'``; after a database
restart (whose grace period protects every lease) it is ``'ok'`` and the lease resumes. A lease
suspended for ``max_suspend`` seconds (default 5 x stale_after) is lost.
``next_job()`` sends a retry key with each call and reuses it when it must re-send the call
after a connection failure, so a lost answer never strands a job (the retry returns the job the
lost call took). A run completed under the lease by the empty-run rule (nothing left to dial)
ends the lease as success: ``completed`` turns true, ``next_job()`` returns None, no release.
A progress watchdog stops heartbeating when the dial loop has not called ``next_job()``
or ``touch()`` for ``stall_after`` seconds, so a hung loop goes stale instead of looking alive.
The twin is :class:`outbound_heartbeat.lease.Lease`; both share
:class:`outbound_heartbeat.lease_state.LeaseState` for every decision.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from types import TracebackType
from typing import Any

import psycopg

from . import calls, errors, pooler, service_async
from .compat import AWORKER_NAME, AEvent, AWorker, ajoin, asleep, aspawn
from .connections import CONNECT_OPTIONS, cut_connection
from .hub_core import CONNECTION_FAILURES, DEFAULT_POOL_SIZE
from .lease_state import (
    DEFAULT_INTERVAL,
    LeaseState,
    LeaseView,
    NothingToClaim,
    check_interval,
    default_worker_id,
)
from .records import Claim, HeartbeatStatus, Job, JobOutcome, ReclaimedRun, RunOutcome

__all__ = [
    "DEFAULT_INTERVAL",
    "AsyncLease",
    "NothingToClaim",
    "check_interval",
    "default_worker_id",
    "read_stale_after",
    "recover_on_startup",
]


logger = logging.getLogger("outbound_heartbeat.lease")


async def read_stale_after(conn: psycopg.AsyncConnection[Any]) -> timedelta:
    """The server's ``stale_after`` setting, which caps the heartbeat period."""
    cur = await conn.execute("SELECT stale_after FROM outbound_heartbeat.current_settings()")
    row = await cur.fetchone()
    assert row is not None
    value: timedelta = row[0]
    return value


class AsyncLease(LeaseView):
    """A claimed run with a background heartbeat; see the module docstring."""

    def __init__(
        self,
        dsn: str,
        worker_id: str | None = None,
        run_id: int | None = None,
        *,
        interval: float | None = None,
        stall_after: float = 120.0,
        max_suspend: float | None = None,
        connect_options: dict[str, Any] | None = None,
        share: bool = True,
        heartbeat_dsn: str | None = None,
    ) -> None:
        self.dsn = dsn
        # Where heartbeats connect: a pool of their own (a separate PgBouncer database entry, or
        # PostgreSQL directly), so they never wait behind the app's queries; None: dsn.
        self.heartbeat_dsn = heartbeat_dsn
        # share: the hub for this dsn and these options (one per process for threads, per event
        # loop for asyncio) beats this lease with all the others in one statement and lends it
        # a pooled work connection (docs/worker-lease.md); False: a heartbeat connection and a
        # work connection of its own, as before.
        self.share = share
        self._hub: Any = None  # hub_async.AsyncLeaseHub (imported late: only shared leases use it)
        self._member: Any = None
        # No name given: one unique to this process, so it can never meet another's run.
        self.worker_id = worker_id if worker_id is not None else default_worker_id()
        self.requested_run_id = run_id
        self.requested_interval = interval
        self.stall_after = stall_after
        self.max_suspend = max_suspend
        self.connect_options = {**CONNECT_OPTIONS, **(connect_options or {})}
        self.state: LeaseState | None = None
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._beat_conn: psycopg.AsyncConnection[Any] | None = None
        self._stop = AEvent()
        self._beater: AWorker | None = None
        self._watcher: AWorker | None = None
        # The connections with a call in flight, for the watcher to cut when suspended.
        self._busy: set[psycopg.AsyncConnection[Any]] = set()

    # -- lifecycle -------------------------------------------------------------------------
    async def _claim(
        self, conn: psycopg.AsyncConnection[Any], sent: list[bool] | None = None
    ) -> tuple[Claim, float]:
        interval = check_interval(self.requested_interval, await read_stale_after(conn))
        if sent is not None:
            sent.append(True)
        claim = await service_async.claim_run(conn, self.worker_id, self.requested_run_id)
        if claim is None:
            raise NothingToClaim(f"worker {self.worker_id}: no run to claim")
        return claim, interval

    async def _claim_on_hub(self) -> tuple[Claim, float]:
        """The claim on a pooled connection. One that died while idle (a restart, a failover,
        a terminated backend) or reaches a read-only server is dropped and the claim goes
        again on another, as a dedicated lease's fresh connection would, but only when
        nothing can have been written: the read before claim_run() failed, or the answer was
        ReadOnlyServer. (A claim whose answer was lost is not sent twice.)"""
        for attempt in range(DEFAULT_POOL_SIZE + 1):
            sent: list[bool] = []
            try:
                async with self._hub.work_connection() as conn:
                    return await self._claim(conn, sent)
            except CONNECTION_FAILURES as exc:
                if attempt == DEFAULT_POOL_SIZE or (sent and not isinstance(
                        exc, errors.ReadOnlyServer)):
                    raise
                logger.warning("[LEASE] worker %s: claim on a pooled connection failed before"
                               " writing (%s); trying another", self.worker_id,
                               type(exc).__name__)
        raise AssertionError("unreachable")

    async def __aenter__(self) -> AsyncLease:
        if self.share:
            from . import hub_async  # late: only shared leases use it

            self._hub = await hub_async.acquire_hub(
                self.dsn, self.connect_options, self.heartbeat_dsn)
            try:
                claim, interval = await self._claim_on_hub()
            except BaseException:
                await hub_async.release_hub(self._hub)
                self._hub = None
                raise
            self.state = LeaseState(claim, interval, self.stall_after, max_suspend=self.max_suspend)
            self._member = self._hub.register(self.state)
            self._busy = self._member.busy  # the hub's watcher cuts them once suspended
            return self
        self._conn = await self._connect("work")
        try:
            claim, interval = await self._claim(self._conn)
        except BaseException:
            await self._conn.close()
            raise
        self.state = LeaseState(claim, interval, self.stall_after, max_suspend=self.max_suspend)
        self._beater = aspawn(self._beat_loop, f"heartbeat-{claim.run_id}")
        self._watcher = aspawn(self._watch, f"lease-watch-{claim.run_id}")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        state = self._state
        if not state.in_owner():
            # A forked child leaving its parent's lease: the lease, its hub and its
            # connections are the parent's; nothing is sent, closed or released from here.
            logger.warning("[LEASE] run %s: a forked child (pid %s) left its parent's lease"
                           " (pid %s) untouched", self.run_id, os.getpid(), state.pid)
            return
        state.releasing = True  # heartbeats go on until the run is released
        try:
            if state.suspended:
                # No write without a confirmed lease: the run goes stale and is reclaimed.
                logger.warning("[LEASE_LOST] run %s: leaving while suspended, not released",
                               self.run_id)
            elif not state.lost and not state.completed:
                with contextlib.suppress(errors.LeaseLost):  # logged where it was decided
                    # One last heartbeat: a cancel request since the previous one decides.
                    status, sent_at = await self._final_heartbeat()
                    state.record(status, sent_at)
                    if not state.lost and not state.completed:
                        failed = exc_type is not None and not issubclass(exc_type, errors.LeaseLost)
                        await self.release(state.final_status(failed))
        finally:
            self._stop.set()
            if self._hub is not None:
                from . import hub_async

                self._hub.unregister(self._member)
                await hub_async.release_hub(self._hub)
                self._hub = None
            for worker in (self._beater, self._watcher):
                if worker is not None:
                    await ajoin(worker, self.connect_options["connect_timeout"] + 5)
            if self._conn is not None:
                await self._conn.close()

    async def _final_heartbeat(self) -> tuple[HeartbeatStatus, float]:
        lease = (self.run_id, self.worker_id, self.lease_epoch)
        if self._hub is not None:  # gathered with the other leases leaving now
            hub = self._hub
            return await self._leaving(lambda: self._retry(lambda: hub.final_beats.call(lease)))
        return await self._leaving(
            lambda: self._call(lambda conn: service_async.heartbeat(conn, *lease)))

    async def release(self, status: str) -> RunOutcome:
        """Ends the run with ``status``; the empty-run cleanup having completed it is success."""
        lease = (self.run_id, self.worker_id, self.lease_epoch, status)
        outcome: RunOutcome
        if self._hub is not None:  # gathered with the other leases leaving now
            hub = self._hub
            outcome = (await self._leaving(
                lambda: self._retry(lambda: hub.finish_runs.call(lease))))[0]
        else:
            outcome = (await self._leaving(
                lambda: self._call(lambda conn: service_async.finish_run(conn, *lease))))[0]
        if outcome.outcome == "lease_lost":
            self._state.mark_lost(f"run is {outcome.status} at release")
        return outcome

    async def _leaving(
        self, send: Callable[[], Awaitable[tuple[Any, float]]]
    ) -> tuple[Any, float]:
        """Sends a call of the release, again after ``RunLocked`` while the lease holds: the
        row is held by a transaction that ends (the hub's own beat statement, under load, or a
        short one of the app), and nothing was written. Once the lease is suspended, or the row
        has stayed locked for as long as a suspension takes (``stale_after - interval``: a lock
        heartbeats pass suspends nothing), the wait ends and ``RunLocked`` is raised: the run
        goes stale and is reclaimed."""
        state = self._state
        give_up_at: float | None = None
        while True:
            try:
                return await send()
            except errors.RunLocked:
                # A lock that heartbeats pass (FOR KEY SHARE: an open transaction that inserted
                # a row referencing the run) never suspends the lease: waited on no longer than
                # a suspension would be, then the run goes stale as well.
                now = state.clock()
                give_up_at = now + state.expires_after if give_up_at is None else give_up_at
                if state.suspended or state.lost or now >= give_up_at:
                    raise
                delay = state.backoff()
                logger.warning("[HEARTBEAT] run %s: run row locked at release; retrying in"
                               " %.1f s", self.run_id, delay)
                await asleep(delay)

    # -- the dial loop's API -----------------------------------------------------------------
    async def _wait_until_writable(self) -> None:
        """Waits while the lease is suspended; LeaseLost once it is lost."""
        state = self._state
        while not state.may_write():
            state.touch()  # waiting for the database is not a stalled dial loop
            await asleep(0.05)

    async def _call(
        self, fn: Callable[[psycopg.AsyncConnection[Any]], Awaitable[Any]]
    ) -> tuple[Any, float]:
        """Runs a dial-loop call on the work connection, reconnecting it after a failure (a
        database restart) for as long as the lease is not lost. Returns the result and when
        the successful attempt was sent."""

        async def attempt() -> Any:
            async with self._work_connection() as conn:
                self._busy.add(conn)
                try:
                    return await fn(conn)
                finally:
                    self._busy.discard(conn)

        return await self._retry(attempt)

    async def _retry(self, attempt: Callable[[], Awaitable[Any]]) -> tuple[Any, float]:
        """Runs ``attempt`` again after a connection failure while the lease holds."""
        state = self._state
        while True:
            await self._wait_until_writable()
            sent_at = state.clock()
            try:
                return await attempt(), sent_at
            except (psycopg.OperationalError, psycopg.InterfaceError, errors.ReadOnlyServer) as exc:
                logger.warning("[HEARTBEAT] run %s: work connection failed (%s), reconnecting",
                               self.run_id, pooler.describe_failure(exc))
                if self._conn is not None:
                    await self._conn.close()
                self._conn = None
                await asleep(state.backoff())

    async def next_job(self) -> Job | None:
        """The next job (now in progress), or None when done or a cancel was requested."""
        state = self._state
        state.check()
        state.touch()
        if state.cancel_requested or state.completed:
            return None
        # One key for every attempt of this call: a re-sent call whose first answer was lost
        # gets the job the first attempt took.
        call = calls.next_job(self.run_id, self.worker_id, self.lease_epoch, uuid.uuid4().hex)

        async def take(conn: psycopg.AsyncConnection[Any]) -> Job | None:
            return (await service_async.execute(conn, call))[0]

        job: Job | None
        try:
            job, sent_at = await self._call(take)
        except errors.LeaseLost as exc:
            state.mark_lost(exc.message)
            raise
        state.record("ok", sent_at)  # next_job is a heartbeat too
        return job

    async def finish_job(
        self, job: Job | int, status: str = "completed", error: str | None = None
    ) -> JobOutcome:
        """Records a job's result; raises LeaseLost (nothing written) when the lease is gone."""
        state = self._state
        state.check()
        state.touch()
        job_id = job.id if isinstance(job, Job) else job
        # The attempt's key, when the Job carries one: a late finish of an attempt since
        # requeued and handed out again is then superseded, never the newer attempt's.
        call_key = job.call_key if isinstance(job, Job) else None
        outcome: JobOutcome = (await self._call(
            lambda conn: service_async.finish_job(
                conn, job_id, self.worker_id, self.lease_epoch, status, error, call_key
            )
        ))[0]
        if outcome.outcome == "lease_lost":
            state.mark_lost(f"finish_job({job_id}) refused")
            raise errors.LeaseLost(f"lease on run {self.run_id} is lost; job {job_id} unchanged")
        return outcome

    @contextlib.asynccontextmanager
    async def _work_connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A pooled connection of the hub (a broken one is dropped by the pool), or the
        lease's own, opened again after a failure."""
        if self._hub is not None:
            async with self._hub.work_connection() as conn:
                yield conn
            return
        if self._conn is None or self._conn.closed:
            self._conn = await self._connect("work")
        yield self._conn

    # -- background heartbeat ---------------------------------------------------------------
    async def _connect(self, role: str) -> psycopg.AsyncConnection[Any]:
        beat = role == "heartbeat"
        conn = await psycopg.AsyncConnection.connect(
            (self.heartbeat_dsn if beat else None) or self.dsn,
            application_name=f"oh-{role}:{self.worker_id}", **self.connect_options
        )
        if beat and self.heartbeat_dsn is None:  # the work connections' pool, behind a pooler?
            row = await (await conn.execute(pooler.SERVER_PID)).fetchone()
            pooler.warn_if_pooled(self.dsn, conn.info.backend_pid, row[0] if row else 0)
        return conn

    async def _watch(self) -> None:
        """Once the lease is suspended, cuts calls still waiting on the network: the dial
        loop must stop now, not whenever a dead path answers."""
        state = self._state
        while not await self._stop.wait_timeout(0.1):
            if state.suspended:
                for conn in list(self._busy):
                    cut_connection(conn)

    async def _beat_loop(self) -> None:
        state = self._state
        delay = state.interval
        try:
            while not await self._stop.wait_timeout(delay):
                delay = state.interval
                if not state.should_beat():
                    if state.lost:
                        return
                    continue
                delay = await self._beat_once(state)
        except Exception:
            logger.exception("[HEARTBEAT] heartbeat %s crashed", AWORKER_NAME)
            state.mark_lost(f"heartbeat {AWORKER_NAME} crashed")
        finally:
            if self._beat_conn is not None:
                await self._beat_conn.close()

    async def _beat_once(self, state: LeaseState) -> float:
        """One heartbeat; returns the wait before the next (shorter after a failure)."""
        sent_at = state.clock()
        try:
            if self._beat_conn is None or self._beat_conn.closed:
                self._beat_conn = await self._connect("heartbeat")
            self._busy.add(self._beat_conn)
            try:
                status = await service_async.heartbeat(
                    self._beat_conn, self.run_id, self.worker_id, self.lease_epoch
                )
            finally:
                self._busy.discard(self._beat_conn)
        except (psycopg.OperationalError, psycopg.InterfaceError, errors.RunLocked,
                errors.ReadOnlyServer) as exc:
            delay = state.backoff()
            logger.warning(
                "[HEARTBEAT] run %s: heartbeat failed (%s); retrying in %.1f s",
                self.run_id,
                pooler.describe_failure(exc),
                delay,
            )
            if self._beat_conn is not None:
                await self._beat_conn.close()
                self._beat_conn = None
            return delay
        state.record(status, sent_at, background=True)
        return state.interval


async def recover_on_startup(
    conn: service_async.Connectable, worker_id: str
) -> list[ReclaimedRun]:
    """Start-up helper: stops the runs this worker id still holds from before a crash
    (``cleanup_stuck_runs(on_startup => true, worker_id => ...)``), plus any stuck run.

    Use it instead of crash resume when a restarted worker should not continue its old run.
    """
    return await service_async.cleanup_stuck_runs(conn, on_startup=True, worker_id=worker_id)
