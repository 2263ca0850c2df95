"""The operator console as a FastAPI router (extra ``fastapi``).

    from outbound_heartbeat.console import Viewer
    from outbound_heartbeat.contrib.fastapi_console import create_console_router

    def authorize(request: Request) -> Viewer | None: ...   # the app's login; None is 401
    app.include_router(create_console_router(pool, authorize))   # at /outbound-heartbeat/

The console's core is synchronous: it takes a psycopg ``ConnectionPool`` (or a connection, or
a factory) and runs each page in Starlette's thread pool, ``authorize`` included (a plain
function that receives Starlette's ``Request``; it must not read the body). A POST's body is
read only after ``authorize`` said yes, refused from its headers (411, 400, 413 over the form
limit) and never read past the limit. The live stream (``/stream``) holds no thread: it waits on
the event loop (asyncio) and reads a business's rows in the console's own small thread pool;
``max_streams`` / ``max_streams_per_viewer`` bound how many are open (429 beyond). See
docs/console.md.
"""

# No `from __future__ import annotations`: FastAPI reads the route annotations at runtime.
from typing import Any

from fastapi import APIRouter
from fastapi import Request as HttpRequest
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..console.core import (
    DEFAULT_CONSOLE_PREFIX,
    MAX_FORM_BYTES,
    Authorize,
    Console,
    Request,
    parse_form,
)
from ..console.core import Response as ConsoleResponse
from ..console.stream import EventStream
from ..web import SyncSource

__all__ = ["create_console_router"]


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
        req = Request(
            method=request.method,
            path="/" + path,
            root=request.scope.get("root_path", "") + prefix.rstrip("/"),
            query=dict(request.query_params),
            form={},
            cookies=dict(request.cookies),
            native=request,
        )
        admitted = await run_in_threadpool(console.admit, req)
        if isinstance(admitted, ConsoleResponse):
            return _starlette_response(admitted)
        if request.method == "POST":
            length = console.form_length(
                req, admitted, request.headers.get("content-length"),
                request.headers.get("transfer-encoding"),
            )
            if isinstance(length, ConsoleResponse):
                return _starlette_response(length)
            raw = bytearray()
            async for chunk in request.stream():
                raw += chunk
                if len(raw) > min(length, MAX_FORM_BYTES):  # more than it said: stop reading
                    return _starlette_response(ConsoleResponse(
                        400, b"body longer than its Content-Length", "text/plain"))
            req.form = parse_form(bytes(raw))
        return _starlette_response(await run_in_threadpool(console.respond, req, admitted))

    return router


def _starlette_response(reply: ConsoleResponse) -> Response:
    response: Response
    if isinstance(reply.body, bytes):
        response = Response(reply.body, status_code=reply.status, media_type=reply.content_type)
    elif isinstance(reply.body, EventStream):
        # Waits on the event loop, not in Starlette's thread pool.
        response = StreamingResponse(
            reply.body.aiter(), status_code=reply.status, media_type=reply.content_type
        )
    else:
        response = StreamingResponse(
            reply.body, status_code=reply.status, media_type=reply.content_type
        )
    for header, value in reply.headers:
        response.headers.append(header, value)
    return response
