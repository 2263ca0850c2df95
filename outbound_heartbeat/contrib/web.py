"""What the Flask blueprint and the FastAPI router share: the endpoints' calls, their replies in
Hebrew or English, the error -> HTTP mapping and the release hooks. No framework import here.

The HTTP surface is the seed app's: ``GET /jobs/active``, ``POST /jobs/<id>/cancel`` and
``POST /jobs/<id>/force-cancel`` under ``/api/outbound_calls``. Errors answer
``{"error": <message>, "code": <SQLSTATE or reason>}`` with the status of DESIGN.md's table.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import psycopg
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from .. import calls
from ..errors import Error
from ..records import CancelResult, Event, Run

__all__ = [
    "DEFAULT_PREFIX",
    "MAX_BIGINT",
    "MESSAGES",
    "RELEASE_EVENTS",
    "AsyncEndpoints",
    "AsyncSource",
    "Endpoints",
    "ReleaseHook",
    "ReleaseHooks",
    "Reply",
    "SyncSource",
    "UnitOfWork",
    "active_call",
    "active_reply",
    "async_connections",
    "cancel_call",
    "cancel_reply",
    "error_reply",
    "messages",
    "parse_run_id",
    "release_hooks",
    "reply_for_error",
    "sync_connections",
]


logger = logging.getLogger("outbound_heartbeat.web")

T = TypeVar("T")

DEFAULT_PREFIX = "/api/outbound_calls"
MAX_BIGINT = 2**63 - 1

#: The events after which a run's external resources (call slots, ...) must be given back.
RELEASE_EVENTS = frozenset({"stale_stopped", "force_cancelled", "cleaned_up", "finished"})

MESSAGES: dict[str, dict[str, str]] = {
    "he": {
        "force_cancelled": "התור בוטל מיידית ({n} שיחות בוטלו)",
        "cancelled": "התור בוטל ({n} שיחות בוטלו)",
        "cancel_requested": "בקשת הביטול נשלחה; התור ייעצר אחרי השיחה הנוכחית",
        "already_ended": "התור כבר הסתיים",
        "no_active": "אין תור פעיל",
        "no_access": "אין גישה לתור זה",
        "not_found": "התור לא נמצא",
        "bad_id": "מזהה תור לא תקין",
        "bad_request": "בקשה לא תקינה",
        "unauthorized": "נדרשת הזדהות",
        "lease_lost": "התור כבר אינו פעיל",
        "locked": "התור תפוס כרגע, נסו שוב בעוד רגע",
        "read_only": "השרת במצב קריאה בלבד (שרת גיבוי); נסו שוב בעוד רגע",
        "unavailable": "התור אינו זמין כרגע בשל הגדרת מסד הנתונים; פנו למנהל המערכת",
    },
    "en": {
        "force_cancelled": "Queue cancelled immediately ({n} calls cancelled)",
        "cancelled": "Queue cancelled ({n} calls cancelled)",
        "cancel_requested": "Cancellation requested; the queue stops after the current call",
        "already_ended": "The queue has already ended",
        "no_active": "No active queue",
        "no_access": "You have no access to this queue",
        "not_found": "Queue not found",
        "bad_id": "Invalid queue id",
        "bad_request": "Invalid request",
        "unauthorized": "Authentication required",
        "lease_lost": "The queue is no longer active",
        "locked": "The queue is busy right now; try again in a moment",
        "read_only": "The database is read-only right now (a standby); try again in a moment",
        "unavailable": "The queue is unavailable (database setup problem); tell an administrator",
    },
}

_MESSAGE_BY_SQLSTATE = {
    "OH400": "bad_request",
    "OH403": "no_access",
    "OH404": "not_found",
    "OH409": "lease_lost",
    "OH423": "locked",
    "OH428": "unavailable",
    "OH503": "read_only",
}


def messages(locale: str) -> Mapping[str, str]:
    """The message catalogue of ``locale`` (``he`` or ``en``); ValueError names the argument."""
    try:
        return MESSAGES[locale]
    except KeyError:
        raise ValueError(f"locale must be one of {sorted(MESSAGES)}, not {locale!r}") from None


@dataclass(frozen=True)
class Reply:
    """An HTTP status and its JSON body."""

    status: int
    body: dict[str, Any]


def error_reply(status: int, key: str, text: Mapping[str, str], code: str | None = None) -> Reply:
    return Reply(status, {"error": text[key], "code": code or key})


def reply_for_error(exc: Error, text: Mapping[str, str]) -> Reply:
    """DESIGN.md's table: the exception's own HTTP status, a message in the locale."""
    return error_reply(exc.http_status, _MESSAGE_BY_SQLSTATE[exc.sqlstate], text, exc.sqlstate)


def parse_run_id(raw: str) -> int | None:
    """A run id from a URL segment: a positive bigint in plain decimal digits, else None."""
    if not raw.isascii() or not raw.isdigit() or len(raw) > 19:
        return None
    value = int(raw)
    return value if 0 < value <= MAX_BIGINT else None


def active_reply(run: Run | None, text: Mapping[str, str]) -> Reply:
    if run is None:
        return error_reply(404, "no_active", text)
    age = run.heartbeat_age.total_seconds() if run.heartbeat_age is not None else None
    return Reply(
        200,
        {
            "id": run.id,
            "run_id": run.id,
            "business_id": run.business_id,
            "status": run.status,
            "queued": run.queued_jobs,
            "in_progress": run.in_progress_jobs,
            "heartbeat_age_seconds": age,
            "worker": run.locked_by_worker,
            "cancel_requested": run.cancel_requested_at is not None,
            "created_at": run.created_at.isoformat() if run.created_at else None,
            "started_at": run.started_at.isoformat() if run.started_at else None,
        },
    )


def cancel_reply(result: CancelResult, text: Mapping[str, str], *, force: bool) -> Reply:
    ended_before = result.previous_status not in ("pending", "running")
    if ended_before:
        message = text["already_ended"]
    elif result.status == "cancelled":
        message = text["force_cancelled" if force else "cancelled"].format(n=result.jobs_cancelled)
    else:
        message = text["cancel_requested"]
    return Reply(
        200,
        {
            "success": True,
            "message": message,
            "jobs_cancelled": result.jobs_cancelled,
            "run_id": result.run_id,
            "status": result.status,
            "previous_status": result.previous_status,
        },
    )


# -- release hooks -----------------------------------------------------------------------------

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


# -- where connections come from ---------------------------------------------------------------


@dataclass(frozen=True)
class UnitOfWork:
    """A source whose block yields something other than a psycopg connection (a SQLAlchemy
    ``Session``) together with how to run a call on it: see contrib.sqlalchemy.unit_of_work."""

    open: Callable[[], AbstractContextManager[Any]]
    execute: Callable[[Any, calls.Call[Any]], calls.Outcome[Any]]


SyncSource = (
    ConnectionPool
    | psycopg.Connection[Any]
    | UnitOfWork
    | Callable[[], AbstractContextManager[psycopg.Connection[Any]]]
)
AsyncSource = (
    AsyncConnectionPool
    | psycopg.AsyncConnection[Any]
    | Callable[[], AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]]
)


def sync_connections(
    source: SyncSource,
) -> Callable[[], AbstractContextManager[psycopg.Connection[Any]]]:
    """A pool, one shared connection, or a factory of connection context managers (for example
    ``lambda: psycopg.connect(dsn)``). The context's exit is where the app's transaction ends.

    One connection shared by threads is safe: every call on it holds that connection's lock
    from the choice of transaction to the hand-off of its events
    (:mod:`outbound_heartbeat.locks`). A call on a connection with no transaction open is its
    own transaction, and its release hooks run as soon as it returns; a call on a connection
    inside the app's open transaction is a savepoint of it, and its hooks run only once the
    server reports that transaction committed (never after a rollback): checked after the
    context's exit, else at the next call on that connection (:mod:`outbound_heartbeat.outbox`).
    """
    if isinstance(source, UnitOfWork):
        return source.open
    if isinstance(source, ConnectionPool):
        return source.connection
    if isinstance(source, psycopg.Connection):
        shared = source

        @contextlib.contextmanager
        def borrow() -> Iterator[psycopg.Connection[Any]]:
            yield shared

        return borrow
    if callable(source):
        return source
    raise TypeError(f"connection must be a pool, a connection or a factory, not {source!r}")


def async_connections(
    source: AsyncSource,
) -> Callable[[], AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]]:
    """The asyncio twin of :func:`sync_connections` (one ``AsyncConnection`` shared by tasks is
    safe: the calls on it take turns under its lock)."""
    if isinstance(source, AsyncConnectionPool):
        return source.connection
    if isinstance(source, psycopg.AsyncConnection):
        shared = source

        @contextlib.asynccontextmanager
        async def borrow() -> AsyncIterator[psycopg.AsyncConnection[Any]]:
            yield shared

        return borrow
    if callable(source):
        return source
    raise TypeError(f"connection must be a pool, a connection or a factory, not {source!r}")


def active_call(business_id: int, stale_after: timedelta | None) -> calls.Call[Run | None]:
    return calls.get_active_run(business_id, stale_after)


def cancel_call(run_id: int, business_id: int, *, force: bool) -> calls.Call[CancelResult]:
    return (calls.force_cancel if force else calls.request_cancel)(run_id, business_id)


# -- the endpoints, framework-free ----------------------------------------------------------------


@dataclass
class _Base:
    locale: str = "he"
    stale_after: timedelta | None = None
    hooks: ReleaseHooks = field(default_factory=ReleaseHooks)

    def __post_init__(self) -> None:
        self.text = messages(self.locale)

    def unauthorized(self) -> Reply:
        return error_reply(401, "unauthorized", self.text)

    def _cancel_call(self, raw_id: str, business_id: int, force: bool) -> calls.Call[Any] | Reply:
        run_id = parse_run_id(raw_id)
        if run_id is None:
            return error_reply(400, "bad_id", self.text, "OH400")
        return cancel_call(run_id, business_id, force=force)


@dataclass
class Endpoints(_Base):
    """The three endpoints on sync connections (Flask); see :func:`sync_connections` for what
    a shared connection and the app's open transaction mean for the calls and the hooks."""

    connections: Callable[[], AbstractContextManager[Any]] | None = None
    #: How a call runs on what ``connections`` yields (default: service.execute_call).
    executor: Callable[[Any, calls.Call[Any]], calls.Outcome[Any]] | None = None

    @classmethod
    def on(cls, source: SyncSource, **options: Any) -> Endpoints:
        """Endpoints on any source :func:`sync_connections` accepts, or a UnitOfWork."""
        executor = source.execute if isinstance(source, UnitOfWork) else None
        return cls(connections=sync_connections(source), executor=executor, **options)

    def _execute(self, call: calls.Call[T]) -> T | Reply:
        from ..service import execute_call, settle

        assert self.connections is not None
        run = self.executor or execute_call
        try:
            with self.connections() as conn:
                outcome: calls.Outcome[T] = run(conn, call)
                if outcome.pending is not None:  # inside the app's transaction
                    outcome.pending.on_commit(self.hooks.run)
        except Error as exc:
            return reply_for_error(exc, self.text)
        if outcome.pending is None:
            self.hooks.run(outcome.events)  # the call's own transaction has committed
        elif outcome.pending.state == "pending" and self.executor is None:
            # The context's exit is where the app's transaction ends: the server says how.
            # Still open, the hooks wait for a later settle (any call on that connection).
            # (A UnitOfWork settles its own: a SQLAlchemy session's commit or rollback.)
            with self.connections() as conn:
                settle(conn, [outcome.pending])
        return outcome.result

    def active(self, business_id: int) -> Reply:
        result = self._execute(active_call(business_id, self.stale_after))
        return result if isinstance(result, Reply) else active_reply(result, self.text)

    def cancel(self, raw_id: str, business_id: int, *, force: bool) -> Reply:
        call = self._cancel_call(raw_id, business_id, force)
        if isinstance(call, Reply):
            return call
        result = self._execute(call)
        return result if isinstance(result, Reply) else cancel_reply(result, self.text, force=force)


@dataclass
class AsyncEndpoints(_Base):
    """The three endpoints on asyncio connections (FastAPI)."""

    connections: Callable[[], AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]] | None = (
        None
    )

    async def _execute(self, call: calls.Call[T]) -> T | Reply:
        from ..service_async import execute_call, settle

        assert self.connections is not None
        try:
            async with self.connections() as conn:
                outcome = await execute_call(conn, call)
                if outcome.pending is not None:
                    outcome.pending.on_commit(self.hooks.run_async)
        except Error as exc:
            return reply_for_error(exc, self.text)
        if outcome.pending is None:
            await self.hooks.run_async(outcome.events)
        elif outcome.pending.state == "pending":
            async with self.connections() as conn:
                await settle(conn, [outcome.pending])
        return outcome.result

    async def active(self, business_id: int) -> Reply:
        result = await self._execute(active_call(business_id, self.stale_after))
        return result if isinstance(result, Reply) else active_reply(result, self.text)

    async def cancel(self, raw_id: str, business_id: int, *, force: bool) -> Reply:
        call = self._cancel_call(raw_id, business_id, force)
        if isinstance(call, Reply):
            return call
        result = await self._execute(call)
        return result if isinstance(result, Reply) else cancel_reply(result, self.text, force=force)
