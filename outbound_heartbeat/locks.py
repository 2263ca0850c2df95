"""One lock per psycopg connection that every call of the library on it takes.

psycopg serializes single statements on a connection (its own ``conn.lock``, taken inside
``execute``), but an API call is more than one statement's worth of state: whether to open a
transaction, the notice handler that gathers the call's events, the statement, the commit and
the events handed back. Two threads (or tasks) sharing one connection must not interleave
those, so the library holds this lock around all of it. The lock is reentrant, so an app may
hold it around its own transaction (:func:`outbound_heartbeat.service.transaction`) and make
API calls inside; psycopg's own lock cannot be used for this, as ``execute`` takes it itself.

The locks are kept in weak dictionaries keyed by the connection object: a closed and dropped
connection takes its lock with it.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from typing import Any

import psycopg

__all__ = ["AsyncConnectionLock", "async_lock_for", "lock_for"]

_guard = threading.Lock()
_sync: weakref.WeakKeyDictionary[psycopg.Connection[Any], threading.RLock] = (
    weakref.WeakKeyDictionary()
)
_async: weakref.WeakKeyDictionary[psycopg.AsyncConnection[Any], AsyncConnectionLock] = (
    weakref.WeakKeyDictionary()
)


class AsyncConnectionLock:
    """A task-reentrant asyncio lock: the task that holds it may take it again."""

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._owner: asyncio.Task[Any] | None = None
        self._depth = 0

    async def __aenter__(self) -> None:
        me = asyncio.current_task()
        if me is not None and self._owner is me:
            self._depth += 1
            return
        await self._lock.acquire()
        self._owner = me
        self._depth = 1

    async def __aexit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._owner = None
            self._lock.release()


def lock_for(conn: psycopg.Connection[Any]) -> threading.RLock:
    """The lock every library call on ``conn`` holds from decision to event hand-off."""
    with _guard:
        lock = _sync.get(conn)
        if lock is None:
            lock = _sync[conn] = threading.RLock()
        return lock


def async_lock_for(conn: psycopg.AsyncConnection[Any]) -> AsyncConnectionLock:
    """The asyncio twin of :func:`lock_for`."""
    with _guard:
        lock = _async.get(conn)
        if lock is None:
            lock = _async[conn] = AsyncConnectionLock()
        return lock
