"""The operator's command line: ``outbound-heartbeat`` (or ``python -m outbound_heartbeat``).

Every subcommand calls the same SQL functions a DBA calls from psql. The database comes from
``--dsn`` or ``DATABASE_URL``. Exit status: 0 success, 1 an error (one line on stderr), 2 a
usage error (one line on stderr naming the argument: a bad value, a missing ``--dsn``, a flag
without the one it needs); ``health`` follows the Nagios convention: 0 ok, 1 warning, 2
critical, 3 unknown (its usage errors and failures included). Durations: see
:data:`DURATION_SYNTAX`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import socket
import sys
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timedelta
from fractions import Fraction
from typing import Any, NoReturn, TextIO

import psycopg

from . import __version__, admin, prometheus, reconciliation, schema, service, service_async
from .arguments import MAX_BIGINT, MAX_INTEGER
from .compat import hook_problem
from .errors import Error
from .records import ReconcileReport, Run
from .upgrade import LockPolicy, MigrationBlocked

__all__ = [
    "DEFAULT_TIMEOUT",
    "DSN_ENV",
    "DURATION_SYNTAX",
    "MAX_BIGINT",
    "MAX_DURATION",
    "PROG",
    "CommandError",
    "UsageError",
    "build_parser",
    "cmd_cancel",
    "cmd_console",
    "cmd_demo",
    "cmd_events",
    "cmd_grant",
    "cmd_handover",
    "cmd_health",
    "cmd_metrics",
    "cmd_migrate",
    "cmd_prune",
    "cmd_reconcile",
    "cmd_recount",
    "cmd_status",
    "cmd_sweep",
    "duration",
    "int_between",
    "main",
    "non_negative_int",
    "port",
    "positive_int",
]


PROG = "outbound-heartbeat"
DSN_ENV = "DATABASE_URL"

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
HEALTH_OK, HEALTH_WARNING, HEALTH_CRITICAL, HEALTH_UNKNOWN = 0, 1, 2, 3

#: How long a command other than migrate, prune, demo and console waits for the database.
DEFAULT_TIMEOUT = timedelta(seconds=8)
#: The longest duration any threshold accepts (the SQL functions refuse more).
MAX_DURATION = timedelta(days=36525)

_DURATION_PART = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", re.IGNORECASE)
_UNIT_SECONDS = {
    "us": Fraction(1, 1_000_000), "ms": Fraction(1, 1000),
    "s": Fraction(1), "sec": Fraction(1), "secs": Fraction(1), "second": Fraction(1),
    "seconds": Fraction(1),
    "m": Fraction(60), "min": Fraction(60), "mins": Fraction(60), "minute": Fraction(60),
    "minutes": Fraction(60),
    "h": Fraction(3600), "hr": Fraction(3600), "hour": Fraction(3600), "hours": Fraction(3600),
    "d": Fraction(86400), "day": Fraction(86400), "days": Fraction(86400),
    "w": Fraction(604800), "week": Fraction(604800), "weeks": Fraction(604800),
}
DURATION_SYNTAX = "a number and a unit (us, ms, s, min, h, d, w), e.g. 90s, 2min, 1h30min, 1d"


class CommandError(Exception):
    """A failure to report as one line and a non-zero exit status."""


class UsageError(CommandError):
    """Bad input found after parsing (a flag without the one it needs, no database given):
    one line and exit 2 (``health``: 3), as argparse's own usage errors."""


class _Parser(argparse.ArgumentParser):
    """argparse with two corrections: a value that starts with a minus and a digit (``-5s``,
    ``-1.5h``) is a value, never an unknown option (argparse only knows plain negative numbers,
    so ``--alert-after -5s`` said "expected one argument" instead of "must be positive"); and
    a usage error is one line on stderr (the usage summary is in ``--help``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # No option of this CLI starts with a minus and a digit.
        self._negative_number_matcher = re.compile(r"^-\d")

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def duration(text: str) -> timedelta:
    """``90`` (seconds), ``90s``, ``2min``, ``1h30min``, ``1.5h``, ``500ms``, ``1d`` -> a
    positive timedelta of at most 100 years (argparse type). Exact arithmetic: a huge number
    is refused by the cap, never an OverflowError."""
    total = Fraction(0)
    pos = 0
    parts = 0
    while pos < len(text):
        match = _DURATION_PART.match(text, pos)
        if match is None or match.end() == pos:
            break
        unit = match.group(2).lower()
        if unit not in _UNIT_SECONDS and not (unit == "" and parts == 0):
            break
        total += Fraction(match.group(1)) * _UNIT_SECONDS.get(unit, Fraction(1))
        parts += 1
        pos = match.end()
        if unit == "":  # a bare number (seconds) stands alone
            break
    if parts == 0 or pos != len(text) or total <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive duration: {DURATION_SYNTAX}")
    if total > MAX_DURATION.total_seconds():
        raise argparse.ArgumentTypeError(f"{text!r} is longer than 100 years")
    return timedelta(microseconds=round(total * 1_000_000))


def int_between(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer from ``low`` to ``high``, refused with both bounds named
    (argparse prefixes the flag: "argument --limit: '0' must be an integer from 1 to 100000")."""

    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(
                f"{text!r} must be an integer from {low} to {high}"
            )
        return value

    parse.__name__ = f"integer from {low} to {high}"
    return parse


