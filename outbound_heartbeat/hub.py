"""One heartbeat connection and one small work pool for all the leases of a process.

A process holding many leases would otherwise open two connections per lease (1,000 leases:
2,000 backends). A hub, one per (dsn, connect options) for threads (:class:`LeaseHub`) and one
per event loop for asyncio (:class:`outbound_heartbeat.hub_async.AsyncLeaseHub`), owns:

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
:class:`HubCore` holds those rules, free of I/O, for both twins.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from . import errors, pooler, service
from .connections import cut_connection
from .lease_state import LeaseState

__all__ = [
    "DEFAULT_POOL_SIZE", "Batcher", "HubCore", "LeaseHub", "Member", "acquire_hub",
    "process_label", "release_hub", "send_beat",
]

logger = logging.getLogger("outbound_heartbeat.lease")

#: Work connections per hub: with the heartbeat connection, 4 backends for any number of leases.
DEFAULT_POOL_SIZE = 3
#: How often the watcher looks for suspended leases (the dedicated lease's watcher: 0.1 s).
WATCH_EVERY = 0.1
#: The longest the beat loop sleeps, so a newly registered lease waits at most this long.
MAX_NAP = 0.25
#: How many recent beat statements' durations set the watcher's patience (HubCore.patience).
PATIENCE_MEMORY = 8
#: Exceptions that make a beat statement a failed heartbeat (not a crash): a broken connection,
#: a held row, and a server that answers read-only (a standby not yet promoted, a primary set
#: read-only): each lease retries with its backoff and self-expires, as a dedicated lease does.
BEAT_FAILURES = (psycopg.OperationalError, psycopg.InterfaceError, errors.RunLocked,
                 errors.ReadOnlyServer)
#: Errors after which a pooled work connection is dropped, not reused: a broken one, or one
#: that reached a read-only server (a reconnection may reach the new primary).
CONNECTION_FAILURES = (psycopg.OperationalError, psycopg.InterfaceError, errors.ReadOnlyServer)
#: The most leases one batched statement carries, and how many such statements run at once
#: (on the pool's connections): a storm of 1,000 finish_runs becomes four statements, two by two.
MAX_BATCH = 250
PARALLEL_BATCHES = 2


def send_beat(
    conn: psycopg.Connection[Any], leases: list[tuple[int, str, int]], *, wait: bool = True
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
            return [(run_id, service.heartbeat(conn, run_id, worker_id, lease_epoch))]
        except errors.RunLocked:
            return [(run_id, "locked")]
    return service.heartbeat_leases(conn, leases)


def final_beats(conn: psycopg.Connection[Any], leases: list[tuple[int, str, int]]) -> list[Any]:
    """The last heartbeat of many leases leaving at once. A lease whose row stayed locked is
    answered RunLocked on its own, at once: its caller sends it again after its backoff (the
    release rules), and no other lease of the batch waits for that row."""
    return [locked_apart(lease[0], status == "locked", status)
            for lease, (_, status) in zip(
                leases, service.heartbeat_leases(conn, leases), strict=True)]


def finish_runs(conn: psycopg.Connection[Any],
                leases: list[tuple[int, str, int, str]]) -> list[Any]:
    """The finish_run of many leases leaving at once; a lease whose row stayed locked
    (outcome 'locked', nothing written for it) is answered RunLocked on its own, as above."""
    return [locked_apart(o.run_id, o.outcome == "locked", o)
            for o in service.finish_runs(conn, leases)]


def locked_apart(run_id: int, locked: bool, answer: Any) -> Any:
    """A batched call's answer for one lease; RunLocked (its caller retries) when its row
    stayed locked."""
    if not locked:
        return answer
    return errors.RunLocked(f"run {run_id} is locked by another transaction; nothing was"
                            " written, sent again after the lease's backoff")


class Batcher:
    """Sends the same call of many leases as one statement on the hub's pool: while batches
    run, the next gathers (no waiting window; a lone call goes at once). A connection error or
    a read-only server fails every call of its batch (each lease retries as it would alone);
    any other error sends that batch's calls one by one, so only the culprit's caller sees it."""

    def __init__(
        self, pool: ConnectionPool[Any],
        send: Callable[[psycopg.Connection[Any], list[Any]], list[Any]], name: str,
    ) -> None:
        self.pool = pool
        self.send = send
        self._pending: list[tuple[Any, concurrent.futures.Future[Any]]] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._slots = threading.Semaphore(PARALLEL_BATCHES)
        self._runner = concurrent.futures.ThreadPoolExecutor(PARALLEL_BATCHES, name)
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def call(self, arg: Any) -> Any:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._lock:
            self._pending.append((arg, future))
        self._wake.set()
        return future.result()

    def close(self, timeout: float) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout)
        self._runner.shutdown(wait=False)

    def _loop(self) -> None:
        while True:
            self._wake.wait()
            with self._lock:
                batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
                if not self._pending:
                    self._wake.clear()
            if not batch:
                if self._stop:
                    return
                continue
            self._slots.acquire()
            self._runner.submit(self._run_in_slot, batch)

    def _run_in_slot(self, batch: list[tuple[Any, concurrent.futures.Future[Any]]]) -> None:
        try:
            self._run(batch)
        finally:
            self._slots.release()

    def _run(self, batch: list[tuple[Any, concurrent.futures.Future[Any]]]) -> None:
        args = [arg for arg, _ in batch]
        try:
            with pooled(self.pool) as conn:
                results = self.send(conn, args)
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
                self._run([item])
            return
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():  # its caller was cancelled
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)


@contextlib.contextmanager
def pooled(pool: ConnectionPool[Any]) -> Iterator[psycopg.Connection[Any]]:
    """A work connection of the pool; after a connection failure or a read-only answer it is
    closed, so the pool drops it and the next call connects again (to the new primary)."""
    with pool.connection() as conn:
        try:
            yield conn
        except CONNECTION_FAILURES:
            conn.close()
            raise


@dataclass(eq=False)
class Member:
    """One lease registered with a hub; ``busy`` holds its work connections in flight."""

    state: LeaseState
    next_due: float
    busy: set[Any] = field(default_factory=set)


def process_label() -> str:
    """The name a hub's connections carry (``oh-heartbeat:``/``oh-work:`` + this): the process,
    ``pid-<pid>@<host>``. A hub serves every lease of its process, whatever their worker ids
    and for as long as leases come and go, so a name fixed when a connection opens can only be
    true for the connection's whole life if it names the process (a worker id would name one
    lease of many, and stay after that lease has left). The host tells apart processes of
    the same pid in different containers; a forked child's hub carries its own pid."""
    host = socket.gethostname() or "host"
    return f"pid-{os.getpid()}@{host}"


