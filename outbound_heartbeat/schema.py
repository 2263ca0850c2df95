"""Installing and upgrading the database side: the yoyo migrations, which read ``sql/``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

from psycopg.conninfo import conninfo_to_dict

from .upgrade import LockPolicy, LockWait, collect_waits, collected_warnings

__all__ = [
    "MIGRATION_TABLE",
    "MigrationReport",
    "libpq_dsn",
    "migrate",
    "migrations_dir",
    "rollback",
    "sql_dir",
    "sql_files",
    "status",
    "yoyo_url",
]


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
    #: What the ``sql/`` files repaired and say so (e.g. a counting trigger found disabled:
    #: re-installed, counters recounted), one line each.
    warnings: list[str] = field(default_factory=list)


def _backend_and_migrations(dsn: str):  # type: ignore[no-untyped-def]
    from yoyo import get_backend, read_migrations

    backend = get_backend(yoyo_url(dsn), migration_table=MIGRATION_TABLE)
    return backend, read_migrations(str(migrations_dir()))


def migrate(dsn: str, policy: LockPolicy | None = None) -> MigrationReport:
    """Applies every pending migration (the same files ``yoyo apply`` uses); idempotent.

    Online: each lock is attempted for ``policy.lock_timeout`` and retried (see
    :mod:`outbound_heartbeat.upgrade`); the report lists every wait. Raises
    :class:`~outbound_heartbeat.upgrade.MigrationBlocked` when the attempts run out."""
    backend, migrations = _backend_and_migrations(dsn)
    try:
        with backend.lock(), collect_waits(policy) as waits:
            todo = backend.to_apply(migrations)
            backend.apply_migrations(todo)
            warned = collected_warnings()
        return MigrationReport([m.id for m in todo], [], [], list(waits), warned)
    finally:
        backend.connection.close()


def rollback(dsn: str, count: int = 1) -> MigrationReport:
    """Rolls back the newest ``count`` applied migrations (the API; tables and rows stay)."""
    backend, migrations = _backend_and_migrations(dsn)
    try:
        with backend.lock():
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
