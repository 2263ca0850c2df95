"""A worker lease's decisions with no server, on a clock the test moves: the state machine of
outbound_heartbeat.lease_state (self-expiry, suspension, loss, the stall watchdog, what each
heartbeat answer changes, the backoff, the final status, the fork rule) and the hub's rules of
outbound_heartbeat.hub_core.HubCore (who is due, the watcher's patience before it cuts a beat).
The same rules against PostgreSQL, with real leases: tests/integration/test_many_leases.py,
tests/integration/test_modes.py, tests/e2e/test_lease.py."""

from __future__ import annotations

import os
from datetime import timedelta

import pytest

from outbound_heartbeat import errors
from outbound_heartbeat.hub_core import MAX_NAP, HubCore
from outbound_heartbeat.lease_state import LeaseState
from outbound_heartbeat.records import Claim

STALE_AFTER = 3.0
INTERVAL = 0.5


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def lease(clock: Clock, *, stall_after: float = 120.0, max_suspend: float | None = None,
          run_id: int = 1) -> LeaseState:
    claim = Claim(run_id, 1, "w", 1, False, timedelta(seconds=STALE_AFTER))
    return LeaseState(claim, INTERVAL, stall_after, clock=clock, max_suspend=max_suspend)


def test_a_lease_suspends_one_interval_before_the_database_could_call_it_dead() -> None:
    clock = Clock()
    state = lease(clock)
    assert state.expires_after == STALE_AFTER - INTERVAL
    clock.now += STALE_AFTER - INTERVAL  # exactly at the bound: not yet
    assert not state.suspended and state.may_write()
    clock.now += 0.01
    assert state.suspended and not state.lost and not state.may_write()
    state.check()  # suspended is not lost: no exception


def test_a_suspended_lease_is_lost_after_max_suspend_and_never_comes_back() -> None:
    clock = Clock()
    state = lease(clock)
    assert state.max_suspend == 5 * STALE_AFTER  # the default
    clock.now += STALE_AFTER
    assert state.suspended  # suspension starts now
    clock.now += 5 * STALE_AFTER
    assert not state.lost  # at max_suspend, not past it
    clock.now += 0.01
    assert state.lost and "suspended for more than 15 s" in (state.lost_reason or "")
    with pytest.raises(errors.LeaseLost):
        state.check()
    state.record("ok", clock.now)  # a late 'ok' cannot revive a lost lease
    assert state.lost and not state.should_beat()


def test_an_ok_sent_before_the_suspension_confirms_nothing_one_sent_after_resumes() -> None:
    clock = Clock()
    state = lease(clock, max_suspend=100)
    sent = clock.now + 0.1
    clock.now += STALE_AFTER
    assert state.suspended
    state.record("ok", sent)  # sent 2.9 s ago: last_ok moves only to when it was sent
    assert state.suspended
    state.record("ok", clock.now)
    assert not state.suspended and state.suspended_at is None and state.may_write()


def test_answers_lost_completed_and_cancel_requested() -> None:
    clock = Clock()
    state = lease(clock)
    state.record("cancel_requested", clock.now)
    assert state.cancel_requested and not state.lost
    assert state.final_status(failed=False) == "cancelled"
    assert state.final_status(failed=True) == "failed"
    state.record("completed", clock.now)
    assert state.completed and not state.should_beat()
    clock.now += 10 * STALE_AFTER
    assert not state.suspended and not state.lost  # a completed run has nothing to expire
    other = lease(clock, run_id=2)
    assert other.final_status(failed=False) == "completed"
    other.record("lost", clock.now)
    assert other.lost and other.lost_reason == "the database answered 'lost'"
    with pytest.raises(errors.LeaseLost, match="run 2"):
        other.check()


def test_a_background_lost_during_the_release_is_left_to_the_release() -> None:
    clock = Clock()
    state = lease(clock)
    state.releasing = True
    state.record("lost", clock.now, background=True)
    assert not state.lost
    state.record("lost", clock.now)  # the release's own call
    assert state.lost


