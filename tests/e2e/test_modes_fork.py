"""The core worker and service guarantees in a child forked from a process that holds shared
leases and connections (docs/guarantees.md, the "after fork" cells): the child's own lease is
fenced when force-cancelled and its run is detected dead when it is SIGKILLed, while the
parent's leases beat on untouched; the child's release storm ends each of its runs once; the
child's service calls (and a web adapter preloaded in the parent, as ``gunicorn --preload``
does) make one transition per cancel and run their release hooks in the child, once.
(The child taking its own hub, heartbeat and connections: tests/e2e/test_hub_outages.py.)"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import threading
import time
import traceback
from typing import Any

import psycopg
import pytest

from outbound_heartbeat import LeaseLost, calls, service, web
from outbound_heartbeat.lease import Lease, NothingToClaim
from outbound_heartbeat.lease_async import AsyncLease

from ..helpers import job_statuses, run_row
from ..proxy import proxy_for

Conn = psycopg.Connection[Any]
STALE_AFTER = 3.0
INTERVAL = 0.5
CTX = multiprocessing.get_context("fork")


def fast(conn: Conn) -> None:
    conn.execute("UPDATE outbound_heartbeat.settings SET stale_after = make_interval(secs => %s)",
                 (STALE_AFTER,))


def ages(conn: Conn, run_ids: list[int]) -> dict[int, float]:
    return dict(conn.execute(
        "SELECT id, extract(epoch FROM clock_timestamp() - last_heartbeat_at)::float8"
        " FROM outbound_call_runs WHERE id = ANY(%s)", (run_ids,)).fetchall())


def rows_of(conn: Conn, run_id: int) -> tuple[Any, ...]:
    """What a lease on ``run_id`` could write: its run row, its jobs, its events."""
    return (conn.execute("SELECT * FROM outbound_call_runs WHERE id = %s", (run_id,)).fetchall(),
            conn.execute("SELECT * FROM outbound_call_jobs WHERE run_id = %s ORDER BY id",
                         (run_id,)).fetchall(),
            conn.execute("SELECT * FROM outbound_heartbeat.run_events WHERE run_id = %s ORDER BY id",
                         (run_id,)).fetchall())


class Parent:
    """The parent: shared leases on ``count`` runs, their dial loop running in a thread (a
    touch of every lease and a job dialed on each, in turn) and their heartbeat ages sampled
    on the database clock, for as long as the test needs."""

    def __init__(self, conn: Conn, dsn: str, count: int = 2, *, outage: bool = False) -> None:
        """``outage``: the server goes away meanwhile; the dial loop only touches its leases
        (they wait, suspended, through it) and their heartbeat ages are not held to the bound."""
        self.conn, self.dsn, self.outage = conn, dsn, outage
        self.runs = [service.create_run(conn, 70 + i, [{"n": j} for j in range(400)]).id
                     for i in range(count)]
        self.leases = [Lease(dsn, f"parent-{i}", r, interval=INTERVAL)
                       for i, r in enumerate(self.runs)]
        for lease in self.leases:
            lease.__enter__()
            job = lease.next_job()  # the hub's pool and heartbeat are open and in use at the fork
            assert job is not None
            lease.finish_job(job)
        self.worst: dict[int, float] = {}
        self.problems: list[str] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> Parent:
        def dial() -> None:
            while not self._stop.is_set():
                for lease in self.leases:
                    lease.touch()
                    if self.outage:
                        continue
                    try:
                        job = lease.next_job()
                        if job is not None:
                            lease.finish_job(job)
                    except Exception as exc:
                        self.problems.append(f"{type(exc).__name__}: {exc}")
                self._stop.wait(0.05)

        def sample() -> None:
            if self.outage:
                return
            with psycopg.connect(self.dsn, autocommit=True) as watcher:
                while not self._stop.wait(0.1):
                    for run_id, age in ages(watcher, self.runs).items():
                        self.worst[run_id] = max(self.worst.get(run_id, 0.0), age)

        self._threads = [threading.Thread(target=dial, daemon=True),
                         threading.Thread(target=sample, daemon=True)]
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)
        try:
            if exc[0] is None:
                self.check()
        finally:
            for lease in self.leases:
                lease.__exit__(None, None, None)
        if exc[0] is None:
            with psycopg.connect(self.dsn, autocommit=True) as c:
                assert {run_row(c, r)["status"] for r in self.runs} == {"completed"}

    def check(self) -> None:
        """The parent's leases went on as if no child had been forked."""
        assert self.problems == []
        if not self.outage:
            assert self.worst and max(self.worst.values()) < STALE_AFTER - INTERVAL, self.worst
        assert not any(lease.lost for lease in self.leases)
        for lease in self.leases:  # each dials on, its suspension (if any) over
            while (job := lease.next_job()) is not None:
                lease.finish_job(job)
                break
        assert not any(lease.lost or lease.suspended for lease in self.leases)
        with psycopg.connect(self.dsn, autocommit=True) as c:  # (a fresh one after an outage)
            assert {run_row(c, r)["status"] for r in self.runs} == {"running"}


