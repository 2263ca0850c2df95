"""The SQL API as plain function calls for web apps, DBAs' scripts and workers (asyncio).

Each function takes a psycopg ``Connection`` or a ``AsyncConnectionPool``, runs one API function in
its own transaction (a savepoint when the caller already has one open, so the caller's commit
decides), maps OH SQLSTATEs to :mod:`outbound_heartbeat.errors` and logs the transitions it caused
with their stable tags. The sync twin is :mod:`outbound_heartbeat.service`.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any, TypeVar

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from . import calls
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

T = TypeVar("T")
Connectable = psycopg.AsyncConnection[Any] | AsyncConnectionPool

__all__ = [
    "Connectable",
    "claim_run",
    "cleanup_stuck_runs",
    "create_run",
    "execute",
    "finish_job",
    "finish_run",
    "force_cancel",
    "get_active_run",
    "health_check",
    "heartbeat",
    "list_active_runs",
    "list_events",
    "metrics",
    "next_job",
    "prune_events",
    "request_cancel",
]


async def execute(conn: Connectable, call: calls.Call[T]) -> tuple[T, list[Event]]:
    """Runs one call; returns its result and the run transitions it caused."""
    if isinstance(conn, AsyncConnectionPool):
        async with conn.connection() as pooled:
            return await _execute_on(pooled, call)
    return await _execute_on(conn, call)


async def _execute_on(
    conn: psycopg.AsyncConnection[Any], call: calls.Call[T]
) -> tuple[T, list[Event]]:
    collector = calls.EventCollector()
    conn.add_notice_handler(collector)
    try:
        async with conn.cursor(row_factory=dict_row) as cur:
            if calls.runs_alone(conn.autocommit, conn.info.transaction_status):
                await cur.execute(call.query, call.params)
                rows = await cur.fetchall()
            else:
                async with conn.transaction():
                    await cur.execute(call.query, call.params)
                    rows = await cur.fetchall()
    except psycopg.Error as exc:
        raise calls.translate(call, exc) from exc
    finally:
        conn.remove_notice_handler(collector)
    calls.log_events(collector.events)
    return call.decode(rows), collector.events


async def create_run(conn: Connectable, business_id: int, jobs: Sequence[Any] = ()) -> Run:
    """Creates a pending run with one queued job per element of ``jobs`` (JSON payloads)."""
    return (await execute(conn, calls.create_run(business_id, jobs)))[0]


async def claim_run(conn: Connectable, worker_id: str, run_id: int | None = None) -> Claim | None:
    """Claims the worker's own running run (resume), else ``run_id`` or the oldest pending run."""
    return (await execute(conn, calls.claim_run(worker_id, run_id)))[0]


async def heartbeat(
    conn: Connectable, run_id: int, worker_id: str, lease_epoch: int
) -> HeartbeatStatus:
    """``'ok'``, ``'cancel_requested'`` or ``'lost'`` for the lease holder."""
    return (await execute(conn, calls.heartbeat(run_id, worker_id, lease_epoch)))[0]


async def next_job(conn: Connectable, run_id: int, worker_id: str, lease_epoch: int) -> Job | None:
    """The next queued job, now in progress, or None; raises LeaseLost when the lease is gone."""
    return (await execute(conn, calls.next_job(run_id, worker_id, lease_epoch)))[0]


async def finish_job(
    conn: Connectable,
    job_id: int,
    worker_id: str,
    lease_epoch: int,
    status: str,
    error: str | None = None,
) -> JobOutcome:
    """Records a job's final status for the lease holder (fenced)."""
    return (await execute(conn, calls.finish_job(job_id, worker_id, lease_epoch, status, error)))[0]


async def finish_run(
    conn: Connectable, run_id: int, worker_id: str, lease_epoch: int, status: str = "completed"
) -> RunOutcome:
    """Ends the lease holder's run; leftover queued jobs are failed (fenced)."""
    return (await execute(conn, calls.finish_run(run_id, worker_id, lease_epoch, status)))[0]


async def get_active_run(
    conn: Connectable, business_id: int, stale_after: timedelta | None = None
) -> Run | None:
    """The business's truly active run or None; a stale run is stopped by this very call."""
    return (await execute(conn, calls.get_active_run(business_id, stale_after)))[0]


async def request_cancel(
    conn: Connectable, run_id: int, business_id: int | None = None
) -> CancelResult:
    """Cooperative cancel (a pending run is cancelled at once)."""
    return (await execute(conn, calls.request_cancel(run_id, business_id)))[0]


async def force_cancel(
    conn: Connectable, run_id: int, business_id: int | None = None
) -> CancelResult:
    """Cancels the run now, dead worker or not; ``jobs_cancelled`` counts the queued jobs failed."""
    return (await execute(conn, calls.force_cancel(run_id, business_id)))[0]


async def cleanup_stuck_runs(
    conn: Connectable, on_startup: bool = False, worker_id: str | None = None
) -> list[ReclaimedRun]:
    """Reclaims stuck running runs, one record each with its reason."""
    return (await execute(conn, calls.cleanup_stuck_runs(on_startup, worker_id)))[0]


async def health_check(
    conn: Connectable, alert_after: timedelta = timedelta(minutes=2), max_stuck: int = 5
) -> list[HealthAlert]:
    """The alerts of the seed's health checks (empty when healthy)."""
    return (await execute(conn, calls.health_check(alert_after, max_stuck)))[0]


async def list_active_runs(conn: Connectable) -> list[Run]:
    """Every open run with its liveness (the ``active_runs`` view)."""
    return (await execute(conn, calls.list_active_runs()))[0]


async def list_events(
    conn: Connectable,
    run_id: int | None = None,
    business_id: int | None = None,
    max_rows: int = 50,
) -> list[AuditEvent]:
    """The audit trail, newest first, optionally of one run and/or one business."""
    return (await execute(conn, calls.list_events(run_id, business_id, max_rows)))[0]


async def metrics(conn: Connectable) -> list[Metric]:
    """The samples of ``outbound_heartbeat.metrics()`` (render with ``prometheus.render``)."""
    return (await execute(conn, calls.metrics()))[0]


async def prune_events(
    conn: Connectable, batch_size: int = 10_000, max_batches: int = 10
) -> PruneResult:
    """Deletes audit events past the ``events_retention`` setting, in batches (the schema
    owner's call: nobody else may delete events). One transaction: keep ``max_batches`` small
    and call again until ``done`` for short ones."""
    return (await execute(conn, calls.prune_events(batch_size, max_batches)))[0]
