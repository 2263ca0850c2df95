"""Quick example: a worker dies, the next reader reclaims its run, an operator force-cancels.

    python examples/quickstart.py            # a throwaway local PostgreSQL (testing chain)
    DATABASE_URL=postgresql://... python examples/quickstart.py   # your database (migrated)

With your own database it creates two runs for business 900001 and leaves them, ended, in the
audit trail. The demo threshold is 2 s instead of 30 s so this takes seconds.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import ExitStack
from datetime import timedelta

import psycopg

from outbound_heartbeat import migrate, service
from outbound_heartbeat.testing import start_server

BUSINESS = 900001
DEMO_STALE_AFTER = timedelta(seconds=2)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with ExitStack() as stack:
        dsn = os.environ.get("DATABASE_URL")
        if not dsn:
            server = start_server()
            stack.callback(server.close)
            dsn = server.create_database()
            print(f"started a throwaway PostgreSQL ({server.kind})")
        print("migrate:", migrate(dsn))
        with psycopg.connect(dsn, autocommit=True) as conn:
            run = service.create_run(
                conn, BUSINESS, [{"phone": f"+97250000{i}"} for i in range(15)]
            )
            claim = service.claim_run(conn, "worker-1", run.id)
            assert claim is not None
            job = service.next_job(conn, run.id, "worker-1", claim.lease_epoch)
            print(
                f"run {run.id}: worker-1 holds epoch {claim.lease_epoch}, dialing job {job and job.id}"
            )
            print("worker-1 dies (no more heartbeats)...")
            deadline = time.monotonic() + 10
            while service.get_active_run(conn, BUSINESS, DEMO_STALE_AFTER) is not None:
                assert time.monotonic() < deadline
                time.sleep(0.5)
            print(
                f"run {run.id} is no longer active: the reader stopped it ->",
                conn.execute(
                    "SELECT status FROM outbound_call_runs WHERE id = %s", (run.id,)
                ).fetchone(),
            )
            print(
                "zombie heartbeat answers:",
                service.heartbeat(conn, run.id, "worker-1", claim.lease_epoch),
            )

            other = service.create_run(conn, BUSINESS, [{} for _ in range(15)])
            result = service.force_cancel(conn, other.id, business_id=BUSINESS)
            print(f"force-cancel run {other.id}: {result.jobs_cancelled} jobs cancelled")
            for row in conn.execute(
                "SELECT run_id, event, created_at FROM outbound_heartbeat.run_events"
                " WHERE business_id = %s ORDER BY id",
                (BUSINESS,),
            ):
                print("  event", *row)


if __name__ == "__main__":
    main()