def touch_until(leases: list[Any], condition: Any, limit: float) -> bool:
    until = time.monotonic() + limit
    while time.monotonic() < until:
        for lease in leases:
            lease.touch()
        if condition():
            return True
        time.sleep(0.05)
    return False


# -- fencing and a release storm in the child ------------------------------------------------


def child_fenced(dsn: str, twin: str, runs: list[int], report: Any, parents: int) -> None:
    """The child: shared leases on ``runs``; one job dialed on each; waits for the parent to
    force-cancel the first run, then must learn it and write nothing with it, then dials the
    others' jobs and leaves every lease at once (its hub's release storm). First it tries to
    take its parent's live run under its parent's worker name: refused."""
    try:
        try:
            with Lease(dsn, "parent-0", parents, interval=INTERVAL):
                report.put(("error", "the child took its parent's live run"))
                return
        except NothingToClaim:
            pass
        if twin == "async":
            async def main() -> dict[str, Any]:
                leases = [AsyncLease(dsn, f"child-{r}", r, interval=INTERVAL) for r in runs]
                for lease in leases:
                    await lease.__aenter__()
                try:
                    held: list[Any] = [await lease.next_job() for lease in leases]
                    report.put(("ready", held[0].id))
                    until = time.monotonic() + 2 * INTERVAL + 3
                    while not leases[0].lost and time.monotonic() < until:
                        for lease in leases:
                            lease.touch()
                        await asyncio.sleep(0.05)
                    outcome: dict[str, Any] = {"learned": leases[0].lost, "hub": leases[0]._hub.pid}
                    for name in ("next_job", "finish_job"):
                        try:
                            if name == "next_job":
                                await leases[0].next_job()
                            else:
                                await leases[0].finish_job(held[0])
                            outcome.setdefault("not fenced", []).append(name)
                        except LeaseLost:
                            pass
                    for lease, job in zip(leases[1:], held[1:], strict=True):
                        await lease.finish_job(job)
                        while (job := await lease.next_job()) is not None:
                            await lease.finish_job(job)
                    return outcome
                finally:
                    await asyncio.gather(*(lease.__aexit__(None, None, None) for lease in leases))

            outcome = asyncio.run(main())
        else:
            leases = [Lease(dsn, f"child-{r}", r, interval=INTERVAL) for r in runs]
            for lease in leases:
                lease.__enter__()
            try:
                held: list[Any] = [lease.next_job() for lease in leases]
                report.put(("ready", held[0].id))
                learned = touch_until(leases, lambda: leases[0].lost, 2 * INTERVAL + 3)
                outcome = {"learned": learned, "hub": leases[0]._hub.pid}
                for name, call in (("next_job", leases[0].next_job),
                                   ("finish_job", lambda: leases[0].finish_job(held[0]))):
                    try:
                        call()
                        outcome.setdefault("not fenced", []).append(name)
                    except LeaseLost:
                        pass
                for lease, job in zip(leases[1:], held[1:], strict=True):
                    lease.finish_job(job)
                    while (job := lease.next_job()) is not None:
                        lease.finish_job(job)
            finally:  # left together, from threads: the hub gathers the releases (a storm)
                leaving = [threading.Thread(target=lease.__exit__, args=(None, None, None))
                           for lease in leases]
                for t in leaving:
                    t.start()
                for t in leaving:
                    t.join(30)
        outcome["pid"] = os.getpid()
        report.put(("ok", outcome))
    except BaseException:
        report.put(("error", traceback.format_exc()))


