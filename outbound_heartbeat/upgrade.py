"""Applying ``sql/`` online, while the app runs: what every migration step calls.

Each ``sql/`` file runs in its own short transaction with a short ``lock_timeout``: when a lock
is not granted in time (an app transaction holds the table), the attempt is rolled back at once,
so the app's statements queued behind it run again, and it is retried after a growing pause, a
bounded number of times. Every failed attempt is reported (what it waited for, how long, which
sessions held the lock); when the attempts are used up, :class:`MigrationBlocked` says so and
names those sessions. The files are idempotent, so a file rolled back and retried, or a run
stopped half way and started again, ends in the same state.

Indexes missing on the app's tables are not built inside those transactions (a plain
``CREATE INDEX`` blocks writes for the whole build on a big legacy table): ``sql/02_tables.sql``
lists them when asked and they are built here with ``CREATE INDEX CONCURRENTLY`` afterwards,
which blocks neither reads nor writes. This module owns that exchange, the only data passed
between ``sql/`` and Python through custom settings, both transaction-local
(:data:`DEFER_INDEXES_SETTING`, :data:`DEFERRED_INDEXES_SETTING`). That is why the
migrations are non-transactional yoyo migrations (``__transactional__ = False``): yoyo then hands
the step an autocommit connection, and the transactions are the ones opened here.
"""

from __future__ import annotations

import contextvars
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from psycopg import errors, sql

__all__ = [
    "ATTEMPTS_ENV",
    "LOCK_TIMEOUT_ENV",
    "LockPolicy",
    "LockWait",
    "MigrationBlocked",
    "apply_release_online",
    "apply_sql_online",
    "collect_waits",
    "collected_warnings",
]

logger = logging.getLogger("outbound_heartbeat.migrations")

#: Environment overrides for ``yoyo apply`` (``migrate()`` and the CLI take arguments).
LOCK_TIMEOUT_ENV = "OUTBOUND_HEARTBEAT_MIGRATE_LOCK_TIMEOUT"
ATTEMPTS_ENV = "OUTBOUND_HEARTBEAT_MIGRATE_ATTEMPTS"

T = TypeVar("T")

#: Set to ``on`` for each file's transaction: ``sql/02_tables.sql`` then lists a missing index in
#: :data:`DEFERRED_INDEXES_SETTING` instead of building it (unset, as when a file is run by hand,
#: it builds it at once).
DEFER_INDEXES_SETTING = "outbound_heartbeat.defer_indexes"
#: What ``sql/02_tables.sql`` appends per deferred index: one line ``name<TAB>statement``, the
#: statement a ``CREATE INDEX CONCURRENTLY`` naming every object and operator with its schema.
DEFERRED_INDEXES_SETTING = "outbound_heartbeat.deferred_indexes"
# Both names are also read by the released migrations' frozen 02_tables.sql (migrations/frozen/,
# releases 3 onwards), which never change: renamed here, their indexes would be built inside the
# file's transaction, blocking the app's writes for the build.


@dataclass(frozen=True)
class LockPolicy:
    """How long one lock attempt may wait, how many attempts, and the pauses between them."""

    #: Seconds one attempt waits for a lock: the longest an app statement can queue behind it.
    lock_timeout: float = 0.5
    attempts: int = 10
    first_pause: float = 0.2
    max_pause: float = 5.0
    #: Seconds a concurrent index build waits for older transactions (it blocks nobody).
    index_lock_timeout: float = 10.0
    #: Seconds migrate() waits for another live migration's lock (yoyo's lock row).
    migration_lock_wait: float = 10.0

    def __post_init__(self) -> None:
        if not 0 < self.lock_timeout <= 3600:
            raise ValueError("lock_timeout must be between 0 and 3600 seconds")
        if not 1 <= self.attempts <= 1000:
            raise ValueError("attempts must be between 1 and 1000")

    @classmethod
    def from_environment(cls) -> LockPolicy:
        kwargs: dict[str, Any] = {}
        if value := os.environ.get(LOCK_TIMEOUT_ENV):
            kwargs["lock_timeout"] = float(value)
        if value := os.environ.get(ATTEMPTS_ENV):
            kwargs["attempts"] = int(value)
        return cls(**kwargs)


@dataclass(frozen=True)
class LockWait:
    """One lock attempt that gave up: what it was applying, how long it waited, who held it."""

    step: str
    attempt: int
    waited: float
    holders: str

    def __str__(self) -> str:
        return (f"{self.step}: lock attempt {self.attempt} gave up after {self.waited:.2f} s;"
                f" held by {self.holders}")


