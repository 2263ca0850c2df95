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

Every request goes through ``authorize`` (it gets Flask's ``request``); see docs/console.md.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, request, stream_with_context

from ..console.core import Authorize, Console, Request
from .web import SyncSource

__all__ = ["DEFAULT_CONSOLE_PREFIX", "create_console_blueprint"]

DEFAULT_CONSOLE_PREFIX = "/outbound-heartbeat"


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
            form=request.form.to_dict() if request.method == "POST" else {},
            cookies=request.cookies.to_dict(),
            native=request._get_current_object(),  # type: ignore[attr-defined]
        )
        reply = console.handle(req)
        body: Any = reply.body
        if not isinstance(body, bytes):
            body = stream_with_context(body)
        response = Response(body, status=reply.status, content_type=reply.content_type)
        for header, value in reply.headers:
            response.headers.add(header, value)
        return response

    return bp
