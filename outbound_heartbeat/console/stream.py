"""The console's event stream (``/stream``): its framing, its limits and the stream itself, which
a threaded server iterates in a thread and an asyncio server (FastAPI) iterates on its event
loop, so that an open stream never holds a thread of the app's shared pool.

Framing: every frame is one fixed event name and one ``data:`` line holding a JSON value with
every non-ASCII and control character escaped, so no value from the database (a worker id with
a ``\\r`` or ``\\n``, ``event: x``) can cut a frame, rename its event or start another one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Executor

from .live import Monitor, Snapshot

__all__ = ["EVENTS", "EventStream", "StreamSlots", "frame"]

logger = logging.getLogger("outbound_heartbeat.console")

#: The only event names the stream sends (console.js listens to these).
EVENTS = frozenset({"mode", "runs"})

RETRY = b"retry: 1000\n\n"
KEEP_ALIVE = b": keep-alive\n\n"


def frame(event: str, data: object) -> bytes:
    """One server-sent event: a fixed name and ``data`` as one line of ASCII JSON (JSON escapes
    every control character, ``ensure_ascii`` every other non-ASCII one: no CR, no LF)."""
    if event not in EVENTS:
        raise ValueError(f"event must be one of {sorted(EVENTS)}, not {event!r}")
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=True)}\n\n".encode("ascii")


class StreamSlots:
    """How many event streams are open, in total and per viewer, against their limits."""

    def __init__(self, total: int, per_viewer: int) -> None:
        for name, value in (("max_streams", total), ("max_streams_per_viewer", per_viewer)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, not {value!r}")
        self.total = total
        self.per_viewer = per_viewer
        self._lock = threading.Lock()
        self._open: dict[str, int] = {}
        self._count = 0
        #: Bumped in a forked child: a stream the parent opened frees no slot of the child's.
        self._generation = 0

    def forked(self) -> None:
        """In a forked child: the parent's open streams are the parent's; the child counts
        its own."""
        self._lock = threading.Lock()
        self._open = {}
        self._count = 0
        self._generation += 1

    def take(self, key: str) -> Callable[[], None] | str:
        """A slot for viewer ``key``: its release (idempotent), or which limit refused it."""
        with self._lock:
            if self._open.get(key, 0) >= self.per_viewer:
                return "max_streams_per_viewer"
            if self._count >= self.total:
                return "max_streams"
            self._open[key] = self._open.get(key, 0) + 1
            self._count += 1
            generation = self._generation
        released = threading.Event()

        def release() -> None:
            with self._lock:
                if released.is_set() or generation != self._generation:
                    return
                released.set()
                self._count -= 1
                left = self._open[key] - 1
                if left:
                    self._open[key] = left
                else:
                    del self._open[key]

        return release

    def open(self, key: str | None = None) -> int:
        with self._lock:
            return self._count if key is None else self._open.get(key, 0)


class EventStream:
    """The frames of one viewer's ``/stream``: ``retry``, then after every new snapshot of the
    console's monitor a ``mode`` and a ``runs`` frame (a keep-alive comment every 15 s without
    one), until ``seconds`` have passed or the console closes.

    Iterate it (a threaded server: each ``next`` may wait up to 15 s) or ``async for`` over
    :meth:`aiter` (an asyncio server: waits on the event loop; a business viewer's rows are read
    in the console's own small thread pool). ``close()`` frees its slot; so does the end of
    either iteration, and, as a last resort, garbage collection."""

    def __init__(
        self,
        monitor: Monitor,
        rows: Callable[[Snapshot], str | None],
        reader: Callable[[], Executor],
        seconds: float,
        release: Callable[[], None],
    ) -> None:
        self._monitor = monitor
        self._rows = rows
        self._reader = reader
        self._end = time.monotonic() + seconds
        self._finalizer = weakref.finalize(self, release)
        self._frames: Iterator[bytes] | None = None

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        self._finalizer()

    # -- threaded servers ----------------------------------------------------------------------

    def __iter__(self) -> EventStream:
        return self

    def __next__(self) -> bytes:
        if self._frames is None:
            self._frames = self._sync_frames()
        try:
            return next(self._frames)
        except BaseException:
            self.close()
            raise

    def _sync_frames(self) -> Iterator[bytes]:
        yield RETRY
        version = 0  # the monitor's first read is version 1: wait for it
        while not self.closed and (left := self._end - time.monotonic()) > 0:
            snap = self._monitor.wait(version, min(15.0, left))
            if snap.version == version:
                if self._monitor.closed:
                    return
                yield KEEP_ALIVE
                continue
            version = snap.version
            rows = self._rows(snap)
            if rows is not None:
                yield frame("mode", snap.mode) + frame("runs", rows)

    # -- asyncio servers -----------------------------------------------------------------------

    async def aiter(self) -> AsyncIterator[bytes]:
        """The same frames, waiting on the running asyncio loop instead of a thread."""
        loop = asyncio.get_running_loop()
        try:
            yield RETRY
            version = 0
            while not self.closed and (left := self._end - time.monotonic()) > 0:
                snap = await self._monitor.wait_async(version, min(15.0, left))
                if snap.version == version:
                    if self._monitor.closed:
                        return
                    yield KEEP_ALIVE
                    continue
                version = snap.version
                rows = await loop.run_in_executor(self._reader(), self._rows, snap)
                if rows is not None:
                    yield frame("mode", snap.mode) + frame("runs", rows)
        finally:
            self.close()
