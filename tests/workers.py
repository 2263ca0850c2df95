"""Real worker subprocesses (the example worker, through tests/stalling_worker.py) whose
JSON-line output the tests read."""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

from outbound_heartbeat.worker_process import WorkerProcess

NO_PREPARE_ENV = "OUTBOUND_HEARTBEAT_TEST_NO_PREPARE"


class Worker(WorkerProcess):
    """A worker subprocess that also takes ``--hang-on-job N``; behind PgBouncer (the test's
    route) it prepares no statements."""

    program: ClassVar[tuple[str, ...]] = (str(Path(__file__).with_name("stalling_worker.py")),)

    def __init__(self, dsn: str, *args: str) -> None:
        extra = ("--no-prepare",) if os.environ.get(NO_PREPARE_ENV) else ()
        super().__init__(dsn, *args, *extra)
