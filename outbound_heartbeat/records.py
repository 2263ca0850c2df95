"""Frozen records returned by the service calls; fields mirror the SQL composite types."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

__all__ = [
    "AuditEvent", "BrokenLink", "CallAnswer", "CallOutcome", "CallResolution", "CancelResult",
    "Claim", "CounterDrift", "Event", "EventName",
    "HealthAlert",
    "HeartbeatStatus", "Job", "JobOutcome", "JobOutcomeName", "JobStatus", "Metric",
    "OrphanedCallKey", "PruneResult", "ReclaimedRun", "ReconcileReport", "ReconcileResult",
    "ReconciledCall", "Run", "RunOutcome", "RunOutcomeName", "RunStatus",
]

#: ``completed``: the run was completed under this lease (the empty-run rule): stop, success.
HeartbeatStatus = Literal["ok", "cancel_requested", "lost", "completed"]
#: The statuses the library writes. An adopted legacy table may hold others its app wrote.
RunStatus = Literal["pending", "running", "completed", "stopped", "cancelled", "failed"]
JobStatus = Literal["queued", "in_progress", "completed", "failed"]
#: Outcomes of the fenced finishing calls.
Outcome = Literal["finished", "already_finished", "lease_lost"]
#: Outcomes of finish_job(): ``already_settled``: its call was settled otherwise (a callback, the
#: provider, the orphan timeout or a requeue) with another status; ``status`` is the job's now,
#: nothing of the job was changed (the contradicting report is audited: ``call_late_finish``).
JobOutcomeName = Literal["finished", "already_finished", "already_settled", "lease_lost"]
#: Outcomes of finish_run() and finish_runs(); ``locked`` only from finish_runs(): that lease's
#: run row stayed locked by another transaction, nothing was written for it (send it again).
RunOutcomeName = Literal["finished", "already_finished", "lease_lost", "locked"]
#: Run transitions recorded in the audit trail.
EventName = Literal[
    "created", "claimed", "resumed", "stale_stopped", "cancel_requested", "force_cancelled",
    "cleaned_up", "finished", "call_resolved", "call_reconciled", "call_requeued", "call_timed_out",
    "call_late_callback", "call_late_finish",
]
#: How a call was settled: by its callback (resolve_call) or, orphaned for longer than
#: call_orphan_timeout, by the sweep (``timed_out``).
CallOutcome = Literal["completed", "failed", "not_placed", "timed_out"]
#: resolve_call()'s answer: ``resolved`` by this call; ``requeued``: reported ``not_placed`` on
#: a run created with ``retry_unplaced`` that is still open, the job is queued again (its next
#: hand-out is a new attempt with a new key); ``already_resolved`` before it (by a callback, the
#: provider, the worker or the timeout: the job unchanged, a contradicting report audited);
#: ``superseded``: the key is a genuine older attempt's (or its job was queued again), the
#: newer attempt was left alone.
CallAnswer = Literal["resolved", "requeued", "already_resolved", "superseded"]


@dataclass(frozen=True, slots=True)
class Run:
    """A run as ``outbound_heartbeat.run_info``: the row plus open job counts and liveness."""

    id: int
    business_id: int
    status: RunStatus
    locked_by_worker: str | None
    lock_ts: datetime | None
    last_heartbeat_at: datetime | None
    lease_epoch: int
    cancel_requested_at: datetime | None
    started_at: datetime | None
    ended_at: datetime | None
    created_at: datetime | None
    updated_at: datetime | None
    queued_jobs: int
    in_progress_jobs: int
    heartbeat_age: timedelta | None
    stale: bool


@dataclass(frozen=True, slots=True)
class Claim:
    """What ``claim_run`` grants: the lease (run_id, worker_id, lease_epoch) and its threshold."""

    run_id: int
    business_id: int
    worker_id: str
    lease_epoch: int
    resumed: bool
    stale_after: timedelta


@dataclass(frozen=True, slots=True)
class Job:
    """A job handed to a worker by ``next_job`` (now ``in_progress``)."""

    id: int
    run_id: int
    business_id: int
    status: JobStatus
    payload: Any
    error_message: str | None
    created_at: datetime | None
    updated_at: datetime | None
    #: This attempt's key (``oh1-<job>-<epoch>-<attempt>-<32 hex>``): the telephony provider's
    #: idempotency key and the status callback's credential (resolve_call).
    call_key: str | None = None


@dataclass(frozen=True, slots=True)
class CallResolution:
    """Result of ``resolve_call``: the job's status and how its call was settled, and the answer."""

    job_id: int
    run_id: int
    business_id: int
    status: JobStatus
    call_outcome: CallOutcome | None
    settled_at: datetime | None
    answer: CallAnswer


@dataclass(frozen=True, slots=True)
class OrphanedCallKey:
    """An unsettled orphaned call with its key (``list_orphaned_call_keys``): what a reconcile
    asks the provider about. ``call_key`` is a credential: never log it."""

    job_id: int
    run_id: int
    business_id: int
    call_key: str
    call_attempt: int
    orphaned_at: datetime
    orphan_reason: str | None
    times_out_at: datetime


