"""Flask blueprint with the queue endpoints (extra ``flask``): ``GET /jobs/active``,
``POST /jobs/<id>/cancel``, ``POST /jobs/<id>/force-cancel`` and the telephony status callback
``POST /calls/<call_key>/status`` (JSON ``{"outcome", "detail"}``: resolve_call()).

    from outbound_heartbeat.contrib.flask import create_blueprint

    app.register_blueprint(create_blueprint(pool, tenant=lambda: g.business_id, locale="he"))

``connection`` is a psycopg ``ConnectionPool``, one ``Connection`` (shared by every request
thread: the calls take turns under its lock), a factory of connection context managers, or a
SQLAlchemy session's unit of work (``contrib.sqlalchemy.unit_of_work(db.session)``). A call
made inside the app's open transaction runs its release hooks only after that transaction
commits, never after a rollback.

``tenant`` is called inside the request and returns the business id the caller acts for, or
None (answered 401); the app's own authentication decides (for the status callback: the
provider's request signature, mapped to the business). The call key in the URL is the other
half: unguessable, it names one attempt of one call. The replies are the web core's
(:mod:`outbound_heartbeat.web`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import timedelta

from flask import Blueprint, Response, jsonify, request

from ..web import (
    DEFAULT_PREFIX,
    MAX_CALLBACK_BODY,
    Endpoints,
    ReleaseHook,
    ReleaseHooks,
    Reply,
    SyncSource,
    release_hooks,
)

__all__ = ["create_blueprint"]


def create_blueprint(
    connection: SyncSource,
    tenant: Callable[[], int | None],
    *,
    url_prefix: str = DEFAULT_PREFIX,
    locale: str = "he",
    stale_after: timedelta | None = None,
    hooks: ReleaseHooks | Iterable[ReleaseHook] | None = None,
    name: str = "outbound_heartbeat",
) -> Blueprint:
    """``GET /jobs/active``, ``POST /jobs/<id>/cancel``, ``POST /jobs/<id>/force-cancel``,
    ``POST /calls/<call_key>/status``."""
    endpoints = Endpoints.on(
        connection, locale=locale, stale_after=stale_after, hooks=release_hooks(hooks)
    )
    bp = Blueprint(name, __name__, url_prefix=url_prefix)

    def respond(action: Callable[[int], Reply]) -> tuple[Response, int]:
        business_id = tenant()
        reply = endpoints.unauthorized() if business_id is None else action(business_id)
        return jsonify(reply.body), reply.status

    @bp.get("/jobs/active")
    def active() -> tuple[Response, int]:
        return respond(endpoints.active)

    @bp.post("/jobs/<run_id>/cancel")
    def cancel(run_id: str) -> tuple[Response, int]:
        return respond(lambda business_id: endpoints.cancel(run_id, business_id, force=False))

    @bp.post("/jobs/<run_id>/force-cancel")
    def force_cancel(run_id: str) -> tuple[Response, int]:
        return respond(lambda business_id: endpoints.cancel(run_id, business_id, force=True))

    @bp.post("/calls/<call_key>/status")
    def call_status(call_key: str) -> tuple[Response, int]:
        body = request.stream.read(MAX_CALLBACK_BODY + 1)
        return respond(lambda business_id: endpoints.call_status(call_key, business_id, body))

    return bp
