"""What the sync and async service modules share: each API call's SQL text, parameters and
decoding, and the reading of the events a call caused. No I/O happens here."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Generic, TypeVar

import psycopg
from psycopg.types.json import Jsonb
from typing_extensions import LiteralString

from . import errors
from .records import (
    AuditEvent,
    CancelResult,
    Claim,
    Event,
    HealthAlert,
    HeartbeatStatus,
    Job,
    JobOutcome,
    Metric,
    PruneResult,
    ReclaimedRun,
    Run,
    RunOutcome,
)

logger = logging.getLogger("outbound_heartbeat")

T = TypeVar("T")
Rows = list[dict[str, Any]]

#: SQLSTATE of the NOTICE each run transition raises; its DETAIL is the event as JSON.
EVENT_SQLSTATE = "OH000"

#: Stable log tags (DESIGN.md, principle 6) by event name.
LOG_TAGS = {
    "stale_stopped": "[STALE_DETECTION]",
    "force_cancelled": "[FORCE_CANCEL]",
    "cleaned_up": "[CLEANUP]",
    "created": "[RUN]",
    "cancel_requested": "[CANCEL]",
    "claimed": "[HEARTBEAT]",
    "resumed": "[HEARTBEAT]",
    "finished": "[HEARTBEAT]",
}
_WARNING_EVENTS = frozenset({"stale_stopped", "force_cancelled", "cleaned_up"})


@dataclass(frozen=True)
class Call(Generic[T]):
    """One API call: the statement, its parameters and how its rows become the result."""

    name: str
    query: LiteralString
    params: dict[str, Any]
    decode: Callable[[Rows], T]


@dataclass
class EventCollector:
    """A notice handler gathering the events (NOTICE OH000) of one call."""

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
            ev.worker_id,
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


def create_run(business_id: int, jobs: Sequence[Any] | Any = ()) -> Call[Run]:
    payload = list(jobs) if isinstance(jobs, (list, tuple)) else jobs
    return Call(
        "create_run",
        "SELECT * FROM outbound_heartbeat.create_run("
        "business_id => %(business_id)s::bigint, jobs => %(jobs)s::jsonb)",
        {"business_id": business_id, "jobs": Jsonb(payload)},
        _one(Run),
    )


def claim_run(worker_id: str, run_id: int | None = None) -> Call[Claim | None]:
    return Call(
        "claim_run",
        "SELECT * FROM outbound_heartbeat.claim_run("
        "worker_id => %(worker_id)s::text, run_id => %(run_id)s::bigint)",
        {"worker_id": worker_id, "run_id": run_id},
        _optional(Claim),
    )


def heartbeat(run_id: int, worker_id: str, lease_epoch: int) -> Call[HeartbeatStatus]:
    return Call(
        "heartbeat",
        "SELECT outbound_heartbeat.heartbeat(run_id => %(run_id)s::bigint,"
        " worker_id => %(worker_id)s::text, lease_epoch => %(lease_epoch)s::bigint) AS status",
        {"run_id": run_id, "worker_id": worker_id, "lease_epoch": lease_epoch},
        _heartbeat_status,
    )


def next_job(run_id: int, worker_id: str, lease_epoch: int) -> Call[Job | None]:
    return Call(
        "next_job",
        "SELECT * FROM outbound_heartbeat.next_job(run_id => %(run_id)s::bigint,"
        " worker_id => %(worker_id)s::text, lease_epoch => %(lease_epoch)s::bigint)",
        {"run_id": run_id, "worker_id": worker_id, "lease_epoch": lease_epoch},
        _optional(Job),
    )


def finish_job(
    job_id: int, worker_id: str, lease_epoch: int, status: str, error: str | None = None
) -> Call[JobOutcome]:
    return Call(
        "finish_job",
        "SELECT * FROM outbound_heartbeat.finish_job(job_id => %(job_id)s::bigint,"
        " worker_id => %(worker_id)s::text, lease_epoch => %(lease_epoch)s::bigint,"
        " status => %(status)s::text, error => %(error)s::text)",
        {
            "job_id": job_id,
            "worker_id": worker_id,
            "lease_epoch": lease_epoch,
            "status": status,
            "error": error,
        },
        _one(JobOutcome),
    )


def finish_run(
    run_id: int, worker_id: str, lease_epoch: int, status: str = "completed"
) -> Call[RunOutcome]:
    return Call(
        "finish_run",
        "SELECT * FROM outbound_heartbeat.finish_run(run_id => %(run_id)s::bigint,"
        " worker_id => %(worker_id)s::text, lease_epoch => %(lease_epoch)s::bigint,"
        " status => %(status)s::text)",
        {"run_id": run_id, "worker_id": worker_id, "lease_epoch": lease_epoch, "status": status},
        _one(RunOutcome),
    )


def get_active_run(business_id: int, stale_after: timedelta | None = None) -> Call[Run | None]:
    return Call(
        "get_active_run",
        "SELECT * FROM outbound_heartbeat.get_active_run("
        "business_id => %(business_id)s::bigint, stale_after => %(stale_after)s::interval)",
        {"business_id": business_id, "stale_after": stale_after},
        _optional(Run),
    )


def request_cancel(run_id: int, business_id: int | None = None) -> Call[CancelResult]:
    return Call(
        "request_cancel",
        "SELECT * FROM outbound_heartbeat.request_cancel("
        "run_id => %(run_id)s::bigint, business_id => %(business_id)s::bigint)",
        {"run_id": run_id, "business_id": business_id},
        _one(CancelResult),
    )


def force_cancel(run_id: int, business_id: int | None = None) -> Call[CancelResult]:
    return Call(
        "force_cancel",
        "SELECT * FROM outbound_heartbeat.force_cancel("
        "run_id => %(run_id)s::bigint, business_id => %(business_id)s::bigint)",
        {"run_id": run_id, "business_id": business_id},
        _one(CancelResult),
    )


def cleanup_stuck_runs(
    on_startup: bool = False, worker_id: str | None = None
) -> Call[list[ReclaimedRun]]:
    return Call(
        "cleanup_stuck_runs",
        "SELECT * FROM outbound_heartbeat.cleanup_stuck_runs("
        "on_startup => %(on_startup)s::boolean, worker_id => %(worker_id)s::text)",
        {"on_startup": on_startup, "worker_id": worker_id},
        _all(ReclaimedRun),
    )


def health_check(
    alert_after: timedelta = timedelta(minutes=2), max_stuck: int = 5
) -> Call[list[HealthAlert]]:
    return Call(
        "health_check",
        "SELECT * FROM outbound_heartbeat.health_check("
        "alert_after => %(alert_after)s::interval, max_stuck => %(max_stuck)s::integer)",
        {"alert_after": alert_after, "max_stuck": max_stuck},
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
        {"run_id": run_id, "business_id": business_id, "max_rows": max_rows},
        _all(AuditEvent),
    )


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
