"""The console's reads (sql/13_console.sql): each call's SQL text, parameters and decoding, run
through :func:`outbound_heartbeat.service.execute` like every other API call."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from .. import calls
from ..records import Job

__all__ = ["RunSummary", "describe_run", "list_jobs", "list_runs"]


@dataclass(frozen=True, slots=True)
class RunSummary:
    """A run as ``outbound_heartbeat.run_summary``: liveness, job counts by status, and for an
    ended run the event that ended it (``ended_by``), its reason and the heartbeat's age then."""

    id: int
    business_id: int
    status: str
    locked_by_worker: str | None
    lease_epoch: int
    last_heartbeat_at: datetime | None
    heartbeat_age: timedelta | None
    stale_after: timedelta
    stale: bool
    cancel_requested_at: datetime | None
    started_at: datetime | None
    ended_at: datetime | None
    created_at: datetime | None
    queued_jobs: int
    in_progress_jobs: int
    completed_jobs: int
    failed_jobs: int
    ended_by: str | None
    end_reason: str | None
    ended_worker: str | None
    heartbeat_age_at_end: timedelta | None

    @property
    def open(self) -> bool:
        return self.status in ("pending", "running")


def _runs(rows: calls.Rows) -> list[RunSummary]:
    return [RunSummary(**row) for row in rows]


def list_runs(
    business_id: int | None = None,
    ended_within: timedelta = timedelta(days=1),
    max_rows: int = 100,
) -> calls.Call[list[RunSummary]]:
    return calls.Call(
        "list_runs",
        "SELECT * FROM outbound_heartbeat.list_runs(business_id => %(business_id)s::bigint,"
        " ended_within => %(ended_within)s::interval, max_rows => %(max_rows)s::integer)",
        {"business_id": business_id, "ended_within": ended_within, "max_rows": max_rows},
        _runs,
    )


def describe_run(run_id: int, business_id: int | None = None) -> calls.Call[RunSummary]:
    return calls.Call(
        "describe_run",
        "SELECT * FROM outbound_heartbeat.describe_run("
        "run_id => %(run_id)s::bigint, business_id => %(business_id)s::bigint)",
        {"run_id": run_id, "business_id": business_id},
        lambda rows: RunSummary(**rows[0]),
    )


def list_jobs(
    run_id: int, business_id: int | None = None, status: str | None = None, max_rows: int = 100
) -> calls.Call[list[Job]]:
    return calls.Call(
        "list_jobs",
        "SELECT * FROM outbound_heartbeat.list_jobs(run_id => %(run_id)s::bigint,"
        " business_id => %(business_id)s::bigint, status => %(status)s::text,"
        " max_rows => %(max_rows)s::integer)",
        {"run_id": run_id, "business_id": business_id, "status": status, "max_rows": max_rows},
        lambda rows: [Job(**row) for row in rows],
    )
