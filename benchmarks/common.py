"""What every benchmark shares: the private server, side-by-side timing and the results table.

Absolute times drift on shared machines; every figure that matters here is a ratio of two
medians measured in the same run, with A and B alternating round by round.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg

from outbound_heartbeat import migrate
from outbound_heartbeat.testing import LocalCluster, start_local_cluster


def timed(fn: Callable[[], Any], calls: int) -> float:
    """Mean seconds per call over ``calls`` calls."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def alternate(
    fns: dict[str, Callable[[], Any]], rounds: int, calls: int, baseline: str | None = None
) -> dict[str, tuple[float, float]]:
    """Per function: (median seconds per call, median of its per-round ratio to ``baseline``).

    The functions run in alternating order round by round; each round's ratio compares
    batches measured moments apart, so drift of the machine between rounds cancels out.
    """
    for fn in fns.values():
        timed(fn, max(1, calls // 10))  # warm plans and caches
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            samples[name].append(timed(fns[name], calls))
    base = samples[baseline or names[0]]
    return {
        name: (
            statistics.median(values),
            statistics.median(v / b for v, b in zip(values, base, strict=True)),
        )
        for name, values in samples.items()
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


@dataclass
class Results:
    """Rows of the summary table, plus free text (plans) for RESULTS.md."""

    rows: list[tuple[str, str, str, str, str]] = field(default_factory=list)
    sections: list[tuple[str, str]] = field(default_factory=list)

    def add(self, bench: str, metric: str, value: str, goal: str = "", ok: bool | None = None) -> None:
        verdict = "" if ok is None else ("met" if ok else "MISSED")
        self.rows.append((bench, metric, value, goal, verdict))
        print(f"  {metric}: {value}" + (f"   (goal {goal}: {verdict})" if goal else ""), flush=True)

    def section(self, title: str, text: str) -> None:
        self.sections.append((title, text))

    def table(self) -> str:
        header = ("benchmark", "metric", "value", "goal", "")
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines)


class Server:
    """A private PostgreSQL started for the benchmarks, and migrated databases on it."""

    def __init__(self, max_connections: int, *, durable: bool = False) -> None:
        # durable: each commit flushed to disk, as on a production server (the default private
        # cluster runs with fsync off, the harshest baseline for a statement's own cost).
        flushed = {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"} if durable else {}
        self.cluster: LocalCluster = start_local_cluster(
            settings={
                "max_connections": str(max_connections),
                "shared_buffers": "256MB",
                # Server-side time per statement, free of the client's and the network's noise.
                "shared_preload_libraries": "pg_stat_statements",
                "pg_stat_statements.track": "top",
                **flushed,
            }
        )
        self.dsn = self.cluster.dsn
        with psycopg.connect(self.dsn) as conn:
            row = conn.execute("SHOW server_version").fetchone()
        self.version = row[0] if row else "?"

    def database(self, name: str, *, library: bool = True) -> str:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(name)))
        dsn = psycopg.conninfo.make_conninfo(self.dsn, dbname=name)
        if library:
            migrate(dsn)
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("UPDATE outbound_heartbeat.settings SET restart_grace = interval '0'")
        return dsn

    def drop(self, *names: str) -> None:
        """Drops a stage's databases and checkpoints, so its leftovers (autovacuum of a million
        rows, dirty buffers) do not run under the next stage's measurements."""
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            for name in names:
                conn.execute(psycopg.sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    psycopg.sql.Identifier(name)))
            conn.execute("CHECKPOINT")

    def close(self) -> None:
        self.cluster.destroy()