def test_the_first_loss_reason_is_kept() -> None:
    state = lease(Clock())
    state.mark_lost("first")
    state.mark_lost("second")
    assert state.lost_reason == "first"


def test_a_stalled_dial_loop_stops_heartbeats_until_it_moves_again() -> None:
    clock = Clock()
    state = lease(clock, stall_after=10.0)
    clock.now += 10.0
    assert state.should_beat() and not state.stalled  # at the bound
    clock.now += 0.01
    assert not state.should_beat() and state.stalled
    state.releasing = True  # the release's own beats go out however long the loop sat
    assert state.should_beat()
    state.releasing = False
    state.touch()
    assert state.should_beat() and not state.stalled


def test_backoff_doubles_from_a_tenth_of_a_second_up_to_the_interval() -> None:
    state = lease(Clock())
    assert [state.backoff() for _ in range(5)] == [0.1, 0.2, 0.4, 0.5, 0.5]
    state.record("ok", state.clock())  # an answer resets the count
    assert state.failures == 0 and state.backoff() == 0.1


def test_only_the_claiming_process_may_write() -> None:
    state = lease(Clock())
    assert state.in_owner() and state.may_write()
    state.pid = os.getpid() + 1  # as a forked child sees its parent's lease
    assert not state.in_owner()
    with pytest.raises(RuntimeError, match="a fork"):
        state.may_write()


def test_the_hub_beats_what_is_due_and_skips_what_must_not_beat() -> None:
    clock = Clock()
    core = HubCore(clock=clock)
    a, b = lease(clock, run_id=1), lease(clock, run_id=2, stall_after=0.2)
    first = core.add(a)  # due one interval after the claim
    assert core.next_wake() == min(MAX_NAP, INTERVAL) and core.take_due() == []
    clock.now += 0.3
    second = core.add(b)  # due at +0.8
    clock.now += 0.25
    # a is due; b is due within half an interval, but its dial loop has not moved for
    # 0.55 s (stall_after 0.2): not carried, looked at again one interval later.
    assert core.take_due() == [first]
    assert second.next_due == clock.now + INTERVAL
    sent = clock.now
    clock.now += INTERVAL
    b.touch()
    core.answered([first], [(1, "ok")], sent_at=sent)
    assert first.next_due == sent + INTERVAL  # one interval after it was sent
    assert core.take_due() == [first, second]
    assert core.durations[-1] == INTERVAL  # the answer's time feeds the watcher's patience


def test_a_locked_answer_is_a_failed_beat_for_that_lease_alone() -> None:
    clock = Clock()
    core = HubCore(clock=clock)
    a, b = lease(clock, run_id=1), lease(clock, run_id=2)
    ma, mb = core.add(a), core.add(b)
    core.answered([ma, mb], [(1, "locked"), (2, "ok")], sent_at=clock.now)
    assert (a.failures, b.failures) == (1, 0)
    assert ma.next_due == pytest.approx(clock.now + 0.1) and mb.next_due == clock.now + INTERVAL


def test_a_failed_statement_backs_off_every_lease_it_carried() -> None:
    clock = Clock()
    core = HubCore(clock=clock)
    members = [core.add(lease(clock, run_id=i)) for i in (1, 2)]
    core.failed(members, ConnectionError("gone"))
    assert [m.state.failures for m in members] == [1, 1]
    assert [m.next_due for m in members] == [pytest.approx(clock.now + 0.1)] * 2
    core.crashed(members)
    assert all(m.state.lost_reason == "heartbeat thread crashed" for m in members)


