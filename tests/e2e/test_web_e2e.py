"""End to end through a real HTTP server on 127.0.0.1: a real worker holding a Redis call slot
is SIGKILLed; the active endpoint goes from 200 to 404 within the threshold + 1 s, and the slot
is given back by the release hook of that very request."""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import redis
from flask import Flask, request
from psycopg_pool import ConnectionPool
from werkzeug.serving import make_server

from outbound_heartbeat import service
from outbound_heartbeat.contrib.flask import create_blueprint
from outbound_heartbeat.contrib.redis_slots import RedisSlots

from ..helpers import run_row
from ..workers import Worker

REDIS_URL = "redis://127.0.0.1:6379/0"

pytestmark = pytest.mark.needs("redis")
STALE_AFTER = 2.0


@pytest.fixture
def slots() -> Iterator[RedisSlots]:
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
    client.ping()
    prefix = f"oh-e2e:{uuid.uuid4().hex}"
    slots = RedisSlots(client, limit=2, prefix=prefix)
    slots.start_fresh()  # a new prefix: no call in flight, no recovery window to wait out
    yield slots
    for key in client.scan_iter(f"{prefix}:*"):
        client.delete(key)
    client.close()


@pytest.fixture
def base_url(dsn: str, slots: RedisSlots) -> Iterator[str]:
    def tenant() -> int | None:
        raw = request.headers.get("X-Business-Id")
        return int(raw) if raw else None

    with ConnectionPool(dsn, kwargs={"autocommit": True}, min_size=1, max_size=4) as pool:
        app = Flask("e2e")
        app.register_blueprint(create_blueprint(pool, tenant, locale="he", hooks=[slots]))
        server = make_server("127.0.0.1", 0, app, threaded=True)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_port}/api/outbound_calls"
        finally:
            server.shutdown()
            thread.join(10)


def get(url: str, business: int) -> tuple[int, Any]:
    req = urllib.request.Request(url, headers={"X-Business-Id": str(business)})
    try:
        with urllib.request.urlopen(req, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_sigkilled_worker_run_goes_404_and_its_slot_is_released(
    dsn: str, conn: psycopg.Connection[Any], base_url: str, slots: RedisSlots
) -> None:
    conn.execute("UPDATE outbound_heartbeat.settings SET stale_after = make_interval(secs => %s)", (STALE_AFTER,))
    run = service.create_run(conn, 5, [{"phone": str(i)} for i in range(10)])
    worker = Worker(dsn, "--worker-id", "e2e-1", "--run-id", str(run.id), "--dial-seconds", "60",
                    "--redis-url", REDIS_URL, "--slot-prefix", slots.prefix, "--slot-limit", "2")
    try:
        worker.wait_for("claimed", timeout=20)
        worker.wait_for("dialing", timeout=20)
        status, body = get(f"{base_url}/jobs/active", 5)
        assert status == 200 and body["id"] == run.id and body["in_progress"] == 1
        assert slots.in_use(5) == 1

        worker.signal(signal.SIGKILL)
        killed = time.monotonic()
        worker.wait_exit(10)
        deadline = killed + 15
        while True:
            status, body = get(f"{base_url}/jobs/active", 5)
            if status == 404 or time.monotonic() > deadline:
                break
            assert status == 200
            time.sleep(0.1)
        elapsed = time.monotonic() - killed
        assert status == 404 and body == {"error": "אין תור פעיל", "code": "no_active"}
        assert elapsed <= STALE_AFTER + 1.0, elapsed
        assert slots.in_use(5) == 0  # released by the hook before the 404 was sent
        row = run_row(conn, run.id)
        assert row["status"] == "stopped" and row["locked_by_worker"] is None
    finally:
        worker.close()
