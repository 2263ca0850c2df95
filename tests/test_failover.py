"""Outages that are not worker deaths, with real servers and real worker subprocesses: a
failover (a streaming standby promoted while runs are live) and a crash recovery (a backend
SIGKILLed, every session ended, the postmaster kept). After each, nothing is declared stale
until the grace (stale_after here) has passed since the server began accepting writes again
(docs/outages.md); live workers reconnect and keep their runs, a worker that really died has
its run stopped once the grace is over, not before."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from typing import Any

import psycopg
import psycopg.sql
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from outbound_heartbeat import service

from .helpers import primary_and_standby, private_server, run_row, wait_replayed
from .workers import Worker

STALE_AFTER = 3.0
INTERVAL = 1.0


def both_hosts(primary_dsn: str, standby_dsn: str) -> str:
    """One DSN listing both servers; libpq picks the one that accepts writes."""
    ports = ",".join(str(conninfo_to_dict(d)["port"]) for d in (primary_dsn, standby_dsn))
    return make_conninfo(primary_dsn, host="127.0.0.1,127.0.0.1", port=ports,
                         target_session_attrs="read-write", connect_timeout="2")


def stale_events(conn: psycopg.Connection[Any]) -> list[int]:
    rows = conn.execute("SELECT run_id FROM outbound_heartbeat.run_events"
                        " WHERE event IN ('stale_stopped', 'cleaned_up') ORDER BY id").fetchall()
    return [r[0] for r in rows]


def outage_ended_at(conn: psycopg.Connection[Any]) -> Any:
    row = conn.execute("SELECT outbound_heartbeat._outage_ended_at()").fetchone()
    assert row is not None
    return row[0]


def test_promotion_is_not_a_worker_death() -> None:
    with primary_and_standby(synchronous_commit="on") as (primary, primary_dsn, standby, standby_dsn):
        with psycopg.connect(primary_dsn, autocommit=True) as conn:
            # restart_grace stays NULL: the grace is stale_after, the library's default.
            conn.execute("UPDATE outbound_heartbeat.settings SET stale_after = make_interval(secs => %s)",
                         (STALE_AFTER,))
            live_run = service.create_run(conn, 1, [{"n": i} for i in range(40)])
            dead_run = service.create_run(conn, 2, [{"n": i} for i in range(40)])
        dsn = both_hosts(primary_dsn, standby_dsn)
        live = Worker(dsn, "--run-id", str(live_run.id), "--dial-seconds", "0.25",
                      "--interval", str(INTERVAL), "--worker-id", "live")
        victim = Worker(dsn, "--run-id", str(dead_run.id), "--dial-seconds", "0.25",
                        "--interval", str(INTERVAL), "--worker-id", "victim")
        try:
            for w in (live, victim):
                w.wait_for("dialed", timeout=30)
            victim.signal(signal.SIGKILL)
            victim.wait_exit(10)
            wait_replayed(primary_dsn, standby_dsn)
            # The old primary goes away (a fast stop ships its last WAL to the standby), the
            # standby is promoted after every heartbeat has grown older than stale_after.
            primary.stop("fast")
            time.sleep(2 * STALE_AFTER)
            standby.promote()
            promoted = time.monotonic()
            with psycopg.connect(standby_dsn, autocommit=True) as conn:
                # The standby's postmaster started long before the grace: only the promotion
                # can hold detection back, and it does.
                row = conn.execute("SELECT pg_postmaster_start_time() < now() - interval '5 seconds',"
                                   " outbound_heartbeat._outage_ended_at() > now() - interval '2 seconds'"
                                   ).fetchone()
                assert row == (True, True)
                while time.monotonic() - promoted < STALE_AFTER - 1.0:
                    assert service.get_active_run(conn, 2) is not None  # still in the grace
                    active = service.get_active_run(conn, 1)
                    assert active is not None and active.status == "running"
                    time.sleep(0.2)
                # The live worker reconnected to the new primary and keeps its run to the end.
                assert live.wait_exit(90) == 0, live.stderr_tail()
                assert "lost" not in live.steps()
                assert run_row(conn, live_run.id)["status"] == "completed"
                # The dead worker's run is stopped, once the grace has passed.
                deadline = time.monotonic() + 4 * STALE_AFTER
                while service.get_active_run(conn, 2) is not None:
                    assert time.monotonic() < deadline, "the dead worker's run was never stopped"
                    time.sleep(0.1)
                assert time.monotonic() - promoted >= STALE_AFTER - 0.5
                assert run_row(conn, dead_run.id)["status"] == "stopped"
                assert stale_events(conn) == [dead_run.id]
        finally:
            live.close()
            victim.close()


def test_crash_recovery_under_load_stops_no_live_run() -> None:
    # synchronous_commit on, as in production: a crash keeps every commit a worker was told of.
    with private_server(synchronous_commit="on") as (cluster, dsn):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("UPDATE outbound_heartbeat.settings SET stale_after = make_interval(secs => %s)",
                         (STALE_AFTER,))
            runs = [service.create_run(conn, b, [{"n": i} for i in range(30)]) for b in (1, 2, 3, 4)]
            # A run whose worker died 10 s before the crash: stale already, not yet swept.
            dead = service.create_run(conn, 9, [{"n": 1}])
            claim = service.claim_run(conn, "dead-worker", dead.id)
            assert claim is not None
            conn.execute("UPDATE outbound_call_runs SET last_heartbeat_at = now() - interval '10 seconds'"
                         " WHERE id = %s", (dead.id,))
            before = outage_ended_at(conn)
        workers = [Worker(dsn, "--run-id", str(r.id), "--dial-seconds", "0.2", "--interval",
                          str(INTERVAL), "--worker-id", f"live-{r.business_id}") for r in runs]
        try:
            for w in workers:
                w.wait_for("dialed", timeout=30)
            cluster.crash_backend()  # every session is ended, the server runs crash recovery
            crashed = time.monotonic()
            deadline = crashed + 30
            while True:  # until the recovered server answers (a session may sneak in first)
                try:
                    conn = psycopg.connect(dsn, autocommit=True)
                    if outage_ended_at(conn) > before:  # the crash recovery is an outage
                        break
                    conn.close()
                except psycopg.OperationalError:
                    pass
                assert time.monotonic() < deadline, "the server never came back"
                time.sleep(0.1)
            with conn:
                row = conn.execute("SELECT pg_postmaster_start_time() <= %s", (before,)).fetchone()
                assert row == (True,)  # ... that the postmaster's start time does not show
                # Within the grace even the long-dead worker's run is left alone ...
                if time.monotonic() - crashed < STALE_AFTER - 1.0:
                    assert service.get_active_run(conn, 9) is not None
                # ... every live worker reconnects and finishes its run ...
                for w in workers:
                    assert w.wait_exit(90) == 0, w.stderr_tail()
                for r in runs:
                    assert run_row(conn, r.id)["status"] == "completed"
                # ... and the dead one is stopped after the grace, the only one ever stopped.
                deadline = time.monotonic() + 4 * STALE_AFTER
                while service.get_active_run(conn, 9) is not None:
                    assert time.monotonic() < deadline, "the dead worker's run was never stopped"
                    time.sleep(0.1)
                assert stale_events(conn) == [dead.id]
        finally:
            for w in workers:
                w.close()


def test_an_app_role_sees_the_promotion_marker_through_the_owner(conn: psycopg.Connection[Any]) -> None:
    """The WAL writer's backend_start is hidden from roles without pg_read_all_stats; the
    grace must not silently fall back to the postmaster start for the app's own role."""
    role = f"oh_app_{conn.info.backend_pid}"
    conn.execute(psycopg.sql.SQL("CREATE ROLE {}").format(psycopg.sql.Identifier(role)))
    try:
        conn.execute("SELECT outbound_heartbeat.grant_app_role(%s)", (role,))
        row = conn.execute("SELECT max(backend_start) FROM pg_stat_activity WHERE backend_type = 'walwriter'"
                           ).fetchone()
        assert row is not None and row[0] is not None
        walwriter_start = row[0]
        with conn.transaction():
            conn.execute(psycopg.sql.SQL("SET LOCAL ROLE {}").format(psycopg.sql.Identifier(role)))
            hidden = conn.execute("SELECT max(backend_start) FROM pg_stat_activity"
                                  " WHERE backend_type = 'walwriter'").fetchone()
            assert hidden == (None,)  # the app's role itself cannot see it ...
            with pytest.raises(psycopg.errors.InsufficientPrivilege), conn.transaction():
                outage_ended_at(conn)  # ... nor call the helper (the owner's, sql/04_liveness.sql)
        with conn.transaction():
            # ... but the API runs as the owner, which is not a superuser and still sees it.
            conn.execute("SET LOCAL ROLE outbound_heartbeat_owner")
            assert outage_ended_at(conn) == walwriter_start
    finally:
        conn.execute(psycopg.sql.SQL("DROP OWNED BY {}").format(psycopg.sql.Identifier(role)))
        conn.execute(psycopg.sql.SQL("DROP ROLE {}").format(psycopg.sql.Identifier(role)))


