"""Where the web's connections come from: a pool, one shared connection, a factory of
connection context managers, or a unit of work (a SQLAlchemy session). The endpoints and the
console take the same sources. No web framework is imported here."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from .. import calls

__all__ = [
    "AsyncSource",
    "SyncSource",
    "UnitOfWork",
    "async_connections",
    "sync_connections",
]


@dataclass(frozen=True)
class UnitOfWork:
    """A source whose block yields something other than a psycopg connection (a SQLAlchemy
    ``Session``) together with how to run a call on it: see contrib.sqlalchemy.unit_of_work."""

    open: Callable[[], AbstractContextManager[Any]]
    execute: Callable[[Any, calls.Call[Any]], calls.Outcome[Any]]


SyncSource = (
    ConnectionPool
    | psycopg.Connection[Any]
    | UnitOfWork
    | Callable[[], AbstractContextManager[psycopg.Connection[Any]]]
)
AsyncSource = (
    AsyncConnectionPool
    | psycopg.AsyncConnection[Any]
    | Callable[[], AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]]
)


def sync_connections(
    source: SyncSource,
) -> Callable[[], AbstractContextManager[psycopg.Connection[Any]]]:
    """A pool, one shared connection, or a factory of connection context managers (for example
    ``lambda: psycopg.connect(dsn)``). The context's exit is where the app's transaction ends.

    One connection shared by threads is safe: every call on it holds that connection's lock
    from the choice of transaction to the hand-off of its events
    (:mod:`outbound_heartbeat.locks`). A call on a connection with no transaction open is its
    own transaction, and its release hooks run as soon as it returns; a call on a connection
    inside the app's open transaction is a savepoint of it, and its hooks run only once the
    server reports that transaction committed (never after a rollback): checked after the
    context's exit, else at the next call on that connection (:mod:`outbound_heartbeat.outbox`).
    """
    if isinstance(source, UnitOfWork):
        return source.open
    if isinstance(source, ConnectionPool):
        return source.connection
    if isinstance(source, psycopg.Connection):
        shared = source

        @contextlib.contextmanager
        def borrow() -> Iterator[psycopg.Connection[Any]]:
            yield shared

        return borrow
    if callable(source):
        return source
    raise TypeError(f"connection must be a pool, a connection or a factory, not {source!r}")


def async_connections(
    source: AsyncSource,
) -> Callable[[], AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]]:
    """The asyncio twin of :func:`sync_connections` (one ``AsyncConnection`` shared by tasks is
    safe: the calls on it take turns under its lock)."""
    if isinstance(source, AsyncConnectionPool):
        return source.connection
    if isinstance(source, psycopg.AsyncConnection):
        shared = source

        @contextlib.asynccontextmanager
        async def borrow() -> AsyncIterator[psycopg.AsyncConnection[Any]]:
            yield shared

        return borrow
    if callable(source):
        return source
    raise TypeError(f"connection must be a pool, a connection or a factory, not {source!r}")
