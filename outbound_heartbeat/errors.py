"""The exceptions of outbound_heartbeat: one class per SQLSTATE of the OH class, mapped here only.

Each class also carries the HTTP status the web answers with, so the whole
SQLSTATE -> exception -> HTTP status table lives in this module (:data:`BY_SQLSTATE`); the web
core (:mod:`outbound_heartbeat.web`) derives its replies from it and adds only their texts.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import ClassVar

import psycopg

__all__ = [
    "BY_SQLSTATE",
    "AccessDenied",
    "CallNotFound",
    "Error",
    "InvalidArgument",
    "JobNotFound",
    "LeaseLost",
    "NotFound",
    "ReadOnlyServer",
    "RunLocked",
    "RunNotFound",
    "UnsafeInstall",
    "UnsafeTables",
    "from_psycopg",
]


class Error(Exception):
    """Base class of every error outbound_heartbeat raises on purpose."""

    sqlstate: ClassVar[str]
    http_status: ClassVar[int]

    def __init__(self, message: str, *, argument: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        #: The SQL argument the database named (RAISE ... COLUMN), e.g. ``"worker_id"``.
        self.argument = argument


class InvalidArgument(Error):
    """A bad argument (``OH400``); the message names it and nothing was written."""

    sqlstate = "OH400"
    http_status = 400


class AccessDenied(Error):
    """The run belongs to another business (``OH403``)."""

    sqlstate = "OH403"
    http_status = 403


class NotFound(Error):
    """No such run or job (``OH404``)."""

    sqlstate = "OH404"
    http_status = 404


class RunNotFound(NotFound):
    """No run with that id."""


class JobNotFound(NotFound):
    """No job with that id."""


class CallNotFound(NotFound):
    """No call has that key (resolve_call): no such job, or no attempt of it with that key."""


class LeaseLost(Error):
    """The worker's lease is gone: the run was stopped, cancelled or taken over (``OH409``)."""

    sqlstate = "OH409"
    http_status = 409


class RunLocked(Error):
    """Another open transaction held the run row past ``lock_timeout`` (``OH423``)."""

    sqlstate = "OH423"
    http_status = 423


class ReadOnlyServer(Error):
    """The call writes (or stops stale runs) and reached a hot standby or a read-only
    transaction (``OH503``): call the primary. PostgreSQL's own ``25006``
    (read_only_sql_transaction), raised by a write the SQL could not check first (heartbeat()'s
    fast path on a standby), maps here too."""

    sqlstate = "OH503"
    http_status = 503


class UnsafeInstall(Error):
    """The installer refused to go on (``OHS01``): a library index or trigger of an earlier
    install runs an operator or function from a schema a non-superuser could write. The message
    names each object and what it uses; nothing was changed (docs/security.md)."""

    sqlstate = "OHS01"
    http_status = 500


class UnsafeTables(Error):
    """The API refused to run (``OH428``): code on the app tables (a trigger, rule, policy,
    default, constraint or index expression) that a role outside ``outbound_heartbeat_owner``
    could have written would run with the API's rights. The message names it; the fix is in
    docs/security.md ("Who owns the tables"). Nothing was written."""

    sqlstate = "OH428"
    http_status = 500


#: The one error table: each SQLSTATE of ours and its class (which carries its HTTP status).
#: ``RunNotFound`` / ``JobNotFound`` / ``CallNotFound`` are the kinds of ``NotFound`` (OH404),
#: told apart by the argument the error names.
BY_SQLSTATE: Mapping[str, type[Error]] = MappingProxyType({
    cls.sqlstate: cls
    for cls in (InvalidArgument, AccessDenied, NotFound, LeaseLost, RunLocked, UnsafeTables,
                ReadOnlyServer, UnsafeInstall)
})
#: PostgreSQL's read_only_sql_transaction: the same meaning as OH503, without our message.
_READ_ONLY_SQL_TRANSACTION = "25006"


def from_psycopg(exc: psycopg.Error) -> Error | None:
    """The outbound_heartbeat error for a database error, or None when its SQLSTATE is not ours."""
    if exc.sqlstate == _READ_ONLY_SQL_TRANSACTION:
        return ReadOnlyServer(
            "read-only server: this call writes and must run on the primary (the read-write"
            f" server); PostgreSQL said: {exc.diag.message_primary or exc}"
        )
    cls = BY_SQLSTATE.get(exc.sqlstate or "")
    if cls is None:
        return None
    argument = exc.diag.column_name
    if cls is NotFound:
        cls = {"job_id": JobNotFound, "call_key": CallNotFound}.get(argument or "", RunNotFound)
    return cls(exc.diag.message_primary or str(exc), argument=argument)
