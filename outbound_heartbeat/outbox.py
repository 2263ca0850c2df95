"""Events of calls made inside the app's own open transaction, held until it ends.

A call the library runs in its own transaction has happened once it returns: its events are
logged and its release hooks run at once. A call made inside a transaction the app opened
(a savepoint in it) has happened only if the app commits: psycopg has no commit callback, so
its events wait here, per connection, with the id of the transaction they belong to. They are
settled (logged and handed to their callbacks if that transaction committed, dropped if it
rolled back) by whichever comes first:

- the library's own transaction block (``service.transaction(conn)``) ending;
- a SQLAlchemy ``Session``'s ``after_commit`` / ``after_rollback`` (contrib.sqlalchemy);
- ``service.settle(conn)``, or any later call on the connection once it is out of that
  transaction: the database answers ``pg_xact_status`` for the recorded transaction id, so a
  transaction the app committed or rolled back by any means is judged by the server itself.

A nested block that rolls back drops the events of the calls made in it at once (the server
only knows the top-level transaction). Settled late, by a call in another thread or task than
the one that made the call (a pooled connection that moved on to another request), the
callbacks still run and a WARNING says so; a connection dropped (or the process ending) with
events never settled logs a WARNING naming them and their transaction id: nothing is lost
silently. A forked child starts with no outbox: the parent's events stay the parent's.

No I/O here: the service modules ask the database and call :func:`Pending.settle`.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import calls
from .records import Event

__all__ = [
    "NOTIFY_QUERY", "XACT_STATUS_QUERY", "XID_QUERY", "Callback", "Outbox", "Pending",
    "deferred_notifies", "outbox_for", "report_late",
]

#: The open transaction's id (top level, also from inside a savepoint); NULL when it has not
#: written anything, which for a call that caused events cannot happen.
XID_QUERY = "SELECT pg_catalog.pg_current_xact_id_if_assigned()::text AS xid"

#: 'committed', 'aborted' or 'in progress' for each recorded transaction id.
XACT_STATUS_QUERY = (
    "SELECT x::text AS xid, pg_catalog.pg_xact_status(x) AS status"
    " FROM pg_catalog.unnest(%(xids)s::text[]::xid8[]) AS x"
)

#: Called with the events once their transaction has committed (plain or ``async``).
Callback = Callable[[list[Event]], Any]


@dataclass(eq=False)
class Pending:
    """The events of one call made inside the app's transaction ``xid``, not yet settled."""

    xid: int | None
    events: list[Event]
    callbacks: list[Callback] = field(default_factory=list)
    state: str = "pending"  # then 'committed' or 'rolled_back', once
    #: Order of the call on its connection (see :meth:`Outbox.mark`).
    seq: int = 0
    #: Made in a transaction marked by skip_notify(): the library sends its NOTIFYs once it
    #: learns of the commit (see :func:`deferred_notifies`).
    silent: bool = False
    #: The thread and asyncio task that made the call (its request).
    origin: tuple[int, object] = field(default_factory=lambda: _origin(), repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def on_commit(self, callback: Callback) -> None:
        """Adds a callback run after the commit (at once if that is known already)."""
        with self._lock:
            if self.state == "pending":
                self.callbacks.append(callback)
                return
            committed = self.state == "committed"
        if committed:
            callback(self.events)

    def settle(self, committed: bool) -> list[Callback]:
        """Marks the outcome once; returns the callbacks to run (none when rolled back or when
        someone settled it before). The events are logged here when committed."""
        with self._lock:
            if self.state != "pending":
                return []
            self.state = "committed" if committed else "rolled_back"
            callbacks, self.callbacks = self.callbacks, []
        if committed:
            calls.log_events(self.events)
            return callbacks
        calls.logger.info(
            "[EVENT] %d event(s) of transaction %s dropped: it rolled back (%s)",
            len(self.events), self.xid, _describe(self.events),
        )
        return []


#: The NOTIFYs a marked transaction did not send, sent once it is known to have committed.
NOTIFY_QUERY = (
    "SELECT pg_catalog.pg_notify('outbound_heartbeat', p)"
    " FROM pg_catalog.unnest(%(payloads)s::text[]) AS p"
)


def deferred_notifies(fired: Sequence[tuple[Pending, Sequence[Callback]]]) -> list[str]:
    """The NOTIFY payloads (as ``_notify_event`` writes them) of committed silent entries."""
    return [
        json.dumps({"event": e.event, "run_id": e.run_id, "business_id": e.business_id})
        for pending, _callbacks in fired if pending.silent
        for e in pending.events
    ]


def report_late(fired: Sequence[tuple[Pending, Sequence[Callback]]]) -> None:
    """Warns about committed events settled by a later call of another thread or task (the
    connection moved on to another request): their callbacks run, but not in their request."""
    here = _origin()
    for pending, _callbacks in fired:
        if pending.origin != here:
            calls.logger.warning(
                "[EVENT] transaction %s committed; its %d event(s) (%s) and after-commit"
                " callbacks run late, in a later call of another thread or task on the"
                " connection: call service.settle(conn) right after the commit, or use"
                " service.transaction(conn)",
                pending.xid, len(pending.events), _describe(pending.events),
            )


def _origin() -> tuple[int, object]:
    try:
        task: object = asyncio.current_task()
    except RuntimeError:  # no running event loop
        task = None
    return threading.get_ident(), task


def _describe(events: Sequence[Event]) -> str:
    return ", ".join(f"{e.event} run {e.run_id}" for e in events)


@dataclass
class Outbox:
    """The unsettled events of one connection."""

    entries: list[Pending] = field(default_factory=list)
    #: The transaction skip_notify() marked last on this connection (one is open at a time).
    silent_xid: int | None = None
    pid: int = field(default_factory=os.getpid)
    _seq: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, xid: int | None, events: list[Event]) -> Pending:
        with self._lock:
            silent = xid is not None and xid == self.silent_xid
            pending = Pending(xid, events, seq=self._seq, silent=silent)
            self._seq += 1
            self.entries.append(pending)
        calls.logger.debug(
            "[EVENT] %d event(s) wait for transaction %s to commit", len(events), xid
        )
        return pending

    def unsettled(self) -> list[Pending]:
        with self._lock:
            self.entries = [p for p in self.entries if p.state == "pending"]
            return list(self.entries)

    def __bool__(self) -> bool:
        return bool(self.unsettled())

    def mark(self) -> int:
        """A point in the connection's calls: :meth:`drop_since` drops those made after it."""
        with self._lock:
            return self._seq

    def drop_since(self, mark: int) -> None:
        """Drops the unsettled events of the calls made since ``mark``: the savepoint they were
        made in rolled back (the server, which judges top-level transactions, cannot tell)."""
        for pending in self.unsettled():
            if pending.seq >= mark:
                pending.settle(committed=False)

    def report_unsettled(self) -> None:
        """Logs the events nobody settled (their connection is gone, or the process ends)."""
        if self.pid != os.getpid():  # a forked child: these are the parent's
            return
        for pending in self.unsettled():
            calls.logger.warning(
                "[EVENT] %d event(s) (%s) of transaction %s were never settled: their"
                " connection was dropped before any library call or service.settle() asked"
                " how the transaction ended, so no after-commit callback ran; check"
                " pg_xact_status('%s') and release what they hold",
                len(pending.events), _describe(pending.events), pending.xid, pending.xid,
            )


