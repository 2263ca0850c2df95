"""The lease guarantees that need real deaths, partitions and outages, in the modes
tests/e2e/test_lease.py, test_faults.py and test_failover.py (shared ``Lease`` in worker processes)
leave out: a dedicated lease (``share=False``) and ``AsyncLease``.

- a worker process SIGKILLed while it holds a dedicated lease: its run leaves the active set
  within stale_after plus one poll (sync and async, direct and through PgBouncer);
- a partition longer than stale_after: a dedicated lease suspends itself before anyone may
  declare it dead, and after the heal learns it is lost and writes nothing;
- a restart, a crash recovery and a failover to a promoted standby under shared and dedicated
  leases of both twins: none is lost, every run completes, and only the run of the worker
  that really died is stopped, after the grace, and readers inside an app transaction or a
  savepoint leave every run alone during the grace too;
- reads on a hot standby, sync and async, as the app role (tables owned by a separate role,
  then by itself), through PgBouncer, and after the standby restarts and recovers from a
  crash."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from psycopg import sql

from outbound_heartbeat import LeaseLost, ReadOnlyServer, migrate, service, service_async
from outbound_heartbeat.lease import Lease
from outbound_heartbeat.lease_async import AsyncLease
from outbound_heartbeat.upgrade import LockPolicy

from ..helpers import (
    backdate_heartbeat,
    both_hosts,
    catalog,
    job_statuses,
    leased,
    primary_and_standby,
    private_server,
    run_row,
    seed_legacy,
    stale_events,
    until,
    wait_replayed,
    wait_writable,
    written,
)
from ..pgbouncer import start_pgbouncer
from ..proxy import proxy_for

Conn = psycopg.Connection[Any]
STALE_AFTER = 3.0
INTERVAL = 0.5


def set_stale_after(conn: Conn, seconds: float) -> None:
    conn.execute("UPDATE outbound_heartbeat.settings SET stale_after = make_interval(secs => %s)",
                 (seconds,))


# -- a SIGKILLed process holding a dedicated lease -------------------------------------------


def hold_until_killed(dsn: str, run_id: int, twin: str, options: dict[str, Any],
                      dialing: Any) -> None:
    """A worker process (spawned): a dedicated lease, one job taken, then dialing for ever."""
    kwargs: dict[str, Any] = {"interval": INTERVAL, "share": False, "connect_options": options}
    if twin == "sync":
        with Lease(dsn, "doomed", run_id, **kwargs) as lease:
            lease.next_job()
            dialing.set()
            while True:
                lease.touch()
                time.sleep(0.05)

    async def dial() -> None:
        async with AsyncLease(dsn, "doomed", run_id, **kwargs) as lease:
            await lease.next_job()
            dialing.set()
            while True:
                lease.touch()
                await asyncio.sleep(0.05)

    asyncio.run(dial())


# Each twin once, each route once (the pairs keep the module short; the shared lease's cells
# are tests/e2e/test_lease.py's, which cross both).
@pytest.mark.parametrize(("twin", "route"), [("sync", "direct"), ("async", "pgbouncer")],
                         indirect=["route"])
def test_a_sigkilled_dedicated_lease_is_detected_within_stale_after(
    conn: Conn, dsn: str, route: str, twin: str
) -> None:
    stale_after = 2.0
    set_stale_after(conn, stale_after)
    run = service.create_run(conn, 1, [{"n": i} for i in range(5)])
    context = multiprocessing.get_context("spawn")
    dialing = context.Event()
    options = {"prepare_threshold": None} if route == "pgbouncer" else {}
    child = context.Process(target=hold_until_killed, args=(dsn, run.id, twin, options, dialing))
    child.start()
    try:
        assert dialing.wait(30), "the worker never took a job"
        time.sleep(2 * INTERVAL)
        assert service.get_active_run(conn, 1) is not None  # alive, beating
        assert child.pid is not None
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
        took = until(lambda: service.get_active_run(conn, 1) is None, stale_after + 3,
                     "the dead worker's run stayed active")
        assert took <= stale_after + 1
    finally:
        if child.is_alive():
            child.kill()
            child.join(10)
    row = run_row(conn, run.id)
    assert (row["status"], row["locked_by_worker"]) == ("stopped", None)
    statuses = sorted(job_statuses(conn, run.id).values())
    assert statuses == ["failed"] * 4 + ["in_progress"]  # the job being dialed is left alone


# -- a partition longer than stale_after -----------------------------------------------------


@pytest.mark.parametrize(("twin", "route"), [("sync", "pgbouncer"), ("async", "direct")],
                         indirect=["route"])
def test_a_partitioned_dedicated_lease_expires_itself_then_learns_it_is_lost(
    conn: Conn, dsn: str, route: str, twin: str
) -> None:
    set_stale_after(conn, STALE_AFTER)
    run = service.create_run(conn, 1, [{"n": i} for i in range(5)])
    with proxy_for(dsn) as (proxy, far), leased(twin, far, f"cut-{twin}", run.id, False) as lease:
        job = lease.next_job()
        time.sleep(2 * INTERVAL)
        assert not lease.suspended
        proxy.blackhole()
        cut_at = time.monotonic()
        until(lambda: (lease.touch(), lease.suspended)[1], STALE_AFTER, "not suspended in time")
        assert lease.must_stop and not lease.lost
        until(lambda: any(r.run_id == run.id for r in service.cleanup_stuck_runs(conn)),
              STALE_AFTER + 5, "the run was never declared stale")
        assert time.monotonic() - cut_at >= STALE_AFTER - INTERVAL
        stopped = written(conn)
        proxy.heal()
        until(lambda: (lease.touch(), lease.lost)[1], 20, "the lease never learned it was lost")
        with pytest.raises(Exception, match="lost"):
            lease.finish_job(job)
    assert written(conn) == stopped  # nothing written after it was declared dead
    assert run_row(conn, run.id)["status"] == "stopped"


# -- restart, crash recovery, failover -------------------------------------------------------

KINDS = [("sync", True), ("sync", False), ("async", True), ("async", False)]


def drive_through(outage: Callable[[], str], dsn_of_leases: str, setup_dsn: str,
                  options: dict[str, Any] | None = None) -> None:
    """Four live leases (shared and dedicated, both twins) and one dead worker's run; the
    outage (which returns the DSN of the server afterwards); then every live lease finishes
    its run, and only the dead one is stopped, after the grace."""
    with psycopg.connect(setup_dsn, autocommit=True) as conn:
        # restart_grace stays NULL: the grace is stale_after, the library's default.
        set_stale_after(conn, STALE_AFTER)
        runs = [service.create_run(conn, b, [{"n": i} for i in range(4)]) for b in (1, 2, 3, 4)]
        dead = service.create_run(conn, 9, [{"n": 1}])
        assert service.claim_run(conn, "dead-worker", dead.id) is not None
        # A zombie: its run was force-cancelled before the outage, its lease is fenced.
        zombie_run = service.create_run(conn, 8, [{"n": 1}, {"n": 2}])
        zombie = service.claim_run(conn, "zombie", zombie_run.id)
        assert zombie is not None
        zombie_job = service.next_job(conn, zombie_run.id, "zombie", zombie.lease_epoch)
        assert zombie_job is not None
        service.force_cancel(conn, zombie_run.id)
    with psycopg.connect(setup_dsn, autocommit=True) as conn:
        # Its worker died 10 s before the outage: stale already, not yet swept.
        conn.execute("UPDATE outbound_call_runs SET last_heartbeat_at = now() - interval '10 s'"
                     " WHERE id = %s", (dead.id,))
    with contextlib.ExitStack() as stack:
        leases = [stack.enter_context(leased(twin, dsn_of_leases, f"live-{twin}-{share}", r.id,
                                             share, options))
                  for (twin, share), r in zip(KINDS, runs, strict=True)]
        for lease in leases:
            job = lease.next_job()
            lease.finish_job(job)
        after = outage()
        started = time.monotonic()
        with psycopg.connect(after, autocommit=True) as conn:
            # In the grace every reader and sweep leaves every run alone, even the long-dead
            # worker's (its beat is 10 s old); the live ones' beats are older than stale_after
            # after a restart or a failover.
            assert service.cleanup_stuck_runs(conn) == [] or time.monotonic() - started > STALE_AFTER - 1.0
            for business in (1, 2, 3, 4, 9):
                if time.monotonic() - started < STALE_AFTER - 1.0:
                    assert service.get_active_run(conn, business) is not None, business
            with conn.transaction():  # the same inside an app's transaction, and a savepoint
                if time.monotonic() - started < STALE_AFTER - 1.0:
                    assert service.get_active_run(conn, 9) is not None
                with conn.transaction():
                    if time.monotonic() - started < STALE_AFTER - 1.0:
                        assert service.get_active_run(conn, 9) is not None
                        assert service.cleanup_stuck_runs(conn) == []
            # A live lease is never claimed by a process of the same name, in the grace or not;
            # the zombie stays fenced.
            for lease in leases:
                assert service.claim_run(conn, lease.worker_id) is None
                assert service.claim_run(conn, lease.worker_id, lease.run_id) is None
            assert service.heartbeat(conn, zombie_run.id, "zombie", zombie.lease_epoch) == "lost"
            with pytest.raises(LeaseLost):
                service.next_job(conn, zombie_run.id, "zombie", zombie.lease_epoch)
            assert service.finish_job(conn, zombie_job.id, "zombie", zombie.lease_epoch,
                                      "completed").outcome == "lease_lost"
            for lease in leases:  # each waits while suspended, then resumes
                while (job := lease.next_job()) is not None:
                    lease.finish_job(job)
        assert [lease.lost for lease in leases] == [False] * 4
        epochs = [lease.lease_epoch for lease in leases]
    with psycopg.connect(after, autocommit=True) as conn:
        for r, epoch in zip(runs, epochs, strict=True):
            assert run_row(conn, r.id)["status"] == "completed"
            assert run_row(conn, r.id)["lease_epoch"] == epoch + 1  # one claim, one release
            assert set(job_statuses(conn, r.id).values()) == {"completed"}
        until(lambda: service.get_active_run(conn, 9) is None, 4 * STALE_AFTER,
              "the dead worker's run was never stopped")
        assert stale_events(conn) == [dead.id]


@pytest.mark.parametrize(("outage", "via"), [("restart", "direct"), ("crash", "direct"),
                                             ("restart", "pgbouncer")])
def test_every_lease_kind_survives_a_restart_and_a_crash_recovery(outage: str, via: str) -> None:
    with private_server(synchronous_commit="on") as (cluster, dsn):
        def go() -> str:
            if outage == "restart":
                cluster.restart(outage=STALE_AFTER + 1)  # every beat now older than stale_after
            else:
                cluster.crash_backend()
            wait_writable(dsn)
            return dsn

        if via == "direct":
            drive_through(go, dsn, dsn)
            return
        bouncer = start_pgbouncer(dsn)  # the leases beat through it; the server restarts behind
        # After a failed server login PgBouncer waits server_login_retry (15 s by default)
        # before it tries again: behind PgBouncer the grace must outlast it, or every live
        # lease is stopped once the grace is over. Here the grace is 3 s, the retry 1 s.
        with (bouncer.root / "pgbouncer.ini").open("a", encoding="utf-8") as ini:
            ini.write("server_login_retry = 1\n")
        bouncer.process.send_signal(signal.SIGHUP)  # reload
        try:
            drive_through(go, bouncer.dsn_for(dsn), dsn, {"prepare_threshold": None})
        finally:
            bouncer.stop()


def test_every_lease_kind_survives_a_failover() -> None:
    with primary_and_standby(synchronous_commit="on") as (primary, primary_dsn, standby, standby_dsn):
        def go() -> str:
            wait_replayed(primary_dsn, standby_dsn)
            primary.stop("fast")
            time.sleep(STALE_AFTER + 1)
            standby.promote()
            wait_writable(standby_dsn)
            return standby_dsn

        drive_through(go, both_hosts(primary_dsn, standby_dsn), primary_dsn)


# -- reads on a hot standby, in every mode they can meet -------------------------------------


def test_standby_reads_in_every_mode_they_can_meet() -> None:
    """Sync and async reads on a hot standby as the app role (a separate owner's tables, then
    its own), through PgBouncer, and after the standby restarts and recovers from a crash:
    each shows the primary's state; each write is ``OH503`` and changes nothing."""
    app = "oh_standby_app"
    with primary_and_standby() as (_, primary_dsn, standby, standby_dsn):
        with psycopg.connect(primary_dsn, autocommit=True) as conn:
            conn.execute("UPDATE outbound_heartbeat.settings SET restart_grace = interval '0'")
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(app)))
            conn.execute("SELECT outbound_heartbeat.grant_app_role(%s)", (app,))
            live = service.create_run(conn, 1, [{"n": 1}, {"n": 2}])
            dead = service.create_run(conn, 2, [{"n": 1}])
            for run, worker in ((live, "w-live"), (dead, "w-dead")):
                assert service.claim_run(conn, worker, run.id) is not None
            backdate_heartbeat(conn, dead.id, 600)  # dead for 10 minutes, not swept yet
        wait_replayed(primary_dsn, standby_dsn)
        as_app = psycopg.conninfo.make_conninfo(standby_dsn, user=app)
        read_standby(as_app, {}, live.id, dead.id)  # tables owned by a separate role
        with psycopg.connect(primary_dsn, autocommit=True) as conn:
            for table in ("outbound_call_runs", "outbound_call_jobs"):
                conn.execute(sql.SQL("ALTER TABLE public.{} OWNER TO {}").format(
                    sql.Identifier(table), sql.Identifier(app)))
        wait_replayed(primary_dsn, standby_dsn)
        read_standby(as_app, {}, live.id, dead.id)  # tables owned by the app role
        bouncer = start_pgbouncer(standby_dsn)
        try:  # PgBouncer's users file holds the server's own user only
            read_standby(bouncer.dsn_for(standby_dsn), {"prepare_threshold": None}, live.id, dead.id)
        finally:
            bouncer.stop()
        standby.restart()
        read_standby(as_app, {}, live.id, dead.id)
        standby.crash_backend()  # every session ended, the standby recovers and replays on
        read_standby(as_app, {}, live.id, dead.id)
        with psycopg.connect(primary_dsn, autocommit=True) as conn:
            assert run_row(conn, dead.id)["status"] == "running"  # nothing changed


