"""4. Many concurrent AsyncLeases in one process, each heartbeating every 2 s on its own
connection (share=False: the dedicated connections; benchmarks/many_leases.py measures the
shared hub), with a sweeper looking for stale runs every second: heartbeat latency
percentiles and false stale detections (must be zero)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psycopg

from outbound_heartbeat import lease_async, service, service_async
from outbound_heartbeat.lease_async import AsyncLease

from .common import Results, Server, percentile


async def _main(dsn: str, leases: int, seconds: float) -> dict[str, Any]:
    steady: list[float] = []
    warming: list[float] = []
    first: list[float] = []
    release: list[float] = []
    phase = {"releasing": False}
    warm_until = [float("inf")]  # two intervals after the last lease's first heartbeat
    seen: set[int] = set()
    real_heartbeat = service_async.heartbeat

    async def timed_heartbeat(conn: Any, run_id: int, *args: Any) -> Any:
        start = time.perf_counter()
        status = await real_heartbeat(conn, run_id, *args)
        latency = time.perf_counter() - start
        if phase["releasing"]:  # every lease ends at once: last heartbeats, finish_run, closes
            release.append(latency)
        elif run_id in seen:
            (steady if start > warm_until[0] else warming).append(latency)
        else:  # a new backend's first call: connection caches and the function compiled
            seen.add(run_id)
            first.append(latency)
            if len(seen) == leases:
                warm_until[0] = time.perf_counter() + 4.0
        return status

    lease_async.service_async.heartbeat = timed_heartbeat  # type: ignore[assignment]
    entered = 0
    all_in = asyncio.Event()
    connecting = asyncio.Semaphore(32)  # do not fork a thousand backends at the same instant
    lost = 0

    async def one(i: int, run_id: int) -> None:
        nonlocal entered, lost
        async with connecting:
            lease = AsyncLease(dsn, f"bench-{i}", run_id, interval=2.0, share=False)
            await lease.__aenter__()
        try:
            entered += 1
            if entered == leases:
                all_in.set()
            await all_in.wait()
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                lease.touch()
                await asyncio.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
            lost += lease.lost
            phase["releasing"] = True
        finally:
            await lease.__aexit__(None, None, None)

    reclaimed = 0
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as sweeper:
        runs = [(await service_async.create_run(sweeper, 10_000 + i, [{}])).id for i in range(leases)]

        async def sweep() -> None:
            nonlocal reclaimed
            while True:
                reclaimed += len(await service_async.cleanup_stuck_runs(sweeper))
                await asyncio.sleep(1.0)

        sweeping = asyncio.create_task(sweep())
        await asyncio.gather(*(one(i, r) for i, r in enumerate(runs)))
        sweeping.cancel()
        lease_async.service_async.heartbeat = real_heartbeat  # type: ignore[assignment]
    return {"steady": steady, "warming": warming, "first": first, "release": release,
            "reclaimed": reclaimed, "lost": lost}


def run(server: Server, results: Results, *, leases: int, seconds: float) -> None:
    print(f"{leases} concurrent leases for {seconds:g} s (steady state: from 4 s after every lease has beaten once)", flush=True)
    dsn = server.database("bench_leases")
    out = asyncio.run(_main(dsn, leases, seconds))
    steady, warming, first, release = out["steady"], out["warming"], out["first"], out["release"]
    reclaimed, lost = out["reclaimed"], out["lost"]
    with psycopg.connect(dsn, autocommit=True) as conn:
        stale_events = conn.execute(
            "SELECT count(*) FROM outbound_heartbeat.run_events"
            " WHERE event IN ('stale_stopped', 'cleaned_up')").fetchone()
        statuses = dict(conn.execute(
            "SELECT status, count(*) FROM outbound_call_runs GROUP BY status").fetchall())
        assert service.list_active_runs(conn) == []
    false_stale = (stale_events[0] if stale_events else 0) + reclaimed + lost
    p50, p99 = percentile(steady, 50) * 1e3, percentile(steady, 99) * 1e3
    results.add("leases", f"{leases:,} AsyncLeases, heartbeat every 2 s for {seconds:g} s:"
                f" {len(steady):,} heartbeats in steady state",
                f"p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {max(steady) * 1e3:.1f} ms",
                "p99 < 50 ms", p99 < 50)
    everything = steady + warming
    results.add("leases", f"all {len(everything):,} heartbeats while every lease runs, warm-up included",
                f"p50 {percentile(everything, 50) * 1e3:.1f} ms, p99 {percentile(everything, 99) * 1e3:.1f} ms")
    results.add("leases", f"the first heartbeat of each lease (new backend: caches, function compiled),"
                f" {len(first):,} of them", f"p50 {percentile(first, 50) * 1e3:.1f} ms,"
                f" p99 {percentile(first, 99) * 1e3:.1f} ms")
    if release:
        results.add("leases", f"last heartbeats while all {leases:,} leases release at the same"
                    f" instant, {len(release):,} of them", f"p50 {percentile(release, 50) * 1e3:.1f} ms,"
                    f" p99 {percentile(release, 99) * 1e3:.1f} ms")
    results.add("leases", "false stale detections (events, sweeper, leases lost)",
                f"{false_stale} (runs at the end: {statuses})", "0", false_stale == 0)
    server.drop("bench_leases")
