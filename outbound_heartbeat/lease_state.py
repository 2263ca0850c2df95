"""Every decision of a worker's lease, free of I/O: when it has expired on its own clock
(suspended), when it is lost, whether the watchdog lets it beat, what a heartbeat answer
changes, the backoff after a failure and the final status; and what both leases share before
any I/O (the heartbeat period, the default worker id, :class:`NothingToClaim`). The sync and
async leases and the hubs that beat many leases (:mod:`outbound_heartbeat.lease`,
:mod:`outbound_heartbeat.lease_async`, :mod:`outbound_heartbeat.hub`,
:mod:`outbound_heartbeat.hub_async`) act on these answers."""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

from . import errors, telemetry
from .records import Claim, HeartbeatStatus

__all__ = [
    "DEFAULT_INTERVAL",
    "LeaseState",
    "LeaseView",
    "NothingToClaim",
    "check_interval",
    "default_worker_id",
]

logger = logging.getLogger("outbound_heartbeat.lease")

#: Default heartbeat period, capped at a third of stale_after.
DEFAULT_INTERVAL = 2.0


def default_worker_id(name: str = "dialer") -> str:
    """A worker id unique to this process across hosts and containers: ``name-host-pid-random``.

    Two containers whose worker is PID 1 differ by host name and by the random part; a
    restarted process gets a new id. A configured name (``--worker-id``) shared by two live
    processes is safe too (a live run is never taken over), but only a dead incarnation's
    stale run is resumed by the next process of that name (docs/worker-lease.md)."""
    host = socket.gethostname()[:100] or "host"
    return f"{name}-{host}-{os.getpid()}-{secrets.token_hex(4)}"


class NothingToClaim(LookupError):
    """No run could be claimed (none pending, or the given run is held or finished)."""


def check_interval(interval: float | None, stale_after: timedelta) -> float:
    """The heartbeat period: default min(2 s, stale_after / 3); more than a third is refused."""
    limit = stale_after.total_seconds() / 3
    if interval is None:
        return min(DEFAULT_INTERVAL, limit)
    if not 0 < interval <= limit:
        raise errors.InvalidArgument(
            f"interval must be positive and at most a third of stale_after "
            f"({stale_after.total_seconds():g} s): got {interval!r}",
            argument="interval",
        )
    return interval


