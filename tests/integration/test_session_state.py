"""No session state (docs/embedding.md): with log_statement = all on a private server, a
whole lifecycle through the service calls and shared and dedicated Lease and AsyncLease sends
no session-level SET, no advisory lock, no LISTEN. Whatever must be set is set inside the
functions."""

from __future__ import annotations

import asyncio
import re

import psycopg

from outbound_heartbeat import service, service_async, testing
from outbound_heartbeat.lease import Lease
from outbound_heartbeat.lease_async import AsyncLease

from ..helpers import private_server

FORBIDDEN = re.compile(
    r"^\s*(SET|RESET|LISTEN|UNLISTEN|DISCARD|PREPARE|DECLARE)\b|pg_advisory_lock|pg_try_advisory_lock"
    r"|set_config\([^)]*,\s*false\s*\)",
    re.IGNORECASE,
)
STATEMENT = re.compile(r"LOG:\s+(?:statement|execute [^:]*):\s*(.*)$")


def test_no_session_state_is_sent() -> None:
    with private_server(log_statement="all", log_min_messages="warning") as (cluster, dsn):
        check_log(cluster, dsn)


def check_log(cluster: testing.LocalCluster, dsn: str) -> None:
    log = cluster.root / "server.log"
    start = log.stat().st_size  # what the migration itself sent is not the library at work

    with psycopg.connect(dsn, autocommit=True, prepare_threshold=None) as conn:
        conn.execute("UPDATE outbound_heartbeat.settings SET restart_grace = interval '0'")
        first = service.create_run(conn, 1, [{"n": i} for i in range(3)])
        second = service.create_run(conn, 2, [{}, {}])
        with Lease(dsn, "sync-worker", first.id, interval=0.5,
                   connect_options={"prepare_threshold": None}) as lease:
            while (job := lease.next_job()) is not None:
                lease.finish_job(job)

        async def async_worker() -> None:
            async with AsyncLease(dsn, "async-worker", second.id, interval=0.5,
                                  connect_options={"prepare_threshold": None}) as held:
                while (job := await held.next_job()) is not None:
                    await held.finish_job(job)
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as aconn:
                await service_async.get_active_run(aconn, 2)

        asyncio.run(async_worker())
        # The same with dedicated leases (share=False): connections and heartbeats of their own.
        own = service.create_run(conn, 4, [{"n": i} for i in range(3)])
        with Lease(dsn, "own-sync-worker", own.id, interval=0.5, share=False,
                   connect_options={"prepare_threshold": None}) as lease:
            while (job := lease.next_job()) is not None:
                lease.finish_job(job)
        own_async = service.create_run(conn, 5, [{}, {}])

        async def dedicated_async_worker() -> None:
            async with AsyncLease(dsn, "own-async-worker", own_async.id, interval=0.5,
                                  share=False, connect_options={"prepare_threshold": None}) as held:
                while (job := await held.next_job()) is not None:
                    await held.finish_job(job)

        asyncio.run(dedicated_async_worker())
        third = service.create_run(conn, 3, [{}])
        service.get_active_run(conn, 3)
        service.request_cancel(conn, third.id, 3)
        service.force_cancel(conn, third.id)
        service.cleanup_stuck_runs(conn)
        service.health_check(conn)
        service.list_active_runs(conn)
        service.list_events(conn, run_id=first.id)
        service.metrics(conn)

    with log.open(encoding="utf-8", errors="replace") as f:
        f.seek(start)
        statements = [m.group(1) for line in f if (m := STATEMENT.search(line))]
    # The log is complete: shared and dedicated leases' beats are in it.
    assert any("outbound_heartbeat.heartbeat_leases" in s for s in statements)
    assert any("outbound_heartbeat.heartbeat(" in s for s in statements)
    assert any("outbound_heartbeat.finish_run(" in s for s in statements)
    assert any("outbound_heartbeat.next_job" in s for s in statements)
    offending = [s for s in statements if FORBIDDEN.search(s)]
    assert offending == []
