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

No I/O here: the service modules ask the database and call :func:`Pending.settle`.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import calls
from .records import Event

__all__ = ["XACT_STATUS_QUERY", "XID_QUERY", "Callback", "Outbox", "Pending", "outbox_for"]

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
            len(self.events), self.xid, ", ".join(f"{e.event} run {e.run_id}" for e in self.events),
        )
        return []


@dataclass
class Outbox:
    """The unsettled events of one connection."""

    entries: list[Pending] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, xid: int | None, events: list[Event]) -> Pending:
        pending = Pending(xid, events)
        with self._lock:
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


_guard = threading.Lock()
_boxes: weakref.WeakKeyDictionary[Any, Outbox] = weakref.WeakKeyDictionary()


def outbox_for(conn: Any) -> Outbox:
    """The outbox of a psycopg ``Connection`` or ``AsyncConnection``."""
    with _guard:
        box = _boxes.get(conn)
        if box is None:
            box = _boxes[conn] = Outbox()
        return box
