"""6. Cost follows live work (issue 15): a poll of a huge run against a poll of a 10-job run,
a scrape with a long history against one with none, and pruning a backlog of old events while
a worker heartbeats.

    python -m benchmarks.run --only live_cost [--full]

Runs against whatever sql/ the imported outbound_heartbeat installs, so the same file measures
an older checkout (PYTHONPATH=<checkout>) side by side; stages whose functions that checkout
lacks (prune_events) are skipped.
"""

from __future__ import annotations

import functools
import statistics
import threading
import time
from typing import Any

import psycopg

from outbound_heartbeat import service

from .common import Results, Server, alternate, percentile

STALE_NEVER = "UPDATE outbound_heartbeat.settings SET stale_after = interval '1 hour'"


def _running_run(conn: psycopg.Connection[Any], business: int, jobs: int) -> int:
    """A running run of ``jobs`` queued jobs, its heartbeat fresh (bulk SQL: fast to build)."""
    row = conn.execute(
        "INSERT INTO outbound_call_runs (business_id, status, locked_by_worker, lock_ts,"
        " last_heartbeat_at, lease_epoch, started_at) VALUES (%s, 'running', 'bench', now(), now(), 1, now())"
        " RETURNING id", (business,)).fetchone()
    assert row is not None
    conn.execute("INSERT INTO outbound_call_jobs (run_id, business_id, status)"
                 " SELECT %s, %s, 'queued' FROM generate_series(1, %s)", (row[0], business, jobs))
    return int(row[0])


def _analyze(conn: psycopg.Connection[Any]) -> None:
    for table in ("outbound_call_runs", "outbound_call_jobs", "outbound_heartbeat.run_events"):
        conn.execute(f"VACUUM ANALYZE {table}")


def polls(server: Server, results: Results, *, jobs: int, rounds: int, calls: int) -> None:
    print("live cost: polls", flush=True)
    big_dsn, clean_dsn = server.database("bench_poll_big"), server.database("bench_poll_clean")
    for dsn, with_huge_run in ((big_dsn, True), (clean_dsn, False)):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(STALE_NEVER)
            if with_huge_run:
                _running_run(conn, 1, jobs)
            _running_run(conn, 2, 10)
            _analyze(conn)
    big = psycopg.connect(big_dsn, autocommit=True)
    clean = psycopg.connect(clean_dsn, autocommit=True)
    try:
        def poll(conn: psycopg.Connection[Any], business: int) -> None:
            found = service.get_active_run(conn, business)
            assert found is not None and found.queued_jobs in (10, jobs)

        measured = alternate({
            "ten": lambda: poll(clean, 2),
            "huge": lambda: poll(big, 1),
            "ten_beside_huge": lambda: poll(big, 2),
        }, rounds, calls, baseline="ten")
        ten = measured["ten"][0]
        for name, label in (("huge", f"a {jobs:,}-job run vs a 10-job run"),
                            ("ten_beside_huge", f"a 10-job run in a database that also holds a {jobs:,}-job run"
                                                " vs a 10-job run alone")):
            median, ratio = measured[name]
            results.add("live_cost", f"get_active_run: {label}",
                        f"{ratio:.2f}x ({median * 1e3:.2f} vs {ten * 1e3:.2f} ms)", "<= 1.2x", ratio <= 1.2)
        view = alternate({
            "clean": lambda: clean.execute("SELECT * FROM outbound_heartbeat.active_runs").fetchall(),
            "big": lambda: big.execute("SELECT * FROM outbound_heartbeat.active_runs").fetchall(),
        }, rounds, calls, baseline="clean")
        median, ratio = view["big"]
        results.add("live_cost", f"active_runs view: with a {jobs:,}-job run vs with a 10-job run only",
                    f"{ratio:.2f}x ({median * 1e3:.2f} vs {view['clean'][0] * 1e3:.2f} ms)", "<= 1.2x",
                    ratio <= 1.2)
    finally:
        big.close()
        clean.close()
    server.drop("bench_poll_big", "bench_poll_clean")


