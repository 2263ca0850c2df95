"""Connection poolers (PgBouncer) between a lease and PostgreSQL: what their errors mean, and a
warning when heartbeats would wait in the same pool as the app's queries.

Through a transaction-mode pooler every statement waits for a free server connection of its
pool. A heartbeat that shares the pool with the app's queries waits behind them; when the pool
is full for longer than the pooler's ``query_wait_timeout``, the pooler drops the connection and
live leases look stale. Heartbeats therefore belong in a pool of their own: the lease's
``heartbeat_dsn`` (docs/operations.md).
"""

from __future__ import annotations

import logging
import threading

__all__ = ["SERVER_PID", "describe_failure", "pooler_warning", "warn_if_pooled"]

logger = logging.getLogger("outbound_heartbeat.lease")

#: The server backend's pid, compared with the one the connection announced.
SERVER_PID = "SELECT pg_catalog.pg_backend_pid()"

#: Error texts of PgBouncer (it answers with these messages, SQLSTATE 08P01 mostly) and what
#: each means for a lease.
_POOLER_ERRORS = (
    ("query_wait_timeout",
     "PgBouncer closed the connection after waiting query_wait_timeout for a server connection:"
     " its pool for this database and user was full (pool_size / default_pool_size, plus"
     " reserve_pool_size), e.g. with the app's long queries; heartbeats must not share that pool:"
     " give them their own with heartbeat_dsn (docs/operations.md)"),
    ("no more connections allowed",
     "PgBouncer refused the connection: max_client_conn, max_db_connections or"
     " max_user_connections reached"),
    ("pgbouncer cannot connect to server",
     "PgBouncer could not open a server connection to PostgreSQL (server down or refusing)"),
    ("server login has been failing",
     "PgBouncer's login to PostgreSQL keeps failing (server_login_retry)"),
    ("query_timeout",
     "PgBouncer cancelled the statement after its query_timeout"),
    ("client_idle_timeout",
     "PgBouncer closed an idle client connection (client_idle_timeout)"),
    ("idle transaction timeout",
     "PgBouncer closed a connection idle in a transaction (idle_transaction_timeout)"),
)


def describe_failure(exc: BaseException) -> str:
    """The exception's class and text, and what happened when a pooler's error is recognised
    (e.g. PgBouncer's ``query_wait_timeout``: a full pool), for the lease's log lines."""
    text = str(exc).strip()
    described = f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__
    lowered = text.lower()
    for needle, meaning in _POOLER_ERRORS:
        if needle in lowered:
            return f"{described} -- {meaning}"
    return described


def pooler_warning(announced_pid: int, server_pid: int) -> str | None:
    """The start-up warning for a heartbeat connection that shares the work connections' DSN,
    when the backend pid the connection announced is not the server's: a pooler is between."""
    if announced_pid == server_pid:
        return None
    return (
        "[HEARTBEAT] heartbeats go through a connection pooler (PgBouncer or alike: the"
        f" connection's backend pid {announced_pid} is not the server's {server_pid}) on the"
        " same DSN as the work"
        " connections and the app: when the app's queries fill that pool, heartbeats wait for a"
        " server connection (PgBouncer's query_wait_timeout) and live leases look stale; give"
        " heartbeats a pool of their own with heartbeat_dsn= (a separate PgBouncer database"
        " entry with its own pool_size, or PostgreSQL directly; docs/operations.md)"
    )


_warned: set[str] = set()
_warned_lock = threading.Lock()


def warn_if_pooled(dsn: str, announced_pid: int, server_pid: int) -> None:
    """Logs :func:`pooler_warning` once per process and DSN."""
    message = pooler_warning(announced_pid, server_pid)
    if message is None:
        return
    with _warned_lock:
        if dsn in _warned:
            return
        _warned.add(dsn)
    logger.warning(message)
