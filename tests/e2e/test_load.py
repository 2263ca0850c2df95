"""Load: real worker threads (the sync Lease) work through 500 runs while two sweepers and a
canceller race them for a minute, on a private server with room for their connections.
No job is failed twice, no deadlock, no live worker declared stale."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from outbound_heartbeat import LeaseLost, hub, service
from outbound_heartbeat.lease import Lease, NothingToClaim

from ..helpers import audit_job_failures, jobs_failed_more_than_once, private_server

RUNS = 500
WORKERS = 60
SECONDS = 60.0
STALE_AFTER = 6  # seconds; workers beat every 2 s


@pytest.fixture(scope="module")
def load_dsn() -> Iterator[str]:
    with private_server(max_connections=str(2 * WORKERS + 40)) as (_, dsn):
        yield dsn


def test_load(load_dsn: str) -> None:
    with psycopg.connect(load_dsn, autocommit=True) as conn:
        conn.execute("UPDATE outbound_heartbeat.settings SET stale_after = make_interval(secs => %s),"
                     " restart_grace = interval '0', lock_timeout = interval '2 seconds'", (STALE_AFTER,))
        audit_job_failures(conn)
        for i in range(RUNS):
            service.create_run(conn, 1 + i % 50, [{"n": n} for n in range(random.Random(i).randint(0, 60))])
        deadlocks_before = conn.execute(
            "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()").fetchone()

    stop = threading.Event()
    latencies: list[float] = []
    lost: list[tuple[int, str]] = []
    errors: list[BaseException] = []
    real_send_beat = hub.send_beat

    def timed_send_beat(conn: Any, leases: Any, *, wait: bool = True) -> Any:
        # The process's hub beats its leases together (hub.send_beat: heartbeat() for a lone
        # lease, heartbeat_leases() for more): each lease's beat took this long.
        start = time.perf_counter()
        try:
            return real_send_beat(conn, leases, wait=wait)
        finally:
            latencies.extend([time.perf_counter() - start] * len(leases))

    hub.send_beat = timed_send_beat  # type: ignore[assignment]

    def worker(n: int) -> None:
        rng = random.Random(n)
        try:
            while not stop.is_set():
                try:
                    with Lease(load_dsn, f"w{n}", interval=2.0) as held:
                        try:
                            while (job := held.next_job()) is not None and not stop.is_set():
                                time.sleep(rng.uniform(0.02, 0.25))  # the call
                                held.finish_job(job, rng.choice(["completed", "completed", "failed"]))
                        except LeaseLost as exc:
                            lost.append((held.run_id, str(exc)))
                except NothingToClaim:
                    time.sleep(0.2)
        except BaseException as exc:  # surfaced by the main thread
            errors.append(exc)

    def sweeper() -> None:
        with psycopg.connect(load_dsn, autocommit=True) as conn:
            while not stop.is_set():
                service.cleanup_stuck_runs(conn)
                service.get_active_run(conn, random.randint(1, 50))
                time.sleep(0.1)

    def canceller() -> None:
        rng = random.Random(99)
        with psycopg.connect(load_dsn, autocommit=True) as conn:
            while not stop.is_set():
                run_id = rng.randint(1, RUNS)
                if rng.random() < 0.5:
                    service.force_cancel(conn, run_id)
                else:
                    service.request_cancel(conn, run_id)
                time.sleep(0.3)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(WORKERS)]
    threads += [threading.Thread(target=sweeper) for _ in range(2)] + [threading.Thread(target=canceller)]
    try:
        for t in threads:
            t.start()
        time.sleep(SECONDS)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        hub.send_beat = real_send_beat  # type: ignore[assignment]

    assert not errors, errors
    assert not any(t.is_alive() for t in threads)
    with psycopg.connect(load_dsn, autocommit=True) as conn:
        assert jobs_failed_more_than_once(conn) == []
        deadlocks_after = conn.execute(
            "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()").fetchone()
        assert deadlocks_after == deadlocks_before
        false_stale = conn.execute(
            "SELECT run_id, event, detail FROM outbound_heartbeat.run_events"
            " WHERE event = 'stale_stopped' OR (event = 'cleaned_up' AND detail->>'reason' <> 'empty')"
        ).fetchall()
        assert false_stale == []
        done = dict(conn.execute("SELECT status, count(*) FROM outbound_call_runs GROUP BY status").fetchall())
        # A worker may lose its lease to a cancel, or to the sweeper completing a run with
        # nothing left to dial; never because it was (wrongly) declared dead.
        ends = dict(conn.execute("SELECT id, status FROM outbound_call_runs WHERE id = ANY(%s)",
                                 ([run_id for run_id, _ in lost],)).fetchall())
    assert all(ends[run_id] in ("cancelled", "completed") for run_id, _ in lost), (lost, ends)
    assert done.get("completed", 0) + done.get("cancelled", 0) > RUNS // 5, done  # real work happened
    ordered = sorted(latencies)
    p99 = ordered[int(0.99 * (len(ordered) - 1))]
    print(f"\nload: {len(latencies)} heartbeats, p50 {ordered[len(ordered) // 2] * 1e3:.1f} ms,"
          f" p99 {p99 * 1e3:.1f} ms; runs {done}")