class MigrationBlocked(RuntimeError):
    """Every lock attempt of one step timed out; nothing of that step was changed."""

    def __init__(self, step: str, waits: list[LockWait], policy: LockPolicy) -> None:
        holders = waits[-1].holders if waits else "unknown sessions"
        super().__init__(
            f"migration stopped at {step}: {len(waits)} lock attempts of {policy.lock_timeout:g} s"
            f" each timed out (waited {sum(w.waited for w in waits):.1f} s in all); the lock is"
            f" held by {holders}. Nothing of {step} was changed: end that session"
            " (pg_terminate_backend(pid)) or run the migration again later."
        )
        self.step = step
        self.waits = waits


_collected: contextvars.ContextVar[list[LockWait] | None] = contextvars.ContextVar(
    "outbound_heartbeat_lock_waits", default=None
)


_policy: contextvars.ContextVar[LockPolicy | None] = contextvars.ContextVar(
    "outbound_heartbeat_lock_policy", default=None
)

_warnings: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar(
    "outbound_heartbeat_migration_warnings", default=None
)


def collected_warnings() -> list[str]:
    """The WARNINGs the ``sql/`` files raised (class ``OH``: e.g. a counting trigger found
    disabled, re-installed and recounted) in the current :func:`collect_waits` block."""
    return list(_warnings.get() or [])


@contextmanager
def collect_waits(policy: LockPolicy | None = None) -> Iterator[list[LockWait]]:
    """Collects the lock waits of the migration steps run inside the block, which apply
    ``policy`` (``migrate()`` uses it around yoyo)."""
    waits: list[LockWait] = []
    token = _collected.set(waits)
    policy_token = _policy.set(policy)
    warnings_token = _warnings.set([])
    try:
        yield waits
    finally:
        _warnings.reset(warnings_token)
        _policy.reset(policy_token)
        _collected.reset(token)


_HOLDERS = """
SELECT pg_catalog.string_agg(DISTINCT pg_catalog.format('pid %s (%s since %s: %s)', a.pid, a.state,
           pg_catalog.date_trunc('second', a.xact_start),
           pg_catalog.left(pg_catalog.regexp_replace(a.query, '\\s+', ' ', 'g'), 80)), '; ')
  FROM pg_catalog.pg_locks AS l
  JOIN pg_catalog.pg_class AS c ON c.oid = l.relation
  JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace
  JOIN pg_catalog.pg_stat_activity AS a ON a.pid = l.pid
 WHERE l.granted AND l.pid <> pg_catalog.pg_backend_pid()
   AND l.database = (SELECT d.oid FROM pg_catalog.pg_database AS d
                      WHERE d.datname = pg_catalog.current_database())
   AND (n.nspname = 'outbound_heartbeat'
        OR (n.nspname = 'public' AND c.relname LIKE 'outbound\\_call\\_%'))
"""


def _holders(conn: psycopg.Connection[Any]) -> str:
    try:
        row = conn.execute(_HOLDERS, prepare=False).fetchone()
    except psycopg.Error:
        return "unknown sessions"
    return str(row[0]) if row and row[0] else "sessions that have since let go"


def _with_retries(conn: psycopg.Connection[Any], step: str, policy: LockPolicy,
                  attempt_once: Callable[[], T], reported: list[LockWait]) -> T:
    waits: list[LockWait] = []
    pause = policy.first_pause
    for attempt in range(1, policy.attempts + 1):
        started = time.monotonic()
        try:
            return attempt_once()
        except (errors.LockNotAvailable, _LockWaitTooLong):
            wait = LockWait(step, attempt, time.monotonic() - started, _holders(conn))
            waits.append(wait)
            reported.append(wait)
            if (collected := _collected.get()) is not None:
                collected.append(wait)
            logger.warning("[MIGRATION] %s", wait)
            if attempt == policy.attempts:
                raise MigrationBlocked(step, waits, policy) from None
            time.sleep(pause)
            pause = min(pause * 2, policy.max_pause)
    raise AssertionError("unreachable")  # pragma: no cover


def _milliseconds(seconds: float) -> str:
    return str(max(1, round(seconds * 1000)))


def _apply_file(
    conn: psycopg.Connection[Any], path: Path, policy: LockPolicy
) -> list[tuple[str, str]]:
    warned: list[str] = []

    def on_notice(diagnostic: psycopg.errors.Diagnostic) -> None:
        ours = (diagnostic.sqlstate or "").startswith("OH")
        if ours and diagnostic.severity_nonlocalized == "WARNING":
            warned.append(str(diagnostic.message_primary))

    conn.add_notice_handler(on_notice)
    try:
        deferred = _apply_file_once(conn, path, policy)
    finally:
        conn.remove_notice_handler(on_notice)
    # Reported once the file committed (an attempt rolled back by a lock timeout said nothing).
    for message in warned:
        logger.warning("[MIGRATION] %s: %s", path.name, message)
        if (collected := _warnings.get()) is not None:
            collected.append(f"{path.name}: {message}")
    return deferred


