"""Release hooks and call slots where Redis misbehaves: a Redis that accepts connections and
never answers, a Redis restarted without its data, instances with different ttls, and runs
ended by paths that run no hook. Real Redis servers (127.0.0.1:6379 and private ones), real
PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from psycopg_pool import ConnectionPool

from outbound_heartbeat import cli, service, web
from outbound_heartbeat.contrib.redis_slots import RedisSlots

from ..helpers import backdate_heartbeat, run_row

pytestmark = pytest.mark.needs("redis")

Conn = psycopg.Connection[Any]
REDIS_URL = "redis://127.0.0.1:6379/0"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def hung_redis() -> Iterator[str]:
    """A Redis URL whose server accepts connections and never answers a byte."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                held.append(listener.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"redis://127.0.0.1:{listener.getsockname()[1]}/0"
    stop.set()
    thread.join(5)
    for s in [*held, listener]:
        s.close()


@pytest.fixture
def prefix() -> Iterator[str]:
    p = f"oh-test:{uuid.uuid4().hex}"
    yield p
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
    for key in client.scan_iter(f"{p}:*"):
        client.delete(key)
    client.close()


def running_run(conn: Conn, business: int, worker: str = "w1") -> int:
    run = service.create_run(conn, business, [{"n": i} for i in range(3)])
    assert service.claim_run(conn, worker, run.id) is not None
    return run.id


def test_a_client_without_socket_timeout_is_refused() -> None:
    with pytest.raises(ValueError, match="socket_timeout"):
        RedisSlots(redis.Redis(socket_timeout=None), limit=1)


def test_hung_redis_never_holds_the_answer_to_a_committed_cancel(
    conn: Conn, dsn: str, hung_redis: str, caplog: pytest.LogCaptureFixture
) -> None:
    slots = RedisSlots.from_url(hung_redis, limit=2, timeout=3.0)
    run_id = running_run(conn, 1)
    with ConnectionPool(dsn, kwargs={"autocommit": True}, min_size=1, max_size=4) as pool:
        endpoints = web.Endpoints.on(pool, locale="en",
                                     hooks=web.ReleaseHooks([slots], wait=0.5, retries=0))
        started = time.monotonic()
        reply = endpoints.cancel(str(run_id), 1, force=True)
        elapsed = time.monotonic() - started
    assert reply.status == 200 and reply.body["jobs_cancelled"] == 3
    assert elapsed < 2.0, elapsed  # the hook alone would hang for its socket timeout and more
    assert run_row(conn, run_id)["status"] == "cancelled"
    assert "still running after 0.5 s" in caplog.text


def test_hung_redis_takes_no_thread_of_the_app_in_asyncio(
    conn: Conn, dsn: str, hung_redis: str
) -> None:
    slots = RedisSlots.from_url(hung_redis, limit=2, timeout=5.0)
    runs = [running_run(conn, 1, f"w{i}") for i in range(8)]
    other = running_run(conn, 2, "other")

    @contextlib.asynccontextmanager
    async def connect() -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as c:
            yield c

    async def scenario() -> tuple[list[web.Reply], float, web.Reply, float]:
        # The default executor is small here, as on a 2-core server: hooks must not fill it.
        loop = asyncio.get_running_loop()
        from concurrent.futures import ThreadPoolExecutor
        loop.set_default_executor(ThreadPoolExecutor(2))
        endpoints = web.AsyncEndpoints(locale="en", connections=connect,
                                       hooks=web.ReleaseHooks([slots], wait=0.5, retries=0))
        started = time.monotonic()
        replies = await asyncio.gather(*(endpoints.cancel(str(r), 1, force=True) for r in runs))
        cancels = time.monotonic() - started
        started = time.monotonic()
        active = await asyncio.wait_for(endpoints.active(2), 10)
        await asyncio.wait_for(loop.run_in_executor(None, lambda: None), 10)
        return replies, cancels, active, time.monotonic() - started

    replies, cancels, active, read = asyncio.run(scenario())
    assert [r.status for r in replies] == [200] * 8
    assert cancels < 3.0, cancels
    assert active.status == 200 and active.body["run_id"] == other
    assert read < 2.0, read


def test_a_failed_release_is_retried(conn: Conn, dsn: str) -> None:
    attempts: list[int] = []
    released = threading.Event()

    def flaky(run_id: int, business_id: int) -> None:
        attempts.append(run_id)
        if len(attempts) < 3:
            raise ConnectionError("redis down")
        released.set()

    run_id = running_run(conn, 1)
    endpoints = web.Endpoints.on(
        lambda: psycopg.connect(dsn, autocommit=True), locale="en",
        hooks=web.ReleaseHooks([flaky], wait=0.2, retry_delay=0.1))
    assert endpoints.cancel(str(run_id), 1, force=True).status == 200
    assert released.wait(10)
    assert attempts == [run_id] * 3


