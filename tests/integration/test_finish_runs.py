"""finish_runs(): finish_run() for many leases in one statement (a release storm, docs/scale.md).
Each lease gets exactly the answer finish_run() gives it alone, one call after the other, with
the same rows, events, NOTICEs and counters; bad arrays change nothing; a run row another
transaction holds is answered 'locked' and holds up no other lease; two overlapping calls from
two threads finish each run once and never deadlock."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from outbound_heartbeat import InvalidArgument, RunLocked, RunNotFound, calls, service
from outbound_heartbeat.records import Event, RunOutcome

from ..helpers import as_role, assert_exact, backdate_heartbeat, denied, run_row, snapshot

Conn = psycopg.Connection[Any]
Lease = tuple[int, str, int, str]


def claimed(conn: Conn, worker: str, jobs: int = 2, business_id: int = 1) -> tuple[int, str, int]:
    run = service.create_run(conn, business_id, [{"n": i} for i in range(jobs)])
    claim = service.claim_run(conn, worker, run.id)
    assert claim is not None
    return run.id, worker, claim.lease_epoch


# -- every kind of lease, as a list of (run_id, worker_id, lease_epoch, status) -------------------

KINDS: dict[str, Callable[[Conn, str], list[Lease]]] = {}


def kind(fn: Callable[[Conn, str], list[Lease]]) -> Callable[[Conn, str], list[Lease]]:
    KINDS[fn.__name__] = fn
    return fn


@kind
def completed_under_the_lease(conn: Conn, w: str) -> list[Lease]:
    # First of the kinds: the sweep below meets no other kind's stale run.
    run_id, _, epoch = claimed(conn, w, jobs=1)
    job = service.next_job(conn, run_id, w, epoch)
    assert job is not None
    service.finish_job(conn, job.id, w, epoch, "completed")
    assert [r.reason for r in service.cleanup_stuck_runs(conn)] == ["empty"]
    return [(run_id, w, epoch, "completed")]


@kind
def fresh(conn: Conn, w: str) -> list[Lease]:
    return [(*claimed(conn, w, jobs=3), "completed")]


@kind
def fresh_with_a_job_in_progress(conn: Conn, w: str) -> list[Lease]:
    run_id, _, epoch = claimed(conn, w, jobs=3)
    assert service.next_job(conn, run_id, w, epoch) is not None
    return [(run_id, w, epoch, "failed")]


@kind
def cancel_requested(conn: Conn, w: str) -> list[Lease]:
    run_id, _, epoch = claimed(conn, w)
    service.request_cancel(conn, run_id, 1)
    return [(run_id, w, epoch, "cancelled")]


@kind
def stale(conn: Conn, w: str) -> list[Lease]:
    run_id, _, epoch = claimed(conn, w)
    backdate_heartbeat(conn, run_id, 3600)  # finish_run() stops it on the spot
    return [(run_id, w, epoch, "completed")]


@kind
def stale_twice(conn: Conn, w: str) -> list[Lease]:
    run_id, _, epoch = claimed(conn, w)
    backdate_heartbeat(conn, run_id, 3600)
    return [(run_id, w, epoch, "completed"), (run_id, w, epoch, "failed")]


@kind
def force_cancelled(conn: Conn, w: str) -> list[Lease]:
    run_id, _, epoch = claimed(conn, w)
    service.force_cancel(conn, run_id, 1)
    return [(run_id, w, epoch, "completed"), (run_id, w, epoch, "cancelled")]


@kind
def other_epoch(conn: Conn, w: str) -> list[Lease]:
    run_id, _, epoch = claimed(conn, w)
    backdate_heartbeat(conn, run_id, 3600)
    assert service.claim_run(conn, w, run_id) is not None  # a new incarnation of the name
    return [(run_id, w, epoch, "completed")]


@kind
def other_worker(conn: Conn, w: str) -> list[Lease]:
    run_id, _, epoch = claimed(conn, w)
    return [(run_id, w + "-impostor", epoch, "completed")]


@kind
def already_finished(conn: Conn, w: str) -> list[Lease]:
    run_id, _, epoch = claimed(conn, w)
    service.finish_run(conn, run_id, w, epoch, "failed")
    return [(run_id, w, epoch, "failed"), (run_id, w, epoch, "completed")]


@kind
def never_claimed(conn: Conn, w: str) -> list[Lease]:
    return [(service.create_run(conn, 1, [{}]).id, w, 1, "completed")]


@kind
def the_same_lease_twice(conn: Conn, w: str) -> list[Lease]:
    lease = claimed(conn, w)
    return [(*lease, "completed"), (*lease, "completed")]


@kind
def the_same_lease_twice_with_two_statuses(conn: Conn, w: str) -> list[Lease]:
    lease = claimed(conn, w)
    return [(*lease, "cancelled"), (*lease, "failed")]


@kind
def impostors_before_and_after_the_holder(conn: Conn, w: str) -> list[Lease]:
    run_id, _, epoch = claimed(conn, w)
    return [(run_id, w + "-x", epoch, "failed"), (run_id, w, epoch, "failed"),
            (run_id, w + "-x", epoch, "failed"), (run_id, w, epoch + 1, "completed")]


@kind
def mixed_statuses(conn: Conn, w: str) -> list[Lease]:
    return [(*claimed(conn, f"{w}-{status}"), status) for status in ("cancelled", "completed", "failed")]


def totals(conn: Conn) -> dict[tuple[str, str], int]:
    """The trigger-kept totals, but for the detection latency's sum: a time, which differs
    between runs stopped moments apart (its buckets and count are compared)."""
    rows = conn.execute("SELECT counter, label, sum(value) FROM outbound_heartbeat.totals"
                        " WHERE (counter, label) <> ('detection_latency', 'sum_ms') GROUP BY 1, 2").fetchall()
    return {(r[0], r[1]): int(r[2]) for r in rows}


def delta(before: dict[tuple[str, str], int], after: dict[tuple[str, str], int]) -> dict[tuple[str, str], int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in before.keys() | after.keys()
            if after.get(k, 0) != before.get(k, 0)}


def anonymous(value: Any) -> Any:
    """A twin's worker names without their prefix ("alone-" or "set-")."""
    if isinstance(value, str):
        return value.removeprefix("alone-").removeprefix("set-")
    return value


