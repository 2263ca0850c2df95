"""Installing and upgrading the database side: the yoyo migrations, which apply each earlier
release's frozen SQL (``migrations/frozen/``) on upgrades and the live ``sql/`` last."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from .errors import from_psycopg
from .upgrade import LockPolicy, LockWait, collect_waits, collected_warnings

__all__ = [
    "MIGRATION_TABLE",
    "MigrationLocked",
    "MigrationReport",
    "break_lock",
    "check_install",
    "libpq_dsn",
    "migrate",
    "migrations_dir",
    "rollback",
    "sql_dir",
    "sql_files",
    "status",
    "yoyo_url",
]


logger = logging.getLogger("outbound_heartbeat.migrations")

_HERE = Path(__file__).resolve().parent

#: yoyo's bookkeeping table, also named in yoyo.ini, so both tools see the same history.
MIGRATION_TABLE = "_yoyo_migration"


def _resource_dir(name: str) -> Path:
    # Inside an installed wheel the folders sit in the package; in a checkout, beside it.
    for candidate in (_HERE / name, _HERE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"outbound_heartbeat: no {name}/ folder next to {_HERE}")


def sql_dir() -> Path:
    """The folder of SQL files that define the schema (the single source of truth)."""
    return _resource_dir("sql")


def migrations_dir() -> Path:
    """The folder of yoyo migrations."""
    return _resource_dir("migrations")


def sql_files() -> list[Path]:
    """The SQL files in the order they are applied."""
    return sorted(sql_dir().glob("*.sql"))


def libpq_dsn(dsn: str) -> str:
    """A DSN libpq understands: a yoyo/SQLAlchemy-style ``postgresql+psycopg://`` URL loses
    its ``+driver`` part; libpq URLs and ``key=value`` strings are returned as they are."""
    scheme, sep, rest = dsn.partition("://")
    if sep and "+" in scheme and scheme.split("+", 1)[0] in ("postgresql", "postgres"):
        return "postgresql://" + rest
    return dsn


def yoyo_url(dsn: str) -> str:
    """A yoyo database URL (``postgresql+psycopg://``) for a libpq DSN or URL (or a yoyo URL).

    Every connection parameter travels as a query argument, which yoyo hands to
    ``psycopg.connect`` unchanged, so unix sockets, options and passwords all survive.
    """
    params = {k: v for k, v in conninfo_to_dict(libpq_dsn(dsn)).items() if v is not None}
    dbname = params.pop("dbname", "")
    return "postgresql+psycopg:///" + str(dbname) + ("?" + urlencode(params) if params else "")


@dataclass(frozen=True)
class MigrationReport:
    """What a migrate / rollback call did."""

    applied: list[str]
    rolled_back: list[str]
    pending: list[str]
    #: Lock attempts that timed out and were retried (what was waited for, how long, who held it).
    waits: list[LockWait] = field(default_factory=list)
    #: What else happened, e.g. a lock left by a killed migration that was removed.
    notes: list[str] = field(default_factory=list)
    #: What the ``sql/`` files repaired and say so (e.g. a counting trigger found disabled:
    #: re-installed, counters recounted), one line each.
    warnings: list[str] = field(default_factory=list)


#: yoyo's own tables, which its statements name without a schema.
_YOYO_TABLES = ("yoyo_lock", MIGRATION_TABLE, "_yoyo_log", "_yoyo_version")

# yoyo finds its tables through the session's search_path ("$user", public): the tables it
# would write (and every schema searched before public) must belong to the migrating role or a
# superuser and carry no trigger or rule, or a role that could write such a schema would have
# yoyo's bookkeeping run its code with the migrating role's rights.
_BOOKKEEPING = sql.SQL("""
SELECT pg_catalog.string_agg(x.what, '; ' ORDER BY x.what) FROM (
    SELECT pg_catalog.format('schema %%I (owned by %%I, searched before public)', n.nspname,
                             r.rolname) AS what
      FROM pg_catalog.unnest(pg_catalog.current_schemas(false)) AS s (name)
      JOIN pg_catalog.pg_namespace AS n ON n.nspname OPERATOR(pg_catalog.=) s.name
      JOIN pg_catalog.pg_roles AS r ON r.oid OPERATOR(pg_catalog.=) n.nspowner
     WHERE n.nspname OPERATOR(pg_catalog.<>) 'public' AND NOT r.rolsuper
       AND r.rolname OPERATOR(pg_catalog.<>) CURRENT_USER
    UNION ALL
    SELECT pg_catalog.format('table %%s (owned by %%I)', c.oid::pg_catalog.regclass, r.rolname)
      FROM pg_catalog.unnest(%s::pg_catalog.text[]) AS t (name)
      JOIN pg_catalog.pg_class AS c
        ON c.oid OPERATOR(pg_catalog.=) pg_catalog.to_regclass(pg_catalog.quote_ident(t.name))
      JOIN pg_catalog.pg_roles AS r ON r.oid OPERATOR(pg_catalog.=) c.relowner
     WHERE NOT r.rolsuper AND r.rolname OPERATOR(pg_catalog.<>) CURRENT_USER
    UNION ALL
    SELECT pg_catalog.format('trigger %%I on %%s', g.tgname, g.tgrelid::pg_catalog.regclass)
      FROM pg_catalog.unnest(%s::pg_catalog.text[]) AS t (name)
      JOIN pg_catalog.pg_trigger AS g
        ON g.tgrelid OPERATOR(pg_catalog.=) pg_catalog.to_regclass(pg_catalog.quote_ident(t.name))
       AND NOT g.tgisinternal
    UNION ALL
    SELECT pg_catalog.format('rule %%I on %%s', w.rulename, w.ev_class::pg_catalog.regclass)
      FROM pg_catalog.unnest(%s::pg_catalog.text[]) AS t (name)
      JOIN pg_catalog.pg_rewrite AS w
        ON w.ev_class OPERATOR(pg_catalog.=) pg_catalog.to_regclass(pg_catalog.quote_ident(t.name))
) AS x
""")


def _check_bookkeeping(dsn: str) -> None:
    from .errors import UnsafeInstall

    tables = list(_YOYO_TABLES)
    with psycopg.connect(libpq_dsn(dsn), autocommit=True, prepare_threshold=None) as conn:
        row = conn.execute(_BOOKKEEPING, (tables, tables, tables)).fetchone()
    if row and row[0]:
        raise UnsafeInstall(
            f"refusing to migrate: yoyo's bookkeeping would use {row[0]}, which a role other than"
            " the migrating one controls; its code would run with the migrating role's rights."
            " Check them, drop them (yoyo's tables keep only the migration history), and"
            " migrate again")


def _backend_and_migrations(dsn: str, check: bool = True):  # type: ignore[no-untyped-def]
    from yoyo import get_backend, read_migrations

    if check:
        _check_bookkeeping(dsn)
    backend = get_backend(yoyo_url(dsn), migration_table=MIGRATION_TABLE)
    # No prepared statements: through a transaction pooler the next statement may reach a
    # server session that has none (or another client's).
    backend.connection.prepare_threshold = None
    return backend, read_migrations(str(migrations_dir()))


class MigrationLocked(RuntimeError):
    """Another migration holds yoyo's lock (its row in ``yoyo_lock``) and it was not let go in
    time. The message says who holds it and, when that cannot be known to be alive, what to
    run."""


# yoyo's lock is a row of yoyo_lock (locked = 1, ctime, pid) holding the client's process id,
# which says nothing about whether that process still runs. While migrate() holds the lock, the
# row carries instead the negated pid of the server backend that took it and the server's time:
# a row whose backend is gone (or is a newer backend with the same pid) belongs to a migration
# that died, and the next migrate() removes it. A row with a positive pid (yoyo apply, or a
# migrate() that died in the instant before marking it) is never removed automatically.
_HOLDER = sql.SQL("""
SELECT -l.pid, l.ctime,
       EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity AS a
                WHERE a.pid OPERATOR(pg_catalog.=) -l.pid
                  AND a.backend_start OPERATOR(pg_catalog.<=) l.ctime AT TIME ZONE 'UTC')
  FROM {table} AS l