#: A positive integer of PostgreSQL's bigint range (ids and counts).
positive_int = int_between(1, MAX_BIGINT)
#: 0 or a positive integer of PostgreSQL's integer range (counts).
non_negative_int = int_between(0, MAX_INTEGER)
#: A TCP port to listen on (0: any free one).
port = int_between(0, 65535)
#: The bounds the SQL functions set: list_events(max_rows), prune_events(batch_size).
EVENTS_LIMIT_MAX = 100_000
PRUNE_BATCH_MAX = 1_000_000


def _age(value: timedelta | None) -> str:
    if value is None:
        return "-"
    seconds = value.total_seconds()
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}min"
    return f"{seconds / 3600:.1f}h"


def _table(out: TextIO, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [list(header)] + [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for row in cells:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n")


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def _print_json(out: TextIO, value: Any) -> None:
    out.write(json.dumps(_jsonable(value), indent=2, sort_keys=True) + "\n")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _connect(args: argparse.Namespace) -> psycopg.Connection[Any]:
    dsn = args.dsn or os.environ.get(DSN_ENV)
    if not dsn:
        raise UsageError(
            f"no database given: pass --dsn 'postgresql://user@host/db' or set {DSN_ENV}"
        )
    wait: timedelta | None = getattr(args, "timeout", None)
    # libpq counts connect_timeout in whole seconds and treats less than 2 as 2.
    connect_timeout = max(2, math.ceil(wait.total_seconds())) if wait is not None else 10
    try:
        return psycopg.connect(
            schema.libpq_dsn(dsn), autocommit=True, connect_timeout=connect_timeout,
            prepare_threshold=None,
        )
    except psycopg.OperationalError as exc:
        raise CommandError(f"cannot connect to the database: {_first_line(exc)}") from exc


@contextlib.contextmanager
def _bounded(args: argparse.Namespace) -> Iterator[psycopg.Connection[Any]]:
    """A connection on which the command's statements, lock waits included, end within
    ``--timeout``: a monitoring check that hangs behind a VACUUM FULL or an open TRUNCATE is
    killed by its scheduler and read as CRITICAL, not UNKNOWN.

    One transaction with transaction-local settings (never a session SET, which a transaction
    pooler would leave on a server connection other clients reuse); ``service.transaction``
    logs the calls' transitions once it commits."""
    limit = f"{max(1, round(args.timeout.total_seconds() * 1000))}ms"
    with _connect(args) as conn:
        try:
            with service.transaction(conn):
                conn.execute(
                    "SELECT pg_catalog.set_config('statement_timeout', %s, true),"
                    " pg_catalog.set_config('lock_timeout', %s, true)",
                    (limit, limit),
                )
                yield conn
        except (psycopg.errors.QueryCanceled, psycopg.errors.LockNotAvailable) as exc:
            raise CommandError(
                f"no answer within --timeout {_age(args.timeout)} ({_first_line(exc)}): another"
                " session holds a lock the command needs (VACUUM FULL, ALTER TABLE, an open"
                " TRUNCATE...) or the server is overloaded"
            ) from exc


def _dsn(args: argparse.Namespace) -> str:
    _connect(args).close()  # the same checks and messages as every other subcommand
    return str(args.dsn or os.environ[DSN_ENV])


# -- subcommands: each returns the exit status ------------------------------------------------


def cmd_migrate(args: argparse.Namespace, out: TextIO) -> int:
    dsn = _dsn(args)
    if args.action == "list":
        report = schema.status(dsn)
        for name in report.applied:
            out.write(f"[applied] {name}\n")
        for name in report.pending:
            out.write(f"[pending] {name}\n")
    elif args.action == "rollback":
        report = schema.rollback(dsn, args.count)
        for name in report.rolled_back:
            out.write(f"rolled back {name}\n")
        if not report.rolled_back:
            out.write("nothing to roll back\n")
    elif args.break_lock:
        out.write(schema.break_lock(dsn) + "\n")
    else:
        policy = LockPolicy(lock_timeout=args.lock_timeout, attempts=args.lock_attempts,
                            migration_lock_wait=args.lock_wait)
        report = schema.migrate(dsn, policy)
        for note in report.notes:
            out.write(f"note: {note}\n")
        for wait in report.waits:
            out.write(f"waited: {wait}\n")
        for warning in report.warnings:
            out.write(f"warning: {warning}\n")
        for name in report.applied:
            out.write(f"applied {name}\n")
        if not report.applied:
            out.write("nothing to apply: the database is up to date\n")
    return EXIT_OK


def _run_rows(runs: Sequence[Run]) -> list[list[Any]]:
    return [
        [
            r.id,
            r.business_id,
            r.status,
            r.locked_by_worker,
            _age(r.heartbeat_age),
            "STALE" if r.stale else "no",
            r.queued_jobs,
            r.in_progress_jobs,
        ]
        for r in runs
    ]


#: Runs with orphaned calls (sql/15_calls.sql), for ``status``: calls no live worker holds.
_ORPHANED_RUNS = (
    "SELECT o.run_id, o.business_id, o.orphaned_calls, o.oldest_orphan_age, o.next_timeout_at"
    " FROM outbound_heartbeat.orphaned_runs AS o ORDER BY o.run_id"
)


def cmd_status(args: argparse.Namespace, out: TextIO) -> int:
    with _bounded(args) as conn:
        runs = service.list_active_runs(conn)
        orphaned = [] if args.json else conn.execute(_ORPHANED_RUNS).fetchall()
    if args.business is not None:
        runs = [r for r in runs if r.business_id == args.business]
        orphaned = [o for o in orphaned if o[1] == args.business]
    if args.json:
        _print_json(out, runs)
    elif not runs:
        out.write("no active runs\n")
    else:
        header = ["run", "business", "status", "worker", "heartbeat", "stale", "queued"]
        _table(out, [*header, "in_progress"], _run_rows(runs))
    if orphaned:
        out.write("orphaned calls (their run ended under them; no callback yet):\n")
        _table(out, ["run", "business", "calls", "oldest", "times_out_at"],
                [[o[0], o[1], o[2], _age(o[3]), o[4]] for o in orphaned])
    return EXIT_OK


def cmd_sweep(args: argparse.Namespace, out: TextIO) -> int:
    if args.on_startup and not args.worker_id:
        raise UsageError("argument --on-startup: needs --worker-id (the worker whose runs to stop)")
    report = None
    if args.hook:  # the provider is asked before call_orphan_timeout fails what it knows
        report = _reconcile(args, _load_hook(args), None, reconciliation.DEFAULT_LIMIT)
    with _bounded(args) as conn:
        reclaimed = service.cleanup_stuck_runs(conn, args.on_startup, args.worker_id)
    _release_slots(args, out)
    if args.json:
        _print_json(out, reclaimed if report is None else
                    {"reconciled": report, "reclaimed": reclaimed})
        return _reconcile_status(args, report)
    if report is not None:
        _write_report(out, report)
    for r in reclaimed:
        out.write(
            f"run {r.run_id} (business {r.business_id}, worker {r.worker_id or '-'}):"
            f" {r.status}, reason {r.reason}, {r.jobs_failed} queued jobs failed\n"
        )
    if not reclaimed:
        out.write("nothing to reclaim\n")
    return _reconcile_status(args, report)


def _load_hook(args: argparse.Namespace) -> Callable[[str], Any]:
    """``--hook MODULE:ATTR``: the hook, or the hook a zero-argument factory returns
    (:func:`outbound_heartbeat.reconciliation.load_hook`)."""
    try:
        return reconciliation.load_hook(args.hook)
    except ValueError as exc:
        raise UsageError(f"argument --hook: {exc}") from exc
    except reconciliation.HookFactoryFailed as exc:
        raise CommandError(f"--hook: {exc}") from exc


def _reconcile(args: argparse.Namespace, hook: Callable[[str], Any], business_id: int | None,
               limit: int) -> ReconcileReport:
    """One reconcile pass, each settlement its own short transaction (never one holding rows
    while the provider is asked); a coroutine-function hook runs on the asyncio service."""
    if hook_problem(hook) is None:
        with _connect(args) as conn:
            return service.reconcile_calls(conn, hook, business_id=business_id, limit=limit)
    dsn = _dsn(args)

    async def run() -> ReconcileReport:
        async with await psycopg.AsyncConnection.connect(
                schema.libpq_dsn(dsn), autocommit=True, prepare_threshold=None) as conn:
            return await service_async.reconcile_calls(conn, hook, business_id=business_id,
                                                       limit=limit)

    return asyncio.run(run())


def _write_report(out: TextIO, report: ReconcileReport) -> None:
    if not report.asked:
        out.write("no orphaned calls to reconcile\n")
        return
    out.write(
        f"asked the provider about {report.asked} orphaned call{'' if report.asked == 1 else 's'}:"
        f" {report.settled} settled, {report.requeued} requeued, {report.already_settled}"
        f" already settled, {report.unknown} unknown (ask again later), {report.hook_errors}"
        f" hook error{'' if report.hook_errors == 1 else 's'}, {report.locked} locked\n"
    )
    for c in report.calls:
        said = f" ({c.outcome}{': ' + c.detail if c.detail else ''})" if c.outcome else ""
        error = f" ({c.detail})" if c.result == "hook_error" and c.detail else ""
        out.write(f"job {c.job_id} (run {c.run_id}, business {c.business_id}):"
                  f" {c.result}{said}{error}\n")


def _reconcile_status(args: argparse.Namespace, report: ReconcileReport | None) -> int:
    """1, with one line on stderr, when the hook failed for any call (the others were still
    asked and settled): a scheduler running the command notices."""
    if report is None or not report.hook_errors:
        return EXIT_OK
    sys.stderr.write(f"{PROG} {args.command}: error: the hook failed for {report.hook_errors}"
                     f" of {report.asked} orphaned calls (each error is in its call's line;"
                     " they stay orphaned)\n")
    return EXIT_ERROR


def cmd_reconcile(args: argparse.Namespace, out: TextIO) -> int:
    """Asks the provider (``--hook``) what became of the orphaned calls and settles them."""
    hook = _load_hook(args)
    report = _reconcile(args, hook, args.business, args.limit)
    if args.json:
        _print_json(out, report)
    else:
        _write_report(out, report)
    return _reconcile_status(args, report)


def _release_slots(args: argparse.Namespace, out: TextIO) -> None:
    """``--release-slots URL``: frees the Redis call slots of every run no longer open (this
    command's, and any other path's), after the command's transaction has committed."""
    if not args.release_slots:
        return
    from .contrib.redis_slots import RedisSlots

    try:
        slots = RedisSlots.from_url(args.release_slots, 1, prefix=args.slots_prefix)
        with _connect(args) as conn:
            freed = slots.release_ended(conn)
    except (ImportError, ValueError, OSError) as exc:
        raise CommandError(f"--release-slots: {_first_line(exc)}") from exc
    except Exception as exc:  # redis-py's errors: the extra may be absent, so no import
        if type(exc).__module__.startswith("redis"):
            raise CommandError(f"--release-slots: {_first_line(exc)}") from exc
        raise
    if not args.json:
        out.write(f"freed {freed} call slot{'' if freed == 1 else 's'} of ended runs\n")


def cmd_prune(args: argparse.Namespace, out: TextIO) -> int:
    # One short transaction per batch (autocommit), so a big backlog never holds one long
    # transaction open; stops when nothing past retention is left or after --max-batches.
    deleted = merged = batches = 0
    done = False
    cutoff = None
    with _connect(args) as conn:
        while not done and batches < args.max_batches:
            result = service.prune_events(conn, args.batch_size, 1)
            deleted += result.events_deleted
            merged += result.counter_rows_merged
            batches += result.batches
            done = result.done
            cutoff = result.cutoff
    summary = {"cutoff": cutoff, "events_deleted": deleted, "batches": batches, "done": done,
               "counter_rows_merged": merged}
    if args.json:
        _print_json(out, summary)
        return EXIT_OK
    out.write(f"deleted {deleted} event{'' if deleted == 1 else 's'} older than {cutoff}"
              f" in {batches} batch{'' if batches == 1 else 'es'}"
              f"{'' if done else ' (more left: run again)'}\n")
    return EXIT_OK


def cmd_recount(args: argparse.Namespace, out: TextIO) -> int:
    """The counters against the tables: ``--check`` lists the drift (exit 1 when any), else
    it is corrected online (``recount_counters()``). A counting trigger that is missing or
    disabled is named first: drift would come back until it is enabled."""
    with _connect(args) as conn:
        triggers = [a for a in service.health_check(conn) if a.check_name == "counting_trigger"]
        call = service.verify_counters if args.check else service.recount_counters
        drift = call(conn)
    if args.json:
        _print_json(out, {"corrected": not args.check, "drift": drift,
                          "trigger_problems": [a.detail for a in triggers]})
        return 1 if args.check and drift else EXIT_OK
    for alert in triggers:
        out.write(f"warning: {alert.detail}\n")
    for d in drift:
        what = f"jobs of run {d.run_id}: {d.status}" if d.counter == "jobs" else f"runs {d.status}"
        if args.check:
            out.write(f"{what}: the counters say {d.kept}, the table has {d.actual}\n")
        else:
            out.write(f"corrected {what} {d.kept} -> {d.actual}\n")
    if not drift:
        out.write("counters exact: nothing to correct\n" if not args.check else "counters exact\n")
    return 1 if args.check and drift else EXIT_OK


def cmd_cancel(args: argparse.Namespace, out: TextIO) -> int:
    force = args.command == "force-cancel"
    with _bounded(args) as conn:
        call = service.force_cancel if force else service.request_cancel
        result = call(conn, args.run_id, args.business)
    if force:
        _release_slots(args, out)
    if args.json:
        _print_json(out, result)
    elif result.previous_status not in ("pending", "running"):
        out.write(
            f"run {result.run_id} was already {result.previous_status}: nothing changed,"
            " 0 jobs cancelled\n"
        )
    elif result.status == "cancelled":
        out.write(
            f"run {result.run_id} (business {result.business_id}): cancelled"
            f" (was {result.previous_status}), {result.jobs_cancelled} jobs cancelled\n"
        )
    else:
        out.write(
            f"run {result.run_id} (business {result.business_id}): cancel requested; its"
            " worker stops at its next heartbeat (use force-cancel if it is dead)\n"
        )
    return EXIT_OK


def cmd_health(args: argparse.Namespace, out: TextIO) -> int:
    with _bounded(args) as conn:
        alert_after = args.alert_after
        if alert_after is None:
            # A run the liveness rule already calls dead is critical, whatever stale_after is.
            row = conn.execute(
                "SELECT stale_after FROM outbound_heartbeat.current_settings()"
            ).fetchone()
            alert_after = row[0] if row is not None else timedelta(seconds=30)
        alerts = service.health_check(conn, alert_after, args.max_stuck)
    critical = sum(a.severity == "critical" for a in alerts)
    warning = sum(a.severity == "warning" for a in alerts)
    code = HEALTH_CRITICAL if critical else HEALTH_WARNING if warning else HEALTH_OK
    label = {HEALTH_OK: "OK", HEALTH_WARNING: "WARNING", HEALTH_CRITICAL: "CRITICAL"}[code]
    if args.json:
        _print_json(out, {"status": label.lower(), "exit_code": code, "alerts": alerts})
        return code
    out.write(f"OUTBOUND_HEARTBEAT {label} - {critical} critical, {warning} warning\n")
    for a in alerts:
        run = f" run {a.run_id}" if a.run_id is not None else ""
        out.write(f"{a.severity.upper()} {a.check_name}{run}: {a.detail}\n")
    return code


def cmd_metrics(args: argparse.Namespace, out: TextIO) -> int:
    with _bounded(args) as conn:
        out.write(prometheus.render(service.metrics(conn)))
    return EXIT_OK


def cmd_events(args: argparse.Namespace, out: TextIO) -> int:
    if args.verify:
        return _verify_events(args, out)
    with _bounded(args) as conn:
        events = service.list_events(conn, args.run, args.business, args.limit)
    events.reverse()  # oldest first: a timeline reads top to bottom
    if args.json:
        _print_json(out, events)
    elif not events:
        out.write("no events\n")
    else:
        rows = [
            [
                e.created_at.isoformat(timespec="milliseconds"),
                e.run_id,
                e.business_id,
                e.event,
                e.worker_id,
                json.dumps(e.detail, sort_keys=True, ensure_ascii=False),
            ]
            for e in events
        ]
        _table(out, ["at (UTC)", "run", "business", "event", "worker", "detail"], rows)
    return EXIT_OK


def _verify_events(args: argparse.Namespace, out: TextIO) -> int:
    """``events --verify``: one line per run whose audit hash chain is broken, exit 1; else 0."""
    with _bounded(args) as conn:
        broken = service.verify_events(conn, args.run)
    if args.json:
        _print_json(out, broken)
    elif not broken:
        out.write("audit trail intact\n")
    else:
        for link in broken:
            out.write(f"run {link.run_id}: event {link.event_id} {link.problem}"
                      f" (expected {link.expected}, found {link.found})\n")
    return 1 if broken else EXIT_OK


def _warn(args: argparse.Namespace, warnings: list[str]) -> None:
    for warning in warnings:
        sys.stderr.write(f"{PROG} {args.command}: WARNING: {warning}\n")


def cmd_grant(args: argparse.Namespace, out: TextIO) -> int:
    """``grant-app-role`` / ``grant-dba-role``: the SQL grant helper; its UNSAFE warning (a role
    that owns the tables, with --allow-table-owner) goes to stderr."""
    with _connect(args) as conn:
        if args.command == "grant-dba-role":
            warnings = admin.grant_dba_role(conn, args.role,
                                            allow_table_owner=args.allow_table_owner)
        else:
            warnings = admin.grant_app_role(conn, args.role, legacy=args.legacy,
                                            allow_table_owner=args.allow_table_owner)
    _warn(args, warnings)
    out.write(f"granted {args.command.removeprefix('grant-')} rights to {args.role}"
              f"{' (UNSAFE: it owns the tables)' if warnings else ''}\n")
    return EXIT_OK


def cmd_handover(args: argparse.Namespace, out: TextIO) -> int:
    """``handover``: hand_over_tables(), online; prints what moved, then the app role's grants."""
    with _connect(args) as conn:
        moved, warnings = admin.hand_over_tables(
            conn, args.app_role, owner_role=args.owner_role, legacy=args.legacy,
            lock_timeout=timedelta(seconds=args.lock_timeout), attempts=args.lock_attempts)
    _warn(args, warnings)
    if args.json:
        _print_json(out, moved)
        return EXIT_OK
    for item in moved:
        if item.to_owner is None:
            out.write(f"revoked {item.moved} from {item.from_owner}\n")
        else:
            out.write(f"{item.moved}: owner {item.from_owner} -> {item.to_owner}\n")
    if not moved:
        out.write(f"nothing to move: {args.app_role} owns none of the tables\n")
    out.write(f"{args.app_role} now holds exactly grant_app_role's rights\n")
    return EXIT_OK


def _os_error(exc: OSError) -> str:
    return os.strerror(exc.errno) if exc.errno else _first_line(exc)


def _check_port_free(host: str, number: int, flag: str) -> None:
    """Refuses, in one line naming the flag, a port another process listens on (or a host
    this machine cannot bind), before any pool or server starts. Exit 1, not 2: the same
    command works once the port is free."""
    if number == 0:
        return
    try:
        with socket.create_server((host, number)):  # SO_REUSEADDR, as the console's server
            pass
    except OSError as exc:
        raise CommandError(f"{flag} {number}: cannot listen on {host}:{number}"
                           f" ({_os_error(exc)}); choose another port,"
                           f" or {flag} 0 for any free one") from exc


def cmd_demo(args: argparse.Namespace, out: TextIO) -> int:
    from . import demo

    if not args.no_console:
        _check_port_free("127.0.0.1", args.console_port, "--console-port")
    try:
        return demo.run(args.dsn, out=out, threshold=args.threshold.total_seconds(),
                        console_port=None if args.no_console else args.console_port,
                        pause=args.pause.total_seconds() if args.pause else 0.0)
    except (demo.DemoFailed, AssertionError) as exc:
        raise CommandError(f"demo failed: {_first_line(exc)}") from exc


CONSOLE_TOKEN_ENV = "OUTBOUND_HEARTBEAT_CONSOLE_TOKEN"


def cmd_console(args: argparse.Namespace, out: TextIO) -> int:
    from .console import new_token, standalone
    from .console.server import TOKEN_RULE, valid_token

    _check_port_free(args.host, args.port, "--port")
    dsn = _dsn(args)
    if args.token:
        token, source = args.token, "--token"
    elif os.environ.get(CONSOLE_TOKEN_ENV):
        token, source = os.environ[CONSOLE_TOKEN_ENV], f"${CONSOLE_TOKEN_ENV}"
    else:
        token, source = new_token(), ""
    if not valid_token(token):
        raise CommandError(f"{source} must be {TOKEN_RULE}")
    try:
        server = standalone(
            dsn, token, read_dsn=args.read_dsn, host=args.host, port=args.port,
            locale=args.locale, listen=not args.no_listen,
            poll_interval=args.poll.total_seconds(), read_only=args.read_only,
        )
    except OSError as exc:  # taken between the check and the bind
        raise CommandError(f"--port {args.port}: cannot listen on {args.host}:{args.port}"
                           f" ({_os_error(exc)})") from exc
    if source:
        # The operator has the token already; stdout is often a log (systemd, a container).
        out.write(f"outbound_heartbeat console on {server.url}/ (token from {source}: open"
                  f" {server.url}/?token=<the token> once)\n")
    else:
        # Generated: printed here once and nowhere else (it is not written to any file).
        out.write(f"outbound_heartbeat console on {server.url}/?token={token}\n")
        out.write(f"(token generated for this run; pass --token or set ${CONSOLE_TOKEN_ENV}"
                  " to choose one, which is then never printed)\n")
    out.flush()
    try:
        server.serve_forever()
    finally:
        server.close()
    return EXIT_OK


# -- parser ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument(
        "--dsn", help=f"libpq URL or key=value DSN of the database (default: ${DSN_ENV})"
    )
    as_json = _Parser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="machine-readable output")
    slots = _Parser(add_help=False)
    slots.add_argument("--release-slots", metavar="REDIS_URL",
                       help="then free the Redis call slots (RedisSlots) of every ended run")
    slots.add_argument("--slots-prefix", default="outbound_heartbeat:slots",
                       help="the RedisSlots key prefix (default outbound_heartbeat:slots)")
    bounded = _Parser(add_help=False)
    bounded.add_argument(
        "--timeout", type=duration, default=DEFAULT_TIMEOUT,
        help="give up (exit 1; health: 3 UNKNOWN) when the database has not answered in this"
        f" long, a lock wait included (default {_age(DEFAULT_TIMEOUT)}, under a monitoring"
        " system's usual 10 s)",
    )

    parser = _Parser(
        prog=PROG,
        description="Operate outbound_heartbeat: migrations, stuck runs, cancels, health, metrics,"
        " retention.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="also log the transitions on stderr"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    def add(name: str, handler: Callable[..., int], help_: str, *parents: Any) -> Any:
        p = sub.add_parser(name, help=help_, description=help_, parents=[common, *parents])
        p.set_defaults(handler=handler)
        return p

    p = add("migrate", cmd_migrate, "apply, list or roll back the migrations (yoyo)")
    p.add_argument("action", nargs="?", choices=["apply", "list", "rollback"], default="apply")
    p.add_argument("--count", type=positive_int, default=1, help="migrations to roll back")
    p.add_argument("--lock-timeout", type=float, default=LockPolicy.lock_timeout,
                   help="seconds one lock attempt may wait, so the longest an app statement"
                   f" queues behind the migration (default {LockPolicy.lock_timeout:g})")
    p.add_argument("--lock-attempts", type=positive_int, default=LockPolicy.attempts,
                   help=f"lock attempts per step before giving up (default {LockPolicy.attempts})")
    p.add_argument("--lock-wait", type=float, default=LockPolicy.migration_lock_wait,
                   help="seconds to wait for another running migration's lock (default"
                   f" {LockPolicy.migration_lock_wait:g})")
    p.add_argument("--break-lock", action="store_true",
                   help="remove the migration lock of a migration known to be gone (a killed"
                   " yoyo apply, or a migrate killed behind a pooler) and apply nothing")

    p = add("status", cmd_status, "active runs with heartbeat age and stale flag", as_json,
            bounded)
    p.add_argument("--business", type=positive_int, help="only this business's runs")

    p = add("sweep", cmd_sweep, "reclaim stuck runs (cleanup_stuck_runs)", as_json, bounded,
            slots)
    p.add_argument(
        "--on-startup",
        action="store_true",
        help="also the stale runs --worker-id holds (never a live one)",
    )
    p.add_argument("--worker-id", help="the restarted worker (with --on-startup)")
    p.add_argument("--hook", metavar="MODULE:ATTR",
                   help="first ask the telephony provider through this reconcile hook about up"
                   f" to {reconciliation.DEFAULT_LIMIT} orphaned calls (as reconcile does), so"
                   " the orphan timeout fails only what the provider does not know")

    p = add("reconcile", cmd_reconcile, "ask the telephony provider (a reconcile hook) what"
            " became of orphaned calls and settle them (resolve_call, source provider)", as_json)
    p.add_argument("--hook", metavar="MODULE:ATTR", required=True,
                   help="the hook: a callable taking a call key, or a zero-argument factory"
                   " returning one (e.g. outbound_heartbeat.fake_provider:hook_from_env)")
    p.add_argument("--business", "--business-id", dest="business", type=positive_int,
                   help="only this business's orphaned calls (default: every business)")
    p.add_argument("--limit", type=int_between(1, reconciliation.MAX_LIMIT),
                   default=reconciliation.DEFAULT_LIMIT,
                   help=f"ask about at most N calls, the oldest orphans first (default"
                   f" {reconciliation.DEFAULT_LIMIT}, at most {reconciliation.MAX_LIMIT})")

    p = add("prune", cmd_prune, "delete audit events past events_retention, in batches", as_json)
    p.add_argument("--batch-size", type=int_between(1, PRUNE_BATCH_MAX), default=10_000,
                   help="events per batch, one short transaction each (default 10000, at most"
                   f" {PRUNE_BATCH_MAX})")
    p.add_argument("--max-batches", type=positive_int, default=1_000,
                   help="stop after this many batches (default 1000)")

    p = add("recount", cmd_recount, "check the trigger-kept counters against the tables and"
            " correct them online (after writes made with the triggers off)", as_json)
    p.add_argument("--check", action="store_true",
                   help="only list what is wrong: one line per count and exit 1, else 0")

    for name, what in (
        ("cancel", "ask a run's worker to stop (a pending run is cancelled at once)"),
        ("force-cancel", "cancel a run now, worker dead or alive; prints the jobs cancelled"),
    ):
        p = add(name, cmd_cancel, what, as_json, bounded,
                *([slots] if name == "force-cancel" else []))
        p.add_argument("run_id", type=positive_int)
        p.add_argument("--business", type=positive_int,
                       help="refuse unless the run is this business's")

    p = add("health", cmd_health, "alerts; exit 0 ok, 1 warning, 2 critical, 3 unknown", as_json,
            bounded)
    p.add_argument("--alert-after", type=duration, default=None,
                   help="heartbeat age that is critical (default: the database's stale_after;"
                   " the original alert was 2min)")
    p.add_argument("--max-stuck", type=non_negative_int, default=5,
                   help="more running runs than this is a warning (default 5)")

    add("metrics", cmd_metrics, "Prometheus text exposition", bounded)

    p = add("events", cmd_events, "the audit trail, oldest first", as_json, bounded)
    p.add_argument("--run", type=positive_int, help="only this run")
    p.add_argument("--business", type=positive_int, help="only this business")
    p.add_argument("--limit", type=int_between(1, EVENTS_LIMIT_MAX), default=50,
                   help=f"newest N events (default 50, at most {EVENTS_LIMIT_MAX})")
    p.add_argument("--verify", action="store_true",
                   help="check the audit hash chain: one line per broken run and exit 1, else 0")

    for name, what in (("grant-app-role", "grant_app_role(): the app's rights (refuses a role"
                                          " that owns the tables unless --allow-table-owner)"),
                       ("grant-dba-role", "grant_dba_role(): an operator's rights")):
        p = add(name, cmd_grant, what)
        p.add_argument("role", help="the role to grant to")
        p.add_argument("--allow-table-owner", action="store_true",
                       help="grant even when the role owns the tables (prints an UNSAFE warning)")
        if name == "grant-app-role":
            p.add_argument("--legacy", action="store_true",
                           help="also let pre-heartbeat workers write their lock (rolling deploy)")

    p = add("handover", cmd_handover, "hand the app tables over to a separate owner role, online,"
            " leaving the app role exactly grant_app_role's rights", as_json)
    p.add_argument("--app-role", required=True, help="the app's role that owns the tables now")
    p.add_argument("--owner-role", default=admin.DEFAULT_OWNER_ROLE,
                   help=f"the new owner (default {admin.DEFAULT_OWNER_ROLE}; or a member of it)")
    p.add_argument("--legacy", action="store_true", help="as grant-app-role --legacy")
    p.add_argument("--lock-timeout", type=float, default=0.5,
                   help="seconds one lock attempt may wait (default 0.5)")
    p.add_argument("--lock-attempts", type=positive_int, default=10,
                   help="lock attempts before giving up (default 10)")

    p = add("console", cmd_console, "the operator console in a browser (127.0.0.1 by default)")
    p.add_argument("--read-dsn", help="read the pages through this database (a standby)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=port, default=8787, help="port (default 8787; 0: any free)")
    p.add_argument("--token", help="the token that lets a browser in, 16-256 characters of"
                   " A-Z a-z 0-9 - . _ ~ + / = (default: $OUTBOUND_HEARTBEAT_CONSOLE_TOKEN, else"
                   " generated and printed once)")
    p.add_argument("--locale", choices=["en", "he"], default="en", help="default language")
    p.add_argument("--read-only", action="store_true", help="no actions: pages only")
    p.add_argument("--no-listen", action="store_true", help="poll instead of LISTEN")
    p.add_argument("--poll", type=duration, default=timedelta(seconds=1),
                   help="how often to re-read the runs (default 1s)")

    p = sub.add_parser(
        "demo",
        help="watch a killed worker's run get reclaimed (throwaway PostgreSQL unless --dsn)",
        description="Creates two runs, starts two real workers, SIGKILLs one and shows its run "
        "reclaimed, force-cancels the other. Uses only an explicit --dsn, never DATABASE_URL.",
    )
    p.add_argument("--dsn", help="use this database instead of a throwaway one")
    p.add_argument("--threshold", type=duration, default=timedelta(seconds=6),
                   help="the demo's stale threshold (default 6s; production default is 30s)")
    p.add_argument("--console-port", type=port, default=0,
                   help="serve the operator console on this port while the demo runs (0: any)")
    p.add_argument("--no-console", action="store_true", help="no operator console")
    p.add_argument("--pause", type=duration, default=None,
                   help="wait this long before the kill and after the end (to watch the console)")
    p.set_defaults(handler=cmd_demo)
    return parser


def _command_of(argv: Sequence[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        # A monitoring system reads exit 2 as CRITICAL: a check that could not run is UNKNOWN.
        if exc.code == EXIT_USAGE and _command_of(argv) == "health":
            raise SystemExit(HEALTH_UNKNOWN) from None
        raise
    health = args.command == "health"
    level = logging.INFO if args.verbose else logging.ERROR
    logging.basicConfig(level=level, stream=sys.stderr, format="%(message)s")
    try:
        code: int = args.handler(args, out)
        return code
    except (CommandError, Error, psycopg.Error, MigrationBlocked, schema.MigrationLocked) as exc:
        message = exc.message if isinstance(exc, Error) else _first_line(exc)
        if isinstance(exc, psycopg.errors.InvalidSchemaName | psycopg.errors.UndefinedFunction):
            message += " (is outbound_heartbeat installed? run: outbound-heartbeat migrate)"
        sys.stderr.write(f"{PROG} {args.command}: error: {message}\n")
        if health:
            return HEALTH_UNKNOWN
        return EXIT_USAGE if isinstance(exc, UsageError) else EXIT_ERROR
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG} {args.command}: interrupted\n")
        return 130