def _apply_file_once(
    conn: psycopg.Connection[Any], path: Path, policy: LockPolicy
) -> list[tuple[str, str]]:
    with conn.transaction():
        # prepare=False here and below: yoyo gives each migration a new connection of its own
        # (prepare_threshold at psycopg's default), and through a transaction pooler a statement
        # it prepared stays on a server session the next migration's connection may get.
        conn.execute(
            "SELECT pg_catalog.set_config('lock_timeout', %s, true),"
            " pg_catalog.set_config('client_min_messages', 'warning', true),"
            # Nothing the files name may resolve through a schema a non-superuser can write.
            " pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true),"
            # The files' LIKE patterns ('\_%') mean what they say whatever the migrating
            # session's standard_conforming_strings.
            " pg_catalog.set_config('standard_conforming_strings', 'on', true),"
            " pg_catalog.set_config(%s, 'on', true),"
            " pg_catalog.set_config(%s, '', true)",
            (_milliseconds(policy.lock_timeout), DEFER_INDEXES_SETTING, DEFERRED_INDEXES_SETTING),
            prepare=False,
        )
        conn.execute(path.read_bytes())
        row = conn.execute("SELECT pg_catalog.current_setting(%s, true)",
                           (DEFERRED_INDEXES_SETTING,), prepare=False).fetchone()
    deferred: list[tuple[str, str]] = []
    for line in str(row[0] if row else "").splitlines():
        name, _, statement = line.partition("\t")
        deferred.append((name, statement))
    return deferred


class _LockWaitTooLong(Exception):
    """A CONCURRENTLY statement waited on locks past ``index_lock_timeout`` and was cancelled."""


def _run_concurrently(conn: psycopg.Connection[Any], statement: str, limit: float) -> None:
    # No session setting (a session-level SET lock_timeout would stay on the server connection
    # a transaction pooler hands to other clients), so lock_timeout is enforced from outside:
    # a watcher on its own connection cancels the statement once it has waited on locks for
    # `limit` seconds in a row. Building the index itself is never cut short.
    tag = f"/* outbound_heartbeat migration {uuid.uuid4().hex} */ "
    done = threading.Event()
    cancelled = threading.Event()

    def watch() -> None:
        try:
            with psycopg.connect(conn.info.dsn, password=conn.info.password, autocommit=True,
                                 prepare_threshold=None,
                                 application_name="outbound_heartbeat migration watcher") as w:
                waiting_since: float | None = None
                while not done.wait(0.1):
                    row = w.execute(
                        "SELECT a.pid, a.wait_event_type IS NOT DISTINCT FROM 'Lock'"
                        "  FROM pg_catalog.pg_stat_activity AS a"
                        " WHERE pg_catalog.left(a.query, %s) OPERATOR(pg_catalog.=) %s"
                        "   AND a.pid OPERATOR(pg_catalog.<>) pg_catalog.pg_backend_pid()"
                        "   AND a.state OPERATOR(pg_catalog.=) 'active'",
                        (len(tag), tag)).fetchone()
                    if row is None or not row[1]:
                        waiting_since = None
                        continue
                    now = time.monotonic()
                    waiting_since = now if waiting_since is None else waiting_since
                    if now - waiting_since >= limit:
                        # Only while that backend still runs this statement (through a pooler
                        # it serves other clients afterwards).
                        cancelled.set()
                        w.execute(
                            "SELECT pg_catalog.pg_cancel_backend(a.pid)"
                            "  FROM pg_catalog.pg_stat_activity AS a"
                            " WHERE a.pid OPERATOR(pg_catalog.=) %s"
                            "   AND pg_catalog.left(a.query, %s) OPERATOR(pg_catalog.=) %s"
                            "   AND a.state OPERATOR(pg_catalog.=) 'active'",
                            (row[0], len(tag), tag))
                        return
        except psycopg.Error as exc:  # the statement still runs, only unbounded
            logger.warning("[MIGRATION] cannot watch the lock waits of %s: %s", statement, exc)

    watcher = threading.Thread(target=watch, name="outbound_heartbeat-index-watch", daemon=True)
    watcher.start()
    try:
        conn.execute((tag + statement).encode())
    except errors.QueryCanceled:
        if cancelled.is_set():
            raise _LockWaitTooLong(statement) from None
        raise
    finally:
        done.set()
        watcher.join()