def scrapes(server: Server, results: Results, *, runs: int, events: int, rounds: int, calls: int) -> None:
    print("live cost: scrapes", flush=True)
    full_dsn, empty_dsn = server.database("bench_scrape_full"), server.database("bench_scrape_empty")
    with psycopg.connect(full_dsn, autocommit=True) as conn:
        conn.execute(STALE_NEVER)
        conn.execute(
            "INSERT INTO outbound_call_runs (business_id, status, lease_epoch, started_at, ended_at)"
            " SELECT mod(g, 100) + 1, (ARRAY['completed', 'stopped', 'cancelled', 'failed'])[mod(g, 4) + 1], 1,"
            "        now() - interval '2 days', now() - interval '1 day' FROM generate_series(1, %s) AS g",
            (runs,))
        conn.execute(
            "INSERT INTO outbound_heartbeat.run_events (run_id, business_id, event, created_at)"
            " SELECT mod(g, %s) + 1, mod(g, 100) + 1,"
            "        (ARRAY['created', 'claimed', 'finished', 'stale_stopped', 'force_cancelled'])[mod(g, 5) + 1],"
            "        now() - make_interval(secs => g) FROM generate_series(1, %s) AS g", (runs, events))
        _running_run(conn, 1, 10)
        _analyze(conn)
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        conn.execute(STALE_NEVER)
        _running_run(conn, 1, 10)
        _analyze(conn)
    full = psycopg.connect(full_dsn, autocommit=True)
    empty = psycopg.connect(empty_dsn, autocommit=True)
    try:
        for label, fn in (("metrics()", service.metrics), ("health_check()", service.health_check)):
            measured = alternate({"empty": functools.partial(fn, empty), "full": functools.partial(fn, full)},
                                 rounds, max(1, calls // 3), baseline="empty")
            median, ratio = measured["full"]
            results.add("live_cost", f"{label}: {runs:,} runs + {events:,} events vs an empty history",
                        f"{ratio:.2f}x ({median * 1e3:.2f} vs {measured['empty'][0] * 1e3:.2f} ms)",
                        "<= 1.5x", ratio <= 1.5)
    finally:
        full.close()
        empty.close()
    server.drop("bench_scrape_full", "bench_scrape_empty")


def prune(server: Server, results: Results, *, events: int) -> None:
    print("live cost: prune", flush=True)
    dsn = server.database("bench_prune")
    with psycopg.connect(dsn, autocommit=True) as conn:
        if conn.execute("SELECT to_regproc('outbound_heartbeat.prune_events')").fetchone() == (None,):
            results.add("live_cost", "prune_events()", "absent in this checkout")
            server.drop("bench_prune")
            return
        conn.execute(
            "INSERT INTO outbound_heartbeat.run_events (run_id, business_id, event, created_at)"
            " SELECT g, 1, 'created', now() - interval '1 year' - make_interval(secs => g)"
            "   FROM generate_series(1, %s) AS g", (events,))
        run = service.create_run(conn, 1, [{}])
        claim = service.claim_run(conn, "bench", run.id)
        assert claim is not None
        _analyze(conn)

    waits: list[float] = []
    baseline: list[float] = []
    stop = threading.Event()
    pruning = threading.Event()

    def beat() -> None:
        with psycopg.connect(dsn, autocommit=True) as hb:
            while not stop.is_set():
                start = time.perf_counter()
                assert service.heartbeat(hb, run.id, "bench", claim.lease_epoch) == "ok"
                (waits if pruning.is_set() else baseline).append(time.perf_counter() - start)
                time.sleep(0.01)

    beater = threading.Thread(target=beat)
    beater.start()
    time.sleep(2)
    deleted = batches = 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        pruning.set()
        started = time.perf_counter()
        done = False
        while not done:  # the CLI's loop: one short transaction per batch
            result = service.prune_events(conn, 10_000, 1)
            deleted += result.events_deleted
            batches += result.batches
            done = result.done
        wall = time.perf_counter() - started
    stop.set()
    beater.join()
    assert deleted == events
    results.add("live_cost", f"prune_events() of {events:,} old events, batches of 10,000 ({batches} transactions)",
                f"{wall:.1f} s ({events / wall:,.0f} events/s)")
    results.add("live_cost", f"heartbeat() while pruning, {len(waits):,} beats (vs {len(baseline):,} before)",
                f"max {max(waits) * 1e3:.1f} ms, p99 {percentile(waits, 99) * 1e3:.1f} ms, p50"
                f" {statistics.median(waits) * 1e3:.2f} ms (before: p50 {statistics.median(baseline) * 1e3:.2f} ms)")
    server.drop("bench_prune")


def transitions(server: Server, results: Results, *, rounds: int, calls: int) -> None:
    """What the counting triggers cost the writers: next_job + finish_job, with and without."""
    print("live cost: job transitions", flush=True)
    leases: dict[str, Any] = {}
    conns: dict[str, psycopg.Connection[Any]] = {}
    for name in ("counted", "uncounted"):
        dsn = server.database(f"bench_transitions_{name}")
        conn = psycopg.connect(dsn, autocommit=True)
        conn.execute(STALE_NEVER)
        if name == "uncounted":
            triggers = conn.execute("SELECT tgname FROM pg_trigger WHERE tgrelid = 'outbound_call_jobs'::regclass"
                                    " AND tgname LIKE 'outbound_heartbeat_count_%'").fetchall()
            if not triggers:
                conn.close()
                server.drop("bench_transitions_counted", "bench_transitions_uncounted")
                return  # an older checkout: nothing to compare
            for (trigger,) in triggers:
                conn.execute(psycopg.sql.SQL("DROP TRIGGER {} ON outbound_call_jobs").format(
                    psycopg.sql.Identifier(trigger)))
        created = service.create_run(conn, 1, [{}] * (rounds * calls * 2 + 100))
        lease = service.claim_run(conn, "bench", created.id)
        assert lease is not None
        leases[name], conns[name] = lease, conn

    def step(name: str) -> None:
        conn, lease = conns[name], leases[name]
        job = service.next_job(conn, lease.run_id, "bench", lease.lease_epoch)
        assert job is not None
        service.finish_job(conn, job.id, "bench", lease.lease_epoch, "completed")

    measured = alternate({n: functools.partial(step, n) for n in conns}, rounds, calls, baseline="uncounted")
    median, ratio = measured["counted"]
    results.add("live_cost", "next_job + finish_job with the counting triggers vs without",
                f"{ratio:.2f}x ({median * 1e3:.2f} vs {measured['uncounted'][0] * 1e3:.2f} ms)")
    for conn in conns.values():
        conn.close()
    server.drop("bench_transitions_counted", "bench_transitions_uncounted")


def run(server: Server, results: Results, *, jobs: int, runs: int, events: int, prune_events: int,
        rounds: int, calls: int) -> None:
    polls(server, results, jobs=jobs, rounds=rounds, calls=calls)
    transitions(server, results, rounds=rounds, calls=calls)
    scrapes(server, results, runs=runs, events=events, rounds=rounds, calls=calls)
    prune(server, results, events=prune_events)
