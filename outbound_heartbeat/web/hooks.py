"""Release hooks: what the web endpoints run after a call that ended a run has committed
(give back call slots and other external resources). No web framework is imported here."""

from __future__ import annotations

import inspect
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field
from typing import Any

from ..records import Event

__all__ = ["RELEASE_EVENTS", "ReleaseHook", "ReleaseHooks", "release_hooks"]

logger = logging.getLogger("outbound_heartbeat.web")

#: The events after which a run's external resources (call slots, ...) must be given back.
RELEASE_EVENTS = frozenset({"stale_stopped", "force_cancelled", "cleaned_up", "finished"})

ReleaseHook = Callable[[int, int], Any]


@dataclass
class ReleaseHooks:
    """Callables ``hook(run_id, business_id)`` run after a run ended by a call has committed.

    They run outside the database transaction and off the request path: in a small pool of
    their own (``workers`` threads; async hooks as tasks), never the app's executor. The answer
    to the committed transition waits for them at most ``wait`` seconds, then goes on; a hook
    still running finishes in the background. A failing hook is logged ``[RELEASE_HOOK]`` and
    retried ``retries`` times with doubling delays from ``retry_delay``; it never undoes the
    transition (the run stays cancelled / stopped). Hooks may be plain or ``async`` functions.
    What no hook released (every retry failed, or the run ended by a path that runs no hook:
    a sweep, the CLI, psql, pg_cron) is for a periodic ``RedisSlots.release_ended``.
    """

    hooks: list[ReleaseHook] = field(default_factory=list)
    wait: float = 1.0
    workers: int = 4
    retries: int = 3
    retry_delay: float = 1.0
    _pool: ThreadPoolExecutor | None = field(default=None, init=False, repr=False)
    _pool_pid: int = field(default=0, init=False, repr=False)
    _tasks: set[Any] = field(default_factory=set, init=False, repr=False)

    def register(self, hook: ReleaseHook) -> ReleaseHook:
        """Adds a hook; usable as a decorator."""
        self.hooks.append(hook)
        return hook

    def _released(self, events: Iterable[Event]) -> list[Event]:
        return [e for e in events if e.event in RELEASE_EVENTS]

    def _executor(self) -> ThreadPoolExecutor:
        # A pool made before a fork has no threads in the child: the child makes its own.
        if self._pool is None or self._pool_pid != os.getpid():
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="oh-release-hook")
            self._pool_pid = os.getpid()
        return self._pool

    def _failed(self, hook: ReleaseHook, event: Event, attempt: int) -> float | None:
        """Logs a failure; the delay before the next attempt, or None when none is left."""
        retry = attempt < self.retries
        logger.exception(
            "[RELEASE_HOOK] %r failed for run %s (business %s) after %s (attempt %d of %d%s);"
            " the run stays %s",
            hook, event.run_id, event.business_id, event.event, attempt + 1, self.retries + 1,
            ", retried" if retry else "; RedisSlots.release_ended() frees what is left",
            event.detail.get("status"),
        )
        return self.retry_delay * 2**attempt if retry else None

    def _call(self, hook: ReleaseHook, event: Event, attempt: int = 0) -> None:
        try:
            outcome = hook(event.run_id, event.business_id)
            if inspect.isawaitable(outcome):
                _run_awaitable(outcome)
        except Exception:
            delay = self._failed(hook, event, attempt)
            if delay is not None:
                timer = threading.Timer(
                    delay, self._submit, args=(hook, event, attempt + 1))
                timer.daemon = True
                timer.start()

    def _submit(self, hook: ReleaseHook, event: Event, attempt: int) -> Future[None]:
        return self._executor().submit(self._call, hook, event, attempt)

    def _late(self, pending: int, events: list[Event]) -> None:
        if pending:
            logger.warning(
                "[RELEASE_HOOK] %d hook call(s) for run(s) %s still running after %g s: the"
                " answer goes on, they finish in the background",
                pending, sorted({e.run_id for e in events}), self.wait,
            )

    def run(self, events: Iterable[Event]) -> None:
        """Runs every hook for every run the events ended; returns within ``wait`` seconds."""
        ended = self._released(events)
        if not ended or not self.hooks:
            return
        futures = [self._submit(hook, event, 0) for event in ended for hook in self.hooks]
        _, pending = futures_wait(futures, timeout=self.wait)
        self._late(len(pending), ended)

    async def run_async(self, events: Iterable[Event]) -> None:
        """The same from an event loop: async hooks as tasks, sync ones in the hooks' pool."""
        import asyncio

        ended = self._released(events)
        if not ended or not self.hooks:
            return
        loop = asyncio.get_running_loop()
        tasks = []
        for event in ended:
            for hook in self.hooks:
                if inspect.iscoroutinefunction(hook):
                    task = asyncio.ensure_future(self._call_async(hook, event, 0))
                else:
                    task = asyncio.ensure_future(
                        asyncio.wrap_future(self._submit(hook, event, 0), loop=loop))
                self._tasks.add(task)  # a task nobody holds may be collected mid-flight
                task.add_done_callback(self._tasks.discard)
                tasks.append(task)
        _, pending = await asyncio.wait(tasks, timeout=self.wait)
        self._late(len(pending), ended)

    async def _call_async(self, hook: ReleaseHook, event: Event, attempt: int) -> None:
        import asyncio

        try:
            await hook(event.run_id, event.business_id)
        except Exception:
            delay = self._failed(hook, event, attempt)
            if delay is not None:
                await asyncio.sleep(delay)
                await self._call_async(hook, event, attempt + 1)


def _run_awaitable(awaitable: Awaitable[Any]) -> None:
    import asyncio

    async def wait() -> None:
        await awaitable

    asyncio.run(wait())


def release_hooks(hooks: ReleaseHooks | Iterable[ReleaseHook] | None) -> ReleaseHooks:
    if isinstance(hooks, ReleaseHooks):
        return hooks
    return ReleaseHooks(list(hooks or ()))