def application_name(role: str, label: str) -> str:
    """``oh-<role>:<label>``, cut to PostgreSQL's 63 bytes (NAMEDATALEN - 1)."""
    return f"oh-{role}:{label}".encode()[:63].decode(errors="ignore")


def hub_key(
    dsn: str, connect_options: dict[str, Any], heartbeat_dsn: str | None = None
) -> tuple[str, tuple[tuple[str, str], ...], str | None]:
    """Leases share a hub only when they would have opened identical connections."""
    return dsn, tuple(sorted((k, repr(v)) for k, v in connect_options.items())), heartbeat_dsn


class HubCore:
    """The hub's decisions, free of I/O: who is due, what an answer or a failure does."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.members: list[Member] = []
        self.in_flight: list[Member] = []
        self.in_flight_since = 0.0
        # How long the server took to answer recent beat statements, and how many statements
        # in a row were cut since the last answer: the watcher's patience grows with both.
        self.durations: deque[float] = deque(maxlen=PATIENCE_MEMORY)
        self.cuts = 0
        self._cut_since: float | None = None
        self._lock = threading.Lock()

    def add(self, state: LeaseState) -> Member:
        # The first beat one interval after the claim, as a dedicated lease's loop does.
        member = Member(state, self.clock() + state.interval)
        with self._lock:
            self.members.append(member)
        return member

    def remove(self, member: Member) -> None:
        with self._lock:
            if member in self.members:
                self.members.remove(member)

    def snapshot(self) -> list[Member]:
        with self._lock:
            return list(self.members)

    def next_wake(self) -> float:
        """Seconds until the earliest lease is due (at most MAX_NAP)."""
        members = self.snapshot()
        if not members:
            return MAX_NAP
        return max(0.0, min(MAX_NAP, min(m.next_due for m in members) - self.clock()))

    def take_due(self) -> list[Member]:
        """The leases to beat now: none unless one is due; then every lease due within half
        its interval (an early beat is harmless), minus those that must not beat (stalled,
        lost, completed: their next look is one interval later, as in a dedicated loop)."""
        now = self.clock()
        members = self.snapshot()
        if not any(m.next_due <= now for m in members):
            return []
        batch = []
        for m in members:
            if m.next_due > now + m.state.interval / 2:
                continue
            if not m.state.should_beat():
                m.next_due = now + m.state.interval
                continue
            batch.append(m)
        return batch

    def answered(self, batch: list[Member], answers: list[tuple[int, str]], sent_at: float) -> None:
        """Applies each lease's own answer; 'locked' (its row held past lock_timeout) is a
        failed heartbeat for that lease alone, as heartbeat()'s OH423 is."""
        self.durations.append(self.clock() - sent_at)
        self.cuts = 0
        for member, (_run_id, status) in zip(batch, answers, strict=True):
            state = member.state
            if status == "locked":
                delay = state.backoff()
                # While the lease releases, its own last calls hold the row: expected.
                logger.log(logging.DEBUG if state.releasing else logging.WARNING,
                           "[HEARTBEAT] run %s: heartbeat failed (run row locked); retrying"
                           " in %.1f s", state.claim.run_id, delay)
                member.next_due = self.clock() + delay
                continue
            state.record(status, sent_at, background=True)  # type: ignore[arg-type]
            member.next_due = sent_at + state.interval

    def failed(self, batch: list[Member], exc: BaseException) -> None:
        """A failed statement is a failed heartbeat for every lease it carried."""
        now = self.clock()
        delay = 0.0
        for member in batch:
            delay = member.state.backoff()
            member.next_due = now + delay
        # A statement the watcher cut failed because of the cut, not of the server: say so.
        cut = bool(self.in_flight) and self._cut_since == self.in_flight_since
        logger.warning("[HEARTBEAT] %d leases: heartbeat failed (%s); retrying in %.1f s",
                       len(batch),
                       "cut by the watcher: no answer in time" if cut
                       else pooler.describe_failure(exc), delay)

    def crashed(self, batch: list[Member]) -> None:
        for member in batch:
            member.state.mark_lost("heartbeat thread crashed")

    def sending(self, batch: list[Member]) -> None:
        self.in_flight_since = self.clock()
        self.in_flight = batch

    def patience(self, batch: list[Member]) -> float:
        """How long a beat statement carrying a suspended lease may stay out before the watcher
        calls its path dead: an interval, or twice the slowest recent answer if longer (a busy
        server is slow, not gone), doubled for every statement cut in a row since the last
        answer. Without the doubling a server that needs longer than an interval to answer would
        see every beat cut, and leases it could confirm would stay suspended until lost. Capped
        at the longest self-expiry of the batch: an answer later than that confirms nothing (a
        confirmation counts from when the statement was sent), however slow a recent one was."""
        interval = min(m.state.interval for m in batch)
        base = max([interval] + [2 * d for d in self.durations])
        cap = max([interval] + [m.state.expires_after for m in batch])
        return float(min(base * 2 ** min(self.cuts, 16), cap))

    def to_cut(self) -> tuple[list[Any], bool]:
        """The watcher's decision: the work connections of suspended leases, and whether the
        shared heartbeat statement in flight is stuck on a dead path: it carries a suspended
        lease and has been out for longer than :meth:`patience`. (A statement sent after the
        suspension is the one that may confirm the leases again: a big one on a busy server
        takes more than the watcher's 0.1 s, and cutting it would keep them suspended.)"""
        work = [conn for m in self.snapshot() if m.state.suspended for conn in list(m.busy)]
        batch = list(self.in_flight)
        since = self.in_flight_since
        if batch and self._cut_since == since:  # cut already: counted once, cut again
            return work, True
        beat = bool(batch) and (
            self.clock() - since > self.patience(batch)
            and any(m.state.suspended for m in batch))
        if beat:
            self._cut_since = since
            self.cuts += 1
            logger.warning("[HEARTBEAT] %d leases: the shared heartbeat statement has been out"
                           " for %.1f s with suspended leases; cutting its connection (cut %d"
                           " in a row)", len(batch), self.clock() - since, self.cuts)
        return work, beat