@pytest.mark.parametrize(("route", "twin"), [("direct", "sync"), ("direct", "async"),
                                             ("pgbouncer", "sync")], indirect=["route"])
def test_a_forked_childs_lease_is_fenced_and_its_storm_ends_each_run_once(
    conn: Conn, dsn: str, twin: str
) -> None:
    fast(conn)
    child_runs = [service.create_run(conn, 80, [{"n": j} for j in range(3)]).id for _ in range(3)]
    report = CTX.SimpleQueue()
    with Parent(conn, dsn) as parent:
        child = CTX.Process(target=child_fenced, args=(dsn, twin, child_runs, report, parent.runs[0]))
        child.start()
        try:
            kind, held = report.get()
            assert kind == "ready", held
            # The parent force-cancels the child's first run (an operator, say).
            assert service.force_cancel(conn, child_runs[0], business_id=80).jobs_cancelled == 2
            frozen = rows_of(conn, child_runs[0])
            child.join(30)
            assert child.exitcode == 0
        finally:
            if child.is_alive():
                child.kill()
        kind, outcome = report.get()
        assert kind == "ok", outcome
    assert outcome["pid"] != os.getpid() and outcome["hub"] == outcome["pid"]
    assert outcome["learned"], "the child's lease never learned it was force-cancelled"
    assert "not fenced" not in outcome, outcome
    assert rows_of(conn, child_runs[0]) == frozen  # the fenced child wrote nothing more
    assert job_statuses(conn, child_runs[0])[held] == "in_progress"  # handed out: the app's
    assert [run_row(conn, r)["status"] for r in child_runs] == ["cancelled", "completed", "completed"]
    for run_id in child_runs[1:]:  # the storm ended each run once
        finished = conn.execute(
            "SELECT count(*) FILTER (WHERE event = 'finished'), count(*) FILTER (WHERE event = 'claimed')"
            " FROM outbound_heartbeat.run_events WHERE run_id = %s", (run_id,)).fetchone()
        assert finished == (1, 1), (run_id, finished)
        assert set(job_statuses(conn, run_id).values()) == {"completed"}
    assert service.verify_events(conn) == []


# -- a SIGKILLed child ------------------------------------------------------------------------


def child_killed(dsn: str, run_id: int, report: Any) -> None:
    """The child: a shared lease, one job dialed, then it keeps touching until it is killed."""
    try:
        lease = Lease(dsn, "child-killed", run_id, interval=INTERVAL)
        lease.__enter__()
        job: Any = lease.next_job()
        report.put(("ready", job.id))
        while True:
            lease.touch()
            time.sleep(0.05)
    except BaseException:
        report.put(("error", traceback.format_exc()))


@pytest.mark.parametrize("route", ["direct", "pgbouncer"], indirect=True)
def test_a_sigkilled_forked_child_is_detected_while_the_parent_beats_on(conn: Conn, dsn: str) -> None:
    fast(conn)
    run_id = service.create_run(conn, 81, [{"n": j} for j in range(4)]).id
    report = CTX.SimpleQueue()
    with Parent(conn, dsn) as parent:
        child = CTX.Process(target=child_killed, args=(dsn, run_id, report))
        child.start()
        try:
            kind, dialing = report.get()
            assert kind == "ready", dialing
            time.sleep(2 * INTERVAL)  # the child's own hub has beaten its run meanwhile
            assert ages(conn, [run_id])[run_id] < 2 * INTERVAL
            os.kill(child.pid or 0, signal.SIGKILL)
            killed = time.monotonic()
            child.join(10)
        finally:
            if child.is_alive():
                child.kill()
        # A reader polling every 0.2 s stops the dead child's run within stale_after, plus
        # its last beat's interval and the poll; the parent's runs are never judged dead.
        while service.get_active_run(conn, 81) is not None:
            assert time.monotonic() - killed < STALE_AFTER + INTERVAL + 2.0, "never detected"
            assert all(service.get_active_run(conn, 70 + i) is not None
                       for i in range(len(parent.runs)))
            time.sleep(0.2)
        took = time.monotonic() - killed
        assert STALE_AFTER - INTERVAL - 0.5 < took < STALE_AFTER + INTERVAL + 2.0, took
    row = run_row(conn, run_id)
    assert (row["status"], row["locked_by_worker"]) == ("stopped", None)
    statuses = job_statuses(conn, run_id)
    assert statuses.pop(dialing) == "in_progress"  # the job being dialed is left to the app
    assert set(statuses.values()) == {"failed"}  # the queued ones failed, with a reason
    reasons = conn.execute("SELECT DISTINCT error_message IS NOT NULL FROM outbound_call_jobs"
                           " WHERE run_id = %s AND status = 'failed'", (run_id,)).fetchall()
    assert reasons == [(True,)]


