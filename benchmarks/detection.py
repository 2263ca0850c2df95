"""5. Detection latency: real workers (example_worker subprocesses) are SIGKILLed; how long
until get_active_run() no longer returns their run, against stale_after."""

from __future__ import annotations

import signal
import statistics
import time

import psycopg

from outbound_heartbeat import service
from outbound_heartbeat.worker_process import WorkerProcess

from .common import Results, Server

STALE_AFTER = 2.0
POLL = 0.02


def run(server: Server, results: Results, *, kills: int) -> None:
    print(f"detection latency over {kills} SIGKILLs", flush=True)
    dsn = server.database("bench_detection")
    latencies: list[float] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE outbound_heartbeat.settings SET stale_after = make_interval(secs => %s)",
                     (STALE_AFTER,))
        runs = [service.create_run(conn, 20_000 + i, [{} for _ in range(50)]) for i in range(kills)]
        workers = [WorkerProcess(dsn, "--worker-id", f"victim-{i}", "--run-id", str(r.id),
                                 "--dial-seconds", "60") for i, r in enumerate(runs)]
        try:
            for w in workers:
                w.wait_for("dialing", timeout=60)
            time.sleep(3 * STALE_AFTER)  # every lease has been beating for a while
            for w, r in zip(workers, runs, strict=True):
                w.signal(signal.SIGKILL)
                killed = time.monotonic()
                w.wait_exit(10)
                while service.get_active_run(conn, r.business_id) is not None:
                    if time.monotonic() - killed > 10 * STALE_AFTER:
                        raise AssertionError(f"run {r.id} never reclaimed")
                    time.sleep(POLL)
                latencies.append(time.monotonic() - killed)
        finally:
            for w in workers:
                w.close()
    med, worst = statistics.median(latencies), max(latencies)
    results.add("detection", f"SIGKILL -> get_active_run() empty, {kills} runs, stale_after {STALE_AFTER:g} s"
                f" (heartbeat every {STALE_AFTER / 3:.2f} s, polled every {POLL * 1e3:.0f} ms)",
                f"median {med:.2f} s, max {worst:.2f} s", f"<= stale_after + 1 s = {STALE_AFTER + 1:g} s",
                worst <= STALE_AFTER + 1)
    server.drop("bench_detection")