def effects(conn: Conn, run_id: int, since: int) -> tuple[Any, ...]:
    """What a finish wrote on one run: the row's state, its jobs, its new events."""
    row = run_row(conn, run_id)
    jobs = conn.execute("SELECT status, error_message FROM outbound_call_jobs WHERE run_id = %s ORDER BY id",
                        (run_id,)).fetchall()
    events = conn.execute("SELECT event, worker_id, detail FROM outbound_heartbeat.run_events"
                          " WHERE run_id = %s AND id > %s ORDER BY id", (run_id, since)).fetchall()
    return (row["status"], anonymous(row["locked_by_worker"]), row["lock_ts"] is None,
            row["ended_at"] is None, row["lease_epoch"], jobs,
            [(e, anonymous(w), d) for e, w, d in events])


def last_event_id(conn: Conn) -> int:
    row = conn.execute("SELECT coalesce(max(id), 0) FROM outbound_heartbeat.run_events").fetchone()
    assert row is not None
    return int(row[0])


def normalized(events: list[Event], names: dict[int, str]) -> list[tuple[Any, ...]]:
    return sorted((names[e.run_id], e.event, anonymous(e.worker_id), sorted(e.detail.items())) for e in events)


@pytest.mark.parametrize("route", ["direct", "pgbouncer"], indirect=True)
def test_set_answers_equal_sequential_single_answers_for_every_kind_of_lease(conn: Conn) -> None:
    # Twin leases of every kind: one set answered by finish_run() one after the other, one set
    # within one finish_runs() call; epochs differ between twins, so they are compared by kind.
    alone: dict[str, list[Lease]] = {}
    in_set: dict[str, list[Lease]] = {}
    for name, make in KINDS.items():
        alone[name] = make(conn, f"alone-{name}")
        in_set[name] = make(conn, f"set-{name}")
    alone_names = {lease[0]: name for name, leases in alone.items() for lease in leases}
    set_names = {lease[0]: name for name, leases in in_set.items() for lease in leases}

    mark = last_event_id(conn)
    before = totals(conn)
    single: list[RunOutcome] = []
    single_events: list[Event] = []
    for lease in (lease for leases in alone.values() for lease in leases):
        outcome, events = service.execute(conn, calls.finish_run(*lease))
        single.append(outcome)
        single_events += events
    middle = totals(conn)
    together, set_events = service.execute(conn, calls.finish_runs(
        [lease for leases in in_set.values() for lease in leases]))
    after = totals(conn)

    # The same answers, lease by lease, in order.
    assert [o.run_id for o in together] == [lease[0] for leases in in_set.values() for lease in leases]
    assert [(alone_names[o.run_id], o.status, o.outcome, o.jobs_failed) for o in single] == \
        [(set_names[o.run_id], o.status, o.outcome, o.jobs_failed) for o in together]
    answers = {(set_names[o.run_id], o.outcome) for o in together}
    assert {o for _, o in answers} == {"finished", "already_finished", "lease_lost"}
    assert ("fresh", "finished") in answers and ("stale", "lease_lost") in answers
    # The same rows, jobs and events per run; the same NOTICEs; the same counters.
    for name in KINDS:
        for twin, lease in zip(alone[name], in_set[name], strict=True):
            assert effects(conn, twin[0], mark) == effects(conn, lease[0], mark), name
    assert normalized(single_events, alone_names) == normalized(set_events, set_names)
    assert delta(before, middle) == delta(middle, after)
    assert_exact(conn)
    assert conn.execute("SELECT * FROM outbound_heartbeat.verify_events()").fetchall() == []