def test_watcher_cuts_a_stuck_beat_but_spares_one_sent_after_the_suspension() -> None:
    """The hub's rule, on its own clock: a suspended lease's in-flight beat is cut once it has
    been out longer than the watcher's patience (a dead path), not before (it may confirm the
    lease). Patience starts at an interval, doubles with each cut in a row, is at least twice
    the slowest recent answer, and never exceeds the self-expiry (later answers confirm nothing)."""
    now = [100.0]
    core = HubCore(clock=lambda: now[0])
    claim = Claim(1, 1, "w", 1, False, timedelta(seconds=3))
    state = LeaseState(claim, 0.5, 120.0, clock=lambda: now[0], max_suspend=1000)
    member = core.add(state)
    now[0] += 2.6  # past stale_after - interval without a beat: suspended
    assert state.suspended
    core.sending([member])
    now[0] += 0.3
    assert core.to_cut() == ([], False)  # out for less than an interval: spared
    now[0] += 0.3
    assert core.to_cut() == ([], True)  # stuck: cut
    assert core.to_cut() == ([], True) and core.cuts == 1  # one cut per statement
    core.in_flight = []
    core.sending([member])  # the next statement: patience doubled
    now[0] += 0.9
    assert core.patience([member]) == 1.0 and core.to_cut() == ([], False)
    now[0] += 0.2
    assert core.to_cut() == ([], True) and core.cuts == 2
    core.in_flight = []
    for _ in range(10):  # cut after cut: patience stops at the self-expiry, 2.5 s
        core.sending([member])
        now[0] += 3.0
        assert core.to_cut() == ([], True)
        core.in_flight = []
    assert core.patience([member]) == 2.5
    core.sending([member])
    now[0] += 1.2
    core.answered([member], [(1, "ok")], sent_at=now[0] - 1.2)  # a slow answer, in time
    core.in_flight = []
    assert not state.suspended and core.cuts == 0
    assert core.patience([member]) == pytest.approx(2.4)  # twice the slowest recent answer
    now[0] += 2.6
    assert state.suspended
    core.sending([member])
    now[0] += 2.0
    assert core.to_cut() == ([], False)  # a busy server is slow, not gone


def test_a_background_beat_crossing_the_release_does_not_lose_the_lease() -> None:
    """A regular beat sent while the release's finish_run holds the run's row waits for it and
    then finds the run ended: 'lost'. That answer is the release's own doing: the release
    decides (its last heartbeat and finish_run answer for the lease), so the lease is not
    marked lost and the worker does not exit as if it had lost its run."""
    now = [100.0]
    core = HubCore(clock=lambda: now[0])
    claim = Claim(1, 1, "w", 1, False, timedelta(seconds=3))
    state = LeaseState(claim, 0.5, 120.0, clock=lambda: now[0])
    member = core.add(state)
    state.releasing = True
    core.answered([member], [(1, "lost")], sent_at=now[0])
    assert not state.lost
    state.record("lost", now[0])  # the release's own last heartbeat still decides
    assert state.lost
    other = LeaseState(Claim(2, 1, "w", 1, False, timedelta(seconds=3)), 0.5, 120.0,
                       clock=lambda: now[0])
    core.answered([core.add(other)], [(2, "lost")], sent_at=now[0])
    assert other.lost  # not releasing: a background 'lost' ends the lease, as before


def test_one_very_slow_answer_does_not_stop_the_watcher_from_cutting_a_dead_path() -> None:
    """An answer that took a minute (a TCP stall that recovered, a server pause) sets patience
    to twice that for the next answers; a path that dies meanwhile must still be cut once the
    statement has been out for the self-expiry: its answer could confirm nothing any more (a
    confirmation counts from when the statement was sent), and every second more keeps the
    leases off a fresh connection that could confirm them before max_suspend loses them."""
    now = [100.0]
    core = HubCore(clock=lambda: now[0])
    claim = Claim(1, 1, "w", 1, False, timedelta(seconds=3))
    state = LeaseState(claim, 0.5, 120.0, clock=lambda: now[0], max_suspend=1000)
    member = core.add(state)
    core.sending([member])
    now[0] += 60.0  # the answer comes a minute late: the lease has been suspended meanwhile
    assert state.suspended
    core.answered([member], [(1, "ok")], sent_at=now[0] - 60.0)
    core.in_flight = []
    assert state.suspended  # sent a minute ago: it confirms nothing, as said above
    core.sending([member])  # the next statement, on a path that has just died
    now[0] += 2.6  # out for longer than the self-expiry (3 s - 0.5 s)
    assert core.patience([member]) <= state.expires_after
    assert core.to_cut() == ([], True)
