"""7. What a heartbeat costs, from a lone lease to a thousand in one process:

- "what a default Lease sends": the statement the process's hub sends to beat N leases (N = 1,
  10, 100, 1,000), per lease, against N raw single-row ``UPDATE ... SET last_heartbeat_at =
  now() WHERE id = $1`` round trips (the cost of a beat nobody fences) and against one bare
  fenced ``UPDATE ... FROM unnest(ids, workers, epochs)`` statement (the set-based limit), all
  alternating round by round in one run; ``heartbeat()`` alone and ``heartbeat_leases()`` beside
  them (goals: a lone lease's beat and ``heartbeat()`` <= 1.1x raw; ``heartbeat_leases()`` <=
  1.5x the bare limit per lease at 100 and 1,000 leases);
- release storms: 1,000 sync leases (a thread each) and 1,000 async leases (a task each) of
  one process leave at the same instant; p50/p99 of the time until each is released (goals:
  p99 <= 0.5 s threads, <= 0.3 s tasks).

Every connection is opened with the leases' own connect options.

    python -m benchmarks.heartbeat_cost [--full] [--output FILE]   # this stage alone
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg

from outbound_heartbeat import hub, service
from outbound_heartbeat.connections import CONNECT_OPTIONS
from outbound_heartbeat.lease import Lease
from outbound_heartbeat.lease_async import AsyncLease

from .common import Results, Server, percentile, timed

RAW = "UPDATE outbound_call_runs SET last_heartbeat_at = now() WHERE id = %s"
BARE = (
    "UPDATE public.outbound_call_runs AS r SET last_heartbeat_at = now()"
    " FROM unnest(%s::bigint[], %s::text[], %s::bigint[]) AS a(id, worker_id, lease_epoch)"
    " WHERE r.id = a.id AND r.locked_by_worker = a.worker_id AND r.lease_epoch = a.lease_epoch"
    " AND r.status = 'running'"
)

HEARTBEAT = "SELECT outbound_heartbeat.heartbeat(%s, %s, %s)"

#: (rounds, calls per round) for each number of leases: a few seconds per size.
PLAN = {1: (40, 100), 10: (24, 30), 100: (20, 6), 1_000: (12, 1)}


def lease_sender() -> Callable[[psycopg.Connection[Any], list[tuple[int, str, int]]], list[tuple[int, str]]]:
    """What the hub of this checkout sends for the leases it beats (older checkouts: always
    heartbeat_leases())."""
    send = getattr(hub, "send_beat", None)
    return send if send is not None else service.heartbeat_leases


def _connect(dsn: str) -> psycopg.Connection[Any]:
    return psycopg.connect(dsn, **CONNECT_OPTIONS)


def _claimed(conn: psycopg.Connection[Any], n: int, tag: str) -> list[tuple[int, str, int]]:
    leases = []
    for i in range(n):
        run_id = service.create_run(conn, 70_000 + i, [{}]).id
        claim = service.claim_run(conn, f"{tag}-{i}", run_id)
        assert claim is not None
        leases.append((claim.run_id, claim.worker_id, claim.lease_epoch))
    return leases


def cost(dsn: str, results: Results, sizes: list[int], scale: float = 1.0) -> None:
    send = lease_sender()
    raw_conn, bare_conn, lease_conn, set_conn, one_conn, sql_conn = (_connect(dsn) for _ in range(6))
    for n in sizes:
        leases = _claimed(raw_conn, n, f"cost{n}")
        ids = [lease[0] for lease in leases]
        workers = [lease[1] for lease in leases]
        epochs = [lease[2] for lease in leases]

        def raw(ids: list[int] = ids) -> None:
            for run_id in ids:
                raw_conn.execute(RAW, (run_id,))

        def bare(ids: list[int] = ids, workers: list[str] = workers, epochs: list[int] = epochs) -> None:
            cur = bare_conn.execute(BARE, (ids, workers, epochs))
            assert cur.rowcount == len(ids)

        def lease(leases: list[tuple[int, str, int]] = leases) -> None:
            answers = send(lease_conn, leases)
            assert all(status == "ok" for _, status in answers), answers[:3]

        def together(leases: list[tuple[int, str, int]] = leases) -> None:
            answers = service.heartbeat_leases(set_conn, leases)
            assert all(status == "ok" for _, status in answers), answers[:3]

        fns: dict[str, Callable[[], Any]] = {"raw": raw, "bare": bare, "lease": lease}
        if send is not service.heartbeat_leases:
            fns["heartbeat_leases"] = together
        if n == 1:
            def alone(lease: tuple[int, str, int] = leases[0]) -> None:
                assert service.heartbeat(one_conn, *lease) == "ok"

            def in_sql(lease: tuple[int, str, int] = leases[0]) -> None:
                row = sql_conn.execute(HEARTBEAT, lease).fetchone()
                assert row is not None and row[0] == "ok"

            fns["heartbeat"] = alone
            fns["heartbeat_sql"] = in_sql
        rounds, calls = PLAN.get(n, (10, 1))
        samples = side_by_side(fns, max(4, round(rounds * scale)), max(1, round(calls * scale)))
        per = {name: statistics.median(values) / n * 1e6 for name, values in samples.items()}
        by_raw = {name: ratio(samples, name, "raw") for name in samples}
        by_bare = {name: ratio(samples, name, "bare") for name in samples}
        what = "one raw single-row UPDATE round trip" if n == 1 else f"{n:,} raw single-row UPDATE round trips"
        results.add("heartbeat cost", f"{n:,} leases: {what}, per lease", f"{per['raw']:.1f} us = x1.00")
        results.add("heartbeat cost", f"{n:,} leases: bare fenced unnest UPDATE, per lease",
                    f"{per['bare']:.1f} us = x{by_raw['bare']:.3f} raw")
        lease_goal = n == 1
        results.add("heartbeat cost", f"{n:,} leases: what a default Lease sends ({_name(send, n)}), per lease",
                    f"{per['lease']:.1f} us = x{by_raw['lease']:.3f} raw, x{by_bare['lease']:.2f} bare",
                    "<= 1.1x raw" if lease_goal else ("<= 1.5x bare" if n >= 100 else ""),
                    by_raw["lease"] <= 1.1 if lease_goal else (by_bare["lease"] <= 1.5 if n >= 100 else None))
        if "heartbeat_leases" in fns:
            results.add("heartbeat cost", f"{n:,} leases: heartbeat_leases(), per lease",
                        f"{per['heartbeat_leases']:.1f} us = x{by_raw['heartbeat_leases']:.3f} raw,"
                        f" x{by_bare['heartbeat_leases']:.2f} bare",
                        "<= 1.5x bare" if n >= 100 else "",
                        by_bare["heartbeat_leases"] <= 1.5 if n >= 100 else None)
        if "heartbeat" in fns:
            results.add("heartbeat cost", "1 lease: heartbeat() called alone in SQL (a DBA's or another"
                        " language's worker)", f"{per['heartbeat_sql']:.1f} us = x{by_raw['heartbeat_sql']:.3f} raw",
                        "<= 1.1x raw", by_raw["heartbeat_sql"] <= 1.1)
            results.add("heartbeat cost", "1 lease: service.heartbeat() (the Python call)",
                        f"{per['heartbeat']:.1f} us = x{by_raw['heartbeat']:.3f} raw")
        raw_conn.execute("UPDATE outbound_call_runs SET status = 'completed', ended_at = now(),"
                         " locked_by_worker = NULL WHERE id = ANY(%s)", (ids,))
    for conn in (raw_conn, bare_conn, lease_conn, set_conn, one_conn, sql_conn):
        conn.close()


def _name(send: Any, n: int) -> str:
    if send is service.heartbeat_leases:
        return "heartbeat_leases()"
    return str(getattr(send, "describe", lambda n: send.__name__)(n))


def side_by_side(fns: dict[str, Callable[[], Any]], rounds: int, calls: int) -> dict[str, list[float]]:
    """Seconds per call of each function, one sample per round, alternating order round by round
    (as common.alternate), so any two can be compared round by round."""
    for fn in fns.values():
        timed(fn, max(2, calls // 5))  # warm plans and caches
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            samples[name].append(timed(fns[name], calls))
    return samples


def ratio(samples: dict[str, list[float]], name: str, baseline: str) -> float:
    """Median of the per-round ratios of ``name`` to ``baseline``."""
    return statistics.median(v / b for v, b in zip(samples[name], samples[baseline], strict=True))


def sync_storm(dsn: str, n: int, hold: float) -> list[float]:
    """n default Leases, a thread each, leave at one instant; seconds until each is released."""
    with _connect(dsn) as conn:
        runs = [service.create_run(conn, 80_000 + i, [{}]).id for i in range(n)]
    entered = threading.Barrier(n + 1)
    go = threading.Event()
    released: list[float] = []
    start = [0.0]
    failures: list[BaseException] = []
    connecting = threading.Semaphore(16)

    def worker(run_id: int) -> None:
        lease = Lease(dsn, f"storm-{run_id}", run_id)
        try:
            with connecting:
                lease.__enter__()
        except BaseException as exc:  # a failed claim still reaches the barrier
            failures.append(exc)
            entered.wait()
            return
        entered.wait()
        while not go.wait(1.0):
            lease.touch()
        lease.__exit__(None, None, None)
        released.append(time.perf_counter() - start[0])

    threads = [threading.Thread(target=worker, args=(run_id,), daemon=True) for run_id in runs]
    for thread in threads:
        thread.start()
    entered.wait()
    time.sleep(hold)
    start[0] = time.perf_counter()
    go.set()
    for thread in threads:
        thread.join(60)
    if failures:
        raise failures[0]
    _check_completed(dsn, runs)
    return released


async def async_storm(dsn: str, n: int, hold: float) -> list[float]:
    """n default AsyncLeases, a task each, leave at one instant; seconds until each is released."""
    with _connect(dsn) as conn:
        runs = [service.create_run(conn, 90_000 + i, [{}]).id for i in range(n)]
    leases = [AsyncLease(dsn, f"astorm-{run_id}", run_id) for run_id in runs]
    connecting = asyncio.Semaphore(16)

    async def enter(lease: AsyncLease) -> None:
        async with connecting:
            await lease.__aenter__()

    await asyncio.gather(*(enter(lease) for lease in leases))
    deadline = time.monotonic() + hold
    while time.monotonic() < deadline:
        for lease in leases:
            lease.touch()
        await asyncio.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    released: list[float] = []
    start = time.perf_counter()

    async def leave(lease: AsyncLease) -> None:
        await lease.__aexit__(None, None, None)
        released.append(time.perf_counter() - start)

    await asyncio.gather(*(leave(lease) for lease in leases))
    _check_completed(dsn, runs)
    return released


def _check_completed(dsn: str, runs: list[int]) -> None:
    with _connect(dsn) as conn:
        rows = conn.execute("SELECT status, count(*) FROM outbound_call_runs WHERE id = ANY(%s) GROUP BY 1",
                            (runs,)).fetchall()
    assert dict(rows) == {"completed": len(runs)}, rows


def storms(dsn: str, results: Results, n: int, hold: float, repeats: int) -> None:
    kinds: list[tuple[str, float, Callable[[], list[float]]]] = [
        ("threads", 0.5, lambda: sync_storm(dsn, n, hold)),
        ("tasks", 0.3, lambda: asyncio.run(async_storm(dsn, n, hold))),
    ]
    for label, goal, measure in kinds:
        p99s, p50s = [], []
        for _ in range(repeats):
            released = measure()
            p99s.append(percentile(released, 99))
            p50s.append(percentile(released, 50))
        med99 = sorted(p99s)[len(p99s) // 2]
        results.add("heartbeat cost", f"release storm: {n:,} default leases ({label}) leave at one instant,"
                    f" time until each is released ({repeats} storms)",
                    f"p50 {' / '.join(f'{v * 1e3:.0f}' for v in p50s)} ms, p99 "
                    f"{' / '.join(f'{v * 1e3:.0f}' for v in p99s)} ms",
                    f"p99 <= {goal:g} s", med99 <= goal)


def run(server: Server, results: Results, *, sizes: list[int], storm: int, hold: float, repeats: int,
        scale: float = 1.0) -> None:
    print(f"heartbeat cost: N = {sizes}; storms of {storm:,} leases", flush=True)
    dsn = server.database("bench_heartbeat_cost")
    cost(dsn, results, sizes, scale)
    server.drop("bench_heartbeat_cost")
    dsn = server.database("bench_heartbeat_storm")
    storms(dsn, results, storm, hold, repeats)
    server.drop("bench_heartbeat_storm")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--full", action="store_true", help="more rounds, three storms of each kind")
    parser.add_argument("--only", choices=["cost", "storm"])
    parser.add_argument("--output", help="write the table (markdown) to this file too")
    args = parser.parse_args()
    results = Results()
    server = Server(max_connections=100)
    started = time.monotonic()
    try:
        dsn = server.database("bench_heartbeat_cost")
        if args.only in (None, "cost"):
            cost(dsn, results, [1, 10, 100, 1_000], 1.5 if args.full else 1.0)
        if args.only in (None, "storm"):
            storms(dsn, results, 1_000, 3.0, 3 if args.full else 1)
        version = server.version
    finally:
        server.close()
    table = results.table()
    print("\n" + table)
    print(f"\nPostgreSQL {version}, {time.monotonic() - started:.0f} s")
    if args.output:
        with open(args.output, "w", encoding="utf-8") as out:
            out.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
