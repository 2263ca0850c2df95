"""The operator console: the runs with their heartbeats drawn against ``stale_after``, live; a
run's jobs and events; cancel, force-cancel and sweep; health and metrics. Hebrew and English.

Mount it in an app (``contrib.flask_console`` / ``contrib.fastapi_console``) with an
``authorize(request) -> Viewer | None`` callback, or run it alone::

    outbound-heartbeat console --dsn postgresql://... [--read-dsn ...] [--port 8787] [--token ...]

See docs/console.md.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from psycopg_pool import ConnectionPool

from .core import (
    DEFAULT_CONSOLE_PREFIX,
    MAX_FORM_BYTES,
    Admitted,
    Authorize,
    Console,
    Request,
    Response,
    Viewer,
)
from .queries import RunSummary
from .server import ConsoleServer, HttpRequest, new_token, token_authorizer, valid_token
from .stream import EventStream

__all__ = [
    "DEFAULT_CONSOLE_PREFIX",
    "MAX_FORM_BYTES",
    "Admitted",
    "Authorize",
    "Console",
    "ConsoleServer",
    "EventStream",
    "HttpRequest",
    "Request",
    "Response",
    "RunSummary",
    "Viewer",
    "new_token",
    "open_pool",
    "standalone",
    "token_authorizer",
    "valid_token",
]


def open_pool(dsn: str, max_size: int = 8) -> ConnectionPool:
    """A small autocommit pool without prepared statements (so PgBouncer in transaction mode
    works), opened and checked."""
    kwargs: dict[str, Any] = {"autocommit": True, "prepare_threshold": None}
    pool = ConnectionPool(dsn, kwargs=kwargs, min_size=1, max_size=max_size, open=False)
    pool.open(wait=True, timeout=15)
    return pool


def standalone(
    dsn: str,
    token: str,
    *,
    read_dsn: str | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    locale: str = "en",
    listen: bool = True,
    poll_interval: float = 1.0,
    read_only: bool = False,
    ended_within: timedelta = timedelta(days=1),
    stop_stale: bool = True,
) -> ConsoleServer:
    """A console server (not started) on its own pools: actions (and LISTEN) on ``dsn``, pages
    on ``read_dsn`` when given (a standby). Closing the server closes the pools."""
    write = open_pool(dsn)
    read = open_pool(read_dsn) if read_dsn else None
    console = Console(
        write,
        token_authorizer(token, read_only=read_only),
        read=read,
        locale=locale,
        listen=dsn if listen else False,
        poll_interval=poll_interval,
        ended_within=ended_within,
        stop_stale=stop_stale,
    )
    server = ConsoleServer(console, host, port)
    original_close = console.close

    def close() -> None:
        original_close()
        write.close()
        if read is not None:
            read.close()

    console.close = close  # type: ignore[method-assign]
    return server