def read_standby(dsn: str, options: dict[str, Any], live: int, dead: int) -> None:
    deadline = time.monotonic() + 30
    while True:  # a standby that restarts or recovers takes connections once consistent
        try:
            asyncio.run(read_standby_async(dsn, options, live, dead))
            break
        except psycopg.OperationalError:
            assert time.monotonic() < deadline, "the standby never came back"
            time.sleep(0.2)
    with psycopg.connect(dsn, autocommit=True, **options) as conn:
        runs = {r.id: r for r in service.list_active_runs(conn)}
        assert (runs[live].stale, runs[dead].stale) == (False, True)
        assert dead in [a.run_id for a in service.health_check(conn)]
        with pytest.raises(ReadOnlyServer):
            service.force_cancel(conn, dead, business_id=2)
        with conn.transaction(), conn.transaction():  # inside an app's transaction, a savepoint
            runs = {r.id: r for r in service.list_active_runs(conn)}
            assert (runs[live].stale, runs[dead].stale) == (False, True)
            with pytest.raises(ReadOnlyServer):
                service.get_active_run(conn, 2)
            assert "claimed" in [e.event for e in service.list_events(conn, run_id=dead)]


async def read_standby_async(dsn: str, options: dict[str, Any], live: int, dead: int) -> None:
    async with await psycopg.AsyncConnection.connect(
            dsn, autocommit=True, connect_timeout=2, **options) as conn:
        row = await (await conn.execute("SELECT pg_is_in_recovery()")).fetchone()
        assert row == (True,)
        runs = {r.id: r for r in await service_async.list_active_runs(conn)}
        assert (runs[live].stale, runs[dead].stale) == (False, True)
        assert "claimed" in [e.event for e in await service_async.list_events(conn, run_id=live)]
        alerts = await service_async.health_check(conn)
        assert dead in [a.run_id for a in alerts] and live not in [a.run_id for a in alerts]
        assert await service_async.metrics(conn)
        for write in (service_async.get_active_run(conn, 2),  # would stop the dead run
                      service_async.force_cancel(conn, dead, business_id=2)):
            with pytest.raises(ReadOnlyServer):
                await write