def any_host(primary_dsn: str, standby_dsn: str) -> str:
    """One DSN listing both servers, no target_session_attrs: with the primary gone, libpq
    lands on the standby, which answers read-only until it is promoted."""
    ports = ",".join(str(conninfo_to_dict(d)["port"]) for d in (primary_dsn, standby_dsn))
    return make_conninfo(primary_dsn, host="127.0.0.1,127.0.0.1", port=ports, connect_timeout="2")


@pytest.mark.parametrize("twin", ["sync", "async"])
def test_shared_leases_ride_a_failover_that_first_lands_on_the_standby(twin: str) -> None:
    """The primary stops; every hub connection reconnects to the standby, which answers
    read-only (ReadOnlyServer) for 3 s, then is promoted. The 5 shared leases are suspended
    meanwhile (self-expiry), never lost, beat again on the new primary and are released there,
    as a dedicated lease would be."""
    from outbound_heartbeat.lease import Lease
    from outbound_heartbeat.lease_async import AsyncLease

    with primary_and_standby(synchronous_commit="on") as (primary, primary_dsn, standby, standby_dsn):
        with psycopg.connect(primary_dsn, autocommit=True) as conn:
            conn.execute("UPDATE outbound_heartbeat.settings SET stale_after = make_interval(secs => %s)",
                         (STALE_AFTER,))
            runs = [service.create_run(conn, 60 + i, [{"n": 1}]).id for i in range(5)]
        dsn = any_host(primary_dsn, standby_dsn)
        promoted_at: list[float] = []

        def fail_over() -> None:
            wait_replayed(primary_dsn, standby_dsn)
            primary.stop("fast")
            time.sleep(3.0)  # the hub's reconnections land on the standby: read-only
            standby.promote()
            promoted_at.append(time.monotonic())

        def beaten_since_promotion() -> bool:
            with psycopg.connect(standby_dsn, autocommit=True) as conn:
                row = conn.execute(
                    "SELECT bool_and(last_heartbeat_at > outbound_heartbeat._outage_ended_at())"
                    " FROM outbound_call_runs WHERE id = ANY(%s)", (runs,)).fetchone()
            return bool(row and row[0])

        if twin == "sync":
            leases = [Lease(dsn, f"fo-{i}", r, interval=INTERVAL) for i, r in enumerate(runs)]
            for lease in leases:
                lease.__enter__()
            try:
                failover = threading.Thread(target=fail_over)
                failover.start()
                while failover.is_alive():
                    for lease in leases:
                        lease.touch()
                    time.sleep(0.1)
                deadline = time.monotonic() + 4 * STALE_AFTER
                while not beaten_since_promotion():
                    assert time.monotonic() < deadline, "never beaten on the new primary"
                    for lease in leases:
                        lease.touch()
                    time.sleep(0.1)
                assert [lease.lost for lease in leases] == [False] * 5
            finally:
                for lease in leases:
                    lease.__exit__(None, None, None)
        else:
            async def main() -> None:
                leases = [AsyncLease(dsn, f"afo-{i}", r, interval=INTERVAL) for i, r in enumerate(runs)]
                for lease in leases:
                    await lease.__aenter__()
                loop = asyncio.get_running_loop()
                try:
                    failover = loop.run_in_executor(None, fail_over)
                    while not failover.done():
                        for lease in leases:
                            lease.touch()
                        await asyncio.sleep(0.1)
                    await failover
                    deadline = time.monotonic() + 4 * STALE_AFTER
                    while not await loop.run_in_executor(None, beaten_since_promotion):
                        assert time.monotonic() < deadline, "never beaten on the new primary"
                        for lease in leases:
                            lease.touch()
                        await asyncio.sleep(0.1)
                    assert [lease.lost for lease in leases] == [False] * 5
                finally:
                    for lease in leases:
                        await lease.__aexit__(None, None, None)

            asyncio.run(main())
        assert promoted_at
        with psycopg.connect(standby_dsn, autocommit=True) as conn:
            assert {run_row(conn, r)["status"] for r in runs} == {"completed"}
            assert stale_events(conn) == []