def test_a_nonexistent_run_is_refused_as_finish_run_refuses_it(conn: Conn) -> None:
    lease = claimed(conn, "present")
    with pytest.raises(RunNotFound):
        service.finish_run(conn, 987_654_321, "w", 1)
    before = snapshot(conn)
    with pytest.raises(RunNotFound) as caught:
        service.finish_runs(conn, [(*lease, "completed"), (987_654_321, "w", 1, "completed")])
    assert "987654321" in str(caught.value)
    assert snapshot(conn) == before  # the held run was not ended either


@pytest.mark.parametrize(
    ("args", "argument"),
    [
        (("{1,2}", "{a}", "{1,1}", "{completed,completed}"), "worker_ids"),
        (("{1}", "{a}", "{1,1}", "{completed}"), "lease_epochs"),
        (("{1}", "{a}", "{1}", "{completed,failed}"), "statuses"),
        (("{1,NULL}", "{a,b}", "{1,1}", "{completed,completed}"), "run_ids"),
        ((None, "{a}", "{1}", "{completed}"), "run_ids"),
        (("{1,2}", "{a,NULL}", "{1,1}", "{completed,completed}"), "worker_ids"),
        (("{1}", "{\" \"}", "{1}", "{completed}"), "worker_ids"),
        (("{1}", "{a}", "{-1}", "{completed}"), "lease_epochs"),
        (("{1}", "{a}", "{NULL}", "{completed}"), "lease_epochs"),
        (("{1}", "{a}", "{1}", "{running}"), "statuses"),
        (("{1}", "{a}", "{1}", "{NULL}"), "statuses"),
        (("{1}", "{a}", "{1}", None), "statuses"),
        (("{{1}}", "{a}", "{1}", "{completed}"), "run_ids"),
    ],
)
def test_bad_arrays_are_refused_naming_the_argument(conn: Conn, args: tuple[Any, ...],
                                                     argument: str) -> None:
    lease = claimed(conn, "a")
    # The would-be valid lease ("a", epoch 1) on a real run: refused all the same.
    run_ids = args[0].replace("{1", f"{{{lease[0]}", 1) if args[0] else None
    real = (run_ids, *args[1:])
    before = snapshot(conn)
    with pytest.raises(psycopg.Error) as caught:
        conn.execute("SELECT * FROM outbound_heartbeat.finish_runs(%s::bigint[], %s::text[],"
                     " %s::bigint[], %s::text[])", real)
    assert caught.value.sqlstate == "OH400"
    assert caught.value.diag.column_name == argument
    assert snapshot(conn) == before


def test_python_keeps_its_signature_and_checks(conn: Conn) -> None:
    with pytest.raises(InvalidArgument) as caught:
        service.finish_runs(conn, [(1, "a", 1, "completed"), (2, "", 1, "completed")])
    assert caught.value.argument == "worker_id"
    assert service.finish_runs(conn, []) == []
    row = conn.execute("SELECT count(*) FROM outbound_heartbeat.finish_runs('{}', '{}', '{}', '{}')").fetchone()
    assert row == (0,)


