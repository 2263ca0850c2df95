"""The API inside a SQLAlchemy unit of work (extra ``sqlalchemy``; SQLAlchemy 2 with the
psycopg 3 dialect, ``postgresql+psycopg://``).

    from outbound_heartbeat.contrib import sqlalchemy as oh

    hooks = ReleaseHooks([slots.release_run])      # outbound_heartbeat.web; here a RedisSlots
    oh.force_cancel(db.session, run_id, business_id=42, on_commit=hooks.run)  # app's transaction
    db.session.commit()        # the cancel commits with the app's own writes; hooks run now

Each call runs on the psycopg connection under the ``Session``'s (or Core ``Connection``'s)
current transaction, in a savepoint of it: the app's commit decides, an error of ours leaves
the app's transaction usable. The events of a call on a ``Session`` are logged, and its
``on_commit`` callbacks (the web adapters' release hooks) run, after the session's real
COMMIT (``after_commit``, only once the database transaction has ended, not at a nested
``begin_nested()`` release) and are dropped on its rollback (``after_soft_rollback``; a rolled-back
``begin_nested()`` drops the calls made inside it). On a Core ``Connection`` there is no
session to listen to: the events settle when the server says the transaction committed (the
next library call on that connection, or :func:`settle`).

For the web adapters, :func:`unit_of_work` makes each request's call one unit of work of the
app's session, committed at the end of the request's block:

    app.register_blueprint(create_blueprint(oh.unit_of_work(db.session), tenant))
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import psycopg
from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session, SessionTransaction, scoped_session

from .. import calls, service
from ..calls import Outcome
from ..outbox import Callback, Pending
from ..records import CancelResult, Event, Run
from ..web import UnitOfWork

__all__ = [
    "Bind",
    "create_run",
    "driver_connection",
    "execute",
    "execute_call",
    "force_cancel",
    "get_active_run",
    "request_cancel",
    "settle",
    "skip_notify",
    "unit_of_work",
]

T = TypeVar("T")
#: What the calls run on: a Session, a scoped_session (Flask-SQLAlchemy's ``db.session``; its
#: current Session is used) or a Core Connection.
Bind = Session | scoped_session[Any] | Connection

_WATCHED = "outbound_heartbeat.pending"


def _session(bind: Bind) -> Session | None:
    if isinstance(bind, scoped_session):
        current: Session = bind()
        return current
    return bind if isinstance(bind, Session) else None


def driver_connection(bind: Bind) -> psycopg.Connection[Any]:
    """The psycopg connection under the bind's current transaction (begun if none was)."""
    session = _session(bind)
    connection = session.connection() if session is not None else bind
    assert isinstance(connection, Connection)
    if not connection.in_transaction():
        # SQLAlchemy begins lazily, at its own first statement: begin now, or the app's
        # commit() would find no transaction of its own to commit ours with.
        connection.begin()
    driver = connection.connection.driver_connection
    if not isinstance(driver, psycopg.Connection):
        raise TypeError(
            "outbound_heartbeat needs SQLAlchemy's psycopg 3 dialect (postgresql+psycopg://),"
            f" not a {type(driver).__name__} connection"
        )
    return driver


def execute_call(bind: Bind, call: calls.Call[T]) -> Outcome[T]:
    """Runs one call inside the bind's transaction; ``pending`` (when it caused events) settles
    with the session's commit or rollback."""
    session = _session(bind)
    driver = driver_connection(bind)
    outcome = service.execute_call(driver, call, join=True)
    if outcome.pending is not None and session is not None:
        _watch(session, driver, outcome.pending)
    return outcome


def execute(
    bind: Bind, call: calls.Call[T], on_commit: Callback | None = None
) -> tuple[T, list[Event]]:
    """Runs one call inside the bind's transaction; ``on_commit(events)`` (for example
    ``ReleaseHooks.run``) runs once the events are final: after the commit, never after a
    rollback, at once when the call was its own transaction (an autocommit connection)."""
    outcome = execute_call(bind, call)
    if on_commit is not None:
        if outcome.pending is not None:
            outcome.pending.on_commit(on_commit)
        elif outcome.events:
            on_commit(outcome.events)
    return outcome.result, outcome.events


