"""How the hub's batchers gather calls (outbound_heartbeat.hub.Batcher): a lone call goes at
once; calls that keep arriving (a release storm) wait a moment for each other and go as one
statement.

No server: the statement is a stand-in that answers each call. The burst's gap and linger are
stretched (0.5 s and 0.3 s) so that the order of events does not depend on the machine's load;
benchmarks/heartbeat_cost.py measures what the real values do to a storm of 1,000 leases."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from outbound_heartbeat import hub, hub_async

GAP = 0.5
LINGER = 0.3


class _Pool:
    """The one thing a Batcher asks of its pool: a connection, here a token."""

    @contextlib.contextmanager
    def connection(self) -> Iterator[object]:
        yield object()


class _APool:
    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[object]:
        yield object()


@pytest.fixture
def batches(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[hub.Batcher, list[list[int]]]]:
    monkeypatch.setattr(hub, "BURST_GAP", GAP)
    monkeypatch.setattr(hub, "BURST_LINGER", LINGER)
    sent: list[list[int]] = []

    def send(_conn: Any, args: list[int]) -> list[int]:
        sent.append(list(args))
        return [arg * 2 for arg in args]

    batcher = hub.Batcher(_Pool(), send, "test-batcher")  # type: ignore[arg-type]
    try:
        yield batcher, sent
    finally:
        batcher.close(5)


def _call_soon(batcher: hub.Batcher, arg: int, after: float, answers: dict[int, int]) -> threading.Thread:
    def call() -> None:
        time.sleep(after)
        answers[arg] = batcher.call(arg)

    thread = threading.Thread(target=call)
    thread.start()
    return thread


def test_calls_arriving_back_to_back_go_as_one_statement(
        batches: tuple[hub.Batcher, list[list[int]]]) -> None:
    batcher, sent = batches
    answers: dict[int, int] = {}
    assert batcher.call(1) == 2  # the first call of a burst goes at once, alone
    # Within GAP of that batch: the next waits LINGER, and a call arriving meanwhile joins it
    # (each would otherwise go alone: two slots are free).
    threads = [_call_soon(batcher, 2, 0.0, answers), _call_soon(batcher, 3, 0.1, answers)]
    for thread in threads:
        thread.join(10)
    assert answers == {2: 4, 3: 6}
    assert sent == [[1], [2, 3]]


def test_a_lone_call_after_a_quiet_moment_goes_at_once(
        batches: tuple[hub.Batcher, list[list[int]]]) -> None:
    batcher, sent = batches
    for i in range(3):
        time.sleep(GAP + 0.1)  # quiet: no burst under way
        started = time.monotonic()
        assert batcher.call(i) == i * 2
        assert time.monotonic() - started < LINGER  # never lingered
    assert sent == [[0], [1], [2]]


# A close() with nothing pending returns at once, even while both slots run a batch (a
# cancelled caller's batch on a dead path runs until tcp_user_timeout).
def test_close_with_both_slots_busy_and_nothing_pending_returns_at_once() -> None:
    gate = threading.Event()
    inside = threading.Semaphore(0)

    def send(_conn: Any, args: list[int]) -> list[int]:
        inside.release()
        gate.wait(30)
        return args

    batcher = hub.Batcher(_Pool(), send, "test-batcher")  # type: ignore[arg-type]
    threads = []
    for i in range(2):
        t = threading.Thread(target=batcher.call, args=(i,), daemon=True)
        t.start()
        threads.append(t)
        assert inside.acquire(timeout=5)  # its batch is in its slot
        time.sleep(0.05)  # past BURST_GAP: no lingering
    started = time.monotonic()
    batcher.close(3)
    took = time.monotonic() - started
    gate.set()
    for t in threads:
        t.join(5)
    assert took < 0.5, f"close() took {took:.2f} s with nothing pending"


def test_async_close_with_both_slots_busy_and_nothing_pending_returns_at_once() -> None:
    async def main() -> float:
        gate = asyncio.Event()
        inside = asyncio.Semaphore(0)

        async def send(_conn: Any, args: list[int]) -> list[int]:
            inside.release()
            await gate.wait()
            return args

        batcher = hub_async.AsyncBatcher(_APool(), send, "test-abatcher")  # type: ignore[arg-type]
        tasks = []
        for i in range(2):
            tasks.append(asyncio.create_task(batcher.call(i)))
            await asyncio.wait_for(inside.acquire(), 5)
            await asyncio.sleep(0.05)
        started = time.monotonic()
        await batcher.close(3)
        took = time.monotonic() - started
        gate.set()
        await asyncio.gather(*tasks)
        return took

    took = asyncio.run(main())
    assert took < 0.5, f"close() took {took:.2f} s with nothing pending"
