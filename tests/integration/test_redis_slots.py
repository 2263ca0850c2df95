"""Per-business call slots against the real Redis on 127.0.0.1:6379 (mandatory under CI=true:
tests/services.py)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta

import pytest
import redis

from outbound_heartbeat.contrib.redis_slots import RedisSlots

REDIS_URL = "redis://127.0.0.1:6379/0"

pytestmark = pytest.mark.needs("redis")


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
    c.ping()  # fails the test when Redis is down
    yield c
    c.close()


@pytest.fixture
def prefix(client: redis.Redis) -> Iterator[str]:
    p = f"oh-test:{uuid.uuid4().hex}"
    # A new prefix is a new deployment with no call in flight: no recovery window to wait out.
    RedisSlots(client, limit=1, prefix=p).start_fresh()
    yield p
    for key in client.scan_iter(f"{p}:*"):
        client.delete(key)


def test_limit_release_and_key_layout(client: redis.Redis, prefix: str) -> None:
    slots = RedisSlots(client, limit=2, prefix=prefix)
    a = slots.acquire(7, 100)
    b = slots.acquire(7, 101)
    assert a and b and a.startswith("100:") and b.startswith("101:")
    assert slots.acquire(7, 100) is None  # business 7 is at its limit
    assert slots.acquire(8, 100) is not None  # another business is not
    assert client.type(f"{prefix}:7") == b"zset"
    assert sorted(m.decode() for m in client.zrange(f"{prefix}:7", 0, -1)) == sorted([a, b])
    assert 0 < client.pttl(f"{prefix}:7") <= 300_000
    assert slots.release(7, a) is True and slots.release(7, a) is False
    assert slots.in_use(7) == 1
    assert slots.acquire(7, 102) is not None


def test_release_run_frees_only_that_run(client: redis.Redis, prefix: str) -> None:
    slots = RedisSlots(client, limit=5, prefix=prefix)
    mine = [slots.acquire(3, 10) for _ in range(3)]
    other = slots.acquire(3, 1)  # run 1 is a prefix of run 10's id: must survive
    other2 = slots.acquire(3, 100)
    assert all(mine) and other and other2
    assert slots.release_run(10, 3) == 3
    assert slots.in_use(3) == 2
    assert slots.release_run(10, 3) == 0  # idempotent
    assert slots(1, 3) == 1  # the instance is a release hook (run_id, business_id)


def test_slots_expire_on_the_server_clock(client: redis.Redis, prefix: str) -> None:
    slots = RedisSlots(client, limit=1, ttl=timedelta(milliseconds=300), prefix=prefix)
    token = slots.acquire(5, 50)
    assert token is not None and slots.acquire(5, 51) is None
    deadline = time.monotonic() + 5
    while slots.in_use(5) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert slots.in_use(5) == 0  # a crashed worker's slot is not leaked forever
    assert slots.renew(5, token) is False  # an expired slot is not brought back
    assert slots.acquire(5, 51) is not None


def test_renew_keeps_a_long_call_alive(client: redis.Redis, prefix: str) -> None:
    # Renewing every 0.3 s against a 3 s ttl leaves 2.7 s of slack per renew on busy cores; the
    # renews span longer than one ttl, so only the renews keep the slot.
    slots = RedisSlots(client, limit=1, ttl=timedelta(seconds=3), prefix=prefix)
    token = slots.acquire(5, 50)
    assert token is not None
    started = time.monotonic()
    while time.monotonic() - started < 4.5:
        time.sleep(0.3)
        assert slots.renew(5, token) is True
    assert slots.in_use(5) == 1 and slots.acquire(5, 51) is None


def test_renew_of_a_live_slot_is_true_in_the_same_millisecond(
    client: redis.Redis, prefix: str
) -> None:
    # ZADD XX CH counts no change when the new expiry equals the old one: a renew within the
    # acquire's millisecond used to answer False for a live slot (1,171 of 2,000 on main).
    slots = RedisSlots(client, limit=1, ttl=timedelta(minutes=5), prefix=prefix)
    answers = []
    for _ in range(2000):
        token = slots.acquire(6, 60)
        assert token is not None
        answers.append(slots.renew(6, token))
        answers.append(slots.renew(6, token))
        assert slots.release(6, token) is True
        assert slots.renew(6, token) is False  # released: stays gone
    assert answers.count(False) == 0 and len(answers) == 4000
    assert slots.in_use(6) == 0


def test_racing_workers_never_overshoot(client: redis.Redis, prefix: str) -> None:
    slots = RedisSlots(client, limit=3, prefix=prefix)
    got: list[str | None] = []
    barrier = threading.Barrier(20)

    def take(i: int) -> None:
        own = RedisSlots(redis.Redis.from_url(REDIS_URL), limit=3, prefix=prefix)
        barrier.wait()
        got.append(own.acquire(9, 1000 + i))

    threads = [threading.Thread(target=take, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(got) == 20 and sum(t is not None for t in got) == 3
    assert slots.in_use(9) == 3


@pytest.mark.parametrize(("kwargs", "word"), [({"limit": 0}, "limit"), ({"limit": -1}, "limit"),
                                              ({"limit": 2, "ttl": timedelta(0)}, "ttl")])
def test_bad_configuration(client: redis.Redis, kwargs: dict[str, object], word: str) -> None:
    with pytest.raises(ValueError, match=word):
        RedisSlots(client, **kwargs)  # type: ignore[arg-type]


def test_bad_ids_name_the_argument(client: redis.Redis, prefix: str) -> None:
    slots = RedisSlots(client, limit=1, prefix=prefix)
    with pytest.raises(ValueError, match="business_id"):
        slots.acquire(0, 1)
    with pytest.raises(ValueError, match="run_id"):
        slots.acquire(1, -5)
    assert {k.decode() for k in client.scan_iter(f"{prefix}:*")} == {f"{prefix}:epoch"}