# -- a partition and a restart under a child ---------------------------------------------------


def child_rides(dsn: str, run_id: int, report: Any, done: Any) -> None:
    """The child: a shared lease, one job dialed; touches it until ``done`` or until it is lost,
    reporting the moment it first finds itself suspended; then dials the rest, or, lost, must
    be refused."""
    try:
        with Lease(dsn, "child-rides", run_id, interval=INTERVAL, max_suspend=60) as lease:
            job: Any = lease.next_job()
            lease.finish_job(job)
            report.put(("ready", None))
            suspended_at = None
            while not done.is_set() and not lease.lost:
                lease.touch()
                if lease.suspended and suspended_at is None:
                    suspended_at = time.monotonic()
                    report.put(("suspended", suspended_at))
                time.sleep(0.05)
            outcome: dict[str, Any] = {"lost": lease.lost, "suspended_at": suspended_at}
            if lease.lost:
                try:
                    lease.next_job()
                    outcome["not fenced"] = True
                except LeaseLost:
                    pass
            else:
                while (job := lease.next_job()) is not None:
                    lease.finish_job(job)
        report.put(("ok", outcome))
    except BaseException:
        report.put(("error", traceback.format_exc()))


def test_a_partitioned_forked_child_expires_itself_while_the_parent_beats_on(
    conn: Conn, dsn: str
) -> None:
    """Self-expiry in a child: the path from the child's hub to the server is cut (a proxy the
    child alone goes through); the child's lease suspends itself before stale_after on its own
    clock, its run is then stopped as a dead one, and once the path heals the child learns it
    is lost; the parent's leases, on their own hub, beat on throughout."""
    fast(conn)
    run_id = service.create_run(conn, 82, [{"n": j} for j in range(4)]).id
    report, done = CTX.SimpleQueue(), CTX.Event()
    with proxy_for(dsn) as (proxy, far), Parent(conn, dsn) as parent:
        child = CTX.Process(target=child_rides, args=(far, run_id, report, done))
        child.start()
        try:
            assert report.get() == ("ready", None)
            time.sleep(2 * INTERVAL)
            proxy.blackhole()
            cut_at = time.monotonic()
            kind, suspended_at = report.get()
            assert kind == "suspended", suspended_at
            assert suspended_at - cut_at < STALE_AFTER, suspended_at - cut_at  # before it can be judged dead
            stopped: list[int] = []
            while run_id not in stopped:  # the database calls it dead; none of the parent's
                assert time.monotonic() - cut_at < STALE_AFTER + 5, "never stopped"
                stopped += [r.run_id for r in service.cleanup_stuck_runs(conn)]
                time.sleep(0.1)
            assert not set(stopped) & set(parent.runs)
            proxy.heal()
            child.join(30)
            assert child.exitcode == 0
        finally:
            done.set()
            if child.is_alive():
                child.kill()
        kind, outcome = report.get()
        assert kind == "ok", outcome
    assert outcome["lost"] and "not fenced" not in outcome, outcome
    assert run_row(conn, run_id)["status"] == "stopped"


