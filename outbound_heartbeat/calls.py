"""What the sync and async service modules share: each API call's SQL text, parameters and
decoding, and the reading of the events a call caused. No I/O happens here."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Generic, LiteralString, TypeVar

import psycopg
from psycopg.types.json import Jsonb

from . import arguments as arg
from . import errors
from .records import (
    AuditEvent,
    BrokenLink,
    CallResolution,
    CancelResult,
    Claim,
    CounterDrift,
    Event,
    HealthAlert,
    HeartbeatStatus,
    Job,
    JobOutcome,
    Metric,
    OrphanedCallKey,
    PruneResult,
    ReclaimedRun,
    Run,
    RunOutcome,
)

__all__ = [
    "AUDITED_REFUSALS",
    "EVENT_SQLSTATE",
    "LOG_TAGS",
    "MAX_WORKER_ID",
    "Call",
    "EventCollector",
    "Outcome",
    "Rows",
    "beat_leases",
    "claim_run",
    "cleanup_stuck_runs",
    "create_run",
    "finish_job",
    "finish_run",
    "force_cancel",
    "get_active_run",
    "health_check",
    "heartbeat",
    "list_active_runs",
    "list_events",
    "list_orphaned_call_keys",
    "log_events",
    "metrics",
    "next_job",
    "prune_events",
    "recount_counters",
    "refusal_audit",
    "request_cancel",
    "resolve_call",
    "runs_alone",
    "translate",
    "verify_counters",
    "verify_events",
]


logger = logging.getLogger("outbound_heartbeat")

T = TypeVar("T")
Rows = list[dict[str, Any]]

#: SQLSTATE of the NOTICE each run transition raises; its DETAIL is the event as JSON.
EVENT_SQLSTATE = "OH000"

#: Stable log tags (grep-able, never renamed) by event name.
LOG_TAGS = {
    "stale_stopped": "[STALE_DETECTION]",
    "force_cancelled": "[FORCE_CANCEL]",
    "cleaned_up": "[CLEANUP]",
    "call_resolved": "[CALL]",
    "call_reconciled": "[CALL]",
    "call_requeued": "[CALL]",
    "call_timed_out": "[CALL]",
    "call_late_callback": "[CALL]",
    "call_late_finish": "[CALL]",
    "created": "[RUN]",
    "cancel_requested": "[CANCEL]",
    "claimed": "[HEARTBEAT]",
    "resumed": "[HEARTBEAT]",
    "finished": "[HEARTBEAT]",
    "access_denied": "[SECURITY]",
}
_WARNING_EVENTS = frozenset({"stale_stopped", "force_cancelled", "cleaned_up", "access_denied",
                             "call_timed_out", "call_late_callback", "call_late_finish"})

#: Calls whose cross-business refusal (OH403) is written to the audit trail (docs/security.md).
AUDITED_REFUSALS = frozenset({"request_cancel", "force_cancel", "resolve_call"})


@dataclass(frozen=True)
class Call(Generic[T]):
    """One API call: the statement, its parameters and how its rows become the result."""

    name: str
    query: LiteralString
    params: dict[str, Any]
    decode: Callable[[Rows], T]


@dataclass(eq=False)
class EventCollector:
    """A notice handler gathering the events (NOTICE OH000) of one call.

    ``eq=False``: psycopg removes a notice handler with ``list.remove``, which matches by
    equality; two calls' collectors must never be mistaken for each other, so they compare
    by identity.
    """

    events: list[Event] = field(default_factory=list)

    def __call__(self, diag: psycopg.errors.Diagnostic) -> None:
        if diag.sqlstate != EVENT_SQLSTATE or not diag.message_detail:
            return
        data = json.loads(diag.message_detail)
        self.events.append(
            Event(
                event=data.pop("event"),
                run_id=data.pop("run_id"),
                business_id=data.pop("business_id"),
                worker_id=data.pop("worker_id", None),
                detail=data,
            )
        )


@dataclass(frozen=True)
class Outcome(Generic[T]):
    """What one call returned and the run transitions it caused.

    ``pending`` is set when the call ran inside a transaction the app had open: the events
    happened only if the app commits, and are logged (and handed to ``pending``'s callbacks)
    then. Otherwise they were logged when the call returned.
    """

    result: T
    events: list[Event]
    pending: Any = None  # outbox.Pending; Any here as outbox imports this module


def log_events(events: Sequence[Event]) -> None:
    for ev in events:
        level = logging.WARNING if ev.event in _WARNING_EVENTS else logging.INFO
        logger.log(
            level,
            "%s run %s (business %s) %s worker=%s %s",
            LOG_TAGS.get(ev.event, "[EVENT]"),
            ev.run_id,
            ev.business_id,
            ev.event,
            ev.worker_id or "-",  # the audit trail's own rendering of "no worker"
            json.dumps(ev.detail, sort_keys=True, default=str),
        )


def runs_alone(autocommit: bool, status: psycopg.pq.TransactionStatus) -> bool:
    """True when the statement is its own transaction already (autocommit, none open).

    Every API call is one statement, hence atomic; a BEGIN/COMMIT around it would only add
    two round trips. Otherwise the call runs in a transaction block (a savepoint inside the
    caller's open transaction), so the caller's commit or rollback decides.
    """
    return autocommit and status == psycopg.pq.TransactionStatus.IDLE


def translate(call: Call[Any], exc: psycopg.Error) -> Exception:
    """The exception to raise for a failed call (ours when the SQLSTATE is ours), logged."""
    err = errors.from_psycopg(exc)
    if isinstance(err, errors.AccessDenied):
        logger.warning("[SECURITY] %s refused: %s", call.name, err.message)
    elif isinstance(err, errors.LeaseLost):
        logger.warning("[LEASE_LOST] %s: %s", call.name, err.message)
    return err if err is not None else exc


def refusal_audit(call: Call[Any], err: Exception) -> Call[AuditEvent] | None:
    """The call that audits ``call``'s OH403, or None when there is nothing to audit.

    The refused statement rolled back together with anything it wrote, so the refusal is
    recorded by a second statement, after it (``audit_access_denied`` accepts genuine refusals
    only: the business must not own the run).
    """
    if not isinstance(err, errors.AccessDenied) or call.name not in AUDITED_REFUSALS:
        return None
    if call.name == "resolve_call":  # the caller knows a key, not the run: the SQL finds it
        if call.params.get("business_id") is None:
            return None
        return Call(
            "audit_call_access_denied",
            "SELECT * FROM outbound_heartbeat.audit_call_access_denied("
            "call_key => %(call_key)s::text, business_id => %(business_id)s::bigint)",
            {"call_key": call.params["call_key"], "business_id": call.params["business_id"]},
            _one(AuditEvent),
        )
    run_id, business_id = call.params.get("run_id"), call.params.get("business_id")
    if run_id is None or business_id is None:
        return None
    return Call(
        "audit_access_denied",
        "SELECT * FROM outbound_heartbeat.audit_access_denied(run_id => %(run_id)s::bigint,"
        " business_id => %(business_id)s::bigint, action => %(action)s::text)",
        {"run_id": run_id, "business_id": business_id, "action": call.name},
        _one(AuditEvent),
    )


def _one(cls: Callable[..., T]) -> Callable[[Rows], T]:
    return lambda rows: cls(**rows[0])


def _optional(cls: Callable[..., T]) -> Callable[[Rows], T | None]:
    return lambda rows: cls(**rows[0]) if rows else None


def _all(cls: Callable[..., T]) -> Callable[[Rows], list[T]]:
    return lambda rows: [cls(**row) for row in rows]


def _heartbeat_status(rows: Rows) -> HeartbeatStatus:
    status: HeartbeatStatus = rows[0]["status"]
    if status == "lost":
        logger.warning("[LEASE_LOST] heartbeat answered 'lost'")
    return status


# -- arguments (checked in Python before anything is sent; see arguments.py) ----------------

#: The SQL's own bound on a worker id's length.
MAX_WORKER_ID = 200


def _worker_id(value: Any) -> str:
    if type(value) is str:  # exactly str: a subclass could hash or compare differently
        return _checked_worker_id(value)
    return arg.text("worker_id", value, max_length=MAX_WORKER_ID, blank=False)


@functools.lru_cache(maxsize=4096)
def _checked_worker_id(value: str) -> str:
    """A worker id that passed once passes again: a process's hub sends the same ids at every
    beat, and checking one (UTF-8, NUL, blank: character by character) costs more than its
    share of the statement. A refused id raises, and is never cached."""
    return arg.text("worker_id", value, max_length=MAX_WORKER_ID, blank=False)


def _lease(run_id: Any, worker_id: Any, lease_epoch: Any) -> dict[str, Any]:
    return {
        "run_id": arg.bigint("run_id", run_id),
        "worker_id": _worker_id(worker_id),
        "lease_epoch": arg.bigint("lease_epoch", lease_epoch, minimum=0),
    }


#: The array parameter of a set-based call that carries each field of its leases.
_ARRAYS = {"run_id": "run_ids", "worker_id": "worker_ids", "lease_epoch": "lease_epochs",
          "status": "statuses"}


def _arrays(checked: list[dict[str, Any]], *fields: str) -> dict[str, list[Any]]:
    """Checked leases as one array parameter per field, in the leases' order."""
    return {_ARRAYS[f]: [c[f] for c in checked] for f in fields}


def _cancel(run_id: Any, business_id: Any) -> dict[str, Any]:
    return {
        "run_id": arg.bigint("run_id", run_id),
        "business_id": arg.optional_bigint("business_id", business_id),
    }


def create_run(
    business_id: int, jobs: Sequence[Any] | Any = (), retry_unplaced: bool = False
) -> Call[Run]:
    params = {
        "business_id": arg.bigint("business_id", business_id),
        "jobs": Jsonb(arg.json_array("jobs", jobs)),
        "retry_unplaced": arg.boolean("retry_unplaced", retry_unplaced),
    }
    # The default is not sent: the same call then works against a schema before retry_unplaced.
    query: LiteralString = (
        "SELECT * FROM outbound_heartbeat.create_run("
        "business_id => %(business_id)s::bigint, jobs => %(jobs)s::jsonb,"
        " retry_unplaced => %(retry_unplaced)s::boolean)"
        if params["retry_unplaced"]
        else "SELECT * FROM outbound_heartbeat.create_run("
        "business_id => %(business_id)s::bigint, jobs => %(jobs)s::jsonb)"
    )
    return Call("create_run", query, params, _one(Run))


def claim_run(worker_id: str, run_id: int | None = None) -> Call[Claim | None]:
    return Call(
        "claim_run",
        "SELECT * FROM outbound_heartbeat.claim_run("
        "worker_id => %(worker_id)s::text, run_id => %(run_id)s::bigint)",
        {"worker_id": _worker_id(worker_id), "run_id": arg.optional_bigint("run_id", run_id)},
        _optional(Claim),
    )


def heartbeat(run_id: int, worker_id: str, lease_epoch: int) -> Call[HeartbeatStatus]:
    return Call(
        "heartbeat",
        "SELECT outbound_heartbeat.heartbeat(run_id => %(run_id)s::bigint,"
        " worker_id => %(worker_id)s::text, lease_epoch => %(lease_epoch)s::bigint) AS status",
        _lease(run_id, worker_id, lease_epoch),
        _heartbeat_status,
    )


def heartbeat_leases(leases: Sequence[tuple[int, str, int]]) -> Call[list[tuple[int, str]]]:
    """One heartbeat for many leases of (run_id, worker_id, lease_epoch): per lease, in order,
    (run_id, status) with heartbeat()'s answers, or 'locked' where heartbeat() raises OH423."""
    return Call(
        "heartbeat_leases",
        "SELECT b.run_id, b.status FROM outbound_heartbeat.heartbeat_leases("
        "run_ids => %(run_ids)s::bigint[], worker_ids => %(worker_ids)s::text[],"
        " lease_epochs => %(lease_epochs)s::bigint[]) AS b",
        _lease_arrays(arg.rows("leases", leases, 3)),
        lambda rows: [(row["run_id"], row["status"]) for row in rows],
    )


def beat_leases(leases: Sequence[tuple[int, str, int]]) -> Call[list[tuple[int, str]]]:
    """heartbeat_leases() as a process's hub sends it: the same statement and answers, read back
    as one row that names only the leases not answered 'ok' (by position). A beat of fresh
    leases, the common case, then costs the client nothing per lease (a row per lease, turned
    into Python objects, cost about as much as the statement's own share at 100 leases)."""
    params = _lease_arrays(arg.rows("leases", leases, 3))
    run_ids = params["run_ids"]
    return Call(
        "heartbeat_leases",
        "SELECT pg_catalog.count(*) AS answered,"
        " pg_catalog.array_agg(b.n) FILTER (WHERE b.status <> 'ok') AS positions,"
        " pg_catalog.array_agg(b.status) FILTER (WHERE b.status <> 'ok') AS statuses"
        " FROM outbound_heartbeat.heartbeat_leases("
        "run_ids => %(run_ids)s::bigint[], worker_ids => %(worker_ids)s::text[],"
        " lease_epochs => %(lease_epochs)s::bigint[]) WITH ORDINALITY AS b(run_id, status, n)",
        params,
        lambda rows: _spread(run_ids, rows[0]),
    )


def _spread(run_ids: list[int], row: dict[str, Any]) -> list[tuple[int, str]]:
    """beat_leases()' one row as heartbeat_leases()' rows: (run_id, status) per lease, in order."""
    if row["answered"] != len(run_ids):
        raise psycopg.ProgrammingError(
            f"heartbeat_leases() answered {row['answered']} of {len(run_ids)} leases")
    statuses = ["ok"] * len(run_ids)
    for position, status in zip(row["positions"] or [], row["statuses"] or [], strict=True):
        statuses[position - 1] = status
    return list(zip(run_ids, statuses, strict=True))


def _lease_arrays(rows: list[tuple[Any, ...]]) -> dict[str, list[Any]]:
    """The leases as heartbeat_leases()' three arrays, each lease checked as _lease() checks it.
    A hub sends the same well-formed leases every beat, and _lease()'s calls per field cost
    more than the statement's own share at a hundred leases: a plain int and str take the
    inline test here, anything else _lease() (which converts an int subclass, or raises naming
    the argument)."""
    run_ids: list[int] = []
    worker_ids: list[str] = []
    lease_epochs: list[int] = []
    for run_id, worker_id, lease_epoch in rows:
        if (type(run_id) is int and arg.MIN_BIGINT <= run_id <= arg.MAX_BIGINT
                and type(lease_epoch) is int and 0 <= lease_epoch <= arg.MAX_BIGINT
                and type(worker_id) is str):
            run_ids.append(run_id)
            worker_ids.append(_checked_worker_id(worker_id))
            lease_epochs.append(lease_epoch)
        else:
            checked = _lease(run_id, worker_id, lease_epoch)
            run_ids.append(checked["run_id"])
            worker_ids.append(checked["worker_id"])
            lease_epochs.append(checked["lease_epoch"])
    return {"run_ids": run_ids, "worker_ids": worker_ids, "lease_epochs": lease_epochs}


def next_job(
    run_id: int, worker_id: str, lease_epoch: int, request_id: str | None = None
) -> Call[Job | None]:
    """``request_id``: a retry key; the same key again (same lease) returns the job the first
    attempt took when its answer was lost (docs/worker-lease.md)."""
    return Call(
        "next_job",
        "SELECT * FROM outbound_heartbeat.next_job(run_id => %(run_id)s::bigint,"
        " worker_id => %(worker_id)s::text, lease_epoch => %(lease_epoch)s::bigint,"
        " request_id => %(request_id)s::text)",
        {
            **_lease(run_id, worker_id, lease_epoch),
            "request_id": arg.optional_text("request_id", request_id, max_length=200, blank=False),
        },
        _optional(Job),
    )


def finish_job(
    job_id: int,
    worker_id: str,
    lease_epoch: int,
    status: str,
    error: str | None = None,
    call_key: str | None = None,
) -> Call[JobOutcome]:
    """``call_key``: the attempt being finished (the key next_job returned with the job); an
    earlier attempt's answers ``superseded`` and writes nothing."""
    params = {
        "job_id": arg.bigint("job_id", job_id),
        "worker_id": _worker_id(worker_id),
        "lease_epoch": arg.bigint("lease_epoch", lease_epoch, minimum=0),
        "status": arg.text("status", status),
        "error": arg.optional_text("error", error),
        "call_key": arg.optional_text("call_key", call_key, max_length=200),
    }
    # No key, none sent: the same call then works against a schema before call_key (release 4).
    query: LiteralString = (
        "SELECT * FROM outbound_heartbeat.finish_job(job_id => %(job_id)s::bigint,"
        " worker_id => %(worker_id)s::text, lease_epoch => %(lease_epoch)s::bigint,"
        " status => %(status)s::text, error => %(error)s::text)"
        if params["call_key"] is None
        else "SELECT * FROM outbound_heartbeat.finish_job(job_id => %(job_id)s::bigint,"
        " worker_id => %(worker_id)s::text, lease_epoch => %(lease_epoch)s::bigint,"
        " status => %(status)s::text, error => %(error)s::text, call_key => %(call_key)s::text)"
    )
    return Call("finish_job", query, params, _one(JobOutcome))


def finish_run(
    run_id: int, worker_id: str, lease_epoch: int, status: str = "completed"
) -> Call[RunOutcome]:
    return Call(
        "finish_run",
        "SELECT * FROM outbound_heartbeat.finish_run(run_id => %(run_id)s::bigint,"
        " worker_id => %(worker_id)s::text, lease_epoch => %(lease_epoch)s::bigint,"
        " status => %(status)s::text)",
        {**_lease(run_id, worker_id, lease_epoch), "status": arg.text("status", status)},
        _one(RunOutcome),
    )


def finish_runs(leases: Sequence[tuple[int, str, int, str]]) -> Call[list[RunOutcome]]:
    """finish_run() for many leases of (run_id, worker_id, lease_epoch, status) in one statement
    (one transaction, one commit): a release storm of a process's hub. Outcomes in order
    (``outbound_heartbeat.finish_runs``: the held runs ended together, set-based)."""
    checked = [{**_lease(r, w, e), "status": arg.text("status", s)}
               for r, w, e, s in arg.rows("leases", leases, 4)]
    return Call(
        "finish_runs",
        "SELECT o.run_id, o.status, o.outcome, o.jobs_failed FROM outbound_heartbeat.finish_runs("
        "run_ids => %(run_ids)s::bigint[], worker_ids => %(worker_ids)s::text[],"
        " lease_epochs => %(lease_epochs)s::bigint[], statuses => %(statuses)s::text[])"
        " WITH ORDINALITY AS o(run_id, status, outcome, jobs_failed, n) ORDER BY o.n",
        _arrays(checked, "run_id", "worker_id", "lease_epoch", "status"),
        _all(RunOutcome),
    )


def get_active_run(business_id: int, stale_after: timedelta | None = None) -> Call[Run | None]:
    return Call(
        "get_active_run",
        "SELECT * FROM outbound_heartbeat.get_active_run("
        "business_id => %(business_id)s::bigint, stale_after => %(stale_after)s::interval)",
        {
            "business_id": arg.bigint("business_id", business_id),
            "stale_after": arg.optional_interval("stale_after", stale_after),
        },
        _optional(Run),
    )


def request_cancel(run_id: int, business_id: int | None = None) -> Call[CancelResult]:
    return Call(
        "request_cancel",
        "SELECT * FROM outbound_heartbeat.request_cancel("
        "run_id => %(run_id)s::bigint, business_id => %(business_id)s::bigint)",
        _cancel(run_id, business_id),
        _one(CancelResult),
    )


def force_cancel(run_id: int, business_id: int | None = None) -> Call[CancelResult]:
    return Call(
        "force_cancel",
        "SELECT * FROM outbound_heartbeat.force_cancel("
        "run_id => %(run_id)s::bigint, business_id => %(business_id)s::bigint)",
        _cancel(run_id, business_id),
        _one(CancelResult),
    )


#: resolve_call()'s outcomes a caller may report (``timed_out`` is the sweep's own).
CALL_OUTCOMES = ("completed", "failed", "not_placed")
#: Who reports a call's outcome to resolve_call(): its status ``callback``, or ``provider`` (a
#: reconciliation that asked the telephony provider).
CALL_SOURCES = ("callback", "provider")


def resolve_call(
    call_key: str,
    outcome: str,
    detail: str | None = None,
    business_id: int | None = None,
    source: str = "callback",
) -> Call[CallResolution]:
    """Settles the call with this key exactly once (a status callback, or ``source="provider"``);
    ``business_id``: the tenant's check (OH403 for another business's call, audited)."""
    params = {
        "call_key": arg.text("call_key", call_key, max_length=200, blank=False),
        "outcome": arg.text("outcome", outcome),
        "detail": arg.optional_text("detail", detail, max_length=2000),
        "business_id": arg.optional_bigint("business_id", business_id),
        "source": arg.text("source", source),
    }
    # The default is not sent: the same call then works against a schema before ``source``.
    query: LiteralString = (
        "SELECT * FROM outbound_heartbeat.resolve_call(call_key => %(call_key)s::text,"
        " outcome => %(outcome)s::text, detail => %(detail)s::text,"
        " business_id => %(business_id)s::bigint)"
        if params["source"] == "callback"
        else "SELECT * FROM outbound_heartbeat.resolve_call(call_key => %(call_key)s::text,"
        " outcome => %(outcome)s::text, detail => %(detail)s::text,"
        " business_id => %(business_id)s::bigint, source => %(source)s::text)"
    )
    return Call("resolve_call", query, params, _one(CallResolution))


def list_orphaned_call_keys(
    business_id: int | None = None, limit: int = 100
) -> Call[list[OrphanedCallKey]]:
    """The unsettled orphaned calls with their keys (of one business, or all), oldest first,
    at most ``limit`` (SQL ``max_calls``)."""
    return Call(
        "list_orphaned_call_keys",
        "SELECT * FROM outbound_heartbeat.list_orphaned_call_keys("
        "business_id => %(business_id)s::bigint, max_calls => %(max_calls)s::integer)",
        {
            "business_id": arg.optional_bigint("business_id", business_id),
            "max_calls": arg.integer("limit", limit, 1, 100_000),
        },
        _all(OrphanedCallKey),
    )


def cleanup_stuck_runs(
    on_startup: bool = False, worker_id: str | None = None
) -> Call[list[ReclaimedRun]]:
    return Call(
        "cleanup_stuck_runs",
        "SELECT * FROM outbound_heartbeat.cleanup_stuck_runs("
        "on_startup => %(on_startup)s::boolean, worker_id => %(worker_id)s::text)",
        {
            "on_startup": arg.boolean("on_startup", on_startup),
            "worker_id": None if worker_id is None else _worker_id(worker_id),
        },
        _all(ReclaimedRun),
    )


def health_check(
    alert_after: timedelta = timedelta(minutes=2), max_stuck: int = 5
) -> Call[list[HealthAlert]]:
    return Call(
        "health_check",
        "SELECT * FROM outbound_heartbeat.health_check("
        "alert_after => %(alert_after)s::interval, max_stuck => %(max_stuck)s::integer)",
        {
            "alert_after": arg.interval("alert_after", alert_after),
            "max_stuck": arg.integer("max_stuck", max_stuck, 0, arg.MAX_INTEGER),
        },
        _all(HealthAlert),
    )


def list_active_runs() -> Call[list[Run]]:
    return Call(
        "list_active_runs",
        "SELECT * FROM outbound_heartbeat.list_active_runs()",
        {},
        _all(Run),
    )


def list_events(
    run_id: int | None = None, business_id: int | None = None, max_rows: int = 50
) -> Call[list[AuditEvent]]:
    return Call(
        "list_events",
        "SELECT * FROM outbound_heartbeat.list_events(run_id => %(run_id)s::bigint,"
        " business_id => %(business_id)s::bigint, max_rows => %(max_rows)s::integer)",
        {
            "run_id": arg.optional_bigint("run_id", run_id),
            "business_id": arg.optional_bigint("business_id", business_id),
            "max_rows": arg.integer("max_rows", max_rows, 1, 100_000),
        },
        _all(AuditEvent),
    )


def verify_events(run_id: int | None = None) -> Call[list[BrokenLink]]:
    return Call(
        "verify_events",
        "SELECT * FROM outbound_heartbeat.verify_events(run_id => %(run_id)s::bigint)",
        {"run_id": run_id},
        _all(BrokenLink),
    )


def verify_counters() -> Call[list[CounterDrift]]:
    return Call("verify_counters", "SELECT * FROM outbound_heartbeat.verify_counters()", {},
                _all(CounterDrift))


def recount_counters() -> Call[list[CounterDrift]]:
    return Call("recount_counters", "SELECT * FROM outbound_heartbeat.recount_counters()", {},
                _all(CounterDrift))


def metrics() -> Call[list[Metric]]:
    return Call("metrics", "SELECT * FROM outbound_heartbeat.metrics()", {}, _all(Metric))


def prune_events(batch_size: int = 10_000, max_batches: int = 10) -> Call[PruneResult]:
    return Call(
        "prune_events",
        "SELECT * FROM outbound_heartbeat.prune_events("
        "batch_size => %(batch_size)s::integer, max_batches => %(max_batches)s::integer)",
        {"batch_size": batch_size, "max_batches": max_batches},
        _one(PruneResult),
    )
