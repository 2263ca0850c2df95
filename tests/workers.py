"""Real worker subprocesses (outbound_heartbeat.example_worker) whose JSON-line output the tests read."""

from outbound_heartbeat.example_worker import WorkerProcess as Worker

__all__ = ["Worker"]
