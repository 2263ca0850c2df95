"""Network partitions and database restarts, with real worker subprocesses.

A partition longer than stale_after: the worker stops dialing on its own before stale_after
has passed (self-expiry), the run is declared stale, and once the network heals the worker
learns its lease is lost and never brings the run back. A database restart with an outage
longer than stale_after: no live run is stopped (restart grace), the workers reconnect and
finish; a worker that really died meanwhile has its run stopped once the grace has passed."""

from __future__ import annotations

import signal
import time
from datetime import timedelta
from typing import Any

import psycopg
import pytest

from outbound_heartbeat import service

from ..helpers import Cluster, private_server, run_row
from ..proxy import proxy_for
from ..workers import Worker

STALE_AFTER = 3.0
INTERVAL = 1.0


def jobs_of(conn: psycopg.Connection[Any], run_id: int) -> list[Any]:
    return conn.execute("SELECT id, status, updated_at FROM outbound_call_jobs WHERE run_id = %s"
                        " ORDER BY id", (run_id,)).fetchall()


@pytest.mark.parametrize("cut", ["blackhole", "reset"])
def test_partition_longer_than_stale_after(dsn: str, conn: psycopg.Connection[Any], cut: str) -> None:
    conn.execute("UPDATE outbound_heartbeat.settings SET stale_after = make_interval(secs => %s)",
                 (STALE_AFTER,))
    with proxy_for(dsn) as (proxy, worker_dsn):
        run = service.create_run(conn, 1, [{"n": i} for i in range(60)])
        # Each call lasts 10 s: the cut comes in the middle of one.
        worker = Worker(worker_dsn, "--run-id", str(run.id), "--dial-seconds", "10",
                        "--interval", str(INTERVAL), "--worker-id", f"cut-{cut}")
        try:
            worker.wait_for("dialing", timeout=20)
            time.sleep(2 * INTERVAL)  # a couple of heartbeats through the proxy
            getattr(proxy, cut)()
            cut_at = time.monotonic()
            hung = worker.wait_for("hung_up", timeout=STALE_AFTER + 5)
            # Self-expiry: it stopped dialing before anyone could declare it dead.
            assert hung["t"] - cut_at < STALE_AFTER, (hung, cut_at)
            assert hung["suspended"] is True

            deadline = time.monotonic() + STALE_AFTER + 5
            while service.get_active_run(conn, 1) is not None:
                assert time.monotonic() < deadline, "the run was never declared stale"
                time.sleep(0.1)
            assert time.monotonic() - cut_at >= STALE_AFTER - INTERVAL
            stopped = run_row(conn, run.id)
            jobs = jobs_of(conn, run.id)
            assert stopped["status"] == "stopped"

            proxy.heal()
            assert worker.wait_exit(30) == 3, worker.stderr_tail()  # LeaseLost
            steps = worker.steps()
            assert "lost" in steps or worker.seen[-1].get("lost") is True, steps
            assert run_row(conn, run.id) == stopped  # never brought back, heartbeat untouched
            assert jobs_of(conn, run.id) == jobs  # and no job written after it was declared dead
        finally:
            worker.close()


def test_database_restart_is_not_a_worker_death() -> None:
    with private_server() as (cluster, dsn):
        restart_with_live_and_dead_workers(cluster, dsn)


def restart_with_live_and_dead_workers(cluster: Cluster, dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        # restart_grace stays NULL: the grace is stale_after, the library's default.
        conn.execute("UPDATE outbound_heartbeat.settings SET stale_after = make_interval(secs => %s)",
                     (STALE_AFTER,))
        runs = [service.create_run(conn, b, [{"n": i} for i in range(25)]) for b in (1, 2, 3, 4)]
    workers = [Worker(dsn, "--run-id", str(r.id), "--dial-seconds", "0.2", "--interval", str(INTERVAL),
                      "--worker-id", f"live-{r.business_id}") for r in runs]
    live, victim = workers[:3], workers[3]
    try:
        for w in workers:
            w.wait_for("dialed", timeout=20)
        victim.signal(signal.SIGKILL)
        victim.wait_exit(10)
        cluster.restart(outage=2 * STALE_AFTER)  # every heartbeat is now older than stale_after
        with psycopg.connect(dsn, autocommit=True) as conn:
            # Within the grace nothing is stale, the dead worker's run included. One statement,
            # so the grace and the reader see the same now(): whichever side of the grace's end
            # it lands on, the reader must agree with it.
            row = conn.execute(
                "SELECT now() - outbound_heartbeat._outage_ended_at(),"
                " (SELECT count(*) FROM outbound_heartbeat.get_active_run(4))").fetchone()
            assert row is not None
            since_outage, active = row
            assert active == (1 if since_outage < timedelta(seconds=STALE_AFTER) else 0), row
            for w in live:
                assert w.wait_exit(60) == 0, w.stderr_tail()
            for r in runs[:3]:
                assert run_row(conn, r.id)["status"] == "completed"
            deadline = time.monotonic() + 3 * STALE_AFTER
            while service.get_active_run(conn, 4) is not None:
                assert time.monotonic() < deadline, "the dead worker's run was never stopped"
                time.sleep(0.2)
            assert run_row(conn, runs[3].id)["status"] == "stopped"
            stale = conn.execute(
                "SELECT run_id, created_at - outbound_heartbeat._outage_ended_at()"
                " FROM outbound_heartbeat.run_events WHERE event IN ('stale_stopped', 'cleaned_up')"
            ).fetchall()
            assert [r[0] for r in stale] == [runs[3].id]
            assert stale[0][1] >= timedelta(seconds=STALE_AFTER)  # not before the grace ended
    finally:
        for w in workers:
            w.close()
