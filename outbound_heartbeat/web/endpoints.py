"""The endpoints the Flask blueprint and the FastAPI router share, framework-free: their calls,
their replies in Hebrew or English and the release hooks after them.

The HTTP surface: ``GET /jobs/active``, ``POST /jobs/<id>/cancel``,
``POST /jobs/<id>/force-cancel`` and ``POST /calls/<call_key>/status`` (the telephony status
callback: JSON ``{"outcome": "completed" | "failed" | "not_placed", "detail": text or null}``)
under ``/api/outbound_calls``. Errors answer
``{"error": <message>, "code": <SQLSTATE or reason>}`` with the status of the one error table
(:mod:`.http`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import psycopg

from .. import calls, service, service_async
from ..errors import Error, InvalidArgument
from ..records import CallResolution, CancelResult, Run
from .hooks import ReleaseHooks
from .http import Reply, error_reply, messages, parse_run_id, reply_for_error
from .sources import SyncSource, UnitOfWork, sync_connections

__all__ = [
    "DEFAULT_PREFIX",
    "MAX_CALLBACK_BODY",
    "AsyncEndpoints",
    "Endpoints",
    "active_call",
    "active_reply",
    "cancel_call",
    "cancel_reply",
    "status_call",
    "status_reply",
]

T = TypeVar("T")

DEFAULT_PREFIX = "/api/outbound_calls"


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


def status_reply(result: CallResolution) -> Reply:
    """200 whatever the answer: a repeated, late or superseded callback is answered, not
    refused, so the provider stops sending it; ``answer`` says what it did."""
    return Reply(
        200,
        {
            "success": True,
            "answer": result.answer,
            "job_id": result.job_id,
            "run_id": result.run_id,
            "status": result.status,
            "call_outcome": result.call_outcome,
            "settled_at": result.settled_at.isoformat() if result.settled_at else None,
        },
    )


#: The most a status callback's body may hold: its detail is at most 2,000 characters. The
#: adapters read one byte more and no further, so a caller cannot make the app buffer more.
MAX_CALLBACK_BODY = 64 * 1024


def status_call(
    call_key: str, business_id: int, body: Any
) -> calls.Call[CallResolution]:
    """resolve_call() for a status callback's key and body: the raw bytes as the adapters read
    them (at most MAX_CALLBACK_BODY + 1), or a parsed value (InvalidArgument when it is too
    long, or not an object with a string ``outcome`` and an optional string ``detail``)."""
    if isinstance(body, (bytes, bytearray)):
        if len(body) > MAX_CALLBACK_BODY:
            raise InvalidArgument(f"the body must be at most {MAX_CALLBACK_BODY} bytes",
                                  argument="body")
        try:
            body = json.loads(body)
        except ValueError:  # not JSON (or not UTF-8): answered as a bad outcome below
            body = None
    if not isinstance(body, Mapping):
        raise InvalidArgument("the body must be a JSON object", argument="outcome")
    outcome, detail = body.get("outcome"), body.get("detail")
    if not isinstance(outcome, str) or not (detail is None or isinstance(detail, str)):
        raise InvalidArgument("outcome must be a string and detail a string or null",
                              argument="outcome")
    return calls.resolve_call(call_key, outcome, detail, business_id)


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

    def _status_call(self, call_key: str, business_id: int, body: Any) -> calls.Call[Any] | Reply:
        try:
            return status_call(call_key, business_id, body)
        except Error as exc:  # refused before the database is asked: the same reply
            return reply_for_error(exc, self.text)

    def _cancel_call(self, raw_id: str, business_id: int, force: bool) -> calls.Call[Any] | Reply:
        run_id = parse_run_id(raw_id)
        if run_id is None:
            bad = InvalidArgument  # a malformed id answers as the database's bad argument
            return error_reply(bad.http_status, "bad_id", self.text, bad.sqlstate)
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
        assert self.connections is not None
        run = self.executor or service.execute_call
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
                service.settle(conn, [outcome.pending])
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

    def call_status(self, call_key: str, business_id: int, body: Any) -> Reply:
        """The status callback: settles the call with this key once (resolve_call)."""
        call = self._status_call(call_key, business_id, body)
        if isinstance(call, Reply):
            return call
        result = self._execute(call)
        return result if isinstance(result, Reply) else status_reply(result)


@dataclass
class AsyncEndpoints(_Base):
    """The three endpoints on asyncio connections (FastAPI)."""

    connections: Callable[[], AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]] | None = (
        None
    )

    async def _execute(self, call: calls.Call[T]) -> T | Reply:
        assert self.connections is not None
        try:
            async with self.connections() as conn:
                outcome = await service_async.execute_call(conn, call)
                if outcome.pending is not None:
                    outcome.pending.on_commit(self.hooks.run_async)
        except Error as exc:
            return reply_for_error(exc, self.text)
        if outcome.pending is None:
            await self.hooks.run_async(outcome.events)
        elif outcome.pending.state == "pending":
            async with self.connections() as conn:
                await service_async.settle(conn, [outcome.pending])
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

    async def call_status(self, call_key: str, business_id: int, body: Any) -> Reply:
        """The status callback: settles the call with this key once (resolve_call)."""
        call = self._status_call(call_key, business_id, body)
        if isinstance(call, Reply):
            return call
        result = await self._execute(call)
        return result if isinstance(result, Reply) else status_reply(result)
