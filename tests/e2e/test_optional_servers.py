"""A missing optional server: its tests are skipped with one summary line on a developer's
machine, and fail under CI=true (tests/services.py). Runs a tiny pytest in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ..services import HIDE_ENV

ROOT = Path(__file__).resolve().parents[2]
CASES = ["tests/integration/test_redis_slots.py::test_limit_release_and_key_layout",
         "tests/integration/test_redis_slots.py::test_release_run_frees_only_that_run"]


def _pytest(ci: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env[HIDE_ENV] = "redis"
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *CASES],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )


def test_missing_server_skips_with_one_line_outside_ci() -> None:
    result = _pytest(None)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 skipped" in result.stdout
    skip_lines = [line for line in result.stdout.splitlines() if "SKIPPED" in line]
    assert skip_lines == [
        "SKIPPED 2 tests: Redis on 127.0.0.1:6379 does not answer;"
        " install: sudo apt-get install redis-server (and start it on 127.0.0.1:6379)"
    ], result.stdout  # one line for the server, however many tests


@pytest.mark.parametrize("ci", ["true", "1"])
def test_missing_server_fails_under_ci(ci: str) -> None:
    result = _pytest(ci)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "2 errors" in result.stdout  # failed in setup: the run fails
    assert "CI=true and Redis on 127.0.0.1:6379 does not answer" in result.stdout
