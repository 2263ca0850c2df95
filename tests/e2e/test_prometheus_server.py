"""A real Prometheus server scrapes an app's /metrics (MetricsCollector in the app's registry)
every second and evaluates the dead-worker alert of prometheus/outbound_heartbeat.rules.yml:
it fires for a run whose worker stopped beating and resolves once the run is reclaimed."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prometheus_client import CollectorRegistry, start_http_server

from outbound_heartbeat import service
from outbound_heartbeat.prometheus import MetricsCollector

from ..helpers import backdate_heartbeat

pytestmark = [pytest.mark.needs("prometheus"), pytest.mark.slow]

RULES = Path(__file__).resolve().parents[2] / "prometheus" / "outbound_heartbeat.rules.yml"
ALERT = "OutboundHeartbeatDeadWorkerNotReclaimed"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: str, check: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise AssertionError(f"not within {timeout:.0f} s: {what}")


def api(port: int, path: str) -> Any:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
            return json.load(answer)["data"]
    except OSError:
        return None


@pytest.fixture
def app_metrics(dsn: str) -> Iterator[int]:
    """The app's own /metrics on a free port, our collector registered in its registry."""
    registry = CollectorRegistry()
    registry.register(MetricsCollector(dsn))
    port = free_port()
    server, thread = start_http_server(port, "127.0.0.1", registry)
    try:
        yield port
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.fixture
def prometheus(app_metrics: int, tmp_path: Path) -> Iterator[int]:
    # The shipped rules, the dead-worker alert's `for` shortened from 2 minutes to 2 seconds.
    text = RULES.read_text()
    assert text.count("        for: 2m\n") == 1
    (tmp_path / "rules.yml").write_text(text.replace("        for: 2m\n", "        for: 2s\n"))
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "rule_files:\n  - rules.yml\n"
        "scrape_configs:\n  - job_name: app\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{app_metrics}']\n")
    port = free_port()
    binary = shutil.which("prometheus")
    assert binary is not None
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [binary, f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for("Prometheus answers", lambda: api(port, "/api/v1/status/buildinfo") is not None, 30)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def alert_states(port: int) -> list[str]:
    data = api(port, "/api/v1/alerts")
    alerts = data["alerts"] if data else []
    return [a["state"] for a in alerts if a["labels"]["alertname"] == ALERT]


def test_the_dead_worker_alert_fires_and_resolves(conn: psycopg.Connection[Any], prometheus: int) -> None:
    run = service.create_run(conn, 1, [{}, {}])
    claim = service.claim_run(conn, "w1", run.id)
    assert claim is not None

    def up() -> bool:
        data = api(prometheus, "/api/v1/query?query=outbound_heartbeat_up")
        return bool(data and data["result"] and data["result"][0]["value"][1] == "1")

    wait_for("the app scraped", up, 30)
    time.sleep(4)  # a live worker: two evaluations past `for` and no alert
    assert alert_states(prometheus) == []

    backdate_heartbeat(conn, run.id, 600)  # the worker died 10 minutes ago; nobody reads
    wait_for("the alert fires", lambda: alert_states(prometheus) == ["firing"])
    assert service.get_active_run(conn, 1) is None  # a read path reclaims it
    wait_for("the alert resolves", lambda: alert_states(prometheus) == [])

    def detected() -> bool:  # the stop's latency scraped: one detection, of about 600 s
        data = api(prometheus, "/api/v1/query?query=outbound_heartbeat_detection_latency_seconds_sum")
        return bool(data and data["result"] and float(data["result"][0]["value"][1]) >= 600)

    wait_for("the detection latency scraped", detected, 30)
    count = api(prometheus, "/api/v1/query?query=outbound_heartbeat_detection_latency_seconds_count")
    assert count["result"][0]["value"][1] == "1"