#: What one reconcile did with one orphaned call: ``settled`` (resolve_call answered
#: ``resolved``), ``requeued`` (``not_placed`` on a run that retries unplaced calls: queued again
#: under a new key), ``already_settled`` (a callback, the worker or the timeout came first:
#: nothing written), ``unknown`` (the hook answered None: ask again later), ``hook_error`` (the
#: hook raised or answered something else than a Reconciled or None), ``locked`` (the job's row
#: stayed locked past ``lock_timeout``: nothing written, ask again later).
ReconcileResult = Literal[
    "settled", "requeued", "already_settled", "unknown", "hook_error", "locked"]


@dataclass(frozen=True, slots=True)
class ReconciledCall:
    """One orphaned call a reconcile asked the provider about (the key is left out: it is a
    credential). ``outcome`` is the provider's answer (None when it had none), ``detail`` its
    detail or the error."""

    job_id: int
    run_id: int
    business_id: int
    result: ReconcileResult
    outcome: Literal["completed", "failed", "not_placed"] | None
    detail: str | None


@dataclass(frozen=True, slots=True)
class ReconcileReport:
    """What ``reconcile_calls`` did: ``asked`` the hook about that many orphaned calls, each
    counted once in ``settled``, ``requeued``, ``already_settled``, ``unknown``,
    ``hook_errors`` or ``locked``; one :class:`ReconciledCall` per call, oldest orphan first."""

    asked: int
    settled: int
    requeued: int
    already_settled: int
    unknown: int
    hook_errors: int
    locked: int
    calls: tuple[ReconciledCall, ...]


@dataclass(frozen=True, slots=True)
class JobOutcome:
    """Result of ``finish_job``: outcome ``finished``, ``already_finished``, ``already_settled``
    (its call was settled otherwise; ``status`` is the job's) or ``lease_lost``."""

    job_id: int
    run_id: int
    status: JobStatus
    outcome: JobOutcomeName


@dataclass(frozen=True, slots=True)
class RunOutcome:
    """Result of ``finish_run``: outcome ``finished``, ``already_finished`` or ``lease_lost``
    (and, from ``finish_runs`` only, ``locked``)."""

    run_id: int
    status: RunStatus
    outcome: RunOutcomeName
    jobs_failed: int


@dataclass(frozen=True, slots=True)
class CancelResult:
    """Result of ``request_cancel`` or ``force_cancel``; 0 ``jobs_cancelled`` if nothing changed."""

    run_id: int
    business_id: int
    previous_status: RunStatus
    status: RunStatus
    jobs_cancelled: int


@dataclass(frozen=True, slots=True)
class ReclaimedRun:
    """One run reclaimed by ``cleanup_stuck_runs``, with its reason."""

    run_id: int
    business_id: int
    worker_id: str | None
    reason: Literal["stale_heartbeat", "legacy_lock_timeout", "empty", "on_startup"]
    status: RunStatus
    jobs_failed: int


@dataclass(frozen=True, slots=True)
class PruneResult:
    """One call of ``prune_events``: events older than ``cutoff`` deleted, in ``batches``;
    ``done`` when none past retention is left; counter rows merged on the way."""

    cutoff: datetime
    events_deleted: int
    batches: int
    done: bool
    counter_rows_merged: int


@dataclass(frozen=True, slots=True)
class HealthAlert:
    """One alert of ``health_check``: severity ``warning`` or ``critical``."""

    severity: Literal["warning", "critical"]
    check_name: str
    run_id: int | None
    detail: str


@dataclass(frozen=True, slots=True)
class Event:
    """A run transition a call caused, as announced by the database (NOTICE ``OH000``)."""

    event: str
    run_id: int
    business_id: int
    worker_id: str | None
    detail: dict[str, Any]


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """A row of the audit trail ``outbound_heartbeat.run_events``."""

    id: int
    run_id: int
    business_id: int
    event: str
    worker_id: str | None
    detail: dict[str, Any]
    created_at: datetime


@dataclass(frozen=True, slots=True)
class BrokenLink:
    """The first broken link of a run's audit hash chain (``verify_events()``): ``problem`` is
    ``altered``, ``deleted``, ``unchained`` or ``relinked``; hashes in hex."""

    run_id: int
    event_id: int
    problem: str
    expected: str | None
    found: str | None


@dataclass(frozen=True, slots=True)
class CounterDrift:
    """One count the trigger-kept counters get wrong (``verify_counters()``, or corrected by
    ``recount_counters()``): counter ``jobs`` (a run's ``queued`` / ``in_progress`` jobs) or
    ``runs`` (runs of a status, ``run_id`` None); ``kept`` is what the counters said."""

    counter: Literal["jobs", "runs"]
    run_id: int | None
    status: str
    kept: int
    actual: int


@dataclass(frozen=True, slots=True)
class Metric:
    """One sample of ``metrics()``: ``kind`` is ``gauge``, ``counter`` or ``histogram`` (a
    histogram's rows are its cumulative ``_bucket`` samples, label ``le``, and its ``_sum``);
    labels by name."""

    name: str
    kind: Literal["gauge", "counter", "histogram"]
    help: str
    labels: dict[str, str]
    value: float
