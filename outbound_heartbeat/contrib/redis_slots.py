"""Per-business call-concurrency slots in Redis (extra ``redis``), released when a run ends.

A worker takes a slot before each call and gives it back after; a business never has more
than ``limit`` calls at once across all its workers. Every slot expires ``ttl`` after it was
taken or renewed, on the Redis server's clock, so a SIGKILLed worker cannot leak its slots
forever; :meth:`RedisSlots.release_run` frees them at once, and is the release hook the web
adapters call after a force-cancel or a stale stop has committed. :meth:`RedisSlots.release_ended`
frees the slots of every run that ended by any other path (a sweep, the CLI, psql, pg_cron).

Key layout (``prefix`` defaults to ``outbound_heartbeat:slots``):

``<prefix>:<business_id>``
    a sorted set, one member per slot in use, ``<run_id>:<token>``, scored by the slot's
    expiry in Redis server milliseconds. The key itself expires with its latest slot.
``<prefix>:epoch``
    set on first use and never expiring: when it is missing, Redis has lost its data (a
    restart without persistence, a failover to an empty replica, a FLUSHALL) or this is the
    first use, and the slots of calls still in flight are unknown.
``<prefix>:recovering``
    while it lives (``recovery``, default ``ttl``, from the moment the epoch was found
    missing), no new slot is granted and :meth:`RedisSlots.renew` re-admits the live calls'
    slots it no longer knows: every live call renews within ``ttl``, so when the window ends
    the count holds every call in flight again. :meth:`RedisSlots.start_fresh` ends the window
    at once where nothing is in flight (a new deployment).

Every operation is one Lua script, so concurrent workers never overshoot the limit.
"""

from __future__ import annotations

import logging
import secrets
from datetime import timedelta
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..service import Connectable

__all__ = ["RedisSlots"]

# Redis 5+ replicates script effects, so TIME (the server's clock) is allowed in a script.
_NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS[2] is the epoch, KEYS[3] the recovery window; ARGV[1] a new epoch, ARGV[2] the window's
# length in ms. A missing epoch means the slots of calls in flight are unknown: open the window.
_RECOVERING = """
local function recovering()
    if redis.call('EXISTS', KEYS[2]) == 0 then
        redis.call('SET', KEYS[2], ARGV[1])
        redis.call('SET', KEYS[3], '1', 'PX', tonumber(ARGV[2]))
        return true
    end
    return redis.call('EXISTS', KEYS[3]) == 1
end
"""

# The key expires with its latest slot, never with the last caller's ttl: instances with
# different ttls share a business's key.
_EXPIRE_WITH_LATEST = """
local latest = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
if latest[2] then
    redis.call('PEXPIREAT', KEYS[1], tonumber(latest[2]))
end
"""

# 1: granted; 0: the business is at its limit; -1: recovering, no slot granted.
_ACQUIRE = _NOW_MS + _RECOVERING + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if recovering() then
    return -1
end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
    return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[4]), ARGV[5])
