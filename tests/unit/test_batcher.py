"""How the hub's batchers gather calls (outbound_heartbeat.hub.Batcher): a lone call goes at
once; calls that keep arriving (a release storm) wait a moment for each other and go as one
statement.

No server: the statement is a stand-in that answers each call. The burst's gap and linger are
stretched (0.5 s and 0.3 s) so that the order of events does not depend on the machine's load;
benchmarks/heartbeat_cost.py measures what the real values do to a storm of 1,000 leases."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from outbound_heartbeat import hub

GAP = 0.5
LINGER = 0.3


class _Pool:
    """The one thing a Batcher asks of its pool: a connection, here a token."""

    @contextlib.contextmanager
    def connection(self) -> Iterator[object]:
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