@dataclass
class LeaseState:
    """Every decision of a lease, free of I/O: shared by Lease and AsyncLease."""

    claim: Claim
    interval: float
    stall_after: float
    clock: Callable[[], float] = time.monotonic
    last_ok: float = 0.0
    last_progress: float = 0.0
    lost_reason: str | None = None
    cancel_requested: bool = False
    completed: bool = False
    releasing: bool = False
    stalled: bool = False
    failures: int = 0
    max_suspend: float | None = None
    suspended_at: float | None = None
    #: The process that claimed the run: only it heartbeats and writes for the lease.
    pid: int = field(default_factory=os.getpid)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        now = self.clock()
        self.last_ok = now
        self.last_progress = now
        if self.max_suspend is None:
            self.max_suspend = 5 * self.stale_after

    @property
    def stale_after(self) -> float:
        return self.claim.stale_after.total_seconds()

    @property
    def expires_after(self) -> float:
        # One interval of margin: the worker gives up before the database can call it dead.
        return self.stale_after - self.interval

    def expired(self) -> bool:
        if self.completed:  # the run is over and nothing is dialed: nothing to expire
            return False
        return self.clock() - self.last_ok > self.expires_after

    def _follow_expiry(self) -> None:
        """Self-expiry bookkeeping: suspend once expired, lose after max_suspend of it."""
        if self.lost_reason is not None or not self.expired():
            return
        now = self.clock()
        if self.suspended_at is None:
            self.suspended_at = now
            logger.warning(
                "[LEASE_LOST] run %s epoch %s (worker %s): suspended, no successful heartbeat"
                " within stale_after - interval; dialing stops until the database answers",
                self.claim.run_id, self.claim.lease_epoch, self.claim.worker_id,
            )
        elif now - self.suspended_at > (self.max_suspend or 0):
            self.mark_lost(f"suspended for more than {self.max_suspend:g} s")

    @property
    def lost(self) -> bool:
        self._follow_expiry()
        return self.lost_reason is not None

    @property
    def suspended(self) -> bool:
        """Self-expired and not lost: no dialing until the database answers again."""
        self._follow_expiry()
        return self.lost_reason is None and self.expired()

    def mark_lost(self, reason: str) -> None:
        with self._lock:
            if self.lost_reason is None:
                self.lost_reason = reason
                telemetry.lease_lost(
                    self.claim.run_id, self.claim.lease_epoch, self.claim.worker_id, reason
                )
                logger.warning(
                    "[LEASE_LOST] run %s epoch %s (worker %s): %s",
                    self.claim.run_id,
                    self.claim.lease_epoch,
                    self.claim.worker_id,
                    reason,
                )

    def touch(self) -> None:
        self.last_progress = self.clock()
        if self.stalled:
            self.stalled = False
            logger.info("[HEARTBEAT] run %s: dial loop made progress again", self.claim.run_id)

    def should_beat(self) -> bool:
        """False once the dial loop has stalled (unless releasing) or the lease is lost or done."""
        if self.lost or self.completed:
            return False
        if not self.releasing and self.clock() - self.last_progress > self.stall_after:
            if not self.stalled:
                self.stalled = True
                logger.warning(
                    "[HEARTBEAT] run %s: dial loop stalled for %.1f s, heartbeats stop",
                    self.claim.run_id,
                    self.clock() - self.last_progress,
                )
            return False
        return True

    def record(self, status: HeartbeatStatus, sent_at: float, *, background: bool = False) -> None:
        """Applies a heartbeat answer; ``sent_at`` is taken before the call (conservative).

        A background beat answered 'lost' while the lease is being released is left to the
        release: its last heartbeat and finish_run answer for the lease. That beat may have
        crossed the release's own finish_run, which ended the run (a beat waiting on the row
        the release held then finds it ended); a lease really lost meanwhile is told so by
        the release's calls ('lost', or finish_run's lease_lost)."""
        self.failures = 0
        if status == "lost" and background and self.releasing:
            logger.debug("[HEARTBEAT] run %s: a background beat answered 'lost' during the"
                         " release; the release's own answers decide", self.claim.run_id)
            return
        if status == "lost":
            self.mark_lost("the database answered 'lost'")
            return
        if status == "completed":
            if not self.completed:
                self.completed = True
                logger.info("[HEARTBEAT] run %s: completed under this lease (nothing left to"
                            " dial): the worker is done", self.claim.run_id)
            return
        self.last_ok = max(self.last_ok, sent_at)
        if self.suspended_at is not None and not self.expired():
            self.suspended_at = None
            logger.info("[HEARTBEAT] run %s: the database confirmed the lease, dialing resumes",
                        self.claim.run_id)
        if status == "cancel_requested" and not self.cancel_requested:
            self.cancel_requested = True
            logger.info("[HEARTBEAT] run %s: cancel requested", self.claim.run_id)

    def backoff(self) -> float:
        """Seconds to wait before reconnecting after a failure (doubling, capped at interval)."""
        self.failures += 1
        return float(min(self.interval, 0.1 * 2 ** (self.failures - 1)))

    def final_status(self, failed: bool) -> str:
        if failed:
            return "failed"
        return "cancelled" if self.cancel_requested else "completed"

    def check(self) -> None:
        if self.lost:
            raise errors.LeaseLost(f"lease on run {self.claim.run_id} is lost: {self.lost_reason}")

    def in_owner(self) -> bool:
        """False in a forked child: the lease, its heartbeat and its connections are the
        parent's (a child takes a lease of its own)."""
        return os.getpid() == self.pid

    def check_owner(self) -> None:
        if not self.in_owner():
            raise RuntimeError(
                f"the lease on run {self.claim.run_id} belongs to process {self.pid}, which"
                f" claimed it; process {os.getpid()} (a fork) must take a lease of its own")

    def may_write(self) -> bool:
        """True when the dial loop may use the database now (not lost, not suspended);
        raises LeaseLost once lost, RuntimeError in a forked child. Callers wait while it is
        False."""
        self.check_owner()
        self.check()
        return not self.suspended


class LeaseView:
    """The read-only face of a lease and its pure checks, shared by Lease and AsyncLease."""

    state: LeaseState | None

    @property
    def _state(self) -> LeaseState:
        if self.state is None:
            raise RuntimeError("lease not entered")
        return self.state

    @property
    def claim(self) -> Claim:
        return self._state.claim

    @property
    def run_id(self) -> int:
        return self._state.claim.run_id

    @property
    def business_id(self) -> int:
        return self._state.claim.business_id

    @property
    def lease_epoch(self) -> int:
        return self._state.claim.lease_epoch

    @property
    def resumed(self) -> bool:
        return self._state.claim.resumed

    @property
    def interval(self) -> float:
        return self._state.interval

    @property
    def lost(self) -> bool:
        return self._state.lost

    @property
    def suspended(self) -> bool:
        """No successful heartbeat for stale_after - interval: stop dialing (see the module)."""
        return self._state.suspended

    @property
    def must_stop(self) -> bool:
        """For a call in progress: hang up now (the lease is lost or suspended)."""
        return self._state.lost or self._state.suspended

    @property
    def cancel_requested(self) -> bool:
        return self._state.cancel_requested

    @property
    def completed(self) -> bool:
        """The run was completed under this lease (the empty-run rule): stop, it is success."""
        return self._state.completed

    def check(self) -> None:
        """Raises LeaseLost when the lease is gone (a suspended lease is not gone yet)."""
        self._state.check()

    def touch(self) -> None:
        """Tells the watchdog the dial loop is making progress (call during long jobs)."""
        self._state.touch()
