"""Optional servers some tests need besides PostgreSQL, and what happens when one is missing.

PostgreSQL itself is never optional (the server chain of outbound_heartbeat.testing fails the
run when it finds none). The servers below are: on a machine without one, its cases are
skipped with one reason, folded by pytest into one summary line, plus one header line saying
what is missing and the command that installs it. With ``CI=true`` they are mandatory: the
same cases fail with that message, so CI can never pass without them.

A test declares what it needs with ``@pytest.mark.needs("redis")`` (or a module-level
``pytestmark``); the cases that run through PgBouncer need ``pgbouncer`` implicitly.
"""

from __future__ import annotations

import functools
import os
import shutil
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from outbound_heartbeat import testing

from .pgbouncer import find_pgbouncer


@dataclass(frozen=True)
class Service:
    name: str
    probe: Callable[[], bool]
    install: str
    problem: str = "is not installed"


def _tcp_answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _extension_found(name: str) -> bool:
    """True when the local server binaries the tests start have extension ``name``."""
    bindir = testing.find_bindir()
    if bindir is None or not (bindir / "pg_config").exists():
        return False
    sharedir = subprocess.run(
        [str(bindir / "pg_config"), "--sharedir"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return bool(sharedir) and Path(sharedir, "extension", f"{name}.control").exists()


def _chromium_found() -> bool:
    return all(
        shutil.which(name) or os.path.exists(f"/usr/bin/{name}")
        for name in ("chromium", "chromedriver")
    )


SERVICES: dict[str, Service] = {
    "pgbouncer": Service(
        "pgbouncer", lambda: find_pgbouncer() is not None,
        "sudo apt-get install pgbouncer",
    ),
    "redis": Service(
        "Redis on 127.0.0.1:6379", lambda: _tcp_answers("127.0.0.1", 6379),
        "sudo apt-get install redis-server (and start it on 127.0.0.1:6379)",
        "does not answer",
    ),
    "chromium": Service(
        "Chromium with ChromeDriver", _chromium_found,
        "sudo apt-get install chromium chromium-driver",
    ),
    "promtool": Service(
        "promtool (Prometheus)", lambda: shutil.which("promtool") is not None,
        "sudo apt-get install prometheus",
    ),
    "prometheus": Service(
        "Prometheus server", lambda: shutil.which("prometheus") is not None,
        "sudo apt-get install prometheus",
    ),
    "pg_cron": Service(
        "pg_cron for the local PostgreSQL",
        lambda: _extension_found("pg_cron"),
        "sudo apt-get install postgresql-$(pg_config --version | grep -oE '[0-9]+' | head -1)-cron",
    ),
}


def in_ci() -> bool:
    """True when the CI environment variable says so (GitHub Actions, GitLab, ours)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


#: Comma-separated names treated as missing, to try a machine without them (and to test this).
HIDE_ENV = "OUTBOUND_HEARTBEAT_TEST_HIDE"


@functools.cache
def available(name: str) -> bool:
    hidden = {n.strip() for n in os.environ.get(HIDE_ENV, "").split(",")}
    return name not in hidden and SERVICES[name].probe()


def missing_message(name: str) -> str:
    service = SERVICES[name]
    return f"{service.name} {service.problem}; install: {service.install}"
