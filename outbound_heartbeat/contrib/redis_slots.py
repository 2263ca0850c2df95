"""Per-business call-concurrency slots in Redis (extra ``redis``), released when a run ends.

A worker takes a slot before each call and gives it back after; a business never has more
than ``limit`` calls at once across all its workers. Every slot expires ``ttl`` after it was
taken or renewed, on the Redis server's clock, so a SIGKILLed worker cannot leak its slots
forever; :meth:`RedisSlots.release_run` frees them at once, and is the release hook the web
adapters call after a force-cancel or a stale stop has committed.

Key layout (``prefix`` defaults to ``outbound_heartbeat:slots``):

``<prefix>:<business_id>``
    a sorted set, one member per slot in use, ``<run_id>:<token>``, scored by the slot's
    expiry in Redis server milliseconds. The key itself expires with its last slot.

Every operation is one Lua script, so concurrent workers never overshoot the limit.
"""

from __future__ import annotations

import secrets
from datetime import timedelta
from typing import Any

__all__ = ["RedisSlots"]

# Redis 5+ replicates script effects, so TIME (the server's clock) is allowed in a script.
_NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

_ACQUIRE = _NOW_MS + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
    return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
return 1
"""

# Renew only a slot that still exists (an expired or released one stays gone). Its presence
# decides the answer, not ZADD's count: ZADD XX CH counts 0 when the new expiry equals the old
# one (a renew in the same millisecond as the acquire), and the slot is live all the same.
_RENEW = _NOW_MS + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], ARGV[2]) then
    return 0
end
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[1]), ARGV[2])
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[1], tonumber(last[2]))
return 1
"""

_RELEASE_RUN = """
local prefix = ARGV[1]
local removed = 0
for _, member in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
    if string.sub(member, 1, string.len(prefix)) == prefix then
        removed = removed + redis.call('ZREM', KEYS[1], member)
    end
end
return removed
"""

_IN_USE = _NOW_MS + """
return redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')
"""


def _positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, not {value!r}")
    return value


class RedisSlots:
    """Slots of ``limit`` concurrent calls per business, each expiring after ``ttl``."""

    def __init__(
        self,
        client: Any,
        limit: int,
        ttl: timedelta = timedelta(minutes=5),
        prefix: str = "outbound_heartbeat:slots",
    ) -> None:
        """``client`` is a ``redis.Redis`` (redis-py); ``ttl`` should outlast the longest call."""
        self.client = client
        self.limit = _positive_int("limit", limit)
        if ttl <= timedelta(0):
            raise ValueError(f"ttl must be positive, not {ttl!r}")
        self.ttl_ms = max(1, int(ttl.total_seconds() * 1000))
        self.prefix = prefix
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._release_run = client.register_script(_RELEASE_RUN)
        self._in_use = client.register_script(_IN_USE)

    def key(self, business_id: int) -> str:
        return f"{self.prefix}:{_positive_int('business_id', business_id)}"

    def acquire(self, business_id: int, run_id: int) -> str | None:
        """A slot token for one call of ``run_id``, or None when the business is at its limit."""
        token = f"{_positive_int('run_id', run_id)}:{secrets.token_hex(8)}"
        got = self._acquire(keys=[self.key(business_id)], args=[self.limit, self.ttl_ms, token])
        return token if int(got) == 1 else None

    def renew(self, business_id: int, token: str) -> bool:
        """Extends a slot by ``ttl`` (a long call); False when it had expired or was released."""
        return int(self._renew(keys=[self.key(business_id)], args=[self.ttl_ms, token])) == 1

    def release(self, business_id: int, token: str) -> bool:
        """Gives one slot back; False when it was already gone (expired or released)."""
        return int(self.client.zrem(self.key(business_id), token)) == 1

    def release_run(self, run_id: int, business_id: int) -> int:
        """Frees every slot of ``run_id``; returns how many. The adapters' release hook."""
        prefix = f"{_positive_int('run_id', run_id)}:"
        return int(self._release_run(keys=[self.key(business_id)], args=[prefix]))

    def in_use(self, business_id: int) -> int:
        """Slots of the business in use now (expired ones not counted)."""
        return int(self._in_use(keys=[self.key(business_id)]))

    __call__ = release_run  # a RedisSlots instance is itself a release hook
