"""Granting roles and handing the app tables over: the DBA's SQL functions of
``sql/14_privileges.sql``, called on a psycopg connection of a role that may grant (the schema's
owner or a superuser). The CLI's ``grant-app-role`` and ``handover`` use these.

Both surface what PostgreSQL warned: ``grant_app_role(..., allow_table_owner=True)`` for a role
that owns the tables grants anyway and warns ``UNSAFE grant_app_role(...)``; the warning is
returned and logged with the ``[SECURITY]`` tag, never swallowed. See docs/security.md,
"Who owns the tables".
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import psycopg
from psycopg import errors as pg_errors

from .errors import from_psycopg

__all__ = ["HandedOver", "grant_app_role", "grant_dba_role", "hand_over_tables"]

logger = logging.getLogger("outbound_heartbeat.admin")

#: The default owner hand_over_tables() gives the tables: the API's own role.
DEFAULT_OWNER_ROLE = "outbound_heartbeat_owner"


@dataclass(frozen=True)
class HandedOver:
    """One thing the handover changed: an object given to ``to_owner``, or (``to_owner`` None)
    a membership of the app role revoked."""

    moved: str
    from_owner: str
    to_owner: str | None


def _call(
    conn: psycopg.Connection[Any], query: str, params: dict[str, Any]
) -> tuple[list[Any], list[str]]:
    warnings: list[str] = []

    def on_notice(diag: pg_errors.Diagnostic) -> None:
        if diag.severity_nonlocalized == "WARNING" and diag.message_primary:
            warnings.append(diag.message_primary)
            logger.warning("[SECURITY] %s", diag.message_primary)

    conn.add_notice_handler(on_notice)
    try:
        # Its own transaction, or a savepoint of the caller's: all or nothing, the caller's
        # transaction left open.
        with conn.transaction():
            rows = conn.execute(query.encode(), params).fetchall()
    except psycopg.Error as exc:
        mapped = from_psycopg(exc)
        if mapped is not None:
            raise mapped from exc
        raise
    finally:
        conn.remove_notice_handler(on_notice)
    return rows, warnings


def grant_app_role(conn: psycopg.Connection[Any], role: str, *, legacy: bool = False,
                   allow_table_owner: bool = False) -> list[str]:
    """``outbound_heartbeat.grant_app_role``; returns the warnings (``UNSAFE ...`` when
    ``allow_table_owner`` let a table-owning role through). InvalidArgument (``OH400``, argument
    ``role_name``) when the role owns the tables or can SET ROLE to their owner and
    ``allow_table_owner`` is false."""
    _, warnings = _call(
        conn,
        "SELECT outbound_heartbeat.grant_app_role(%(role)s, %(legacy)s, %(allow)s)",
        {"role": role, "legacy": legacy, "allow": allow_table_owner},
    )
    return warnings


def grant_dba_role(
    conn: psycopg.Connection[Any], role: str, *, allow_table_owner: bool = False
) -> list[str]:
    """``outbound_heartbeat.grant_dba_role``; the same refusal and warnings as grant_app_role."""
    _, warnings = _call(
        conn,
        "SELECT outbound_heartbeat.grant_dba_role(%(role)s, %(allow)s)",
        {"role": role, "allow": allow_table_owner},
    )
    return warnings


def hand_over_tables(conn: psycopg.Connection[Any], app_role: str, *,
                     owner_role: str = DEFAULT_OWNER_ROLE, legacy: bool = False,
                     lock_timeout: timedelta = timedelta(milliseconds=500),
                     attempts: int = 10) -> tuple[list[HandedOver], list[str]]:
    """``outbound_heartbeat.hand_over_tables``: what moved (empty when it already had) and the
    warnings. One transaction (a savepoint inside the caller's): all of it or nothing."""
    rows, warnings = _call(
        conn,
        "SELECT moved, from_owner, to_owner FROM outbound_heartbeat.hand_over_tables("
        "%(app)s, %(owner)s, %(legacy)s, %(lock_timeout)s, %(attempts)s)",
        {"app": app_role, "owner": owner_role, "legacy": legacy, "lock_timeout": lock_timeout,
         "attempts": attempts},
    )
    return [HandedOver(*row) for row in rows], warnings
