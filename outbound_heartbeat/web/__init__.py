"""The web core, below every web surface: the Flask blueprint and the FastAPI router
(:mod:`outbound_heartbeat.contrib.flask`, :mod:`~outbound_heartbeat.contrib.fastapi`) and the
operator console (:mod:`outbound_heartbeat.console` and its adapters) import it; it imports no
web framework, so each extra installs and imports alone.

- :mod:`.http`: run ids from URLs, the reply texts (he/en), the one error -> HTTP table.
- :mod:`.sources`: where connections come from (pool, shared connection, factory, unit of work).
- :mod:`.hooks`: release hooks run after a call that ended a run has committed.
- :mod:`.endpoints`: the three endpoints of the blueprint and the router, framework-free.
"""

from __future__ import annotations

from .endpoints import (
    DEFAULT_PREFIX,
    MAX_CALLBACK_BODY,
    AsyncEndpoints,
    Endpoints,
    active_call,
    active_reply,
    cancel_call,
    cancel_reply,
)
from .hooks import RELEASE_EVENTS, ReleaseHook, ReleaseHooks, release_hooks
from .http import (
    ERRORS,
    MESSAGES,
    HttpError,
    Reply,
    error_reply,
    http_error,
    messages,
    parse_run_id,
    reply_for_error,
)
from .sources import AsyncSource, SyncSource, UnitOfWork, async_connections, sync_connections

__all__ = [
    "DEFAULT_PREFIX",
    "ERRORS",
    "MAX_CALLBACK_BODY",
    "MESSAGES",
    "RELEASE_EVENTS",
    "AsyncEndpoints",
    "AsyncSource",
    "Endpoints",
    "HttpError",
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
    "http_error",
    "messages",
    "parse_run_id",
    "release_hooks",
    "reply_for_error",
    "sync_connections",
]