def test_a_forked_child_and_its_parent_ride_a_restart_without_a_death() -> None:
    """An outage in a child: the server restarts for longer than stale_after under a parent's
    shared leases and a forked child's; in the grace nobody is stopped, both hubs reconnect,
    nobody's lease is lost and every run completes."""
    from ..helpers import private_server, wait_writable

    with private_server(synchronous_commit="on") as (cluster, dsn), \
            psycopg.connect(dsn, autocommit=True) as setup:
        fast(setup)
        run_id = service.create_run(setup, 83, [{"n": j} for j in range(4)]).id
        report, done = CTX.SimpleQueue(), CTX.Event()
        with Parent(setup, dsn, outage=True) as parent:
            child = CTX.Process(target=child_rides, args=(dsn, run_id, report, done))
            child.start()
            try:
                assert report.get() == ("ready", None)
                cluster.restart(outage=STALE_AFTER + 1)  # every beat now older than stale_after
                wait_writable(dsn)
                back = time.monotonic()
                with psycopg.connect(dsn, autocommit=True) as reader:
                    while time.monotonic() - back < STALE_AFTER - 1.0:
                        assert service.cleanup_stuck_runs(reader) == []
                        for business in (70, 71, 83):
                            assert service.get_active_run(reader, business) is not None, business
                        time.sleep(0.2)
                    until = time.monotonic() + 10  # both hubs beat again
                    while max(ages(reader, [*parent.runs, run_id]).values()) > 2 * INTERVAL:
                        assert time.monotonic() < until, ages(reader, [*parent.runs, run_id])
                        time.sleep(0.1)
                done.set()
                child.join(30)
                assert child.exitcode == 0
            finally:
                done.set()
                if child.is_alive():
                    child.kill()
            kind, outcome = report.get()
            while kind == "suspended":
                kind, outcome = report.get()
            assert kind == "ok", outcome
            assert not outcome["lost"], outcome
        with psycopg.connect(dsn, autocommit=True) as after:
            assert run_row(after, run_id)["status"] == "completed"
            assert set(job_statuses(after, run_id).values()) == {"completed"}
            stale = after.execute("SELECT count(*) FROM outbound_heartbeat.run_events"
                                  " WHERE event = 'stale_stopped'").fetchone()
            assert stale == (0,)


# -- service calls and a preloaded web adapter in the child ---------------------------------


def running(conn: Conn, business: int) -> int:
    run = service.create_run(conn, business, [{"n": 1}, {"n": 2}])
    assert service.claim_run(conn, f"w{run.id}", run.id) is not None
    return run.id


def test_a_forked_childs_service_calls_and_preloaded_adapter_run_their_own_hooks(
    conn: Conn, dsn: str
) -> None:
    """The parent holds an app connection in a transaction block with a pending hook, and a
    Flask adapter made before the fork, its hook pool already started (as ``gunicorn
    --preload`` makes it). The child, on connections of its own: races the parent to
    force-cancel one run (one transition between them), cancels another in a transaction block
    of its own and a third through the preloaded adapter; each hook runs in the child, once;
    the parent's pending hook runs in the parent only, after the parent's commit."""
    from flask import Flask

    from outbound_heartbeat.contrib.flask import create_blueprint

    contested, in_block, by_adapter, parents, warm = (running(conn, 90) for _ in range(5))
    read_end, write_end = os.pipe()

    def log(what: str, run_id: int) -> bool:  # one line per hook run: who ran it, for what
        return os.write(write_end, f"{os.getpid()} {what} {run_id}\n".encode()) > 0

    hooks = web.ReleaseHooks([lambda run_id, business_id: log("adapter", run_id)],
                             wait=2.0, retries=0)
    app = Flask(__name__)
    app.register_blueprint(create_blueprint(lambda: psycopg.connect(dsn, autocommit=True),
                                            tenant=lambda: 90, locale="en", hooks=hooks))
    # A request served before the fork: the adapter's hook pool exists in the parent.
    assert app.test_client().post(f"/api/outbound_calls/jobs/{warm}/force-cancel").status_code == 200
    go = CTX.Event()

    def child() -> bool:
        with psycopg.connect(dsn, autocommit=True) as own:
            go.wait(10)
            race = service.force_cancel(own, contested, business_id=90).jobs_cancelled
            log("race", race)
            with service.transaction(own):
                later = service.execute_call(own, calls.force_cancel(in_block, 90)).pending
                assert later is not None
                later.on_commit(lambda events: [log("block", e.run_id) for e in events])
        answer = app.test_client().post(f"/api/outbound_calls/jobs/{by_adapter}/force-cancel")
        return answer.status_code == 200 and answer.get_json()["jobs_cancelled"] == 2

    with psycopg.connect(dsn, autocommit=True) as app_conn, \
            psycopg.connect(dsn, autocommit=True) as mine:
        with service.transaction(app_conn):
            pending = service.execute_call(app_conn, calls.force_cancel(parents, 90)).pending
            assert pending is not None
            pending.on_commit(lambda events: [log("parent", e.run_id) for e in events])
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                code = 1
                try:
                    code = 0 if child() else 3
                except BaseException:
                    traceback.print_exc()
                    code = 2
                finally:
                    os._exit(code)
            go.set()
            ours = service.force_cancel(mine, contested, business_id=90).jobs_cancelled
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
            assert pending.state == "pending"  # the parent's block is still open
        assert pending.state == "committed"
    os.close(write_end)
    with os.fdopen(read_end) as lines:
        ran = sorted(tuple(line.split()) for line in lines.read().splitlines())
    me, them = str(os.getpid()), str(pid)
    races = [int(n) for p, what, n in ran if what == "race"]
    assert sorted([ours, *races]) == [0, 2]  # one transition between parent and child
    assert [r for r in ran if r[1] != "race"] == sorted([
        (me, "adapter", str(warm)), (me, "parent", str(parents)),
        (them, "adapter", str(by_adapter)), (them, "block", str(in_block))]), ran
    assert {run_row(conn, r)["status"] for r in (contested, in_block, by_adapter, parents)} == {
        "cancelled"}


