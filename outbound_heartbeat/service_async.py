"""The SQL API as plain function calls for web apps, DBAs' scripts and workers (asyncio).

Each function takes a psycopg connection (``AsyncConnection``) or pool
(``AsyncConnectionPool``) and runs one API function holding the connection's lock
(:mod:`outbound_heartbeat.locks`), so one connection may be shared by threads or tasks. With no
transaction open the call is its own transaction and its events are logged at once; inside the
app's open transaction it runs in a savepoint, the app's commit decides, and its events wait for
that commit (:mod:`outbound_heartbeat.outbox`, :func:`transaction`). OH SQLSTATEs map to
:mod:`outbound_heartbeat.errors`; arguments are checked before anything is sent
(:mod:`outbound_heartbeat.arguments`). The twin is :mod:`outbound_heartbeat.service`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from . import calls, errors, reconciliation, telemetry
from .calls import Outcome
from .compat import acall_hook, ahook_problem, arun_callback
from .locks import async_lock_for
from .outbox import (
    NOTIFY_QUERY,
    XACT_STATUS_QUERY,
    XID_QUERY,
    Callback,
    Pending,
    decide,
    deferred_notifies,
    outbox_for,
    report_late,
)
from .reconciliation import AsyncReconcileHook
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
    ReconcileReport,
    Run,
    RunOutcome,
)

T = TypeVar("T")
IDLE = psycopg.pq.TransactionStatus.IDLE
Connectable = psycopg.AsyncConnection[Any] | AsyncConnectionPool

__all__ = [
    "Connectable",
    "claim_run",
    "cleanup_stuck_runs",
    "create_run",
    "execute",
    "execute_call",
    "finish_job",
    "finish_run",
    "finish_runs",
    "force_cancel",
    "get_active_run",
    "health_check",
    "heartbeat",
    "heartbeat_leases",
    "list_active_runs",
    "list_events",
    "list_orphaned_call_keys",
    "metrics",
    "next_job",
    "prune_events",
    "reconcile_calls",
    "recount_counters",
    "request_cancel",
    "resolve_call",
    "settle",
    "skip_notify",
    "transaction",
    "verify_counters",
    "verify_events",
]


async def execute(conn: Connectable, call: calls.Call[T]) -> tuple[T, list[Event]]:
    """Runs one call; returns its result and the run transitions it caused.

    Inside a transaction the app has open, the events are those of a savepoint that counts
    only if the app commits: see :func:`execute_call` to learn which, and to act after it."""
    outcome = await execute_call(conn, call)
    return outcome.result, outcome.events


async def execute_call(
    conn: Connectable, call: calls.Call[T], *, join: bool = False
) -> Outcome[T]:
    """Runs one call holding the connection's lock (see :mod:`outbound_heartbeat.locks`).

    On a connection with no transaction open the call is its own transaction, committed when
    this returns; its events are logged at once and ``pending`` is None. On a connection
    inside the app's transaction it runs in a savepoint; ``pending`` then holds its events,
    logged and handed to ``pending.on_commit`` callbacks only once that transaction commits,
    dropped if it rolls back (see :mod:`outbound_heartbeat.outbox`). ``join=True`` makes a
    call on an idle non-autocommit connection start the app's transaction instead of
    committing its own (how SQLAlchemy's unit of work hands its connection over).
    """
    with telemetry.call_span(call.name) as span:
        if isinstance(conn, AsyncConnectionPool):
            async with conn.connection() as pooled:
                outcome = await _execute_on(pooled, call, join)
        else:
            outcome = await _execute_on(conn, call, join)
        if outcome.pending is None:
            span.events(outcome.events)
        else:  # traced once the app's transaction has committed, like the logs
            outcome.pending.on_commit(lambda events: telemetry.record_events(call.name, events))
        return outcome


async def _execute_on(
    conn: psycopg.AsyncConnection[Any], call: calls.Call[T], join: bool
) -> Outcome[T]:
    async with async_lock_for(conn):
        box = outbox_for(conn)
        status = conn.info.transaction_status
        fired = await _settle_locked(conn, box.unsettled()) if status == IDLE and box else []
        inside = status != IDLE or (join and not conn.autocommit)
        collector = calls.EventCollector()
        conn.add_notice_handler(collector)
        try:
            async with conn.cursor(row_factory=dict_row) as cur:
                if calls.runs_alone(conn.autocommit, status) or (inside and status == IDLE):
                    # One statement is atomic on its own; joined, psycopg's implicit BEGIN
                    # makes it the first of the app's transaction.
                    await cur.execute(call.query, call.params)
                    rows = await cur.fetchall()
                else:  # its own BEGIN/COMMIT, or a savepoint in the app's transaction
                    async with conn.transaction():
                        await cur.execute(call.query, call.params)
                        rows = await cur.fetchall()
                xid = (
                    await (await cur.execute(XID_QUERY)).fetchone()
                    if inside and collector.events
                    else None
                )
        except psycopg.Error as exc:
            err = calls.translate(call, exc)
            audit = calls.refusal_audit(call, err)
            if audit is not None:
                await _audit_refusal(conn, audit, join)
            raise err from exc
        finally:
            conn.remove_notice_handler(collector)
        pending = None
        if inside and collector.events:
            pending = box.add(_xid(xid), collector.events)
    report_late(fired)
    await _run(fired)
    if pending is None:
        calls.log_events(collector.events)
    return Outcome(call.decode(rows), collector.events, pending)


async def _audit_refusal(
    conn: psycopg.AsyncConnection[Any], audit: calls.Call[AuditEvent], join: bool
) -> None:
    """Writes the [SECURITY] event of a refused call on the same connection (after the caller's
    commit when it has a transaction open); a failure to audit is logged, never raised."""
    try:
        await _execute_on(conn, audit, join)
    except (psycopg.Error, errors.Error) as exc:
        calls.logger.error("[SECURITY] could not audit a refused %s: %s", audit.name, exc)


def _xid(row: dict[str, Any] | None) -> int | None:
    return int(row["xid"]) if row is not None and row["xid"] is not None else None


async def _settle_locked(
    conn: psycopg.AsyncConnection[Any], entries: Sequence[Pending]
) -> list[tuple[Pending, list[Callback]]]:
    """Asks the server how the entries' transactions ended; settles those that have."""
    if not entries:
        return []
    xids = [str(p.xid) for p in entries if p.xid is not None]
    statuses: dict[str, str | None] = {}
    if xids:
        async with conn.cursor(row_factory=dict_row) as cur:
            if conn.autocommit or conn.info.transaction_status != IDLE:
                rows = await (await cur.execute(XACT_STATUS_QUERY, {"xids": xids})).fetchall()
            else:
                async with conn.transaction():  # not left open on a non-autocommit connection
                    rows = await (await cur.execute(XACT_STATUS_QUERY, {"xids": xids})).fetchall()
        statuses = {r["xid"]: r["status"] for r in rows}
    fired = decide(entries, statuses)
    payloads = deferred_notifies(fired)
    if payloads and conn.info.transaction_status == IDLE:
        # The NOTIFYs a transaction marked by skip_notify() did not send, now it committed
        # (only in a transaction of our own: the app's next one may be prepared too).
        if conn.autocommit:
            await conn.execute(NOTIFY_QUERY, {"payloads": payloads})
        else:
            async with conn.transaction():
                await conn.execute(NOTIFY_QUERY, {"payloads": payloads})
    return fired


async def _run(fired: list[tuple[Pending, list[Callback]]]) -> None:
    for pending, callbacks in fired:
        for callback in callbacks:
            try:
                await arun_callback(callback, pending.events)
            except Exception:
                calls.logger.exception("[EVENT] after-commit callback %r failed", callback)


async def settle(conn: Connectable, pending: Sequence[Pending] | None = None) -> None:
    """Settles events waiting for the app's commit: those of ``conn`` (default) or the given
    ones, judged by the server (``pg_xact_status``). Committed ones are logged and their
    callbacks run, rolled-back ones dropped, those of a transaction still open kept.

    Any later call on the connection does this by itself once it is out of the transaction;
    call it when nothing else will touch the connection soon."""
    if isinstance(conn, AsyncConnectionPool):
        async with conn.connection() as pooled:
            await settle(pooled, pending)
        return
    async with async_lock_for(conn):
        entries = outbox_for(conn).unsettled() if pending is None else list(pending)
        fired = await _settle_locked(conn, [p for p in entries if p.state == "pending"])
    await _run(fired)


@contextlib.asynccontextmanager
async def transaction(
    conn: psycopg.AsyncConnection[Any], *, notify: bool = True
) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """The app's own transaction block, with library calls inside it.

    Holds the connection's lock for the whole block, so other threads' calls on a shared
    connection wait instead of joining it, and opens ``conn.transaction()``. Work the block
    fans out and waits for (threads it joins, futures it waits on, tasks it gathers) is
    admitted into it, one call at a time (see :mod:`outbound_heartbeat.locks`). When the block
    commits, the events of the library calls made in it are logged and their after-commit
    callbacks (release hooks) run; when it rolls back they are dropped. Nested in an outer
    transaction it is a savepoint: its rollback drops the events of the calls made in it at
    once, its release leaves them to the outer transaction's end. ``notify=False``: the
    library's calls in the transaction send no NOTIFY (see :func:`skip_notify`).
    """
    fired: list[tuple[Pending, list[Callback]]] = []
    box = outbox_for(conn)
    async with async_lock_for(conn).block() as block:
        mark = box.mark()
        ok = False
        try:
            async with conn.transaction():
                try:
                    if not notify:
                        await _skip_notify_locked(conn)
                    yield conn
                except BaseException:
                    await block.close()  # the fanned-out calls end before the rollback
                    box.drop_since(mark)
                    raise
                await block.close()
            ok = True
        finally:
            if conn.info.transaction_status == IDLE and not conn.closed:
                try:
                    fired = await _settle_locked(conn, box.unsettled())
                except psycopg.Error:
                    if ok:
                        raise
                    # The block's own error is the one to see; the events stay pending.
    await _run(fired)


#: Marks the open transaction (by its id, so a session-level value does nothing) as one whose
#: events send no NOTIFY.
SKIP_NOTIFY_QUERY = (
    "SELECT pg_catalog.set_config('outbound_heartbeat.skip_notify',"
    " pg_catalog.pg_current_xact_id()::text, true)"
)


async def skip_notify(conn: psycopg.AsyncConnection[Any]) -> None:
    """Makes the library's calls in the transaction open on ``conn`` send no NOTIFY, so that
    the app may end it with ``PREPARE TRANSACTION`` (two-phase commit), which PostgreSQL
    refuses once a NOTIFY was sent. Only this transaction: the mark is its transaction id,
    set with ``set_config(..., true)``; the events are still written, and listeners (the
    console) see them at their next re-read. Raises InvalidArgument (``conn``) when no
    transaction is open on an autocommit connection."""
    if not isinstance(conn, psycopg.AsyncConnection):
        raise errors.InvalidArgument(
            "conn must be the connection of the open transaction, not a pool", argument="conn"
        )
    async with async_lock_for(conn):
        await _skip_notify_locked(conn)


async def _skip_notify_locked(conn: psycopg.AsyncConnection[Any]) -> None:
    if conn.autocommit and conn.info.transaction_status == IDLE:
        raise errors.InvalidArgument(
            "conn has no transaction open: skip_notify() marks the open transaction",
            argument="conn",
        )
    row = await (await conn.execute(SKIP_NOTIFY_QUERY)).fetchone()
    assert row is not None
    outbox_for(conn).silent_xid = int(row[0])


async def create_run(
    conn: Connectable, business_id: int, jobs: Sequence[Any] = (), retry_unplaced: bool = False
) -> Run:
    """Creates a pending run with one queued job per element of ``jobs`` (JSON payloads);
    ``retry_unplaced``: a call reported ``not_placed`` while the run is open is queued again."""
    return (await execute(conn, calls.create_run(business_id, jobs, retry_unplaced)))[0]


async def claim_run(conn: Connectable, worker_id: str, run_id: int | None = None) -> Claim | None:
    """Claims the worker's own running run (resume), else ``run_id`` or the oldest pending run."""
    return (await execute(conn, calls.claim_run(worker_id, run_id)))[0]


async def heartbeat(
    conn: Connectable, run_id: int, worker_id: str, lease_epoch: int
) -> HeartbeatStatus:
    """``'ok'``, ``'cancel_requested'`` or ``'lost'`` for the lease holder."""
    return (await execute(conn, calls.heartbeat(run_id, worker_id, lease_epoch)))[0]


async def heartbeat_leases(
    conn: Connectable, leases: Sequence[tuple[int, str, int]]
) -> list[tuple[int, str]]:
    """One statement beating many leases: (run_id, status) per lease, in order (see calls)."""
    return (await execute(conn, calls.heartbeat_leases(leases)))[0]


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


async def finish_runs(
    conn: Connectable, leases: Sequence[tuple[int, str, int, str]]
) -> list[RunOutcome]:
    """finish_run() for many (run_id, worker_id, lease_epoch, status) in one statement."""
    return (await execute(conn, calls.finish_runs(leases)))[0]


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


async def resolve_call(
    conn: Connectable,
    call_key: str,
    outcome: str,
    detail: str | None = None,
    business_id: int | None = None,
    source: str = "callback",
) -> CallResolution:
    """Settles the call with this key exactly once (the telephony status callback, or
    ``source="provider"``: a reconciliation that asked the provider): answer ``resolved``,
    ``requeued`` (not placed, on a ``retry_unplaced`` run still open), ``already_resolved``
    (the job unchanged) or ``superseded`` (a genuine older attempt's key)."""
    call = calls.resolve_call(call_key, outcome, detail, business_id, source)
    return (await execute(conn, call))[0]


async def list_orphaned_call_keys(
    conn: Connectable, business_id: int | None = None, limit: int = reconciliation.DEFAULT_LIMIT
) -> list[OrphanedCallKey]:
    """The unsettled orphaned calls with their keys (of one business, or all), oldest first,
    at most ``limit``. The keys are credentials: never log them."""
    return (await execute(conn, calls.list_orphaned_call_keys(business_id, limit)))[0]


async def reconcile_calls(
    conn: Connectable,
    hook: AsyncReconcileHook,
    *,
    business_id: int | None = None,
    limit: int = reconciliation.DEFAULT_LIMIT,
) -> ReconcileReport:
    """Asks ``hook`` what became of each unsettled orphaned call (of ``business_id``, or all:
    an operator's call), oldest first, at most ``limit``, and settles each answer with
    ``resolve_call(..., source='provider')``, one short transaction per call (the hook is never
    asked inside one on an idle connection). ``hook``: see
    :mod:`outbound_heartbeat.reconciliation` (the thread twin takes a sync hook only, the
    asyncio twin a coroutine function too).

    A hook that raises, or answers something else than a Reconciled or None, for one call is
    logged and counted (``hook_errors``); the others are still asked. A call whose row another
    transaction holds past ``lock_timeout`` is counted ``locked`` and left for the next pass.
    A callback, the worker or the timeout settling the call first makes it ``already_settled``:
    resolve_call() settles a call exactly once. Database errors other than a held row stop the
    pass (what was settled stays settled). InvalidArgument (``hook``, ``business_id``,
    ``limit``) before anything is asked."""
    problem = ahook_problem(hook)
    if problem is not None:
        raise errors.InvalidArgument(problem, argument="hook")
    tally = reconciliation.Tally()
    for orphan in await list_orphaned_call_keys(conn, business_id, limit):
        try:
            answer = reconciliation.checked_answer(await acall_hook(hook, orphan.call_key))
        except Exception as exc:
            tally.hook_failed(orphan, exc)
            continue
        if answer is None:
            tally.add(orphan, "unknown")
            continue
        try:
            resolution = await resolve_call(conn, orphan.call_key, answer.outcome, answer.detail,
                                            business_id, source="provider")
        except errors.RunLocked as exc:
            tally.add(orphan, "locked", answer, exc.message)
            continue
        tally.resolved(orphan, answer, resolution)
    return tally.report()


async def cleanup_stuck_runs(
    conn: Connectable, on_startup: bool = False, worker_id: str | None = None
) -> list[ReclaimedRun]:
    """Reclaims stuck running runs, one record each with its reason."""
    return (await execute(conn, calls.cleanup_stuck_runs(on_startup, worker_id)))[0]


async def health_check(
    conn: Connectable, alert_after: timedelta = timedelta(minutes=2), max_stuck: int = 5
) -> list[HealthAlert]:
    """The alerts of the health checks (empty when healthy)."""
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


async def verify_events(conn: Connectable, run_id: int | None = None) -> list[BrokenLink]:
    """The first broken link of each run's audit hash chain (or of one run); empty: intact."""
    return (await execute(conn, calls.verify_events(run_id)))[0]


async def verify_counters(conn: Connectable) -> list[CounterDrift]:
    """Every count the trigger-kept counters get wrong against the tables (empty: exact).
    Reads every open job and every run: an operator's call (``grant_dba_role``)."""
    return (await execute(conn, calls.verify_counters()))[0]


async def recount_counters(conn: Connectable) -> list[CounterDrift]:
    """Corrects the counters online by the drift :func:`verify_counters` sees, waiting for no
    writer; returns what it corrected (an operator's call, ``grant_dba_role``)."""
    return (await execute(conn, calls.recount_counters()))[0]


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