def rows_of(conn: Conn, run_id: int) -> tuple[Any, ...]:
    """Everything of one run the library can write."""
    return tuple(conn.execute(query, (run_id,)).fetchall() for query in (
        "SELECT * FROM outbound_call_runs WHERE id = %s",
        "SELECT * FROM outbound_call_jobs WHERE run_id = %s ORDER BY id",
        "SELECT * FROM outbound_heartbeat.run_events WHERE run_id = %s ORDER BY id"))


def test_a_held_run_row_is_answered_locked_and_holds_up_no_other_lease(conn: Conn, dsn: str) -> None:
    """One run row held by the app's open transaction: every other lease of the call is
    answered at once (SKIP LOCKED), the held one 'locked' after a short budget with nothing
    written for it, instead of the whole call waiting lock_timeout and failing OH423."""
    conn.execute("UPDATE outbound_heartbeat.settings SET lock_timeout = interval '3 s'")
    free = [(*claimed(conn, f"free-{i}"), "completed") for i in range(3)]
    held = (*claimed(conn, "held"), "completed")
    held_stale = (*claimed(conn, "held-stale"), "failed")
    backdate_heartbeat(conn, held_stale[0], 3600)
    before = {lease[0]: rows_of(conn, lease[0]) for lease in (held, held_stale)}
    with psycopg.connect(dsn) as locker:
        locker.execute("SELECT 1 FROM outbound_call_runs WHERE id = ANY(%s) FOR UPDATE",
                       ([held[0], held_stale[0]],))
        start = time.monotonic()
        answers = service.finish_runs(conn, [free[0], held, free[1], held_stale, free[2]])
        took = time.monotonic() - start
        assert {r: rows_of(conn, r) for r in before} == before  # nothing written for them
        locker.rollback()
    assert took < 1.5, took  # was lock_timeout (3 s), then OH423 for every lease
    assert [(a.run_id, a.outcome) for a in answers] == [
        (free[0][0], "finished"), (held[0], "locked"), (free[1][0], "finished"),
        (held_stale[0], "locked"), (free[2][0], "finished")]
    assert answers[1].status == "running" and answers[1].jobs_failed == 0
    assert [run_row(conn, lease[0])["status"] for lease in free] == ["completed"] * 3
    assert conn.execute("SHOW lock_timeout").fetchone() == ("0",)
    # Sent again once the row is free: finish_run()'s own answers.
    again = service.finish_runs(conn, [held, held_stale])
    assert [(a.outcome, a.status) for a in again] == [("finished", "completed"),
                                                      ("lease_lost", "stopped")]
    assert_exact(conn)


def test_a_held_run_row_waits_at_most_the_callers_stricter_lock_timeout(conn: Conn, dsn: str) -> None:
    conn.execute("UPDATE outbound_heartbeat.settings SET lock_timeout = interval '3 s'")
    held = (*claimed(conn, "held-strict"), "completed")
    with psycopg.connect(dsn) as locker:
        locker.execute("SELECT 1 FROM outbound_call_runs WHERE id = %s FOR UPDATE", (held[0],))
        with conn.transaction():
            conn.execute("SET LOCAL lock_timeout = '20ms'")
            start = time.monotonic()
            assert [a.outcome for a in service.finish_runs(conn, [held])] == ["locked"]
            assert time.monotonic() - start < 1.0
            assert conn.execute("SHOW lock_timeout").fetchone() == ("20ms",)
        locker.rollback()


def test_a_job_row_held_past_lock_timeout_makes_the_call_oh423_and_keeps_nothing(conn: Conn, dsn: str) -> None:
    conn.execute("UPDATE outbound_heartbeat.settings SET lock_timeout = interval '300 ms'")
    free = [(*claimed(conn, f"free-{i}"), "completed") for i in range(3)]
    held = (*claimed(conn, "held"), "completed")
    before = snapshot(conn)
    with psycopg.connect(dsn) as locker:
        # A queued job of a held run: its run is locked by the call, the job is not.
        locker.execute("SELECT 1 FROM outbound_call_jobs WHERE run_id = %s FOR UPDATE", (held[0],))
        start = time.monotonic()
        with pytest.raises(RunLocked) as caught:
            service.finish_runs(conn, [*free, held])
        took = time.monotonic() - start
        locker.rollback()
    assert "is locked" in str(caught.value)
    assert took < 2.0, took
    assert snapshot(conn) == before
    assert conn.execute("SHOW lock_timeout").fetchone() == ("0",)
    assert {o.outcome for o in service.finish_runs(conn, [*free, held])} == {"finished"}