def decide(
    entries: Sequence[Pending], statuses: dict[str, str | None]
) -> list[tuple[Pending, list[Callback]]]:
    """Settles the entries whose transaction has ended (``statuses`` from XACT_STATUS_QUERY);
    returns each committed entry with the callbacks to run. 'in progress' stays pending."""
    fired = []
    for pending in entries:
        status = statuses.get(str(pending.xid)) if pending.xid is not None else "aborted"
        if status == "in progress":
            continue
        if status is None:  # too old for the server to remember: never guess it committed
            calls.logger.warning(
                "[EVENT] outcome of transaction %s unknown; its events are dropped", pending.xid
            )
        callbacks = pending.settle(status == "committed")
        if pending.state == "committed":
            fired.append((pending, callbacks))
    return fired


_pid = os.getpid()
_guard = threading.Lock()
_boxes: weakref.WeakKeyDictionary[Any, Outbox] = weakref.WeakKeyDictionary()


def _after_fork_in_child() -> None:
    """The child starts with empty outboxes: the parent's events and hooks stay the parent's."""
    global _pid, _guard, _boxes
    _pid = os.getpid()
    _guard = threading.Lock()
    _boxes = weakref.WeakKeyDictionary()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def outbox_for(conn: Any) -> Outbox:
    """The outbox of a psycopg ``Connection`` or ``AsyncConnection``."""
    if _pid != os.getpid():  # a fork that bypassed the at-fork hooks
        _after_fork_in_child()
    with _guard:
        box = _boxes.get(conn)
        if box is None:
            box = _boxes[conn] = Outbox()
            weakref.finalize(conn, box.report_unsettled)
        return box
