"""The example worker (:mod:`outbound_heartbeat.example_worker`) run as a subprocess, its JSON
lines read in the background: the demo's two workers."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from typing import Any, ClassVar

__all__ = ["WorkerProcess"]


class WorkerProcess:
    """The example worker run as a subprocess, its JSON lines read in the background."""

    #: What ``python`` runs: the example worker (a subclass may run a script of its own that
    #: prints the same JSON lines).
    program: ClassVar[tuple[str, ...]] = ("-m", "outbound_heartbeat.example_worker")

    def __init__(self, dsn: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, *self.program, "--dsn", dsn, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.pid = self.proc.pid
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        self._stderr: collections.deque[str] = collections.deque(maxlen=40)
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        with contextlib.suppress(ValueError, OSError):  # closed by close()
            for line in self.proc.stdout:
                self.lines.put(json.loads(line))

    def _read_stderr(self) -> None:
        # Drained continuously so a chatty worker never blocks on a full pipe.
        assert self.proc.stderr is not None
        with contextlib.suppress(ValueError, OSError):
            for line in self.proc.stderr:
                self._stderr.append(line)

    def wait_for(self, step: str, timeout: float = 15.0) -> dict[str, Any]:
        """The first not yet seen line whose step is ``step``; AssertionError after timeout."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"worker never said {step!r}; saw {self.seen}; stderr: {self.stderr_tail()}"
                )
            try:
                item = self.lines.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                continue
            self.seen.append(item)
            if item["step"] == step:
                return item

    def steps(self) -> list[str]:
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return [s["step"] for s in self.seen]

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def stderr_tail(self) -> str:
        return "".join(self._stderr)[-2000:]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
