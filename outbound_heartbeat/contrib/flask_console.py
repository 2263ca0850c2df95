"""The operator console as a Flask blueprint (extra ``flask``).

    from outbound_heartbeat.console import Viewer
    from outbound_heartbeat.contrib.flask_console import create_console_blueprint

    def authorize(request) -> Viewer | None:          # the app's own login decides
        user = current_user()
        if user is None:
            return None                                # 401: deny by default
        if user.is_staff:
            return Viewer(operator=True, read_only=not user.is_admin, name=user.email)
        return Viewer(business_id=user.business_id, name=user.email)

    app.register_blueprint(create_console_blueprint(pool, authorize))   # at /outbound-heartbeat/

Every request goes through ``authorize`` (it gets Flask's ``request``) before any byte of its
body is read: ``authorize`` must not read the body (``request.form``, ``get_data()``) itself. A
POST's body is then refused from its headers (411, 400, 413 over the form limit) and read
within its length. See docs/console.md.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, request

from ..console.core import DEFAULT_CONSOLE_PREFIX, Authorize, Console, Request, parse_form
from ..console.core import Response as ConsoleResponse
from ..web import SyncSource

__all__ = ["create_console_blueprint"]


def create_console_blueprint(
    connection: SyncSource,
    authorize: Authorize,
    *,
    url_prefix: str = DEFAULT_CONSOLE_PREFIX,
    read: SyncSource | None = None,
    name: str = "outbound_heartbeat_console",
    **options: Any,
) -> Blueprint:
    """The console under ``url_prefix``; ``options`` are :class:`Console`'s (locale, secret,
    listen, poll_interval, stop_stale, ...). The blueprint's ``console`` attribute is the
    :class:`Console` (``close()`` it at shutdown to stop its thread)."""
    console = Console(connection, authorize, read=read, **options)
    bp = Blueprint(name, __name__, url_prefix=url_prefix)
    bp.console = console  # type: ignore[attr-defined]

    @bp.route("/", defaults={"path": ""}, methods=["GET", "HEAD", "POST"])
    @bp.route("/<path:path>", methods=["GET", "HEAD", "POST"])
    def console_view(path: str) -> Response:
        req = Request(
            method=request.method,
            path="/" + path,
            root=request.script_root + url_prefix.rstrip("/"),
            query=request.args.to_dict(),
            form={},
            cookies=request.cookies.to_dict(),
            native=request._get_current_object(),  # type: ignore[attr-defined]
        )
        admitted = console.admit(req)
        if isinstance(admitted, ConsoleResponse):
            return _flask_response(admitted)
        if request.method == "POST":
            length = console.form_length(
                req, admitted, request.headers.get("Content-Length"),
                request.headers.get("Transfer-Encoding"),
            )
            if isinstance(length, ConsoleResponse):
                return _flask_response(length)
            req.form = parse_form(_read(length))
        return _flask_response(console.respond(req, admitted))

    return bp


def _read(length: int) -> bytes:
    """Exactly ``length`` bytes of the request's body (fewer if the client stops), never more."""
    stream = request.stream
    chunks: list[bytes] = []
    left = length
    while left > 0:
        chunk = stream.read(left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _flask_response(reply: ConsoleResponse) -> Response:
    """The console's answer as Flask's. (A body left unread is the WSGI server's to drain or
    close: an application may not set ``Connection``, a hop-by-hop header.)"""
    # An event stream goes as it is: the WSGI server's close() of the response closes it
    # (frees its slot) even when it was never iterated. It needs no request context.
    response = Response(reply.body, status=reply.status, content_type=reply.content_type)
    for header, value in reply.headers:
        response.headers.add(header, value)
    return response