""")


def _lock_table(backend: Any) -> sql.Identifier:
    return sql.Identifier(str(backend.lock_table))


def _lock_holder(backend: Any) -> tuple[int, Any, bool] | None:
    """(pid, since, alive) of the lock row; pid < 0 is a process id, pid > 0 a server backend
    marked by migrate(); ``alive`` only means something for the latter."""
    conn: psycopg.Connection[Any] = backend.connection
    with conn.transaction():
        row = conn.execute(_HOLDER.format(table=_lock_table(backend))).fetchone()
    return None if row is None else (int(row[0]), row[1], bool(row[2]))


def _recover_dead_lock(backend: Any) -> str | None:
    """Removes the lock row of a migrate() whose server backend is gone; says what it did."""
    holder = _lock_holder(backend)
    if holder is None or holder[0] < 0 or holder[2]:
        return None
    conn: psycopg.Connection[Any] = backend.connection
    with conn.transaction():
        conn.execute(sql.SQL("DELETE FROM {} WHERE pid OPERATOR(pg_catalog.=) %s"
                             " AND ctime IS NOT DISTINCT FROM %s").format(_lock_table(backend)),
                     (-holder[0], holder[1]))
    note = (f"removed the migration lock left by a migration whose session (server backend"
            f" {holder[0]}, since {holder[1]:%Y-%m-%d %H:%M:%S} UTC) is gone")
    logger.warning("[MIGRATION] %s", note)
    return note


def _activity(backend: Any, pid: int) -> str:
    conn: psycopg.Connection[Any] = backend.connection
    with conn.transaction():
        row = conn.execute(
            "SELECT pg_catalog.format('; %%s%%s: %%s', a.state,"
            "       COALESCE(', waiting on ' OPERATOR(pg_catalog.||) a.wait_event_type, ''),"
            "       pg_catalog.left(pg_catalog.regexp_replace(a.query, '\\s+', ' ', 'g'), 60))"
            "  FROM pg_catalog.pg_stat_activity AS a WHERE a.pid OPERATOR(pg_catalog.=) %s",
            (pid,)).fetchone()
    return str(row[0]) if row else ""


def _locked_message(backend: Any) -> str:
    holder = _lock_holder(backend)
    if holder is None:
        return "another migration held the migration lock; run the migration again"
    pid, since, alive = holder
    when = f"{since:%Y-%m-%d %H:%M:%S} UTC"
    if pid > 0 and not alive:
        return (f"the migration lock was taken again by a migration whose session (server"
                f" backend {pid}, since {when}) has ended meanwhile: run the migration again")
    if pid > 0:
        return (f"another outbound-heartbeat migrate holds the migration lock (server backend"
                f" {pid}, since {when}{_activity(backend, pid)}) and is still connected: wait"
                " for it to end; if its process was killed (a session outlives it while a"
                " statement runs, and behind a pooler), end that session with SELECT"
                f" pg_terminate_backend({pid}); and migrate again, which removes its lock")
    return (f"the migration lock is held by process {-pid} (since {when}; yoyo apply, or a"
            " migration that was killed): if no migration is running, run: outbound-heartbeat"
            " migrate --break-lock")


@contextmanager
def _migration_lock(backend: Any, wait: float, notes: list[str]) -> Iterator[None]:
    from yoyo.exceptions import LockTimeout

    deadline = time.monotonic() + wait
    while True:
        # A killed migration's server session may take a moment to end (it finishes a lock
        # wait first): looked at again at every poll.
        if note := _recover_dead_lock(backend):
            notes.append(note)
        try:
            lock = backend.lock(max(0.05, min(0.5, deadline - time.monotonic())))
            lock.__enter__()
            break
        except LockTimeout:
            if time.monotonic() >= deadline:
                raise MigrationLocked(_locked_message(backend)) from None
    conn: psycopg.Connection[Any] = backend.connection
    table = _lock_table(backend)
    marked: list[int] = []
    try:
        with conn.transaction():
            row = conn.execute(sql.SQL("UPDATE {} SET pid = -pg_catalog.pg_backend_pid(),"
                                       " ctime = pg_catalog.now() AT TIME ZONE 'UTC'"
                                       " WHERE pid OPERATOR(pg_catalog.=) %s RETURNING pid"
                                       ).format(table), (os.getpid(),)).fetchone()
            marked += [row[0]] if row else []
        yield
    finally:
        try:  # the row deleted by the value marked (a pooler may give the next statement
            # another server session), in one statement: handing it back to yoyo's release
            # first left, when an outage cut the release, a row naming this live process,
            # which no later migrate could tell from a running `yoyo apply`
            with conn.transaction():
                conn.execute(sql.SQL("DELETE FROM {} WHERE pid OPERATOR(pg_catalog.=) ANY (%s)"
                                     ).format(table), (marked,))
        finally:
            lock.__exit__(None, None, None)


def check_install(conn: psycopg.Connection[Any]) -> None:
    """Runs ``sql/00_preflight.sql`` (in its own transaction, search_path pinned): raises
    ``OHS01`` when a library object of an earlier install captured foreign code. ``conn``
    must be outside a transaction."""
    with conn.transaction():
        conn.execute("SELECT pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true)")
        conn.execute((sql_dir() / "00_preflight.sql").read_bytes())


def migrate(dsn: str, policy: LockPolicy | None = None) -> MigrationReport:
    """Applies every pending migration (the same files ``yoyo apply`` uses); idempotent.

    Online: each lock is attempted for ``policy.lock_timeout`` and retried (see
    :mod:`outbound_heartbeat.upgrade`); the report lists every wait. Raises
    :class:`~outbound_heartbeat.upgrade.MigrationBlocked` when the attempts run out,
    :class:`MigrationLocked` when another migration holds the lock, and
    :class:`~outbound_heartbeat.errors.UnsafeInstall` (before anything is changed) when a
    library object of an earlier install captured an operator or function from a schema a
    non-superuser could write. A lock left by a migration whose session is gone (the process
    was killed) is removed first."""
    wait = (policy or LockPolicy.from_environment()).migration_lock_wait
    backend, migrations = _backend_and_migrations(dsn)
    try:
        notes: list[str] = []
        with _migration_lock(backend, wait, notes), collect_waits(policy) as waits:
            check_install(backend.connection)
            todo = backend.to_apply(migrations)
            backend.apply_migrations(todo)
            warned = collected_warnings()
        return MigrationReport([m.id for m in todo], [], [], list(waits), notes, warned)
    except psycopg.Error as exc:
        mapped = from_psycopg(exc)
        if mapped is None:
            raise
        raise mapped from exc
    finally:
        backend.connection.close()


def break_lock(dsn: str) -> str:
    """Removes yoyo's migration lock row (what ``yoyo break-lock`` does) and says whose it was.
    Only for a lock whose migration is known to be gone, such as one a killed ``yoyo apply``
    left: migrate() itself removes the lock of a migrate() whose server session has ended."""
    backend, _ = _backend_and_migrations(dsn)
    try:
        holder = _lock_holder(backend)
        if holder is None:
            return "no migration lock was held"
        pid, since, alive = holder
        backend.break_lock()
        if pid > 0:
            what = (f"an outbound-heartbeat migrate (server backend {pid},"
                    f" {'still connected' if alive else 'gone'})")
        else:
            what = f"process {-pid}"
        return f"removed the migration lock of {what}, taken {since:%Y-%m-%d %H:%M:%S} UTC"
    finally:
        backend.connection.close()


def rollback(dsn: str, count: int = 1) -> MigrationReport:
    """Rolls back the newest ``count`` applied migrations (the API; tables and rows stay)."""
    backend, migrations = _backend_and_migrations(dsn)
    try:
        with _migration_lock(backend, LockPolicy.from_environment().migration_lock_wait, []):
            todo = backend.to_rollback(migrations)[:count]
            backend.rollback_migrations(todo)
        return MigrationReport([], [m.id for m in todo], [])
    finally:
        backend.connection.close()


def status(dsn: str) -> MigrationReport:
    """Which migrations are applied and which are pending."""
    backend, migrations = _backend_and_migrations(dsn)
    try:
        pending = [m.id for m in backend.to_apply(migrations)]
        applied = [m.id for m in migrations if m.id not in pending]
        return MigrationReport(applied, [], pending)
    finally:
        backend.connection.close()