""" + _EXPIRE_WITH_LATEST + """
return 1
"""

# Renew only a slot that still exists (an expired or released one stays gone). Its presence
# decides the answer, not ZADD's count: ZADD XX CH counts 0 when the new expiry equals the old
# one (a renew in the same millisecond as the acquire), and the slot is live all the same.
# While recovering, a slot it does not know is a live call whose slot Redis lost: re-admitted.
_RENEW = _NOW_MS + _RECOVERING + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], ARGV[4]) and not recovering() then
    return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[4])
""" + _EXPIRE_WITH_LATEST + """
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


logger = logging.getLogger("outbound_heartbeat.slots")


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
        recovery: timedelta | None = None,
    ) -> None:
        """``client`` is a ``redis.Redis`` (redis-py) with a ``socket_timeout`` (a Redis that
        accepts connections but stops answering must not hang a call: :meth:`from_url` sets
        one); ``ttl`` should outlast the longest call, and calls renew within it; ``recovery``
        (default ``ttl``) is how long no slot is granted after Redis lost its data."""
        kwargs = getattr(getattr(client, "connection_pool", None), "connection_kwargs", {})
        if kwargs.get("socket_timeout", 1) is None:
            raise ValueError(
                "client has no socket_timeout: a Redis that stops answering would hang every"
                " call; pass redis.Redis(..., socket_timeout=2, socket_connect_timeout=2) or"
                " use RedisSlots.from_url()"
            )
        self.client = client
        self.limit = _positive_int("limit", limit)
        if ttl <= timedelta(0):
            raise ValueError(f"ttl must be positive, not {ttl!r}")
        self.ttl_ms = max(1, int(ttl.total_seconds() * 1000))
        recovery = ttl if recovery is None else recovery
        if recovery <= timedelta(0):
            raise ValueError(f"recovery must be positive, not {recovery!r}")
        self.recovery_ms = max(1, int(recovery.total_seconds() * 1000))
        self.prefix = prefix
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._release_run = client.register_script(_RELEASE_RUN)
        self._in_use = client.register_script(_IN_USE)

    @classmethod
    def from_url(
        cls, url: str, limit: int, *, timeout: float = 2.0, **options: Any
    ) -> RedisSlots:
        """Slots on a new ``redis.Redis`` for ``url`` whose every command gives up after
        ``timeout`` seconds; ``options`` are the constructor's (``ttl``, ``prefix``, ...)."""
        import redis

        client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        return cls(client, limit, **options)

    def key(self, business_id: int) -> str:
        return f"{self.prefix}:{_positive_int('business_id', business_id)}"

    def _state_keys(self, business_id: int) -> list[str]:
        return [self.key(business_id), f"{self.prefix}:epoch", f"{self.prefix}:recovering"]

    def _state_args(self) -> list[Any]:
        return [secrets.token_hex(8), self.recovery_ms]

    def acquire(self, business_id: int, run_id: int) -> str | None:
        """A slot token for one call of ``run_id``, or None when the business is at its limit
        or Redis is recovering the slots it lost (:meth:`recovering`)."""
        token = f"{_positive_int('run_id', run_id)}:{secrets.token_hex(8)}"
        got = int(self._acquire(
            keys=self._state_keys(business_id),
            args=[*self._state_args(), self.limit, self.ttl_ms, token],
        ))
        if got == -1:
            logger.warning(
                "[SLOTS] no slot granted to run %s: Redis lost its slots (restart without data,"
                " failover, flush) or this is its first use; the calls in flight renew theirs"
                " back within %s ms (RedisSlots.start_fresh() when none is in flight)",
                run_id, self.recovery_ms,
            )
        return token if got == 1 else None

    def renew(self, business_id: int, token: str) -> bool:
        """Extends a slot by ``ttl`` (a long call); False when it had expired or was released.
        While recovering, a slot Redis no longer knows is re-admitted (True)."""
        return int(self._renew(
            keys=self._state_keys(business_id),
            args=[*self._state_args(), self.ttl_ms, token],
        )) == 1

    def release(self, business_id: int, token: str) -> bool:
        """Gives one slot back; False when it was already gone (expired or released)."""
        return int(self.client.zrem(self.key(business_id), token)) == 1

    def release_run(self, run_id: int, business_id: int) -> int:
        """Frees every slot of ``run_id``; returns how many. The adapters' release hook."""
        prefix = f"{_positive_int('run_id', run_id)}:"
        return int(self._release_run(keys=[self.key(business_id)], args=[prefix]))

    def release_ended(self, conn: Connectable) -> int:
        """Frees the slots of every run that is no longer open, however it ended (a sweep, the
        CLI, a DBA in psql, pg_cron, a reader's stale stop in another process) or whose release
        hook failed; returns how many. One ``list_active_runs()`` call; idempotent.

        The slots are read before the open runs: a slot is taken for a running run, and an
        ended run never runs again, so a slot whose run is not open after the read is stale."""
        from ..service import list_active_runs

        held: dict[int, set[int]] = {}
        for key in self.client.scan_iter(match=f"{self.prefix}:*", count=500):
            name = key.decode() if isinstance(key, bytes) else str(key)
            suffix = name[len(self.prefix) + 1:]
            if not suffix.isdigit():
                continue  # the epoch and the recovery window
            for member in self.client.zrange(name, 0, -1):
                text = member.decode() if isinstance(member, bytes) else str(member)
                head = text.split(":")[0]
                if head.isdigit():
                    held.setdefault(int(suffix), set()).add(int(head))
        if not held:
            return 0
        open_runs = {r.id for r in list_active_runs(conn)}
        freed = 0
        for business_id, run_ids in held.items():
            for run_id in run_ids - open_runs:
                freed += self.release_run(run_id, business_id)
        return freed

    def in_use(self, business_id: int) -> int:
        """Slots of the business in use now (expired ones not counted)."""
        return int(self._in_use(keys=[self.key(business_id)]))

    def recovering(self) -> bool:
        """True while no slot is granted because Redis lost the slots of the calls in flight."""
        return bool(self.client.exists(f"{self.prefix}:recovering")) or not self.client.exists(
            f"{self.prefix}:epoch")

    def start_fresh(self) -> None:
        """Declares that no call holds a slot (a new deployment, every worker stopped): ends
        the recovery window at once. Never call it while calls may be in flight."""
        self.client.set(f"{self.prefix}:epoch", secrets.token_hex(8))
        self.client.delete(f"{self.prefix}:recovering")

    __call__ = release_run  # a RedisSlots instance is itself a release hook
