"""Real worker subprocesses (outbound_heartbeat.example_worker) whose JSON-line output the tests read."""

from __future__ import annotations

import os

from outbound_heartbeat.worker_process import WorkerProcess

NO_PREPARE_ENV = "OUTBOUND_HEARTBEAT_TEST_NO_PREPARE"


class Worker(WorkerProcess):
    """A worker subprocess; behind PgBouncer (the test's route) it prepares no statements."""

    def __init__(self, dsn: str, *args: str) -> None:
        extra = ("--no-prepare",) if os.environ.get(NO_PREPARE_ENV) else ()
        super().__init__(dsn, *args, *extra)
