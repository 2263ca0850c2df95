"""How lease connections are opened and, when a call hangs on a dead network path, cut."""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Any

__all__ = ["CONNECT_OPTIONS", "cut_connection"]


#: Connection options for lease connections: bounded connect, dead sockets noticed in seconds.
CONNECT_OPTIONS: dict[str, Any] = {
    "autocommit": True,
    "connect_timeout": 5,
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 10000,
}


def cut_connection(conn: Any) -> None:
    """Shuts down a connection's socket from another thread or task, so a call blocked on a
    dead network path (nothing answers, nothing resets) fails at once instead of waiting for
    an answer that may never come; the owner then sees a connection error and reconnects."""
    with contextlib.suppress(Exception):
        fd = conn.pgconn.socket
        with socket.socket(fileno=os.dup(fd)) as sock:
            sock.shutdown(socket.SHUT_RDWR)