def _build_index(
    conn: psycopg.Connection[Any], name: str, statement: str, policy: LockPolicy
) -> None:
    # CONCURRENTLY: outside any transaction; a build that timed out leaves an invalid index,
    # dropped (concurrently too) before the next attempt. The statements name every object
    # and operator with its schema (sql/02_tables.sql), so they depend on no search_path.
    row = conn.execute(
        "SELECT i.indisvalid FROM pg_catalog.pg_index AS i"
        " WHERE i.indexrelid OPERATOR(pg_catalog.=) pg_catalog.to_regclass(%s)",
        (f"public.{name}",), prepare=False
    ).fetchone()
    if row is not None and row[0]:
        return  # built meanwhile (another migrator)
    if row is not None:
        _run_concurrently(conn, sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(
            sql.Identifier("public", name)).as_string(conn), policy.index_lock_timeout)
    _run_concurrently(conn, statement, policy.index_lock_timeout)


def apply_sql_online(conn: psycopg.Connection[Any], sql_dir: Path,
                     policy: LockPolicy | None = None,
                     index_statements: dict[str, str] | None = None) -> list[LockWait]:
    """Applies every ``sql/`` file online (see the module's docstring); returns the waits.

    ``conn`` must be in autocommit mode and outside a transaction (a non-transactional yoyo
    migration's connection is). ``index_statements`` replaces, by index name, the statement a
    file lists for a deferred index: an earlier release's frozen files list some whose
    operators are not qualified, and a deferred build runs under the session's search_path."""
    if not conn.autocommit or conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        raise ValueError("apply_sql_online needs an autocommit connection outside a transaction:"
                         " each file gets its own short transaction")
    policy = policy or _policy.get() or LockPolicy.from_environment()
    waits: list[LockWait] = []
    deferred: list[tuple[str, str]] = []
    for path in sorted(sql_dir.glob("*.sql")):
        deferred += _with_retries(conn, path.name, policy,
                                  lambda p=path: _apply_file(conn, p, policy), waits)  # type: ignore[misc]
    replaced = index_statements or {}
    for name, statement in deferred:
        statement = replaced.get(name, statement)
        _with_retries(conn, f"index {name} (concurrently)", policy,
                      lambda n=name, s=statement: _build_index(conn, n, s, policy), waits)  # type: ignore[misc]
    while _with_retries(conn, "orphaned calls (adoption)", policy,
                        lambda: _adopt_orphaned_calls(conn, policy), waits):
        pass
    return waits


#: Legacy jobs adopted as orphaned calls per transaction: each holds its rows a moment only.
ADOPTION_BATCH = 1000


def _adopt_orphaned_calls(conn: psycopg.Connection[Any], policy: LockPolicy) -> bool:
    # In-progress jobs of runs that ended before calls were tracked (sql/15_calls.sql), one
    # short transaction per batch; rows an app transaction holds are skipped (SKIP LOCKED).
    # True while a batch found work, so the caller asks again. An earlier release's frozen SQL
    # has no such function: nothing to adopt yet (the newest migration's pass does it).
    with conn.transaction():
        known = conn.execute("SELECT pg_catalog.to_regprocedure("
                             "'outbound_heartbeat._adopt_orphaned_calls(integer)') IS NOT NULL"
                             ).fetchone()
        if not (known and known[0]):
            return False
        conn.execute("SELECT pg_catalog.set_config('lock_timeout', %s, true)",
                     (_milliseconds(policy.lock_timeout),))
        row = conn.execute("SELECT outbound_heartbeat._adopt_orphaned_calls(%s)",
                           (ADOPTION_BATCH,)).fetchone()
    return bool(row and row[0])


def apply_release_online(conn: psycopg.Connection[Any], release_dir: Path,
                         index_statements: dict[str, str] | None = None) -> list[LockWait]:
    """What a released migration does: applies its release's frozen SQL (``release_dir``) with
    :func:`apply_sql_online`, to a database where the library is installed (an upgrade). Where
    it is not (a fresh install or the adoption of an app's tables), it does nothing: the newest
    migration, which applies the live ``sql/``, installs the newest schema at once, and no
    earlier release's SQL runs there."""
    row = conn.execute("SELECT pg_catalog.to_regnamespace('outbound_heartbeat') IS NOT NULL",
                       prepare=False).fetchone()
    if not (row and row[0]):
        logger.info("[MIGRATION] %s: nothing installed yet, left to the newest migration",
                    release_dir.name)
        return []
    return apply_sql_online(conn, release_dir, index_statements=index_statements)