@pytest.mark.parametrize("stale_runs", [0, 20])
def test_two_overlapping_calls_finish_each_run_once_and_never_deadlock(conn: Conn, dsn: str,
                                                                         stale_runs: int) -> None:
    leases = [(*claimed(conn, f"ov-{i}", jobs=1), "completed") for i in range(120 + stale_runs)]
    for lease in leases[120:]:
        backdate_heartbeat(conn, lease[0], 3600)
    rng = random.Random(7)
    first = leases[:90] + leases[120:]
    second = leases[30:]
    rng.shuffle(first)
    rng.shuffle(second)
    answers: dict[int, list[RunOutcome]] = {}
    errors: list[Exception] = []
    barrier = threading.Barrier(2)

    def release(n: int, batch: list[Lease]) -> None:
        try:
            with psycopg.connect(dsn, autocommit=True) as own:
                barrier.wait()
                answers[n] = service.finish_runs(own, batch)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=release, args=(n, b)) for n, b in enumerate((first, second))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    outcomes: dict[int, list[str]] = {}
    for n, batch in ((0, first), (1, second)):
        assert [o.run_id for o in answers[n]] == [lease[0] for lease in batch]
        # A lease whose row the other call held past the short budget is 'locked' (nothing
        # written): sent again, as the hub does.
        locked = [lease for lease, o in zip(batch, answers[n], strict=True) if o.outcome == "locked"]
        again = iter(service.finish_runs(conn, locked))
        for o in answers[n]:
            o = next(again) if o.outcome == "locked" else o
            outcomes.setdefault(o.run_id, []).append(o.outcome)
    for lease in leases[:120]:
        assert outcomes[lease[0]].count("finished") == 1, outcomes[lease[0]]
        assert set(outcomes[lease[0]]) <= {"finished", "already_finished"}
    for lease in leases[120:]:
        assert set(outcomes[lease[0]]) == {"lease_lost"}
    events = dict(conn.execute(
        "SELECT run_id, array_agg(event ORDER BY id) FROM outbound_heartbeat.run_events"
        " WHERE run_id = ANY(%s) AND event IN ('finished', 'stale_stopped') GROUP BY run_id",
        ([lease[0] for lease in leases],)).fetchall())
    assert all(events[lease[0]] == ["finished"] for lease in leases[:120])
    assert all(events[lease[0]] == ["stale_stopped"] for lease in leases[120:])
    assert_exact(conn)
    assert conn.execute("SELECT * FROM outbound_heartbeat.verify_events()").fetchall() == []


def test_a_storm_sends_one_notify_and_one_notice_per_run(conn: Conn, dsn: str) -> None:
    leases = [(*claimed(conn, f"n-{i}", jobs=1), "completed") for i in range(5)]
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute("LISTEN outbound_heartbeat")
        _, events = service.execute(conn, calls.finish_runs(leases))
        got = [n.payload for n in listener.notifies(timeout=1.0, stop_after=5)]
    ids = [lease[0] for lease in leases]
    assert sorted(e.run_id for e in events) == ids
    assert all(e.event == "finished" and e.detail["jobs_failed"] == 1 for e in events)
    assert got == [f'{{"event": "finished", "run_id": {i}, "business_id": 1}}' for i in ids]


def test_the_app_role_may_call_it_as_it_may_call_finish_run(conn: Conn, dsn: str,
                                                             roles: dict[str, str]) -> None:
    for role in roles.values():
        row = conn.execute("SELECT has_function_privilege(%(r)s, 'outbound_heartbeat.finish_run(bigint, text,"
                           " bigint, text)', 'EXECUTE'), has_function_privilege(%(r)s,"
                           " 'outbound_heartbeat.finish_runs(bigint[], text[], bigint[], text[])', 'EXECUTE')",
                           {"r": role}).fetchone()
        assert row is not None and row[0] == row[1], role
    with as_role(dsn, roles["app"]) as app:
        leases = [(*claimed(app, f"app-{i}", jobs=1), "completed") for i in range(3)]
        assert [o.outcome for o in service.finish_runs(app, leases)] == ["finished"] * 3
    with as_role(dsn, roles["nobody"]) as nobody:
        assert denied(nobody, "SELECT * FROM outbound_heartbeat.finish_runs('{1}', '{a}', '{1}', '{completed}')")
