"""heartbeat() against a raw single-row UPDATE of last_heartbeat_at, side by side in one run.

    python benchmarks/heartbeat_vs_update.py [--rounds 20] [--calls 500]

Each round times `calls` calls of A then of B (the order alternates per round) on one
connection each; the figure is the ratio of the medians. Absolute times are printed for
context only: they drift between machines, the ratio is what to compare.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import psycopg

from outbound_heartbeat import migrate, service
from outbound_heartbeat.testing import start_server


def timed(fn: Callable[[], Any], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--calls", type=int, default=500)
    args = parser.parse_args()
    with ExitStack() as stack:
        dsn = os.environ.get("DATABASE_URL")
        if not dsn:
            server = start_server()
            stack.callback(server.close)
            dsn = server.create_database()
        migrate(dsn)
        ours_conn = stack.enter_context(psycopg.connect(dsn, autocommit=True))
        raw_conn = stack.enter_context(psycopg.connect(dsn, autocommit=True))
        a = service.claim_run(ours_conn, "bench-a", service.create_run(ours_conn, 1, [{}]).id)
        b = service.claim_run(raw_conn, "bench-b", service.create_run(raw_conn, 2, [{}]).id)
        assert a is not None and b is not None

        def ours() -> None:
            service.heartbeat(ours_conn, a.run_id, "bench-a", a.lease_epoch)

        def ours_sql() -> None:
            ours_conn.execute(
                "SELECT outbound_heartbeat.heartbeat(%s, %s, %s)",
                (a.run_id, "bench-a", a.lease_epoch),
            )

        def raw() -> None:
            raw_conn.execute(
                "UPDATE outbound_call_runs SET last_heartbeat_at = now() WHERE id = %s", (b.run_id,)
            )

        samples: dict[str, list[float]] = {
            "service.heartbeat": [],
            "SQL heartbeat()": [],
            "raw UPDATE": [],
        }
        fns = {"service.heartbeat": ours, "SQL heartbeat()": ours_sql, "raw UPDATE": raw}
        for fn in fns.values():
            timed(fn, 50)  # warm up plans and caches
        for r in range(args.rounds):
            order = list(fns) if r % 2 == 0 else list(reversed(fns))
            for name in order:
                samples[name].append(timed(fns[name], args.calls))
        base = statistics.median(samples["raw UPDATE"])
        print(f"{'call':<20} {'median µs':>10} {'x raw UPDATE':>13}")
        for name, values in samples.items():
            med = statistics.median(values)
            print(f"{name:<20} {med * 1e6:>10.1f} {med / base:>13.2f}")


if __name__ == "__main__":
    main()
