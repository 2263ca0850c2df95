"""One lock per psycopg connection that every call of the library on it takes.

psycopg serializes single statements on a connection (its own ``conn.lock``, taken inside
``execute``), but an API call is more than one statement's worth of state: whether to open a
transaction, the notice handler that gathers the call's events, the statement, the commit and
the events handed back. Two threads (or tasks) sharing one connection must not interleave
those, so the library holds this lock around all of it. The lock is reentrant, so an app may
hold it around its own transaction (:func:`outbound_heartbeat.service.transaction`) and make
API calls inside; psycopg's own lock cannot be used for this, as ``execute`` takes it itself.

Fan-out inside a transaction block: while ``service.transaction(conn)`` is open its thread (or
task) holds the connection's lock, and another thread's call waits for the block to end. That
is right for another request sharing the connection, and a deadlock for work the block itself
started and waits for. So each open block has an inner lock, and a call is admitted into the
block (it runs in the block's transaction, serialized with the block's own calls by that inner
lock) when it is the block's own thread or task, when it runs in a context copied inside the
block (every asyncio task created in it; a thread started through
``contextvars.copy_context().run`` or ``asyncio.to_thread``), or, for a plain thread, when the
block's thread is waiting for exactly that thread (``Thread.join``) or for the
``concurrent.futures`` future it is running (``Future.result``, ``wait``, ``as_completed``,
``Executor.map``). Any other call waits for the block to end, as before. A nested block is a
savepoint with its own inner lock, the same way.

The locks are kept in weak dictionaries keyed by the connection object: a closed and dropped
connection takes its lock with it. A forked child starts with none of them
(``os.register_at_fork`` and a pid check): a lock another thread of the parent held at the fork
would never be released in the child.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import sys
import threading
import weakref
from collections.abc import AsyncIterator, Iterator
from typing import Any

import psycopg

__all__ = ["AsyncConnectionLock", "async_lock_for", "lock_for"]

#: How often a call waiting for a connection held by an open block looks again whether it has
#: become part of it (the block's thread now waits for this one).
_SLICE = 0.05

#: The blocks the current context was created inside (tasks and copied contexts inherit it).
_INSIDE: contextvars.ContextVar[tuple[object, ...]] = contextvars.ContextVar(
    "outbound_heartbeat_blocks", default=()
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


# -- sync ----------------------------------------------------------------------------------------


class Block:
    """One open ``service.transaction`` block of a connection (sync)."""

    def __init__(self) -> None:
        self.owner = threading.get_ident()
        self.inner = threading.RLock()
        self.open = True

    def close(self) -> None:
        """Waits for the calls admitted into the block to finish; later ones wait outside."""
        with self.inner:
            self.open = False


def _my_futures() -> list[object]:
    """The concurrent.futures futures the current thread is running the work of."""
    found = []
    frame = sys._getframe()
    while frame is not None:
        if frame.f_code.co_name == "run" and "concurrent" in frame.f_code.co_filename:
            item = frame.f_locals.get("self")
            future = getattr(item, "future", None)
            if future is not None:
                found.append(future)
        frame = frame.f_back  # type: ignore[assignment]
    return found


def _waits_for_me(owner: int) -> bool:
    """True when thread ``owner`` is blocked waiting for the current thread or its future."""
    frame = sys._current_frames().get(owner)
    me = threading.current_thread()
    futures: list[object] | None = None
    while frame is not None:
        name = frame.f_code.co_name
        if name in ("join", "_wait_for_tstate_lock") and frame.f_code.co_filename.endswith(
            "threading.py"
        ):
            if frame.f_locals.get("self") is me:
                return True
        elif name in _FUTURE_WAITS and "concurrent" in frame.f_code.co_filename:
            if futures is None:
                futures = _my_futures()
            waited = frame.f_locals.get(_FUTURE_WAITS[name])
            if waited is not None and any(
                waited is f or (name != "result" and f in waited) for f in futures
            ):
                return True
        frame = frame.f_back
    return False


#: The concurrent.futures functions a thread waits for futures in, and the local naming them.
_FUTURE_WAITS = {"result": "self", "wait": "fs", "as_completed": "fs"}


class ConnectionLock:
    """The lock of one ``Connection``: ``with lock:`` around a call, :meth:`block` around the
    app's transaction block."""

    def __init__(self) -> None:
        self.outer = threading.RLock()
        self.blocks: list[Block] = []
        self._mutex = threading.Lock()
        self._held = threading.local()

    def _admitting(self, look_at_frames: bool) -> Block | None:
        """The innermost open block the current thread's call belongs to, if any."""
        me, inside = threading.get_ident(), _INSIDE.get()
        with self._mutex:
            blocks = [b for b in self.blocks if b.open]
        for block in reversed(blocks):
            if block.owner == me or block in inside:
                return block
            if look_at_frames and _waits_for_me(block.owner):
                return block
        return None

    def acquire(self) -> threading.RLock:
        """Takes the lock this thread's call must hold now (see the module's docstring)."""
        first = True
        while True:
            block = self._admitting(look_at_frames=not first)
            lock = block.inner if block is not None else self.outer
            if block is None and not self.blocks:
                lock.acquire()
                return lock
            if lock.acquire(timeout=_SLICE):
                if block is None or block.open:
                    return lock
                lock.release()  # the block ended while we waited: wait outside it
            first = False

    def __enter__(self) -> None:
        stack = getattr(self._held, "stack", None)
        if stack is None:
            stack = self._held.stack = []
        stack.append(self.acquire())

    def __exit__(self, *exc: object) -> None:
        self._held.stack.pop().release()

    @contextlib.contextmanager
    def block(self) -> Iterator[Block]:
        """Holds the lock for a transaction block and opens it to the work it fans out.
        The caller closes the block (:meth:`Block.close`) before it commits or rolls back."""
        with self:
            block = Block()
            with self._mutex:
                self.blocks.append(block)
            token = _INSIDE.set((*_INSIDE.get(), block))
            try:
                yield block
            finally:
                block.close()
                _INSIDE.reset(token)
                with self._mutex:
                    self.blocks.remove(block)


