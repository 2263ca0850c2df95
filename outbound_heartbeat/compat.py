"""What differs between the thread twins and the asyncio twins, the two spellings side by side.

``service``, ``hub`` and ``lease`` are written from ``service_async``, ``hub_async`` and
``lease_async`` by ``python -m tools.async_to_sync``, which drops ``async``/``await`` and renames
each async name here to the sync name next to it (``AEvent`` to ``Event``, ``aspawn`` to
``spawn``...). So the async modules use only the ``A``/``a`` names of this module, and both
columns must offer the same calls.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeAlias, TypeVar

__all__ = [
    "AWORKER_NAME",
    "WORKER_NAME",
    "AEvent",
    "AFuture",
    "ALock",
    "ARunner",
    "ASemaphore",
    "AWorker",
    "Event",
    "Future",
    "Lock",
    "Runner",
    "Semaphore",
    "Worker",
    "acall_hook",
    "ahook_problem",
    "ajoin",
    "arun_callback",
    "asleep",
    "aspawn",
    "await_result",
    "call_hook",
    "hook_problem",
    "join",
    "run_callback",
    "sleep",
    "spawn",
    "wait_result",
]

T = TypeVar("T")

#: What a background heartbeat runs as, in log messages.
WORKER_NAME = "thread"
AWORKER_NAME = "task"

Worker: TypeAlias = threading.Thread
AWorker: TypeAlias = "asyncio.Task[None]"

Lock = threading.Lock
ALock = asyncio.Lock
Semaphore = threading.Semaphore
ASemaphore = asyncio.Semaphore
Future = concurrent.futures.Future
AFuture = asyncio.Future

sleep = time.sleep
asleep = asyncio.sleep


class Event(threading.Event):
    def wait_timeout(self, timeout: float) -> bool:
        """Waits until the event is set, at most ``timeout`` seconds; True when it is set."""
        return self.wait(timeout)


class AEvent(asyncio.Event):
    async def wait_timeout(self, timeout: float) -> bool:
        """Waits until the event is set, at most ``timeout`` seconds; True when it is set."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.wait(), timeout)
        return self.is_set()


def spawn(target: Callable[[], object], name: str) -> threading.Thread:
    """Runs ``target`` in a daemon thread: a worker never keeps the process alive."""
    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    return thread


def aspawn(target: Callable[[], Coroutine[Any, Any, None]], name: str) -> asyncio.Task[None]:
    """Runs ``target`` in a task of the running loop."""
    return asyncio.create_task(target(), name=name)


def join(worker: threading.Thread, timeout: float) -> None:
    """Waits at most ``timeout`` seconds for the worker to end."""
    worker.join(timeout)


async def ajoin(worker: asyncio.Task[None], timeout: float) -> None:
    """Waits at most ``timeout`` seconds for the worker to end; a task still running then is
    cancelled (a thread cannot be)."""
    with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
        await asyncio.wait_for(worker, timeout)


def wait_result(future: concurrent.futures.Future[T]) -> T:
    """The future's result (or its exception, raised), once it has one."""
    return future.result()


async def await_result(future: asyncio.Future[T]) -> T:
    """The future's result (or its exception, raised), once it has one; cancelling the waiting
    task cancels the future."""
    return await future


def run_callback(callback: Callable[[T], object], arg: T) -> None:
    """``callback(arg)``."""
    callback(arg)


async def arun_callback(callback: Callable[[T], object], arg: T) -> None:
    """``callback(arg)``, awaited when it returns an awaitable (a coroutine function)."""
    outcome = callback(arg)
    if inspect.isawaitable(outcome):
        await outcome


def call_hook(hook: Callable[[T], object], arg: T) -> object:
    """``hook(arg)``; TypeError when it returns an awaitable (an async hook: the sync twin
    cannot await it, so the coroutine is closed unrun)."""
    outcome = hook(arg)
    if inspect.isawaitable(outcome):
        if inspect.iscoroutine(outcome):
            outcome.close()
        raise TypeError("the hook returned an awaitable: an async hook needs service_async")
    return outcome


async def acall_hook(hook: Callable[[T], object], arg: T) -> object:
    """``hook(arg)``, awaited when it returns an awaitable (a coroutine function)."""
    outcome = hook(arg)
    if inspect.isawaitable(outcome):
        return await outcome
    return outcome


def hook_problem(hook: object) -> str | None:
    """Why ``hook`` cannot be called here (not callable, or a coroutine function), or None."""
    if not callable(hook):
        return f"hook must be callable, not {type(hook).__name__}"
    if inspect.iscoroutinefunction(hook) or inspect.iscoroutinefunction(
            getattr(hook, "__call__", None)):  # noqa: B004
        return "hook is a coroutine function: pass it to service_async.reconcile_calls"
    return None


def ahook_problem(hook: object) -> str | None:
    """Why ``hook`` cannot be called here (not callable), or None: sync or async both do."""
    if not callable(hook):
        return f"hook must be callable, not {type(hook).__name__}"
    return None


class Runner:
    """Runs calls on up to ``workers`` threads named after ``name``."""

    def __init__(self, workers: int, name: str) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(workers, name)

    def submit(self, fn: Callable[..., object], *args: Any) -> None:
        self._executor.submit(fn, *args)

    def shutdown(self) -> None:
        """Starts no more calls; those running end on their own."""
        self._executor.shutdown(wait=False)


class ARunner:
    """Runs calls as tasks named ``name`` (how many at once is the caller's semaphore's
    business, as with :class:`Runner`'s threads)."""

    def __init__(self, workers: int, name: str) -> None:
        self._name = name
        # The running tasks, referenced: the loop keeps only weak references to tasks.
        self._running: set[asyncio.Task[None]] = set()

    def submit(self, fn: Callable[..., Coroutine[Any, Any, None]], *args: Any) -> None:
        task = asyncio.create_task(fn(*args), name=self._name)
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    def shutdown(self) -> None:
        """Nothing to stop: the running tasks end on their own."""
