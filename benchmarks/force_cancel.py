"""3. force_cancel() of a run with many queued jobs against the per-row way: select the run's
queued jobs, then update each from Python, in one transaction."""

from __future__ import annotations

import statistics
import time

import psycopg

from outbound_heartbeat import service

from .common import Results, Server


def seed_style(conn: psycopg.Connection, run_id: int) -> int:  # type: ignore[type-arg]
    """The per-row loop the library replaces (kept here only to measure against)."""
    with conn.transaction():
        ids = [r[0] for r in conn.execute(
            "SELECT id FROM outbound_call_jobs WHERE run_id = %s AND status = 'queued'", (run_id,))]
        for job_id in ids:
            conn.execute("UPDATE outbound_call_jobs SET status = 'failed',"
                         " error_message = 'cancelled', updated_at = now() WHERE id = %s", (job_id,))
        conn.execute("UPDATE outbound_call_runs SET status = 'cancelled', ended_at = now(),"
                     " locked_by_worker = NULL, lock_ts = NULL WHERE id = %s", (run_id,))
    return len(ids)


def run(server: Server, results: Results, *, jobs: int, repeats: int) -> None:
    print("force_cancel", flush=True)
    dsn = server.database("bench_force_cancel")
    times: dict[str, list[float]] = {"force_cancel()": [], "seed-style loop": []}
    with psycopg.connect(dsn, autocommit=True) as conn:
        for r in range(repeats):
            order = list(times) if r % 2 == 0 else list(reversed(times))
            for name in order:
                run_ = service.create_run(conn, 5000 + r, [{} for _ in range(jobs)])
                claim = service.claim_run(conn, "bench", run_.id)
                assert claim is not None
                conn.execute("VACUUM ANALYZE outbound_call_jobs")
                start = time.perf_counter()
                if name == "force_cancel()":
                    done = service.force_cancel(conn, run_.id).jobs_cancelled
                else:
                    done = seed_style(conn, run_.id)
                times[name].append(time.perf_counter() - start)
                assert done == jobs, (name, done)
    ours = statistics.median(times["force_cancel()"])
    loop = statistics.median(times["seed-style loop"])
    results.add("force_cancel", f"{jobs:,} queued jobs: force_cancel() {ours * 1e3:.0f} ms,"
                f" seed-style loop {loop * 1e3:.0f} ms", f"{loop / ours:.0f}x faster", ">= 20x",
                loop / ours >= 20)
    server.drop("bench_force_cancel")
