"""2. get_active_run() and cleanup_stuck_runs(): the same calls against a table with a short and
a long history of finished runs (plus the same open runs): the cost must follow the open runs."""

from __future__ import annotations

import random
from typing import Any

import psycopg

from outbound_heartbeat import service

from .common import Results, Server, alternate

BUSINESSES_WITH_HISTORY = 100

FILL = [
"""
INSERT INTO outbound_call_runs (business_id, status, lease_epoch, started_at, ended_at, created_at, updated_at)
SELECT mod(g, %(businesses)s) + 1, (ARRAY['completed', 'stopped', 'cancelled', 'failed'])[mod(g, 4) + 1], 1,
       now() - interval '2 days', now() - interval '1 day', now() - interval '2 days', now() - interval '1 day'
  FROM generate_series(1, %(finished)s) AS g""",
"""INSERT INTO outbound_call_jobs (run_id, business_id, status, created_at, updated_at)
SELECT r.id, r.business_id, 'completed', r.created_at, r.updated_at FROM outbound_call_runs AS r""",
"""INSERT INTO outbound_call_runs (business_id, status, locked_by_worker, lock_ts, last_heartbeat_at,
                                lease_epoch, started_at, created_at, updated_at)
SELECT g, 'running', 'bench-' || g, now(), now(), 1, now(), now(), now()
  FROM generate_series(1, %(active)s) AS g""",
"""INSERT INTO outbound_call_jobs (run_id, business_id, status)
SELECT r.id, r.business_id, 'queued' FROM outbound_call_runs AS r, generate_series(1, 5)
 WHERE r.status = 'running'""",
]

AUTO_EXPLAIN = [
    "LOAD 'auto_explain'",
    "SET auto_explain.log_min_duration = 0",
    "SET auto_explain.log_analyze = on",
    "SET auto_explain.log_buffers = on",
    "SET auto_explain.log_nested_statements = on",
    "SET auto_explain.log_level = 'notice'",
]


def build(server: Server, name: str, finished: int, active: int) -> str:
    dsn = server.database(name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        # Nothing may go stale while we measure: this compares lookups, not reclaims.
        conn.execute("UPDATE outbound_heartbeat.settings SET stale_after = interval '1 hour'")
        params = {"businesses": BUSINESSES_WITH_HISTORY, "finished": finished, "active": active}
        with conn.transaction():
            for statement in FILL:
                conn.execute(statement, {k: v for k, v in params.items() if f"%({k})s" in statement})
        conn.execute("VACUUM ANALYZE outbound_call_runs")
        conn.execute("VACUUM ANALYZE outbound_call_jobs")
    return dsn


def plans(dsn: str, query: str) -> str:
    """auto_explain's plans (ANALYZE, BUFFERS) of every statement inside the call that reads
    the runs or jobs table, as the function really runs them."""
    notices: list[str] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        for _ in range(6):  # past plpgsql's switch to a cached generic plan
            conn.execute(query).fetchall()
        for statement in AUTO_EXPLAIN:
            conn.execute(statement)
        notices.clear()
        conn.execute(query).fetchall()
    keep = [n for n in notices if "outbound_call_runs" in n or "outbound_call_jobs" in n]
    return "\n\n".join(keep)


def run(server: Server, results: Results, *, small: int, large: int, active: int,
        rounds: int, calls: int) -> None:
    print("scaling with history", flush=True)
    small_dsn = build(server, "bench_history_small", small, active)
    large_dsn = build(server, "bench_history_large", large, active)
    conns: dict[str, psycopg.Connection[Any]] = {
        "small": psycopg.connect(small_dsn, autocommit=True),
        "large": psycopg.connect(large_dsn, autocommit=True),
    }
    rng = random.Random(7)

    def active_run(conn: psycopg.Connection[Any]) -> None:
        found = service.get_active_run(conn, rng.randint(1, BUSINESSES_WITH_HISTORY))
        assert found is not None and found.status == "running"

    def cleanup(conn: psycopg.Connection[Any]) -> None:
        assert service.cleanup_stuck_runs(conn) == []

    for label, fn, n in (("get_active_run", active_run, calls), ("cleanup_stuck_runs", cleanup, max(1, calls // 10))):
        measured = alternate({size: (lambda c=c, fn=fn: fn(c)) for size, c in conns.items()}, rounds, n,
                             baseline="small")
        (large_median, ratio), (small_median, _) = measured["large"], measured["small"]
        results.add(
            "history", f"{label}: {large:,} vs {small:,} finished runs (+{active:,} running)",
            f"{ratio:.2f}x ({large_median * 1e3:.2f} vs {small_median * 1e3:.2f} ms)",
            "<= 1.5x", ratio <= 1.5)
    for conn in conns.values():
        conn.close()
    results.section(f"EXPLAIN get_active_run, {large:,} finished runs",
                    plans(large_dsn, "SELECT * FROM outbound_heartbeat.get_active_run(1)"))
    results.section(f"EXPLAIN cleanup_stuck_runs, {large:,} finished runs",
                    plans(large_dsn, "SELECT * FROM outbound_heartbeat.cleanup_stuck_runs()"))
    server.drop("bench_history_small", "bench_history_large")