def settle(bind: Bind) -> None:
    """Settles the events waiting on the bind's connection (see ``service.settle``)."""
    session = _session(bind)
    if isinstance(bind, Connection) or (session is not None and session.in_transaction()):
        service.settle(driver_connection(bind))


def skip_notify(bind: Bind) -> None:
    """Marks the bind's transaction (begun if none was) so the library's calls in it send no
    NOTIFY and it may end with PREPARE TRANSACTION (see ``service.skip_notify``)."""
    service.skip_notify(driver_connection(bind))


def _watch(session: Session, driver: psycopg.Connection[Any], pending: Pending) -> None:
    watched: list[tuple[psycopg.Connection[Any], Pending, SessionTransaction | None]]
    watched = session.info.setdefault(_WATCHED, [])
    watched.append((driver, pending, session.get_nested_transaction()))
    if not event.contains(session, "after_commit", _after_commit):
        event.listen(session, "after_commit", _after_commit)
        event.listen(session, "after_soft_rollback", _after_soft_rollback)


def _ended(driver: psycopg.Connection[Any]) -> bool:
    """True once the database transaction itself has ended (not a savepoint of it)."""
    return driver.closed or driver.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


def _after_commit(session: Session) -> None:
    watched = session.info.get(_WATCHED, [])
    done = [w for w in watched if _ended(w[0])]
    session.info[_WATCHED] = [w for w in watched if w not in done]
    for _, pending, _nested in done:
        for callback in pending.settle(committed=True):
            try:
                callback(pending.events)
            except Exception:
                calls.logger.exception("[EVENT] after-commit callback %r failed", callback)


def _within(nested: SessionTransaction | None, rolled_back: SessionTransaction) -> bool:
    """True when a call made in ``nested`` is undone by rolling back ``rolled_back``."""
    while nested is not None:
        if nested is rolled_back:
            return True
        nested = nested.parent
    return False


def _after_soft_rollback(session: Session, previous_transaction: SessionTransaction) -> None:
    watched = session.info.get(_WATCHED, [])
    # The whole transaction, or the begin_nested() savepoint a call was made in, rolled back.
    dropped = [w for w in watched if _ended(w[0]) or _within(w[2], previous_transaction)]
    session.info[_WATCHED] = [w for w in watched if w not in dropped]
    for _, pending, _nested in dropped:
        pending.settle(committed=False)


# -- the web-app calls -------------------------------------------------------------------------


def create_run(
    bind: Bind, business_id: int, jobs: Sequence[Any] = (), *, on_commit: Callback | None = None
) -> Run:
    """``service.create_run`` inside the bind's transaction."""
    return execute(bind, calls.create_run(business_id, jobs), on_commit)[0]


def get_active_run(
    bind: Bind,
    business_id: int,
    stale_after: timedelta | None = None,
    *,
    on_commit: Callback | None = None,
) -> Run | None:
    """``service.get_active_run`` inside the bind's transaction."""
    return execute(bind, calls.get_active_run(business_id, stale_after), on_commit)[0]


def request_cancel(
    bind: Bind, run_id: int, business_id: int | None = None, *, on_commit: Callback | None = None
) -> CancelResult:
    """``service.request_cancel`` inside the bind's transaction."""
    return execute(bind, calls.request_cancel(run_id, business_id), on_commit)[0]


def force_cancel(
    bind: Bind, run_id: int, business_id: int | None = None, *, on_commit: Callback | None = None
) -> CancelResult:
    """``service.force_cancel`` inside the bind's transaction."""
    return execute(bind, calls.force_cancel(run_id, business_id), on_commit)[0]


# -- the web adapters' connection source -------------------------------------------------------


def unit_of_work(session: Session | scoped_session[Any]) -> UnitOfWork:
    """A connection source for ``create_blueprint``: each request's call runs in the app's
    session (its current one, for a scoped_session), which is committed at the end of the
    call's block, or rolled back if it raised. The release hooks run on that commit."""

    @contextlib.contextmanager
    def open_unit() -> Iterator[Session]:
        current = _session(session)
        assert current is not None
        try:
            yield current
            current.commit()
        except BaseException:
            current.rollback()
            raise

    return UnitOfWork(open_unit, execute_call)
