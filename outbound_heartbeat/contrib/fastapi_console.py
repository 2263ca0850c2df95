"""The operator console as a FastAPI router (extra ``fastapi``).

    from outbound_heartbeat.console import Viewer
    from outbound_heartbeat.contrib.fastapi_console import create_console_router

    def authorize(request: Request) -> Viewer | None: ...   # the app's login; None is 401
    app.include_router(create_console_router(pool, authorize))   # at /outbound-heartbeat/

The console's core is synchronous: it takes a psycopg ``ConnectionPool`` (or a connection, or
a factory) and runs each request in Starlette's thread pool, ``authorize`` included (a plain
function that receives Starlette's ``Request``). See docs/console.md.
"""

# No `from __future__ import annotations`: FastAPI reads the route annotations at runtime.
from typing import Any
from urllib.parse import parse_qsl

from fastapi import APIRouter
from fastapi import Request as HttpRequest
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..console.core import Authorize, Console, Request
from .flask_console import DEFAULT_CONSOLE_PREFIX
from .web import SyncSource

__all__ = ["create_console_router"]

MAX_FORM_BYTES = 64 * 1024


def create_console_router(
    connection: SyncSource,
    authorize: Authorize,
    *,
    prefix: str = DEFAULT_CONSOLE_PREFIX,
    read: SyncSource | None = None,
    **options: Any,
) -> APIRouter:
    """The console under ``prefix``; ``options`` are :class:`Console`'s. The router's
    ``console`` attribute is the :class:`Console` (``close()`` it at shutdown)."""
    console = Console(connection, authorize, read=read, **options)
    router = APIRouter(prefix=prefix.rstrip("/"))
    router.console = console  # type: ignore[attr-defined]

    @router.api_route("/{path:path}", methods=["GET", "HEAD", "POST"], include_in_schema=False)
    async def console_view(path: str, request: HttpRequest) -> Response:
        form: dict[str, str] = {}
        if request.method == "POST":
            raw = await request.body()
            if len(raw) > MAX_FORM_BYTES:
                return Response(b"form too large", status_code=413, media_type="text/plain")
            form = dict(parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True))
        req = Request(
            method=request.method,
            path="/" + path,
            root=request.scope.get("root_path", "") + prefix.rstrip("/"),
            query=dict(request.query_params),
            form=form,
            cookies=dict(request.cookies),
            native=request,
        )
        reply = await run_in_threadpool(console.handle, req)
        response: Response
        if isinstance(reply.body, bytes):
            response = Response(reply.body, status_code=reply.status, media_type=reply.content_type)
        else:
            response = StreamingResponse(
                reply.body, status_code=reply.status, media_type=reply.content_type
            )
        for header, value in reply.headers:
            response.headers.append(header, value)
        return response

    return router
