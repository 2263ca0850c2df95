"""The Prometheus rules of prometheus/: valid for promtool, their unit tests (input series in,
alerts out) pass, and every metric they read is one metrics() emits, on a real PostgreSQL."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import psycopg
import pytest

from outbound_heartbeat import service
from outbound_heartbeat.prometheus import render

RULES_DIR = Path(__file__).resolve().parents[2] / "prometheus"
RULES = RULES_DIR / "outbound_heartbeat.rules.yml"
RULES_TEST = RULES_DIR / "outbound_heartbeat.rules.test.yml"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    path = shutil.which("promtool")
    assert path is not None
    return subprocess.run([path, *args], cwd=RULES_DIR, capture_output=True, text=True,
                          timeout=120, check=False)


@pytest.mark.needs("promtool")
def test_promtool_checks_the_rules() -> None:
    result = promtool("check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 10 rules found" in result.stdout


@pytest.mark.needs("promtool")
def test_promtool_unit_tests_of_the_rules_pass() -> None:
    result = promtool("test", "rules", RULES_TEST.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.needs("promtool")
def test_a_rule_changed_under_its_unit_tests_fails_them(tmp_path: Path) -> None:
    # The unit tests can fail: the dead-worker alert made to wait 5 minutes misses its case.
    text = RULES.read_text()
    assert "        for: 2m\n" in text
    (tmp_path / RULES.name).write_text(text.replace("        for: 2m\n", "        for: 5m\n", 1))
    shutil.copy(RULES_TEST, tmp_path / RULES_TEST.name)
    path = shutil.which("promtool")
    assert path is not None
    result = subprocess.run([path, "test", "rules", RULES_TEST.name], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode != 0
    assert "OutboundHeartbeatDeadWorkerNotReclaimed" in result.stdout + result.stderr


def test_every_metric_the_rules_read_is_one_metrics_emits(conn: psycopg.Connection[Any]) -> None:
    service.force_cancel(conn, service.create_run(conn, 1, [{}]).id)  # an event: events_total
    emitted = {line.split(" ")[2] for line in render(service.metrics(conn)).splitlines()
               if line.startswith("# TYPE ")}
    series = set()
    for name in emitted:
        series.add(name)
        series.update(name + suffix for suffix in ("_total", "_bucket", "_sum", "_count"))
    read = set(re.findall(r"\boutbound_heartbeat_[a-z_]+", RULES.read_text()))
    assert read, "the rules read no metric"
    assert read <= series, sorted(read - series)
    # Each metric of the rules' unit tests too.
    assert set(re.findall(r"\boutbound_heartbeat_[a-z_]+", RULES_TEST.read_text())) <= series