# -- an upgrade cut by a restart, a crash recovery or a failover ----------------------------


@pytest.mark.parametrize("outage", ["restart", "crash", "failover"])
def test_an_upgrade_cut_by_an_outage_completes_on_the_next_migrate(outage: str) -> None:
    """The adoption of legacy tables waits (short attempts) behind an app session idle in its
    transaction when the server restarts, recovers from a crash, or goes away and its standby
    is promoted: the cut migration leaves every row as it was, and the next ``migrate()`` (on
    the promoted standby after a failover) completes, the dead holder's lock recovered, with
    the same library objects as a fresh install."""
    with primary_and_standby(synchronous_commit="on") as (primary, fresh_dsn, standby, standby_app):
        with psycopg.connect(primary.dsn, autocommit=True) as admin:
            admin.execute("CREATE DATABASE legacy")
        dsn = psycopg.conninfo.make_conninfo(primary.dsn, dbname="legacy")
        seed_legacy(dsn)
        rows = ("SELECT id, status FROM outbound_call_runs ORDER BY id",
                "SELECT id, status FROM outbound_call_jobs ORDER BY id")
        with psycopg.connect(dsn) as conn:
            before = [conn.execute(query).fetchall() for query in rows]
        wait_replayed(fresh_dsn, standby_app)
        cut: list[BaseException] = []

        def upgrade() -> None:
            try:
                migrate(dsn, LockPolicy(lock_timeout=0.2, attempts=200, max_pause=0.3))
            except BaseException as exc:
                cut.append(exc)

        holder = psycopg.connect(dsn)
        holder.execute("SELECT count(*) FROM outbound_call_runs")  # idle in its transaction
        migrating = threading.Thread(target=upgrade)
        migrating.start()
        try:
            time.sleep(1.5)
            assert migrating.is_alive()  # waiting, one short attempt at a time
            if outage == "restart":
                primary.restart()
            elif outage == "crash":
                primary.crash_backend()
            else:
                primary.stop("fast")
                standby.promote()
                dsn = psycopg.conninfo.make_conninfo(standby.dsn, dbname="legacy")
                fresh_dsn = standby_app
            migrating.join(60)
            assert not migrating.is_alive() and cut, "the migration outlived the outage"
        finally:
            with contextlib.suppress(psycopg.Error):
                holder.close()
        wait_writable(fresh_dsn)
        with psycopg.connect(dsn) as conn:
            assert [conn.execute(query).fetchall() for query in rows] == before
        migrate(dsn)
        assert catalog(dsn, include_app_tables=False) == catalog(fresh_dsn, include_app_tables=False)
        with psycopg.connect(dsn) as conn:
            assert [conn.execute(query).fetchall() for query in rows] == before
