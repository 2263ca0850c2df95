"""The core worker guarantees in every mode a lease can run in (docs/guarantees.md): each
scenario runs with a shared lease (the process's hub) and a dedicated one (``share=False``),
with ``Lease`` and ``AsyncLease``, straight to PostgreSQL and through PgBouncer in transaction
mode, and with the app tables owned by a separate role or by the app's own role.

In-process leases on a real server: the harness drives an ``AsyncLease`` on an event loop of
its own thread, so the same scenario reads the same for both twins while the lease's
background heartbeat keeps running between the test's steps."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

import psycopg
import pytest
from psycopg import sql

from outbound_heartbeat import (
    AccessDenied,
    InvalidArgument,
    LeaseLost,
    RunNotFound,
    calls,
    schema,
    service,
    service_async,
)
from outbound_heartbeat.lease import Lease, NothingToClaim
from outbound_heartbeat.upgrade import apply_sql_online

from ..helpers import (
    LEASE_INTERVAL,
    AsyncDriver,
    audit_job_failures,
    backdate_heartbeat,
    job_statuses,
    jobs_failed_more_than_once,
    leased,
    run_row,
    until,
    written,
)
from ..proxy import proxy_for

Conn = psycopg.Connection[Any]
T = TypeVar("T")

STALE_AFTER = 3.0
INTERVAL = LEASE_INTERVAL  # the interval leased() gives its leases
SHARES = [pytest.param(True, id="shared"), pytest.param(False, id="dedicated")]
TWINS = ["sync", "async"]
ROUTES = ["direct", "pgbouncer"]


@pytest.fixture
def fast(conn: Conn) -> Conn:
    conn.execute("UPDATE outbound_heartbeat.settings SET stale_after = make_interval(secs => %s)",
                  (STALE_AFTER,))
    return conn


# -- fencing and cancel, every lease kind x twin x route ------------------------------------


@pytest.mark.parametrize("route", ROUTES, indirect=True)
@pytest.mark.parametrize("twin", TWINS)
@pytest.mark.parametrize("share", SHARES)
def test_a_force_cancelled_lease_learns_it_and_writes_nothing(
    fast: Conn, dsn: str, share: bool, twin: str
) -> None:
    run = service.create_run(fast, 1, [{"n": i} for i in range(4)])
    with leased(twin, dsn, f"fenced-{twin}", run.id, share) as lease:
        first = lease.next_job()
        lease.finish_job(first)
        second = lease.next_job()
        epoch = lease.lease_epoch
        assert service.force_cancel(fast, run.id, business_id=1).jobs_cancelled == 2
        frozen = written(fast)
        took = until(lambda: lease.lost, 2 * INTERVAL + 3, "the lease never learned it")
        assert took <= 2 * INTERVAL + 3
        with pytest.raises(LeaseLost):
            lease.next_job()
        with pytest.raises(LeaseLost):
            lease.finish_job(second)
        # The zombie's own calls, sent anyway, are fenced by the server too.
        assert service.heartbeat(fast, run.id, f"fenced-{twin}", epoch) == "lost"
        refused = service.finish_job(fast, second.id, f"fenced-{twin}", epoch, "completed")
        assert refused.outcome == "lease_lost"
        assert written(fast) == frozen
    assert written(fast) == frozen  # leaving a lost lease releases nothing
    row = run_row(fast, run.id)
    assert (row["status"], row["locked_by_worker"]) == ("cancelled", None)
    assert row["lease_epoch"] > epoch
    assert job_statuses(fast, run.id)[second.id] == "in_progress"  # handed out: left to the app


@pytest.mark.parametrize("route", ROUTES, indirect=True)
@pytest.mark.parametrize("twin", TWINS)
@pytest.mark.parametrize("share", SHARES)
def test_a_cancel_request_reaches_the_lease_within_an_interval(
    fast: Conn, dsn: str, share: bool, twin: str
) -> None:
    run = service.create_run(fast, 1, [{"n": i} for i in range(4)])
    with leased(twin, dsn, f"polite-{twin}", run.id, share) as lease:
        job = lease.next_job()
        service.request_cancel(fast, run.id, business_id=1)
        until(lambda: lease.cancel_requested, 2 * INTERVAL + 3, "the cancel never arrived")
        lease.finish_job(job)  # the call in progress ends normally
        assert lease.next_job() is None
    assert not lease.lost
    assert run_row(fast, run.id)["status"] == "cancelled"
    statuses = job_statuses(fast, run.id)
    assert statuses.pop(job.id) == "completed"
    assert set(statuses.values()) == {"failed"}


@pytest.mark.slow
@pytest.mark.parametrize("twin", TWINS)
@pytest.mark.parametrize("share", [pytest.param(False, id="dedicated")])
def test_a_live_lease_keeps_its_run_while_readers_poll_past_stale_after(
    fast: Conn, dsn: str, share: bool, twin: str
) -> None:
    """A live lease is never taken over nor declared stale: a same-named claimer and a sweep
    race it for longer than stale_after while a reader polls; the run completes. (Shared
    leases: tests/e2e/test_lease.py::test_two_live_processes_with_one_name_never_share_a_run.)"""
    run = service.create_run(fast, 1, [{"n": i} for i in range(3)])
    with leased(twin, dsn, f"alive-{twin}", run.id, share) as lease:
        job = lease.next_job()
        start = time.monotonic()
        while time.monotonic() - start < STALE_AFTER + INTERVAL:
            assert service.claim_run(fast, f"alive-{twin}") is None
            assert service.claim_run(fast, f"alive-{twin}", run.id) is None
            assert service.cleanup_stuck_runs(fast) == []
            active = service.get_active_run(fast, 1)
            assert active is not None and active.id == run.id
            lease.touch()  # the dial loop is busy on one long call, not stalled
            time.sleep(0.2)
        lease.finish_job(job)
        while (job := lease.next_job()) is not None:
            lease.finish_job(job)
    assert not lease.lost
    assert run_row(fast, run.id)["status"] == "completed"
    assert set(job_statuses(fast, run.id).values()) == {"completed"}


# -- who owns the tables ---------------------------------------------------------------------


def give_tables_to(conn: Conn, role: str) -> None:
    for table in ("outbound_call_runs", "outbound_call_jobs"):
        conn.execute(sql.SQL("ALTER TABLE public.{} OWNER TO {}").format(
            sql.Identifier(table), sql.Identifier(role)))


@pytest.mark.parametrize("owner", ["separate", "app"])
@pytest.mark.parametrize("twin", TWINS)
@pytest.mark.parametrize("share", SHARES)
def test_worker_guarantees_hold_whoever_owns_the_tables(
    fast: Conn, dsn: str, roles: dict[str, str], owner: str, share: bool, twin: str
) -> None:
    """Fencing, cancel, tenant isolation and stale detection through the API, the lease and
    the web side all logged in as the app role, whether its tables belong to a separate
    owner or to that very role (what the API promises; what the app role could do around
    it with its owner rights is docs/security.md's subject)."""
    app = roles["app"]
    if owner == "app":
        row = fast.execute("SELECT pg_get_userbyid(relowner) FROM pg_class"
                           " WHERE oid = 'public.outbound_call_runs'::regclass").fetchone()
        assert row is not None
        give_tables_to(fast, app)
        try:
            run_as_app(fast, dsn, app, owner, share, twin)
        finally:
            give_tables_to(fast, row[0])  # so the fixture can drop the role
    else:
        run_as_app(fast, dsn, app, owner, share, twin)


def run_as_app(fast: Conn, dsn: str, app: str, owner: str, share: bool, twin: str) -> None:
    owners = fast.execute(
        "SELECT DISTINCT pg_get_userbyid(relowner) = %s FROM pg_class"
        " WHERE oid IN ('public.outbound_call_runs'::regclass, 'public.outbound_call_jobs'::regclass)",
        (app,)).fetchall()
    assert owners == [(owner == "app",)]
    app_dsn = psycopg.conninfo.make_conninfo(dsn, user=app)
    with psycopg.connect(app_dsn, autocommit=True) as web:
        run = service.create_run(web, 21, [{"n": i} for i in range(3)])
        other = service.create_run(web, 22, [{"n": 1}])
        with leased(twin, app_dsn, f"owned-{twin}", run.id, share) as lease:
            job = lease.next_job()
            lease.finish_job(job)
            untouched = written(fast, beats=False)[:2]  # the lease beats meanwhile
            with pytest.raises(AccessDenied):
                service.force_cancel(web, run.id, business_id=22)
            assert written(fast, beats=False)[:2] == untouched  # refused, nothing changed (audited only)
            service.request_cancel(web, run.id, business_id=21)
            until(lambda: lease.cancel_requested, 2 * INTERVAL + 3, "the cancel never arrived")
            assert service.force_cancel(web, run.id, business_id=21).jobs_cancelled == 2
            until(lambda: lease.lost, 2 * INTERVAL + 3, "the lease never learned it")
            with pytest.raises(LeaseLost):
                lease.next_job()
        assert run_row(fast, run.id)["status"] == "cancelled"
        # A second cancel and a sweep change nothing.
        frozen = written(fast)
        assert service.force_cancel(web, run.id, business_id=21).jobs_cancelled == 0
        assert service.cleanup_stuck_runs(web) == []
        assert written(fast) == frozen
        # A worker that died holding the other business's run: stopped by the reader.
        assert service.claim_run(web, "gone", other.id) is not None
        backdate_heartbeat(fast, other.id, STALE_AFTER + 1)
        assert service.get_active_run(web, 22) is None
        assert run_row(fast, other.id)["status"] == "stopped"
        assert set(job_statuses(fast, other.id).values()) == {"failed"}
    assert service.verify_events(fast) == []


# -- a lost answer, every lease kind x twin ------------------------------------------------


@pytest.mark.parametrize("route", ROUTES, indirect=True)
@pytest.mark.parametrize("twin", TWINS)
@pytest.mark.parametrize("share", SHARES)
def test_a_lost_answer_to_next_job_strands_no_job(
    fast: Conn, dsn: str, share: bool, twin: str
) -> None:
    """The server commits the second next_job, its answer never arrives (the proxy swallows
    it and resets the connection): the lease re-sends the call with the same retry key and
    gets the job the lost call took."""
    run = service.create_run(fast, 1, [{"n": i} for i in range(4)])
    seen: list[int] = []
    with proxy_for(dsn) as (proxy, far):
        proxy.drop_answer_to(b"outbound_heartbeat.next_job", nth=2)
        with leased(twin, far, f"lossy-{twin}", run.id, share) as lease:
            while (job := lease.next_job()) is not None:
                seen.append(job.id)
                lease.finish_job(job)
        assert proxy.dropped == 1
    assert not lease.lost
    statuses = job_statuses(fast, run.id)
    assert sorted(seen) == sorted(statuses) and len(seen) == len(set(seen))
    assert set(statuses.values()) == {"completed"}
    assert run_row(fast, run.id)["status"] == "completed"


# -- calls in autocommit, inside the app's transaction, and in a savepoint of it -------------

BLOCKS = ["autocommit", "transaction", "nested"]


def zombie_setup(conn: Conn) -> tuple[int, int, int, int]:
    """A running run whose worker lost its first lease (resumed once stale: a new epoch) and
    another business's running run; (run, job taken under the old lease, old epoch, other)."""
    run = service.create_run(conn, 1, [{"n": i} for i in range(3)])
    first = service.claim_run(conn, "w", run.id)
    assert first is not None
    job = service.next_job(conn, run.id, "w", first.lease_epoch)
    assert job is not None
    backdate_heartbeat(conn, run.id, STALE_AFTER + 1)
    resumed = service.claim_run(conn, "w")
    assert resumed is not None and resumed.lease_epoch > first.lease_epoch
    other = service.create_run(conn, 1, [{"n": 1}])
    assert service.claim_run(conn, "v", other.id) is not None
    return run.id, job.id, first.lease_epoch, other.id


def after_the_block(fast: Conn, how: str, run: int, job: int, other: int) -> None:
    assert run_row(fast, run)["status"] == "cancelled"
    statuses = job_statuses(fast, run)
    assert statuses.pop(job) == "in_progress"  # the zombie's job: left to the app
    assert set(statuses.values()) == {"failed"}
    assert run_row(fast, other)["status"] == "running"  # its cancel was rolled back (nested)
    assert set(job_statuses(fast, other).values()) == {"queued"}
    assert service.verify_events(fast) == []


@contextlib.contextmanager
def sync_block(app: Conn, how: str) -> Iterator[None]:
    if how == "autocommit":
        yield
        return
    with app.transaction():
        if how == "transaction":
            yield
        else:
            with app.transaction():  # a savepoint of the app's transaction
                yield
        assert app.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS


@pytest.mark.parametrize("route", ROUTES, indirect=True)
@pytest.mark.parametrize("how", BLOCKS)
def test_sync_calls_keep_their_guarantees_in_every_transaction_mode(
    fast: Conn, dsn: str, how: str
) -> None:
    """Refusals (unknown run, other business, bad argument) leave the app's transaction
    usable and change nothing; a zombie's calls are fenced; a cancel is one transition and a
    second reports 0; a cancel in a rolled-back savepoint never happened."""
    run, job, old_epoch, other = zombie_setup(fast)
    with psycopg.connect(dsn, autocommit=True) as app, sync_block(app, how):
        with pytest.raises(RunNotFound):
            service.force_cancel(app, 10**9, business_id=1)
        with pytest.raises(AccessDenied):
            service.force_cancel(app, run, business_id=2)
        with pytest.raises(InvalidArgument) as bad:
            service.finish_job(app, job, "w", old_epoch, "bogus")
        assert service.heartbeat(app, run, "w", old_epoch) == "lost"
        with pytest.raises(LeaseLost):
            service.next_job(app, run, "w", old_epoch)
        assert service.finish_job(app, job, "w", old_epoch, "completed").outcome == "lease_lost"
        assert service.force_cancel(app, run, business_id=1).jobs_cancelled == 2
        assert service.force_cancel(app, run, business_id=1).jobs_cancelled == 0
        # Others see it only once the app commits.
        assert run_row(fast, run)["status"] == ("cancelled" if how == "autocommit" else "running")
        if how == "nested":
            with contextlib.suppress(ZeroDivisionError), app.transaction():
                assert service.force_cancel(app, other, business_id=1).jobs_cancelled == 1
                raise ZeroDivisionError  # the app undoes this savepoint only
    assert bad.value.argument == "status"
    after_the_block(fast, how, run, job, other)


@contextlib.asynccontextmanager
async def async_block(app: psycopg.AsyncConnection[Any], how: str) -> AsyncIterator[None]:
    if how == "autocommit":
        yield
        return
    async with app.transaction():
        if how == "transaction":
            yield
        else:
            async with app.transaction():
                yield
        assert app.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS


@pytest.mark.parametrize("route", ROUTES, indirect=True)
@pytest.mark.parametrize("how", BLOCKS)
def test_async_calls_keep_their_guarantees_in_every_transaction_mode(
    fast: Conn, dsn: str, how: str
) -> None:
    """The async twin of the test above, on an AsyncConnection."""
    run, job, old_epoch, other = zombie_setup(fast)

    async def scenario() -> str | None:
        app = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        async with app, async_block(app, how):
            with pytest.raises(RunNotFound):
                await service_async.force_cancel(app, 10**9, business_id=1)
            with pytest.raises(AccessDenied):
                await service_async.force_cancel(app, run, business_id=2)
            with pytest.raises(InvalidArgument) as bad:
                await service_async.finish_job(app, job, "w", old_epoch, "bogus")
            assert await service_async.heartbeat(app, run, "w", old_epoch) == "lost"
            with pytest.raises(LeaseLost):
                await service_async.next_job(app, run, "w", old_epoch)
            refused = await service_async.finish_job(app, job, "w", old_epoch, "completed")
            assert refused.outcome == "lease_lost"
            assert (await service_async.force_cancel(app, run, business_id=1)).jobs_cancelled == 2
            assert (await service_async.force_cancel(app, run, business_id=1)).jobs_cancelled == 0
            assert run_row(fast, run)["status"] == ("cancelled" if how == "autocommit" else "running")
            if how == "nested":
                with contextlib.suppress(ZeroDivisionError):
                    async with app.transaction():
                        cancelled = await service_async.force_cancel(app, other, business_id=1)
                        assert cancelled.jobs_cancelled == 1
                        raise ZeroDivisionError
        return bad.value.argument

    assert asyncio.run(scenario()) == "status"
    after_the_block(fast, how, run, job, other)


# -- bad arguments, every lease kind x twin --------------------------------------------------


@pytest.mark.parametrize("twin", TWINS)
@pytest.mark.parametrize("share", SHARES)
def test_a_bad_lease_argument_is_refused_before_anything_is_claimed(
    fast: Conn, dsn: str, share: bool, twin: str
) -> None:
    run = service.create_run(fast, 1, [{"n": 1}])
    before = written(fast)

    def enter(run_id: int, **kwargs: Any) -> None:
        if twin == "sync":
            with Lease(dsn, "careful", run_id, share=share, **kwargs):
                pass
            return
        with AsyncDriver(dsn, "careful", run_id, share=share, **kwargs):
            pass

    with pytest.raises(InvalidArgument) as bad:
        enter(run.id, interval=STALE_AFTER)  # more than a third of stale_after
    assert bad.value.argument == "interval"
    with pytest.raises(RunNotFound):
        enter(10**9)
    assert written(fast) == before  # nothing claimed, nothing written
    service.force_cancel(fast, run.id)
    with pytest.raises(NothingToClaim):
        enter(run.id)


# -- every lease kind racing sweeps, readers and cancels ------------------------------------

KINDS = [("sync", True), ("sync", False), ("async", True), ("async", False)]


@pytest.mark.parametrize(("route", "owner"), [("direct", "separate"), ("pgbouncer", "separate"),
                                              ("direct", "app")], indirect=["route"])
def test_every_lease_kind_races_sweeps_readers_and_cancels_without_deadlock(
    fast: Conn, dsn: str, direct_dsn: str, roles: dict[str, str], route: str, owner: str
) -> None:
    """Shared and dedicated, sync and async leases work through their runs while two sweepers
    and readers poll every business (one in autocommit, one inside app transactions with its
    reads in a nested block) and a canceller force-cancels two runs: no deadlock, no
    live run declared stale, no job failed twice, each run ended once. Directly the callers
    log in as the app role (whose tables a separate role owns, or it owns them itself);
    PgBouncer's users file holds the server's user only."""
    app = roles["app"]
    original = fast.execute("SELECT pg_get_userbyid(relowner) FROM pg_class"
                            " WHERE oid = 'public.outbound_call_runs'::regclass").fetchone()
    assert original is not None
    if owner == "app":
        give_tables_to(fast, app)
    try:
        login = psycopg.conninfo.make_conninfo(dsn, user=app) if route == "direct" else dsn
        race(fast, direct_dsn, login)
    finally:
        give_tables_to(fast, original[0])


def race(fast: Conn, direct_dsn: str, login: str) -> None:
    audit_job_failures(fast)
    runs = [service.create_run(fast, b, [{"n": i} for i in range(30)]).id for b in range(1, 9)]
    doomed = set(runs[-2:])  # one shared and one dedicated lease's run
    with psycopg.connect(direct_dsn, autocommit=True) as watcher:
        deadlocks = "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"
        before = watcher.execute(deadlocks).fetchone()
        done = threading.Event()
        errors: list[BaseException] = []
        outcome: dict[int, str] = {}
        progress: dict[int, int] = dict.fromkeys(runs, 0)

        def work(run_id: int, twin: str, share: bool) -> None:
            try:
                with leased(twin, login, f"racer-{run_id}", run_id, share) as lease:
                    while (job := lease.next_job()) is not None:
                        time.sleep(0.02)
                        lease.finish_job(job)
                        progress[run_id] += 1
                outcome[run_id] = "lost" if lease.lost else "released"
            except LeaseLost:
                outcome[run_id] = "lost"
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        def sweep(in_block: bool) -> None:
            """Sweeps and reads; ``in_block``: each round inside an app transaction (the
            library's block), its reads in a block nested in it (a savepoint)."""
            try:
                with psycopg.connect(login, autocommit=True) as c:
                    while not done.is_set():
                        with service.transaction(c) if in_block else contextlib.nullcontext(c):
                            service.cleanup_stuck_runs(c)
                            with service.transaction(c) if in_block else contextlib.nullcontext(c):
                                for business in range(1, 9):
                                    service.get_active_run(c, business)
                            service.list_active_runs(c)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        workers = [threading.Thread(target=work, args=(run_id, *KINDS[i % 4]))
                   for i, run_id in enumerate(runs)]
        sweepers = [threading.Thread(target=sweep, args=(in_block,)) for in_block in (False, True)]
        for thread in workers + sweepers:
            thread.start()
        try:
            until(lambda: all(progress[r] >= 1 for r in doomed), 20, "the doomed runs never began")
            with psycopg.connect(login, autocommit=True) as web:
                for run_id in doomed:
                    business = run_row(fast, run_id)["business_id"]
                    assert service.force_cancel(web, run_id, business_id=business).jobs_cancelled > 0
            for thread in workers:
                thread.join(60)
        finally:
            done.set()
            for thread in sweepers:
                thread.join(30)
        assert errors == []
        assert watcher.execute(deadlocks).fetchone() == before
    assert outcome == {r: "lost" if r in doomed else "released" for r in runs}
    assert jobs_failed_more_than_once(fast) == []
    for run_id in runs:
        assert run_row(fast, run_id)["status"] == ("cancelled" if run_id in doomed else "completed")
    ended = fast.execute(
        "SELECT run_id, count(*) FROM outbound_heartbeat.run_events WHERE event IN"
        " ('finished', 'force_cancelled', 'stale_stopped', 'cleaned_up') GROUP BY run_id").fetchall()
    assert dict(ended) == dict.fromkeys(runs, 1)  # each run ended once, none as stale
    assert service.verify_events(fast) == []


# -- operator commands through PgBouncer and as the DBA role --------------------------------


@pytest.mark.parametrize(("route", "login"), [("pgbouncer", "server user"), ("direct", "dba role")],
                         indirect=["route"])
@pytest.mark.parametrize("command", [["health"], ["force-cancel", "RUN"]],
                         ids=["health", "force-cancel"])
def test_operator_commands_give_up_behind_a_lock_whoever_logs_in(
    fast: Conn, dsn: str, roles: dict[str, str], login: str, command: list[str]
) -> None:
    """The CLI behind an ACCESS EXCLUSIVE lock gives up after --timeout in one line with the
    documented exit code, through PgBouncer (PgBouncer's users file holds the server's user)
    and logged in as the role ``grant_dba_role()`` made, which owns no table."""
    run = service.create_run(fast, 1, [{"n": 1}])
    assert service.claim_run(fast, "w1", run.id) is not None
    command = [str(run.id) if arg == "RUN" else arg for arg in command]
    target = psycopg.conninfo.make_conninfo(dsn, user=roles["dba"]) if login == "dba role" else dsn
    with psycopg.connect(dsn) as holder:
        holder.execute("LOCK TABLE public.outbound_call_runs IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "outbound_heartbeat", *command, "--dsn", target, "--timeout", "1s"],
            capture_output=True, text=True, timeout=60)
        elapsed = time.monotonic() - started
        holder.rollback()
    assert elapsed < 15, elapsed
    assert done.returncode == (3 if command == ["health"] else 1), done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--timeout 1.0s" in lines[0] and "lock" in lines[0], done.stderr
    row = run_row(fast, run.id)
    assert (row["status"], row["locked_by_worker"]) == ("running", "w1")  # nothing changed


# -- the shared heartbeat touches no counter -------------------------------------------------


def test_shared_heartbeats_touch_no_counter(fast: Conn) -> None:
    """What a shared lease sends (``heartbeat_leases``) fires no counting trigger, like the
    dedicated lease's ``heartbeat()`` (tests/integration/test_counters.py)."""
    runs = [service.create_run(fast, b, [{}, {}]) for b in (1, 2, 3)]
    claims = [service.claim_run(fast, f"w{r.id}", r.id) for r in runs]
    leases = [(c.run_id, c.worker_id, c.lease_epoch) for c in claims if c is not None]
    counters = ("SELECT * FROM outbound_heartbeat.totals ORDER BY 1, 2, 3",
                "SELECT * FROM outbound_heartbeat.job_counts ORDER BY 1, 2")
    before = [fast.execute(query).fetchall() for query in counters]
    for _ in range(20):
        assert [status for _, status in service.heartbeat_leases(fast, leases)] == ["ok"] * 3
    assert [fast.execute(query).fetchall() for query in counters] == before


# -- after-commit hooks, sync and async, direct and through PgBouncer ------------------------


def later(outcome: Any, hook: Callable[[list[Any]], None]) -> None:
    assert outcome.pending is not None  # inside the block: it waits for the commit
    outcome.pending.on_commit(hook)


def running_runs(conn: Conn, count: int) -> list[int]:
    runs = [service.create_run(conn, 5, [{"n": 1}, {"n": 2}]).id for _ in range(count)]
    for run_id in runs:
        assert service.claim_run(conn, f"w{run_id}", run_id) is not None
    return runs


@pytest.mark.parametrize("route", ROUTES, indirect=True)
@pytest.mark.parametrize("how", ["transaction", "nested"])
@pytest.mark.parametrize("twin", TWINS)
def test_hooks_follow_the_apps_commit_in_every_route(
    fast: Conn, dsn: str, twin: str, how: str
) -> None:
    """Hooks of calls made in the library's transaction block (and in a block nested in it,
    released) fire once, after the outer COMMIT, when the change is visible to others; none
    fires for a block that rolls back."""
    first, second, third = running_runs(fast, 3)
    fired: list[tuple[int, str]] = []

    def hook(events: list[Any]) -> None:
        fired.extend((e.run_id, run_row(fast, e.run_id)["status"]) for e in events)

    if twin == "sync":
        with psycopg.connect(dsn, autocommit=True) as app:
            with service.transaction(app):
                later(service.execute_call(app, calls.force_cancel(first, 5)), hook)
                with service.transaction(app) if how == "nested" else contextlib.nullcontext(app):
                    later(service.execute_call(app, calls.force_cancel(second, 5)), hook)
                assert fired == []
            assert sorted(fired) == [(first, "cancelled"), (second, "cancelled")]
            with pytest.raises(ZeroDivisionError), service.transaction(app):
                with service.transaction(app) if how == "nested" else contextlib.nullcontext(app):
                    later(service.execute_call(app, calls.force_cancel(third, 5)), hook)
                raise ZeroDivisionError
    else:
        async def scenario() -> None:
            app = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
            async with app:
                async with service_async.transaction(app):
                    outcome = await service_async.execute_call(app, calls.force_cancel(first, 5))
                    later(outcome, hook)
                    async with (service_async.transaction(app) if how == "nested"
                                else contextlib.nullcontext(app)):
                        outcome = await service_async.execute_call(
                            app, calls.force_cancel(second, 5))
                        later(outcome, hook)
                    assert fired == []
                assert sorted(fired) == [(first, "cancelled"), (second, "cancelled")]
                with pytest.raises(ZeroDivisionError):
                    async with service_async.transaction(app):
                        async with (service_async.transaction(app) if how == "nested"
                                    else contextlib.nullcontext(app)):
                            outcome = await service_async.execute_call(
                                app, calls.force_cancel(third, 5))
                            later(outcome, hook)
                        raise ZeroDivisionError

        asyncio.run(scenario())
    assert sorted(fired) == [(first, "cancelled"), (second, "cancelled")]
    assert run_row(fast, third)["status"] == "running"


# -- sql/ re-applied (what every upgrade does) under every lease kind ------------------------


def test_every_lease_kind_keeps_beating_while_sql_is_reapplied(fast: Conn, dsn: str) -> None:
    """An upgrade re-applies every file of ``sql/`` online: shared and dedicated, sync and
    async leases keep beating through it (no heartbeat older than an interval and a second,
    watched on the database clock), the re-apply waits for none of them, and every run
    completes afterwards."""
    runs = [service.create_run(fast, b, [{"n": i} for i in range(3)]).id for b in (1, 2, 3, 4)]
    oldest = ("SELECT max(clock_timestamp() - last_heartbeat_at) FROM outbound_call_runs"
              " WHERE id = ANY(%s)")
    with contextlib.ExitStack() as stack:
        leases = [stack.enter_context(leased(twin, dsn, f"upgraded-{twin}-{share}", run_id, share))
                  for (twin, share), run_id in zip(KINDS, runs, strict=True)]
        for lease in leases:
            lease.finish_job(lease.next_job())
        ages: list[float] = []
        done = threading.Event()

        def watch() -> None:
            with psycopg.connect(dsn, autocommit=True) as watcher:
                while not done.is_set():
                    row = watcher.execute(oldest, (runs,)).fetchone()
                    assert row is not None
                    ages.append(row[0].total_seconds())
                    for lease in leases:
                        lease.touch()  # the dial loops are busy on a call, not stalled
                    time.sleep(0.1)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            with psycopg.connect(dsn, autocommit=True) as installer:
                start, applied = time.monotonic(), 0
                while applied < 2 or time.monotonic() - start < 3 * INTERVAL:
                    assert apply_sql_online(installer, schema.sql_dir()) == []
                    applied += 1
        finally:
            done.set()
            watcher.join(10)
        assert ages and max(ages) < INTERVAL + 1.0, max(ages)
        for lease in leases:
            while (job := lease.next_job()) is not None:
                lease.finish_job(job)
        assert not any(lease.lost or lease.suspended for lease in leases)
    assert {run_row(fast, run_id)["status"] for run_id in runs} == {"completed"}


def test_shared_heartbeats_write_the_database_clock(fast: Conn, dsn: str) -> None:
    """``heartbeat_leases`` (the shared heartbeat) stamps each run with the server's clock,
    whatever the caller's TimeZone, as ``heartbeat()`` does (tests/integration/test_worker_api.py)."""
    runs = [service.create_run(fast, b, [{}]) for b in (1, 2)]
    claims = [service.claim_run(fast, f"w{r.id}", r.id) for r in runs]
    leases = [(c.run_id, c.worker_id, c.lease_epoch) for c in claims if c is not None]
    for run in runs:
        backdate_heartbeat(fast, run.id, STALE_AFTER - 1)  # old, not yet stale
    far_away = psycopg.conninfo.make_conninfo(dsn, options="-c TimeZone=Pacific/Kiritimati")
    with psycopg.connect(far_away, autocommit=True) as caller:
        before = caller.execute("SELECT clock_timestamp()").fetchone()
        assert [status for _, status in service.heartbeat_leases(caller, leases)] == ["ok", "ok"]
        after = caller.execute("SELECT clock_timestamp()").fetchone()
    assert before is not None and after is not None
    for run in runs:
        beat = run_row(fast, run.id)["last_heartbeat_at"]
        assert before[0] <= beat <= after[0], (before, beat, after)
