"""Every benchmark of outbound_heartbeat, one command: prints a table and appends it, dated, to
RESULTS.md (the file keeps every earlier run and the hand-written rounds beside them).

    python -m benchmarks.run            # small sizes, a few minutes
    python -m benchmarks.run --full     # the full sizes (100k heartbeats, 1M runs, ...)

Every figure is a ratio or a distribution measured side by side in this one run, on a private
PostgreSQL started from local binaries. Nothing here is asserted by the test suite.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import sys
import time
from pathlib import Path

from . import (
    detection,
    force_cancel,
    heartbeat,
    leases,
    live_cost,
    many_leases,
    migration_locks,
    scaling,
)
from .common import Results, Server

HERE = Path(__file__).resolve().parent

SIZES = {
    False: {"rounds": 30, "calls": 200, "hot_beats": 20_000, "small": 10_000, "large": 200_000,
            "active": 1_000, "jobs": 20_000, "repeats": 3, "leases": 200, "seconds": 20.0, "kills": 20,
            "migration_jobs": 100_000, "hold": 2.0,
            "live_jobs": 100_000, "live_runs": 100_000, "live_events": 500_000, "prune_events": 100_000,
            "many": [100, 200], "processes": 2, "many_seconds": 12.0},
    True: {"rounds": 40, "calls": 300, "hot_beats": 100_000, "small": 10_000, "large": 1_000_000,
           "active": 1_000, "jobs": 100_000, "repeats": 3, "leases": 1_000, "seconds": 60.0, "kills": 20,
           "migration_jobs": 1_000_000, "hold": 8.0,
           "live_jobs": 1_000_000, "live_runs": 1_000_000, "live_events": 5_000_000, "prune_events": 1_000_000,
           "many": [100, 1_000], "processes": 4, "many_seconds": 30.0},
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--full", action="store_true", help="the full sizes")
    parser.add_argument("--only", nargs="*", choices=["heartbeat", "history", "force_cancel", "leases", "detection",
                                                    "migration", "live_cost", "many_leases"])
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args()
    # The library's tagged log lines (one per force-cancel here) are not what is measured.
    logging.basicConfig(level=logging.ERROR)
    size = SIZES[args.full]
    wanted = set(args.only or ["heartbeat", "history", "force_cancel", "leases", "detection", "migration",
                               "live_cost", "many_leases"])
    results = Results()
    started = time.monotonic()
    server = Server(max_connections=2 * size["leases"] + 50)
    try:
        if "heartbeat" in wanted:
            heartbeat.run(server, results, rounds=size["rounds"], calls=size["calls"], hot_beats=size["hot_beats"])
        if "history" in wanted:
            scaling.run(server, results, small=size["small"], large=size["large"], active=size["active"],
                        rounds=size["rounds"], calls=size["calls"] // 3)
        if "force_cancel" in wanted:
            force_cancel.run(server, results, jobs=size["jobs"], repeats=size["repeats"])
        if "leases" in wanted:
            leases.run(server, results, leases=size["leases"], seconds=size["seconds"])
        if "many_leases" in wanted:
            many_leases.run(server, results, sizes=size["many"], processes=size["processes"],
                            seconds=size["many_seconds"], rounds=size["rounds"] // 2)
        if "detection" in wanted:
            detection.run(server, results, kills=size["kills"])
        if "migration" in wanted:
            migration_locks.run(server, results, jobs=size["migration_jobs"], hold=size["hold"])
        if "live_cost" in wanted:
            # Few rounds: the point is a ratio far from 1 or not, and a poll of a huge run on an
            # older checkout takes tens of milliseconds.
            live_cost.run(server, results, jobs=size["live_jobs"], runs=size["live_runs"],
                          events=size["live_events"], prune_events=size["prune_events"], rounds=10, calls=20)
        version = server.version
    finally:
        server.close()
    elapsed = time.monotonic() - started
    table = results.table()
    print("\n" + table)
    header = (
        f"\n## `python -m benchmarks.run{' --full' if args.full else ''}"
        f"{' --only ' + ' '.join(sorted(wanted)) if args.only else ''}` on"
        f" {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC\n\n"
        f"PostgreSQL {version} (private cluster, fsync off), Python {platform.python_version()},"
        f" {os.cpu_count()} CPUs, {platform.machine()}; {elapsed:.0f} s in all. Ratios and"
        " distributions measured side by side in one run (medians, A and B alternating);"
        " absolute times drift between machines and runs.\n\n"
    )
    body = "".join(f"\n### {title}\n\n```\n{text}\n```\n" for title, text in results.sections)
    # Appended, never rewritten: the file holds earlier runs and the rounds written by hand.
    existing = args.output.read_text(encoding="utf-8") if args.output.exists() else "# Benchmark results\n"
    args.output.write_text(existing.rstrip("\n") + "\n" + header + table + "\n" + body, encoding="utf-8")
    print(f"\nappended to {args.output} ({elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
