"""The console's live view: one background thread per console reads every run the console may
show and hands the snapshot to the pages' event streams (server-sent events).

Two modes, chosen by the database connection itself:

- ``listen``: a dedicated connection ``LISTEN``s on ``outbound_heartbeat``; every run transition
  (created, claimed, stopped, cancelled, ...) is pushed within milliseconds. Heartbeats send no
  NOTIFY (they stay a single cheap UPDATE), so while runs are open the thread also re-reads
  every ``poll_interval`` to refresh the heartbeat ages; with no open run it reads nothing
  until a NOTIFY arrives.
- ``poll``: no notification reaches us (``listen=False``, a standby, or PgBouncer in transaction
  mode, where a LISTEN belongs to a server connection the pooler hands to other clients): the
  thread re-reads every ``poll_interval``. The mode is found with a probe at start: a NOTIFY
  sent from another connection must come back on the listening one within ``probe_timeout``.

A running run that the snapshot shows stale is stopped by calling ``get_active_run`` for its
business on the primary, as the app's own web UI does (``stop_stale``), so a dead worker's run
shows ``stopped`` with its reason within ``stale_after`` plus one poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import psycopg

from .. import calls, service
from . import queries
from .queries import RunSummary

__all__ = [
    "CHANNEL",
    "Connections",
    "Monitor",
    "Snapshot",
]


logger = logging.getLogger("outbound_heartbeat.console")

CHANNEL = "outbound_heartbeat"

Connections = Callable[[], AbstractContextManager[psycopg.Connection[Any]]]


@dataclass(frozen=True)
class Snapshot:
    """Every run the console shows, as read at ``taken`` (time.monotonic()), and how it was read."""

    version: int
    runs: tuple[RunSummary, ...]
    mode: str
    taken: float
    error: str | None = None


@dataclass
class Monitor:
    """Reads the runs in the background and wakes the event streams when they change."""

    read: Connections
    write: Connections
    listen_dsn: str | None = None
    poll_interval: float = 1.0
    probe_timeout: float = 2.0
    stop_stale: bool = True
    ended_within: timedelta = timedelta(days=1)
    max_runs: int = 200
    _cond: threading.Condition = field(default_factory=threading.Condition, init=False)
    _snapshot: Snapshot = field(init=False)
    _thread: threading.Thread | None = field(default=None, init=False)
    _closed: bool = field(default=False, init=False)
    _woken: bool = field(default=False, init=False)
    #: Wakers of the event streams waiting on an event loop (wait_async), called on publish.
    _async_waiters: set[Callable[[], None]] = field(default_factory=set, init=False)

    def __post_init__(self) -> None:
        self._snapshot = Snapshot(0, (), "starting", time.monotonic())

    def forked(self) -> None:
        """In a forked child: the parent's thread did not survive the fork (and may have held
        the lock), the event loops waiting are the parent's; the next consumer starts a thread
        of the child's own, which goes on from the snapshot the parent had published."""
        self._cond = threading.Condition()
        self._thread = None
        self._woken = False
        self._async_waiters = set()

    # -- consumers ---------------------------------------------------------------------------

    def start(self) -> None:
        with self._cond:
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(
                    target=self._run, name="outbound-heartbeat-console", daemon=True
                )
                self._thread.start()

    def snapshot(self) -> Snapshot:
        with self._cond:
            return self._snapshot

    def wait(self, after_version: int, timeout: float) -> Snapshot:
        """The first snapshot newer than ``after_version``, or the current one after ``timeout``."""
        self.start()
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._snapshot.version <= after_version and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return self._snapshot

    async def wait_async(self, after_version: int, timeout: float) -> Snapshot:
        """:meth:`wait` on the running asyncio loop: no thread waits, the monitor's thread wakes
        the loop (``call_soon_threadsafe``) when it publishes."""
        self.start()
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()

        def waker() -> None:
            with contextlib.suppress(RuntimeError):  # that loop has closed meanwhile
                loop.call_soon_threadsafe(ready.set)

        with self._cond:
            if self._snapshot.version > after_version or self._closed:
                return self._snapshot
            self._async_waiters.add(waker)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ready.wait(), timeout)
        finally:
            with self._cond:
                self._async_waiters.discard(waker)
        return self.snapshot()

    @property
    def closed(self) -> bool:
        return self._closed

    def _wake_async(self) -> None:
        """With ``_cond`` held: wake every stream waiting on an event loop."""
        for waker in self._async_waiters:
            waker()

    def wake(self) -> None:
        """Re-read now (after an action this console performed)."""
        with self._cond:
            self._woken = True
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            self._wake_async()
        if self._thread is not None:
            self._thread.join(10)

    @property
    def mode(self) -> str:
        return self.snapshot().mode

    # -- the thread ------------------------------------------------------------------------

    def _publish(self, runs: tuple[RunSummary, ...], mode: str, error: str | None) -> None:
        with self._cond:
            self._snapshot = Snapshot(
                self._snapshot.version + 1, runs, mode, time.monotonic(), error
            )
            self._cond.notify_all()
            self._wake_async()

    def _read(self) -> tuple[RunSummary, ...]:
        call = queries.list_runs(None, self.ended_within, self.max_runs)
        with self.read() as conn:
            runs, _ = service.execute(conn, call)
        if self.stop_stale and any(r.stale for r in runs):
            # get_active_run stops the business's stale run in that very call.
            for business_id in sorted({r.business_id for r in runs if r.stale}):
                with self.write() as conn:
                    service.execute(conn, calls.get_active_run(business_id))
            with self.read() as conn:
                runs, _ = service.execute(conn, call)
        return tuple(runs)

    def _refresh(self, mode: str) -> bool:
        """Reads and publishes; True when some run is open (its heartbeat needs re-reading)."""
        try:
            runs = self._read()
        except (psycopg.Error, OSError) as exc:
            logger.warning("[CONSOLE] reading the runs failed: %s", exc)
            self._publish(self.snapshot().runs, mode, str(exc).strip().splitlines()[0])
            return True
        self._publish(runs, mode, None)
        return any(r.open for r in runs)

    def _sleep(self, seconds: float) -> None:
        with self._cond:
            if not self._woken and not self._closed:
                self._cond.wait(seconds)
            self._woken = False

    def _run(self) -> None:
        while not self._closed:
            listener = self._listener()
            if listener is None:
                self._poll_loop()
                return
            try:
                self._listen_loop(listener)
            except (psycopg.Error, OSError) as exc:
                logger.warning("[CONSOLE] LISTEN connection lost (%s); reconnecting", exc)
                time.sleep(self.poll_interval)
            finally:
                with contextlib.suppress(Exception):
                    listener.close()

    def _poll_loop(self) -> None:
        while not self._closed:
            self._refresh("poll")
            self._sleep(self.poll_interval)

    def _listen_loop(self, listener: psycopg.Connection[Any]) -> None:
        any_open = self._refresh("listen")
        while not self._closed:
            # With open runs, wake every poll_interval for their heartbeats; otherwise only a
            # NOTIFY (or close()/wake(), seen within a second) makes us read.
            timeout = self.poll_interval if any_open else 1.0
            got = list(listener.notifies(timeout=timeout, stop_after=1))
            with self._cond:
                woken, self._woken = self._woken, False
            if got or any_open or woken:
                any_open = self._refresh("listen")

    def _listener(self) -> psycopg.Connection[Any] | None:
        """A LISTENing connection that really receives notifications, or None (poll)."""
        if not self.listen_dsn:
            return None
        try:
            conn = psycopg.connect(
                self.listen_dsn, autocommit=True, prepare_threshold=None, connect_timeout=10
            )
        except psycopg.Error as exc:
            logger.warning("[CONSOLE] no LISTEN connection (%s): polling", exc)
            return None
        try:
            conn.execute("LISTEN outbound_heartbeat")
            token = secrets.token_hex(8)
            payload = json.dumps({"event": "console_probe", "token": token})
            with self.write() as other, other.transaction():
                other.execute("SELECT pg_catalog.pg_notify(%s, %s)", (CHANNEL, payload))
            deadline = time.monotonic() + self.probe_timeout
            while (left := deadline - time.monotonic()) > 0:
                for note in conn.notifies(timeout=left, stop_after=1):
                    if token in note.payload:
                        logger.info("[CONSOLE] live updates: LISTEN %s", CHANNEL)
                        return conn
        except psycopg.Error as exc:
            logger.warning("[CONSOLE] LISTEN failed (%s): polling", exc)
        logger.info("[CONSOLE] LISTEN delivers nothing here (a pooler?): polling")
        conn.close()
        return None