# -- asyncio -------------------------------------------------------------------------------------


class AsyncBlock:
    """One open ``service_async.transaction`` block of a connection."""

    def __init__(self) -> None:
        self.owner = asyncio.current_task()
        self.inner = AsyncConnectionLock()
        self.open = True

    async def close(self) -> None:
        """Waits for the calls admitted into the block to finish; later ones wait outside."""
        async with self.inner:
            self.open = False


class AsyncConnectionLocks:
    """The lock of one ``AsyncConnection`` (the twin of :class:`ConnectionLock`): a task created
    inside a block (``asyncio.gather``, ``create_task``) is admitted into it."""

    def __init__(self) -> None:
        self.outer = AsyncConnectionLock()
        self.blocks: list[AsyncBlock] = []
        self._held: dict[asyncio.Task[Any] | None, list[AsyncConnectionLock]] = {}

    def _admitting(self) -> AsyncBlock | None:
        me, inside = asyncio.current_task(), _INSIDE.get()
        for block in reversed(self.blocks):
            if block.open and (block.owner is me or block in inside):
                return block
        return None

    async def acquire(self) -> AsyncConnectionLock:
        while True:
            block = self._admitting()
            lock = block.inner if block is not None else self.outer
            await lock.__aenter__()
            if block is None or block.open:
                return lock
            await lock.__aexit__()

    async def __aenter__(self) -> None:
        lock = await self.acquire()
        self._held.setdefault(asyncio.current_task(), []).append(lock)

    async def __aexit__(self, *exc: object) -> None:
        me = asyncio.current_task()
        stack = self._held[me]
        lock = stack.pop()
        if not stack:
            del self._held[me]
        await lock.__aexit__()

    @contextlib.asynccontextmanager
    async def block(self) -> AsyncIterator[AsyncBlock]:
        async with self:
            block = AsyncBlock()
            self.blocks.append(block)
            token = _INSIDE.set((*_INSIDE.get(), block))
            try:
                yield block
            finally:
                await block.close()
                _INSIDE.reset(token)
                self.blocks.remove(block)


# -- the registry, fresh in a forked child ------------------------------------------------------

_pid = os.getpid()
_guard = threading.Lock()
_sync: weakref.WeakKeyDictionary[psycopg.Connection[Any], ConnectionLock] = (
    weakref.WeakKeyDictionary()
)
_async: weakref.WeakKeyDictionary[psycopg.AsyncConnection[Any], AsyncConnectionLocks] = (
    weakref.WeakKeyDictionary()
)


def _after_fork_in_child() -> None:
    """The child forgets the parent's locks (threads that held them do not exist here)."""
    global _pid, _guard, _sync, _async
    _pid = os.getpid()
    _guard = threading.Lock()
    _sync = weakref.WeakKeyDictionary()
    _async = weakref.WeakKeyDictionary()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _check_pid() -> None:
    if _pid != os.getpid():  # a fork that bypassed the at-fork hooks
        _after_fork_in_child()


def lock_for(conn: psycopg.Connection[Any]) -> ConnectionLock:
    """The lock every library call on ``conn`` holds from decision to event hand-off."""
    _check_pid()
    with _guard:
        lock = _sync.get(conn)
        if lock is None:
            lock = _sync[conn] = ConnectionLock()
        return lock


def async_lock_for(conn: psycopg.AsyncConnection[Any]) -> AsyncConnectionLocks:
    """The asyncio twin of :func:`lock_for`."""
    _check_pid()
    with _guard:
        lock = _async.get(conn)
        if lock is None:
            lock = _async[conn] = AsyncConnectionLocks()
        return lock
