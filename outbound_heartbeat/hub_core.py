"""What the thread hub (:mod:`outbound_heartbeat.hub`) and the asyncio hub
(:mod:`outbound_heartbeat.hub_async`) share, free of I/O: their limits, the names of their
connections, :class:`HubCore` (who is due, what an answer or a failure does, when the watcher
cuts) and the tables of the hubs started, one per process for threads and one per event loop
for asyncio."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import psycopg

from . import errors, pooler
from .lease_state import LeaseState

__all__ = [
    "BEAT_FAILURES",
    "BURST_GAP",
    "BURST_LINGER",
    "CONNECTION_FAILURES",
    "DEFAULT_POOL_SIZE",
    "MAX_BATCH",
    "MAX_NAP",
    "PARALLEL_BATCHES",
    "PATIENCE_MEMORY",
    "WATCH_EVERY",
    "HubCore",
    "HubTable",
    "Member",
    "application_name",
    "hub_key",
    "inherited",
    "locked_apart",
    "loop_hubs",
    "process_hubs",
    "process_label",
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
#: A batch taken within BURST_GAP s of the previous one waits BURST_LINGER s more for the calls
#: still arriving (a release storm); measured with 1,000 threads leaving at once, p99 from
#: 0.64-0.82 s to 0.36-0.45 s (benchmarks/heartbeat_cost.py).
BURST_GAP = 0.01
BURST_LINGER = 0.005


def locked_apart(run_id: int, locked: bool, answer: Any) -> Any:
    """A batched call's answer for one lease; RunLocked (its caller retries) when its row
    stayed locked."""
    if not locked:
        return answer
    return errors.RunLocked(f"run {run_id} is locked by another transaction; nothing was"
                            " written, sent again after the lease's backoff")


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


L = TypeVar("L")


@dataclass(eq=False)
class HubTable(Generic[L]):
    """The hubs started (by :func:`~outbound_heartbeat.hub_core.hub_key`), and the lock that
    guards the table across a hub's start and close."""

    lock: L
    hubs: dict[Any, Any] = field(default_factory=dict)


_process_table: HubTable[threading.Lock] = HubTable(threading.Lock())
# One table per event loop: a hub's tasks and connections belong to its loop.
_loop_tables: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, HubTable[asyncio.Lock]] = (
    weakref.WeakKeyDictionary())
#: Hubs a forked child inherited from its parent. Their threads and tasks did not survive the
#: fork and their sockets are the parent's (closing one would end the parent's session; using
#: one would mix both processes' statements on it): the child keeps them referenced, never
#: touches them, and starts hubs of its own.
inherited: list[Any] = []


def process_hubs() -> HubTable[threading.Lock]:
    """The thread hubs of this process."""
    return _process_table


def loop_hubs() -> HubTable[asyncio.Lock]:
    """The asyncio hubs of the running event loop."""
    loop = asyncio.get_running_loop()
    table = _loop_tables.get(loop)
    if table is None:
        table = _loop_tables[loop] = HubTable(asyncio.Lock())
    return table


def _forget_hubs_after_fork() -> None:
    """In a forked child: the parent's hubs are left alone (see ``inherited``); the tables and
    their locks start afresh (another thread of the parent may have held a lock)."""
    global _process_table
    inherited.extend(_process_table.hubs.values())
    for table in _loop_tables.values():
        inherited.extend(table.hubs.values())
    _process_table = HubTable(threading.Lock())
    _loop_tables.clear()


os.register_at_fork(after_in_child=_forget_hubs_after_fork)