def test_slots_of_runs_ended_by_any_path_are_freed(conn: Conn, dsn: str, prefix: str) -> None:
    slots = RedisSlots.from_url(REDIS_URL, limit=10, prefix=prefix)
    slots.start_fresh()
    by_cli, by_sweep, by_reader, live = (running_run(conn, 1, f"w{i}") for i in range(4))
    tokens = {run: [slots.acquire(1, run), slots.acquire(1, run)] for run in
              (by_cli, by_sweep, by_reader, live)}
    assert all(t for pair in tokens.values() for t in pair) and slots.in_use(1) == 8
    assert cli.main(["force-cancel", str(by_cli), "--dsn", dsn]) == 0
    backdate_heartbeat(conn, by_sweep, 3600)
    conn.execute("SELECT * FROM outbound_heartbeat.cleanup_stuck_runs()")  # a DBA, or pg_cron
    backdate_heartbeat(conn, by_reader, 3600)
    assert service.get_active_run(conn, 1) is not None  # the live run; by_reader stopped
    assert run_row(conn, by_reader)["status"] == "stopped"
    assert slots.in_use(1) == 8  # no hook ran on any of those paths
    assert slots.release_ended(conn) == 6
    assert slots.in_use(1) == 2
    assert slots.renew(1, tokens[live][0]) and slots.renew(1, tokens[live][1])
    assert slots.release_ended(conn) == 0  # idempotent


def test_cli_sweep_and_force_cancel_free_the_slots(conn: Conn, dsn: str, prefix: str) -> None:
    slots = RedisSlots.from_url(REDIS_URL, limit=10, prefix=prefix)
    slots.start_fresh()
    cancelled, stale = running_run(conn, 1, "a"), running_run(conn, 1, "b")
    for run in (cancelled, stale):
        assert slots.acquire(1, run) is not None
    common = ["--dsn", dsn, "--release-slots", REDIS_URL, "--slots-prefix", prefix]
    assert cli.main(["force-cancel", str(cancelled), *common]) == 0
    assert slots.in_use(1) == 1
    backdate_heartbeat(conn, stale, 3600)
    assert cli.main(["sweep", *common]) == 0
    assert slots.in_use(1) == 0


def test_a_shorter_ttl_never_cuts_a_longer_slot(prefix: str) -> None:
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
    long_slots = RedisSlots(client, limit=2, ttl=timedelta(minutes=10), prefix=prefix)
    short_slots = RedisSlots(client, limit=2, ttl=timedelta(seconds=1), prefix=prefix)
    long_slots.start_fresh()
    held = long_slots.acquire(4, 40)
    brief = short_slots.acquire(4, 41)
    assert held and brief and short_slots.release(4, brief)
    time.sleep(2.5)
    assert long_slots.in_use(4) == 1
    assert client.pttl(f"{prefix}:4") > 9 * 60 * 1000
    # With a limit of 2, one more call fits, and not two: the long call still counts.
    assert short_slots.acquire(4, 42) is not None and short_slots.acquire(4, 43) is None


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[tuple[int, Any]]:
    """A Redis of this test alone that keeps nothing on disk; ``restart()`` loses every key."""
    binary = shutil.which("redis-server")
    assert binary, "redis-server is needed (the redis optional server)"
    port = free_port()
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> None:
        procs.append(subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
             "no", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        client = redis.Redis(port=port, socket_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "private redis did not start"
                time.sleep(0.05)

    def restart() -> None:
        procs[-1].kill()
        procs[-1].wait(10)
        start()

    start()
    yield port, restart
    for p in procs:
        p.kill()
        p.wait(10)


def test_a_redis_restart_never_lets_calls_exceed_the_limit(
    private_redis: tuple[int, Any],
) -> None:
    port, restart = private_redis
    client = redis.Redis(port=port, socket_timeout=2, retry_on_error=[redis.ConnectionError])
    slots = RedisSlots(client, limit=3, ttl=timedelta(seconds=30),
                       recovery=timedelta(seconds=2), prefix="p")
    assert slots.recovering() and slots.acquire(1, 10) is None  # first use: nothing known
    slots.start_fresh()
    live = [slots.acquire(1, 10) for _ in range(3)]
    assert all(live) and slots.acquire(1, 10) is None
    restart()  # without its data: the three calls in flight are forgotten
    assert slots.in_use(1) == 0
    refused = [slots.acquire(1, 11) for _ in range(3)]
    assert refused == [None, None, None] and slots.recovering()
    # The live calls renew within their ttl, as they must: each is re-admitted.
    assert all(slots.renew(1, token) for token in live if token)
    assert slots.in_use(1) == 3
    deadline = time.monotonic() + 10
    while slots.recovering():
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert slots.acquire(1, 12) is None  # 3 of 3 still in use: never 6 at once
    assert live[0] and slots.release(1, live[0])
    assert slots.acquire(1, 12) is not None
    assert slots.in_use(1) == 3
    # After the window, a slot nobody renewed in time stays gone.
    assert slots.renew(1, "10:deadbeef") is False
