"""FastAPI router with the queue endpoints (extra ``fastapi``): ``GET /jobs/active``,
``POST /jobs/{id}/cancel``, ``POST /jobs/{id}/force-cancel`` and the telephony status callback
``POST /calls/{call_key}/status`` (JSON ``{"outcome", "detail"}``: resolve_call()).

    from outbound_heartbeat.contrib.fastapi import create_router

    async def tenant(request: Request) -> int | None: ...   # the app's auth: business id or None
    app.include_router(create_router(async_pool, tenant, locale="en"))

``tenant`` is a FastAPI dependency (it may itself take ``Request``, headers, other
dependencies); None is answered 401 (for the status callback: the app checks the provider's
request signature there; the unguessable call key in the URL is the other half). Connections
come from an ``AsyncConnectionPool``, an ``AsyncConnection`` (shared by every request task:
the calls take turns under its lock) or a factory of async connection context managers. A call
made inside the app's open transaction runs its release hooks only after that transaction
commits, never after a rollback.
"""

# No `from __future__ import annotations`: FastAPI reads the route annotations at runtime, and
# `Business` is local to create_router.
from collections.abc import Awaitable, Callable, Iterable
from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from ..web import (
    DEFAULT_PREFIX,
    MAX_CALLBACK_BODY,
    AsyncEndpoints,
    AsyncSource,
    ReleaseHook,
    ReleaseHooks,
    Reply,
    async_connections,
    release_hooks,
)

__all__ = ["create_router"]


def create_router(
    connection: AsyncSource,
    tenant: Callable[..., Any],
    *,
    prefix: str = DEFAULT_PREFIX,
    locale: str = "he",
    stale_after: timedelta | None = None,
    hooks: ReleaseHooks | Iterable[ReleaseHook] | None = None,
) -> APIRouter:
    """``GET /jobs/active``, ``POST /jobs/{id}/cancel``, ``POST /jobs/{id}/force-cancel``,
    ``POST /calls/{call_key}/status``."""
    endpoints = AsyncEndpoints(
        locale=locale,
        stale_after=stale_after,
        hooks=release_hooks(hooks),
        connections=async_connections(connection),
    )
    router = APIRouter(prefix=prefix)
    Business = Annotated[int | None, Depends(tenant)]

    async def respond(
        business_id: int | None, action: Callable[[int], Awaitable[Reply]]
    ) -> JSONResponse:
        reply = endpoints.unauthorized() if business_id is None else await action(business_id)
        return JSONResponse(reply.body, status_code=reply.status)

    @router.get("/jobs/active")
    async def active(business_id: Business) -> JSONResponse:
        return await respond(business_id, endpoints.active)

    # The id is taken as text so a malformed one is our 400 with a message, not FastAPI's 422.
    @router.post("/jobs/{run_id}/cancel")
    async def cancel(run_id: str, business_id: Business) -> JSONResponse:
        return await respond(business_id, lambda b: endpoints.cancel(run_id, b, force=False))

    @router.post("/jobs/{run_id}/force-cancel")
    async def force_cancel(run_id: str, business_id: Business) -> JSONResponse:
        return await respond(business_id, lambda b: endpoints.cancel(run_id, b, force=True))

    @router.post("/calls/{call_key}/status")
    async def call_status(call_key: str, request: Request, business_id: Business) -> JSONResponse:
        body = bytearray()
        async for chunk in request.stream():  # bounded: never more than one byte too many
            body += chunk[: MAX_CALLBACK_BODY + 1 - len(body)]
            if len(body) > MAX_CALLBACK_BODY:
                break
        return await respond(business_id, lambda b: endpoints.call_status(call_key, b, body))

    return router