# -- a console used before the fork ----------------------------------------------------------


def stream_request(viewer: str) -> Any:
    from outbound_heartbeat.console import HttpRequest, Request

    return Request("GET", "/stream", "", {}, {}, {"viewer": viewer}, HttpRequest({}, {"viewer": viewer}, {}))


def frame_with(stream: Any, text: bytes, limit: float) -> bool:
    """Whether a frame of ``stream`` carrying ``text`` arrives within ``limit`` seconds."""
    until = time.monotonic() + limit
    for frame in stream:
        if text in frame:
            return True
        if time.monotonic() > until:
            return False
    return False


def test_a_console_used_before_a_fork_serves_the_child_with_its_own_threads_and_limits(
    conn: Conn, dsn: str
) -> None:
    """A console made and used in the parent (its monitor thread running, a viewer's one
    allowed stream open) and then forked, as a server forking its workers after loading the
    app: the child admits that viewer's stream (the parent's is not the child's), pushes a run
    created after the fork within a few polls (a monitor thread of its own), and dropping the
    parent's stream object frees no slot of the child's; the parent's stream goes on."""
    from outbound_heartbeat.console import Console

    from ..console_support import viewer_from_any_cookie

    console = Console(lambda: psycopg.connect(dsn, autocommit=True), viewer_from_any_cookie,
                      listen=False, poll_interval=0.2, max_streams_per_viewer=1,
                      stream_seconds=30)
    try:
        parents = console.handle(stream_request("biz:91"))
        assert parents.status == 200
        assert frame_with(parents.body, b"event: runs", 5)  # the monitor runs in the parent
        assert console.handle(stream_request("biz:91")).status == 429  # one per viewer
        read_end, write_end = os.pipe()

        def child() -> str:
            mine = console.handle(stream_request("biz:91"))
            if mine.status != 200:
                return f"refused {mine.status}"
            if console.handle(stream_request("biz:91")).status != 429:
                return "the child's own limit was not kept"
            with psycopg.connect(dsn, autocommit=True) as own:
                run = service.create_run(own, 91, [{}])
            if not frame_with(mine.body, f'data-run=\\"{run.id}\\"'.encode(), 5):
                return "the child's stream never showed the new run"
            parents.body.close()  # the parent's stream object, inherited: not the child's slot
            return "ok" if console.streams.open() == 1 else "the parent's stream freed a slot"

        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                os.write(write_end, child().encode())
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        os.close(write_end)
        with os.fdopen(read_end) as said:
            answer = said.read()
        _, status = os.waitpid(pid, 0)
        assert (os.waitstatus_to_exitcode(status), answer) == (0, "ok")
        run = service.create_run(conn, 91, [{}])
        assert frame_with(parents.body, f'data-run=\\"{run.id}\\"'.encode(), 5)
        assert console.streams.open() == 1  # the parent's own, untouched by the child
    finally:
        console.close()