class LeaseHub:
    """The sync hub: a beat thread and a watcher thread, one heartbeat connection, one pool."""

    def __init__(self, dsn: str, connect_options: dict[str, Any],
                 pool_size: int = DEFAULT_POOL_SIZE, heartbeat_dsn: str | None = None) -> None:
        self.dsn = dsn
        # Heartbeats on a pool of their own (a PgBouncer entry, or PostgreSQL directly), so they
        # never queue behind the app's queries; None: the same DSN as the work connections.
        self.heartbeat_dsn = heartbeat_dsn
        self.connect_options = connect_options
        self.core = HubCore()
        self.users = 0
        #: The process that started the hub: its threads and sockets exist only there.
        self.pid = os.getpid()
        label = self.label = process_label()
        self._beat_conn: psycopg.Connection[Any] | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.pool: ConnectionPool[Any] = ConnectionPool(
            dsn,
            kwargs={**connect_options, "application_name": application_name("work", label)},
            min_size=1, max_size=pool_size,
            timeout=float(connect_options.get("connect_timeout", 5)) * 2,
            name=f"outbound-heartbeat-{label}", open=True,
        )
        # A release storm: every lease's last heartbeat and finish_run, gathered.
        self.final_beats = Batcher(self.pool, final_beats, "oh-final-beats")
        self.finish_runs = Batcher(self.pool, finish_runs, "oh-finish-runs")
        self._threads = [
            threading.Thread(target=self._beat_loop, name="oh-heartbeat-hub", daemon=True),
            threading.Thread(target=self._watch, name="oh-lease-watch-hub", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    # -- membership ---------------------------------------------------------------------------
    def register(self, state: LeaseState) -> Member:
        member = self.core.add(state)
        self._wake.set()
        return member

    def unregister(self, member: Member) -> None:
        self.core.remove(member)

    @contextlib.contextmanager
    def work_connection(self) -> Iterator[psycopg.Connection[Any]]:
        with pooled(self.pool) as conn:
            yield conn

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        wait = float(self.connect_options.get("connect_timeout", 5)) + 5
        for thread in self._threads:
            thread.join(timeout=wait)
        self.final_beats.close(wait)
        self.finish_runs.close(wait)
        self.pool.close()
        if self._beat_conn is not None:
            self._beat_conn.close()

    # -- the beat loop --------------------------------------------------------------------------
    def _connect(self) -> psycopg.Connection[Any]:
        conn = psycopg.connect(self.heartbeat_dsn or self.dsn,
                               application_name=application_name("heartbeat", self.label),
                               **self.connect_options)
        try:
            if self.heartbeat_dsn is None:  # sharing the work connections' pool behind a pooler?
                row = conn.execute(pooler.SERVER_PID).fetchone()
                pooler.warn_if_pooled(self.dsn, conn.info.backend_pid, row[0] if row else 0)
            # Warm start: the backend's caches and the function's plans are built before any
            # lease depends on them, so a lease's first heartbeat costs what its hundredth does.
            service.heartbeat_leases(conn, [])
        except BaseException:
            conn.close()  # a standby, say: the next beat connects again
            raise
        return conn

    def _beat_loop(self) -> None:
        # The first connection is a courtesy (the warm start): whatever it meets (no server
        # yet, a standby, a read-only primary) the loop starts, and the first due beat
        # connects again, as after any failure.
        try:
            self._beat_conn = self._connect()
        except Exception as exc:
            logger.warning("[HEARTBEAT] heartbeat hub: first connection failed (%s: %s); the"
                           " first beat connects again", type(exc).__name__,
                           str(exc).strip()[:200])
        while not self._stop.is_set():
            self._wake.wait(self.core.next_wake())
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                batch = self.core.take_due()
                if batch:
                    self._beat(batch)
            except Exception:  # never the end of the beat thread: the leases depend on it
                logger.exception("[HEARTBEAT] heartbeat hub: unexpected error in the beat loop")
                self._stop.wait(MAX_NAP)
        if self._beat_conn is not None:
            self._beat_conn.close()

    def _beat(self, batch: list[Member]) -> None:
        try:
            if self._beat_conn is None or self._beat_conn.closed:
                # Connecting (and warming) is bounded by connect_timeout and the keepalives,
                # not the watcher: only the beat statement itself counts as in flight.
                self._beat_conn = self._connect()
            sent_at = self.core.clock()
            self.core.sending(batch)
            answers = send_beat(
                self._beat_conn,
                [(m.state.claim.run_id, m.state.claim.worker_id, m.state.claim.lease_epoch)
                 for m in batch],
                wait=not any(m.state.releasing for m in batch))
        except BEAT_FAILURES as exc:
            self.core.failed(batch, exc)
            if self._beat_conn is not None:
                self._beat_conn.close()
                self._beat_conn = None
            return
        except Exception:
            logger.exception("[HEARTBEAT] heartbeat hub crashed on a beat")
            self.core.crashed(batch)
            return
        finally:
            self.core.in_flight = []
        self.core.answered(batch, answers, sent_at)

    def _watch(self) -> None:
        while not self._stop.wait(WATCH_EVERY):
            work, beat = self.core.to_cut()
            for conn in work:
                cut_connection(conn)
            if beat and self._beat_conn is not None:
                cut_connection(self._beat_conn)


_hubs: dict[Any, LeaseHub] = {}
_hubs_lock = threading.Lock()
#: Hubs a forked child inherited from its parent. Their threads did not survive the fork and
#: their sockets are the parent's (closing one would end the parent's session; using one would
#: mix both processes' statements on it): the child keeps them referenced, never touches them,
#: and starts hubs of its own.
_inherited: list[Any] = []


def _forget_hubs_after_fork() -> None:
    """In a forked child: the parent's hubs are left alone (see ``_inherited``); the table
    and its lock start afresh (another thread of the parent may have held the lock)."""
    global _hubs_lock
    _inherited.extend(_hubs.values())
    _hubs.clear()
    _hubs_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_hubs_after_fork)


def acquire_hub(dsn: str, connect_options: dict[str, Any],
                heartbeat_dsn: str | None = None) -> LeaseHub:
    """The process's hub for these connections (started on first use); pair with release_hub.
    A hub another process started (a fork that bypassed ``os.fork``'s hooks) is never used."""
    key = hub_key(dsn, connect_options, heartbeat_dsn)
    with _hubs_lock:
        hub = _hubs.get(key)
        if hub is not None and hub.pid != os.getpid():
            _inherited.append(hub)
            hub = None
        if hub is None:
            hub = _hubs[key] = LeaseHub(dsn, connect_options, heartbeat_dsn=heartbeat_dsn)
        hub.users += 1
        return hub


def release_hub(hub: LeaseHub) -> None:
    """Drops one use; the last user closes the hub (its connections and threads). A hub of
    another process (inherited at a fork) is never closed here: its sockets are the parent's."""
    if hub.pid != os.getpid():
        return
    with _hubs_lock:
        hub.users -= 1
        if hub.users > 0:
            return
        key = hub_key(hub.dsn, hub.connect_options, hub.heartbeat_dsn)
        if _hubs.get(key) is hub:
            del _hubs[key]
    hub.close()
