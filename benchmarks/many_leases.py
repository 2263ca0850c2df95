"""6. Many leases in one process, sharing the process's hub (one heartbeat connection, a pool of
three work connections), on a server with max_connections = 100:

- backends used by N leases in one process (the hub) and, side by side, by N dedicated leases;
- heartbeat cost per lease: one heartbeat_leases() of N leases / N, against one raw single-row
  UPDATE per lease (a round trip each), alternating in one run (goal <= 0.2);
- heartbeat round trip (the beat statement each lease rode in), p50/p99, for N leases in one
  process and for P processes x N leases, with a sweeper every second: 0 false stale;
- a lease's first heartbeat against its steady ones (warm start), p99;
- a release storm: all N leases leave at the same instant; p99 of the time to be released
  (goal within 1 s).

    python -m benchmarks.many_leases child DSN RUN_IDS_JSON SECONDS   # one holder process
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from typing import Any

import psycopg

from outbound_heartbeat import hub_async, service
from outbound_heartbeat.lease_async import AsyncLease

from .common import Results, Server, alternate, percentile

MAX_CONNECTIONS = 100


async def hold(dsn: str, runs: list[int], seconds: float, *, share: bool = True) -> dict[str, Any]:
    """Holds one AsyncLease per run for ``seconds``, then releases all at once; what it saw."""
    beats: list[tuple[float, float, list[int]]] = []  # (start, seconds, run ids)
    real = hub_async.send_beat  # the hub's beat statement, whatever it sends

    async def timed(conn: Any, leases: Any, *, wait: bool = True) -> Any:
        start = time.perf_counter()
        answers = await real(conn, leases, wait=wait)
        if leases:
            beats.append((start, time.perf_counter() - start, [lease[0] for lease in leases]))
        return answers

    hub_async.send_beat = timed  # type: ignore[assignment]
    leases = [AsyncLease(dsn, f"bench-{run_id}", run_id, interval=2.0, share=share)
              for run_id in runs]
    connecting = asyncio.Semaphore(32)

    async def enter(lease: AsyncLease) -> None:
        async with connecting:
            await lease.__aenter__()

    try:
        await asyncio.gather(*(enter(lease) for lease in leases))
        all_in = time.perf_counter()
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as watch:
            deadline = time.monotonic() + seconds
            backends = 0
            while time.monotonic() < deadline:
                for lease in leases:
                    lease.touch()
                cur = await watch.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'oh-%%'"
                    " AND pid <> pg_backend_pid()")
                row = await cur.fetchone()
                backends = max(backends, row[0] if row else 0)
                await asyncio.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        lost = sum(lease.lost for lease in leases)
        released: list[float] = []
        storm = time.perf_counter()

        async def leave(lease: AsyncLease) -> None:
            await lease.__aexit__(None, None, None)
            released.append(time.perf_counter() - storm)

        await asyncio.gather(*(leave(lease) for lease in leases))
    finally:
        hub_async.send_beat = real  # type: ignore[assignment]
    first: list[float] = []
    steady: list[float] = []
    first_beat_done = all_in  # when the last lease had its first beat
    seen: set[int] = set()
    for start, _, ids in beats:
        if not seen.issuperset(ids):
            seen.update(ids)
            first_beat_done = start
    seen.clear()
    for start, took, ids in beats:
        for run_id in ids:
            if run_id not in seen:
                seen.add(run_id)
                first.append(took)
            elif start > first_beat_done + 4.0:  # two intervals after every lease's first beat
                steady.append(took)
    return {"first": first, "steady": steady, "release": released, "lost": lost,
            "backends": backends, "statements": len(beats)}


def child_main(argv: list[str]) -> int:
    dsn, runs, seconds = argv[0], json.loads(argv[1]), float(argv[2])
    print(json.dumps(asyncio.run(hold(dsn, runs, seconds))), flush=True)
    return 0


def _sweeping(dsn: str, stop: threading.Event, found: list[int]) -> threading.Thread:
    def sweep() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            while not stop.wait(1.0):
                found.append(len(service.cleanup_stuck_runs(conn)))

    thread = threading.Thread(target=sweep, daemon=True)
    thread.start()
    return thread


def _stale_events(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM outbound_heartbeat.run_events"
                           " WHERE event IN ('stale_stopped', 'cleaned_up')").fetchone()
    return int(row[0]) if row else 0


def _new_runs(dsn: str, count: int) -> list[int]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return [service.create_run(conn, 50_000 + i, [{}]).id for i in range(count)]


def _ms(values: list[float], q: float) -> str:
    return f"{percentile(values, q) * 1e3:.1f} ms" if values else "n/a"


def _cost(results: Results, dsn: str, sizes: list[int], rounds: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for n in sizes:
            runs = _new_runs(dsn, n)
            leases = []
            for run_id in runs:
                claim = service.claim_run(conn, f"cost-{run_id}", run_id)
                assert claim is not None
                leases.append((run_id, claim.worker_id, claim.lease_epoch))
            ids, workers, epochs = ([lease[i] for lease in leases] for i in range(3))

            def raw(ids: list[int] = ids) -> None:
                for run_id in ids:
                    conn.execute("UPDATE outbound_call_runs SET last_heartbeat_at = now()"
                                 " WHERE id = %s", (run_id,))

            def together(ids: list[int] = ids, workers: list[str] = workers,
                         epochs: list[int] = epochs) -> None:
                rows = conn.execute(
                    "SELECT * FROM outbound_heartbeat.heartbeat_leases(%s, %s, %s)",
                    (ids, workers, epochs)).fetchall()
                assert all(status == "ok" for _, status in rows), rows[:3]

            out = alternate({"raw": raw, "set": together}, rounds=rounds, calls=1, baseline="raw")
            per_raw, per_set = out["raw"][0] / n * 1e6, out["set"][0] / n * 1e6
            results.add("many leases", f"heartbeat cost per lease, {n:,} leases in one statement"
                        f" / one raw single-row UPDATE per lease",
                        f"{per_set:.1f} us / {per_raw:.1f} us = x{out['set'][1]:.3f}",
                        "<= 0.2", out["set"][1] <= 0.2)
            conn.execute("UPDATE outbound_call_runs SET status = 'completed', ended_at = now(),"
                         " locked_by_worker = NULL WHERE id = ANY(%s)", (ids,))


def run(server: Server, results: Results, *, sizes: list[int], processes: int, seconds: float,
        rounds: int) -> None:
    """``server`` is ignored: this stage starts its own with max_connections = 100."""
    del server
    print(f"many leases per process: N = {sizes}, {processes} processes, {seconds:g} s,"
          f" max_connections = {MAX_CONNECTIONS}", flush=True)
    small = Server(max_connections=MAX_CONNECTIONS)
    try:
        dsn = small.database("bench_many")
        _cost(results, dsn, sizes, rounds)
        dedicated_n = min(sizes[0], (MAX_CONNECTIONS - 10) // 2)
        dedicated = asyncio.run(hold(dsn, _new_runs(dsn, dedicated_n), 5.0, share=False))
        for n in sizes:
            stop, swept = threading.Event(), []
            sweeper = _sweeping(dsn, stop, swept)
            stale_before = _stale_events(dsn)
            out = asyncio.run(hold(dsn, _new_runs(dsn, n), seconds))
            stop.set()
            sweeper.join()
            false_stale = _stale_events(dsn) - stale_before + sum(swept) + out["lost"]
            results.add("many leases", f"backends used by {n:,} leases in one process (hub)"
                        + (f"; {dedicated_n} dedicated leases: {dedicated['backends']}"
                           if n == sizes[0] else ""),
                        f"{out['backends']}", "<= 4", out["backends"] <= 4)
            results.add("many leases", f"{n:,} leases in one process, beat every 2 s for"
                        f" {seconds:g} s: round trip of each lease's beat (steady,"
                        f" {len(out['steady']):,} beats in {out['statements']:,} statements)",
                        f"p50 {_ms(out['steady'], 50)}, p99 {_ms(out['steady'], 99)};"
                        f" false stale {false_stale}", "0 false stale", false_stale == 0)
            results.add("many leases", f"{n:,} leases: first heartbeat vs steady heartbeat",
                        f"first p50 {_ms(out['first'], 50)}, p99 {_ms(out['first'], 99)};"
                        f" steady p99 {_ms(out['steady'], 99)}")
            results.add("many leases", f"release storm: {n:,} leases leave at the same instant,"
                        " time until each is released",
                        f"p50 {_ms(out['release'], 50)}, p99 {_ms(out['release'], 99)}",
                        "p99 <= 1 s", bool(out["release"]) and percentile(out["release"], 99) <= 1.0)
        # A fresh database, as every stage of benchmarks/run.py gets: the stages above leave
        # tens of thousands of dead run versions behind (see docs/worker-lease.md).
        small.drop("bench_many")
        dsn = small.database("bench_many_processes")
        n = sizes[-1]
        runs = _new_runs(dsn, n * processes)
        stop, swept = threading.Event(), []
        sweeper = _sweeping(dsn, stop, swept)
        stale_before = _stale_events(dsn)
        children = [subprocess.Popen(
            [sys.executable, "-m", "benchmarks.many_leases", "child", dsn,
             json.dumps(runs[i * n:(i + 1) * n]), str(seconds)],
            stdout=subprocess.PIPE, text=True) for i in range(processes)]
        answers = [child.communicate()[0] for child in children]
        stop.set()
        sweeper.join()
        outs = [json.loads(text) for text in answers if text.strip()]
        if len(outs) < processes:  # a holder died: say so instead of a half-measured row
            failed = processes - len(outs)
            results.add("many leases", f"{processes} processes x {n:,} leases",
                        f"{failed} holder processes failed (see their stderr)", "all finish", False)
            if not outs:
                return
        false_stale = _stale_events(dsn) - stale_before + sum(swept) + sum(o["lost"] for o in outs)
        steady = [t for o in outs for t in o["steady"]]
        release = [t for o in outs for t in o["release"]]
        results.add("many leases", f"{processes} processes x {n:,} leases, max_connections ="
                    f" {MAX_CONNECTIONS}: round trip of each lease's beat (steady, {len(steady):,})",
                    f"p50 {_ms(steady, 50)}, p99 {_ms(steady, 99)}; backends of all {processes}"
                    f" processes {max(o['backends'] for o in outs)}; false stale {false_stale}",
                    "0 false stale", false_stale == 0)
        results.add("many leases", f"{processes} processes x {n:,} leases: release storm, p99",
                    f"p50 {_ms(release, 50)}, p99 {_ms(release, 99)}")
    finally:
        small.close()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        sys.exit(child_main(sys.argv[2:]))
    print(__doc__)
