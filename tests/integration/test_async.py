"""The asyncio twin: same SQL, same records, same errors, on an AsyncConnection and a pool."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from outbound_heartbeat import AccessDenied, JobNotFound, LeaseLost, service, service_async

from ..helpers import backdate_heartbeat, run_row


def test_async_lifecycle_on_connection(dsn: str) -> None:
    async def main() -> None:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            run = await service_async.create_run(conn, 3, [{"p": 1}, {"p": 2}])
            claim = await service_async.claim_run(conn, "aw", run.id)
            assert claim is not None and claim.lease_epoch == 1
            assert await service_async.heartbeat(conn, run.id, "aw", 1) == "ok"
            job = await service_async.next_job(conn, run.id, "aw", 1)
            assert job is not None and job.payload == {"p": 1}
            out = await service_async.finish_job(conn, job.id, "aw", 1, "completed")
            assert out.outcome == "finished"
            active = await service_async.get_active_run(conn, 3)
            assert active is not None and active.queued_jobs == 1
            with pytest.raises(AccessDenied):
                await service_async.force_cancel(conn, run.id, 4)
            with pytest.raises(JobNotFound):
                await service_async.finish_job(conn, 98765, "aw", 1, "completed")
            result = await service_async.force_cancel(conn, run.id, 3)
            assert result.jobs_cancelled == 1
            with pytest.raises(LeaseLost):
                await service_async.next_job(conn, run.id, "aw", 1)
            assert await service_async.heartbeat(conn, run.id, "aw", 1) == "lost"
            assert await service_async.cleanup_stuck_runs(conn) == []
            assert await service_async.health_check(conn) == []
            assert await service_async.list_active_runs(conn) == []
            fin = await service_async.finish_run(conn, run.id, "aw", 1)
            assert fin.outcome == "lease_lost" and fin.status == "cancelled"
            pending = await service_async.create_run(conn, 3, [{}])
            cancel = await service_async.request_cancel(conn, pending.id)
            assert cancel.status == "cancelled"
            trail = await service_async.list_events(conn, run_id=run.id)
            assert [e.event for e in trail] == ["force_cancelled", "access_denied", "claimed", "created"]
            assert (trail[1].business_id, trail[1].detail["owner_business_id"]) == (4, 3)
            assert await service_async.verify_events(conn, run.id) == []
            samples = {(m.name, tuple(m.labels.values())): m.value
                       for m in await service_async.metrics(conn)}
            assert samples[("outbound_heartbeat_runs", ("cancelled",))] == 2


    asyncio.run(main())


def test_async_pool_concurrent_force_cancel(dsn: str, conn: psycopg.Connection[Any]) -> None:
    run = service.create_run(conn, 1, [{} for _ in range(10)])

    async def main() -> list[int]:
        async with AsyncConnectionPool(
            dsn, min_size=5, max_size=5, open=False, kwargs={"autocommit": True}
        ) as pool:
            results = await asyncio.gather(
                *(service_async.force_cancel(pool, run.id) for _ in range(10))
            )
            return sorted(r.jobs_cancelled for r in results)

    assert asyncio.run(main()) == [0] * 9 + [10]


def test_sync_pool_and_stale_detection(dsn: str, conn: psycopg.Connection[Any]) -> None:
    claim = service.claim_run(conn, "w", service.create_run(conn, 2, [{}]).id)
    assert claim is not None
    backdate_heartbeat(conn, claim.run_id, 31)
    with ConnectionPool(dsn, min_size=1, max_size=2, kwargs={"autocommit": True}) as pool:
        assert service.get_active_run(pool, 2) is None
    assert run_row(conn, claim.run_id)["status"] == "stopped"


def test_works_without_prepared_statements(dsn: str) -> None:
    # PgBouncer in transaction mode: no server-side prepared statements, no session state.
    with psycopg.connect(dsn, autocommit=True, prepare_threshold=None) as conn:
        for _ in range(10):
            run = service.create_run(conn, 5, [{}])
            claim = service.claim_run(conn, "pw", run.id)
            assert claim is not None
            assert service.heartbeat(conn, run.id, "pw", claim.lease_epoch) == "ok"
            service.finish_run(conn, run.id, "pw", claim.lease_epoch, "failed")
        assert conn.execute("SELECT count(*) FROM pg_prepared_statements").fetchone() == (0,)


def test_async_module_mirrors_the_sync_one() -> None:
    assert sorted(service_async.__all__) == sorted(service.__all__)
