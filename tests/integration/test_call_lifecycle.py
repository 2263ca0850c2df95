"""A call's whole life as deployed: handed out, orphaned by a dead worker, settled by its status
callback or by the orphan timeout, all logged in as the app role (grant_app_role(), no
superuser); the status callback through the Flask and FastAPI endpoints with the app's
connections going through PgBouncer in transaction mode (prepare_threshold=None); and the call
guarantees (docs/guarantees.md) in each lease kind, twin and route, inside the app's
transaction, and across a lost answer."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import time
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from typing import Any

import psycopg
import pytest

from outbound_heartbeat import LeaseLost, service, service_async
from outbound_heartbeat.testing import Server

from ..helpers import LEASE_INTERVAL, leased, login_dsn, snapshot, until
from ..pgbouncer import start_pgbouncer
from ..proxy import proxy_for
from ..workers import Worker

Conn = psycopg.Connection[Any]

KEY = re.compile(r"^oh1-(\d+)-(\d+)-(\d+)-[0-9a-f]{32}$")


def call_row(conn: Conn, job_id: int) -> tuple[Any, ...]:
    row = conn.execute("SELECT status, call_key, orphaned_at IS NOT NULL, orphan_reason, call_outcome"
                       " FROM outbound_call_jobs WHERE id = %s", (job_id,)).fetchone()
    assert row is not None
    return tuple(row)


def settlements(conn: Conn, job_id: int) -> list[str]:
    rows = conn.execute(
        "SELECT event FROM outbound_heartbeat.run_events"
        " WHERE event IN ('call_resolved', 'call_timed_out') AND (detail ->> 'job_id')::bigint = %s"
        " ORDER BY id", (job_id,)).fetchall()
    return [r[0] for r in rows]


def late_reports(conn: Conn, job_id: int) -> list[str]:
    rows = conn.execute(
        "SELECT detail ->> 'reported' FROM outbound_heartbeat.run_events"
        " WHERE event = 'call_late_callback' AND (detail ->> 'job_id')::bigint = %s ORDER BY id",
        (job_id,)).fetchall()
    return [r[0] for r in rows]


def orphan_gauges(conn: Conn) -> dict[str, float]:
    return {m.name: m.value for m in service.metrics(conn) if "orphan" in m.name}


def orphan_alerts(conn: Conn) -> list[tuple[str, str, int | None]]:
    return [(a.severity, a.check_name, a.run_id)
            for a in service.health_check(conn, alert_after=timedelta(milliseconds=1))
            if "orphan" in a.check_name]


@pytest.mark.slow  # a real worker process, SIGKILLed; thresholds of seconds waited for real
def test_the_call_lifecycle_as_the_app_role(dsn: str, conn: Conn, roles: dict[str, str]) -> None:
    # The DBA's part: short thresholds for this database (a setting, not the app's to change).
    conn.execute("UPDATE outbound_heartbeat.settings SET stale_after = interval '2 seconds',"
                 " call_orphan_timeout = interval '2 seconds'")
    app_dsn = login_dsn(dsn, roles["app"])
    with psycopg.connect(app_dsn, autocommit=True) as app:
        assert app.execute("SELECT current_user, rolsuper FROM pg_roles WHERE rolname = current_user"
                           ).fetchone() == (roles["app"], False)
        killed_run = service.create_run(app, 1, [{"n": i} for i in range(3)])
        stale_run = service.create_run(app, 2, [{"n": i} for i in range(3)])

        # 1. A worker process logged in as the app role takes a call and dies in it (SIGKILL).
        worker = Worker(app_dsn, "--run-id", str(killed_run.id), "--hang-on-job", "1",
                        "--interval", "0.5", "--worker-id", "app-dialer")
        try:
            dialing = worker.wait_for("dialing", timeout=30)
            worker.signal(signal.SIGKILL)
            worker.wait_exit(10)
        finally:
            worker.close()
        killed_job = dialing["job_id"]

        # 2. The app's own lease on the other run: next_job gives a key, a retried next_job
        # (the same request id: its answer was lost) the same job and the same key.
        claim = service.claim_run(app, "app-inline", stale_run.id)
        assert claim is not None
        take = "SELECT id, call_key FROM outbound_heartbeat.next_job(%s, %s, %s, 'req-1')"
        lease = (claim.run_id, claim.worker_id, claim.lease_epoch)
        first = app.execute(take, lease).fetchone()
        assert first is not None and app.execute(take, lease).fetchone() == first
        match = KEY.match(first[1])
        assert match and (int(match[1]), int(match[2])) == (first[0], claim.lease_epoch)
        stale_job = first[0]

        # 3. The read path, as the app role, stops the dead worker's run: its call is orphaned,
        # and the view, the metrics and the health check all say so.
        deadline = time.monotonic() + 20
        while service.get_active_run(app, 1) is not None:
            assert time.monotonic() < deadline, "the dead worker's run was never stopped"
            time.sleep(0.2)
        status, killed_key, orphaned, reason, outcome = call_row(app, killed_job)
        assert (status, orphaned, reason, outcome) == (
            "in_progress", True, "run stopped: worker heartbeat stale", None)
        assert KEY.match(killed_key)
        assert app.execute("SELECT job_id, run_id, orphan_reason FROM outbound_heartbeat.orphaned_calls"
                           ).fetchall() == [(killed_job, killed_run.id, reason)]
        assert orphan_gauges(app)["outbound_heartbeat_orphaned_calls"] == 1
        assert orphan_alerts(app) == [("warning", "orphaned_calls", killed_run.id)]

        # 4. Its status callback, as the app role's endpoint makes it: settled once.
        assert service.resolve_call(app, killed_key, "completed", "answered", 1).answer == "resolved"
        before = snapshot(app)
        assert service.resolve_call(app, killed_key, "completed", "answered", 1).answer == "already_resolved"
        assert snapshot(app) == before
        assert call_row(app, killed_job)[0::4] == ("completed", "completed")
        assert orphan_gauges(app)["outbound_heartbeat_orphaned_calls"] == 0

        # 5. The app's own lease goes stale (nobody beats it): the sweep, as the app role, stops
        # the run and orphans its call, which no callback settles: the sweep fails it after
        # call_orphan_timeout, once.
        time.sleep(2.1)
        assert [(r.run_id, r.reason) for r in service.cleanup_stuck_runs(app)] == [
            (stale_run.id, "stale_heartbeat")]
        assert call_row(app, stale_job)[:4] == ("in_progress", first[1], True,
                                                "run stopped: worker heartbeat stale")
        assert orphan_alerts(app) == [("warning", "orphaned_calls", stale_run.id)]
        deadline = time.monotonic() + 20
        while call_row(app, stale_job)[0] == "in_progress":
            assert time.monotonic() < deadline, "the orphan was never timed out"
            time.sleep(0.3)
            service.cleanup_stuck_runs(app)
        assert call_row(app, stale_job)[0::4] == ("failed", "timed_out")
        late = service.resolve_call(app, first[1], "completed", None, 2)
        assert (late.answer, late.call_outcome) == ("already_resolved", "timed_out")
        assert (settlements(app, killed_job), settlements(app, stale_job)) == (
            ["call_resolved"], ["call_timed_out"])
        gauges = orphan_gauges(app)
        assert (gauges["outbound_heartbeat_orphaned_calls"],
                gauges["outbound_heartbeat_oldest_orphaned_call_age_seconds"]) == (0, 0)
        assert orphan_alerts(app) == []
        assert app.execute("SELECT * FROM outbound_heartbeat.verify_events()").fetchall() == []


# -- the status callback through PgBouncer -----------------------------------------------------

@contextlib.contextmanager
def callback_client(kind: str, bounced: str) -> Iterator[Any]:
    """A test client of the app's status-callback endpoint whose connections go through
    PgBouncer without prepared statements, as docs/embedding.md says to configure them."""
    options: dict[str, Any] = {"autocommit": True, "prepare_threshold": None}
    if kind == "flask":
        from flask import Flask, request
        from psycopg_pool import ConnectionPool

        from outbound_heartbeat.contrib.flask import create_blueprint

        def flask_tenant() -> int | None:
            raw = request.headers.get("X-Business-Id")
            return int(raw) if raw else None

        with ConnectionPool(bounced, kwargs=options, min_size=2, max_size=4) as pool:
            app = Flask("callbacks")
            app.register_blueprint(create_blueprint(pool, flask_tenant, locale="en"))
            yield app.test_client()
    else:
        from fastapi import FastAPI, Header
        from fastapi.testclient import TestClient

        from outbound_heartbeat.contrib.fastapi import create_router

        async def fastapi_tenant(x_business_id: str | None = Header(default=None)) -> int | None:
            return int(x_business_id) if x_business_id else None

        @contextlib.asynccontextmanager
        async def connect() -> AsyncIterator[psycopg.AsyncConnection[Any]]:
            async with await psycopg.AsyncConnection.connect(bounced, **options) as c:
                yield c

        api = FastAPI()
        api.include_router(create_router(connect, fastapi_tenant, locale="en"))
        with TestClient(api) as client:
            yield client


def post(client: Any, key: str, outcome: str, detail: str | None = None) -> tuple[int, str, str, Any]:
    response = client.post(f"/api/outbound_calls/calls/{key}/status",
                           json={"outcome": outcome, "detail": detail}, headers={"X-Business-Id": "1"})
    body = response.get_json() if hasattr(response, "get_json") else response.json()
    return response.status_code, body["answer"], body["status"], body["call_outcome"]


def session_state(conn: Conn) -> tuple[Any, ...]:
    row = conn.execute("SELECT current_setting('lock_timeout'), current_setting('search_path'),"
                       " current_setting('TimeZone'), current_setting('statement_timeout')").fetchone()
    assert row is not None
    return tuple(row)


@pytest.mark.needs("pgbouncer")
@pytest.mark.parametrize("kind", ["flask", "fastapi"])
def test_status_callbacks_through_pgbouncer(kind: str, pg_server: Server, dsn: str, conn: Conn) -> None:
    # One server connection behind the pooler: every client's transactions share it, so any
    # session state a callback left behind would be seen by the next one, and by the check below.
    bouncer = start_pgbouncer(pg_server.dsn, pool_size=1)
    try:
        bounced = bouncer.dsn_for(dsn)
        run = service.create_run(conn, 1, [{"n": i} for i in range(4)])
        claim = service.claim_run(conn, "w1", run.id)
        assert claim is not None
        lease = (claim.run_id, claim.worker_id, claim.lease_epoch)
        answered, busy, retried = (service.next_job(conn, *lease) for _ in range(3))
        assert answered and busy and retried
        # The app puts one call back in the queue and dials it again: a second attempt, a new key.
        conn.execute("UPDATE outbound_call_jobs SET status = 'queued' WHERE id = %s", (retried.id,))
        again = service.next_job(conn, *lease)
        assert again is not None and again.id == retried.id and again.call_key != retried.call_key
        service.force_cancel(conn, run.id)  # all three calls in flight are orphaned
        assert conn.execute("SELECT count(*) FROM outbound_heartbeat.orphaned_calls").fetchone() == (3,)
        with psycopg.connect(bounced, autocommit=True, prepare_threshold=None) as through:
            clean = session_state(through)

        with callback_client(kind, bounced) as client:
            # A duplicate: the provider retries a callback it already delivered.
            assert post(client, answered.call_key or "", "completed", "answered") == (
                200, "resolved", "completed", "completed")
            before = snapshot(conn)
            for _ in range(3):
                assert post(client, answered.call_key or "", "completed", "answered") == (
                    200, "already_resolved", "completed", "completed")
            assert snapshot(conn) == before
            # Out of order: the final 'failed' first, a contradicting 'completed' after it.
            assert post(client, busy.call_key or "", "failed", "busy") == (200, "resolved", "failed", "failed")
            jobs = conn.execute("SELECT * FROM outbound_call_jobs ORDER BY id").fetchall()
            for _ in range(2):
                assert post(client, busy.call_key or "", "completed") == (
                    200, "already_resolved", "failed", "failed")
            assert conn.execute("SELECT * FROM outbound_call_jobs ORDER BY id").fetchall() == jobs
            # The contradiction is audited, once, and changes nothing.
            assert late_reports(conn, busy.id) == ["completed"]
            # Out of order across attempts: the newer attempt's callback first, then the older
            # attempt's, which settles nothing of the newer one.
            assert post(client, again.call_key or "", "completed") == (
                200, "resolved", "completed", "completed")
            before = snapshot(conn)
            assert post(client, retried.call_key or "", "failed") == (
                200, "superseded", "completed", None)
            assert snapshot(conn) == before

        assert [settlements(conn, j.id) for j in (answered, busy, retried)] == [["call_resolved"]] * 3
        assert conn.execute("SELECT count(*) FROM outbound_heartbeat.orphaned_calls").fetchone() == (0,)
        with psycopg.connect(bounced, autocommit=True, prepare_threshold=None) as through:
            assert session_state(through) == clean  # the shared server session left as found
    finally:
        bouncer.stop()


# -- every lease kind, twin and route ----------------------------------------------------------

SHARES = [pytest.param(True, id="shared"), pytest.param(False, id="dedicated")]


@pytest.mark.parametrize("route", ["direct", "pgbouncer"], indirect=True)
@pytest.mark.parametrize("twin", ["sync", "async"])
@pytest.mark.parametrize("share", SHARES)
def test_a_leases_calls_are_keyed_orphaned_and_settled_once(
        conn: Conn, dsn: str, share: bool, twin: str) -> None:
    run = service.create_run(conn, 1, [{"n": i} for i in range(4)])
    with leased(twin, dsn, f"keyed-{twin}", run.id, share) as lease:
        done = lease.next_job()
        lease.finish_job(done)
        answered, unanswered = lease.next_job(), lease.next_job()
        keys = [job.call_key for job in (done, answered, unanswered)]
        assert all(KEY.match(k or "") for k in keys) and len(set(keys)) == 3, keys
        assert [call_row(conn, j.id)[1] for j in (answered, unanswered)] == keys[1:]
        service.force_cancel(conn, run.id, business_id=1)
        until(lambda: lease.lost, 2 * LEASE_INTERVAL + 3, "the lease never learned it")
        with pytest.raises(LeaseLost):
            lease.finish_job(answered)  # the worker's late finish settles nothing
    orphaned = conn.execute("SELECT job_id FROM outbound_heartbeat.orphaned_calls ORDER BY job_id"
                            ).fetchall()
    assert orphaned == [(answered.id,), (unanswered.id,)]  # the finished call is not orphaned
    # The callback, on the route and twin under test, twice: settled once.
    # The other never gets one: past call_orphan_timeout, the sweep fails it.
    conn.execute("UPDATE outbound_call_jobs SET orphaned_at = now() - interval '2 hours' WHERE id = %s",
                 (unanswered.id,))
    key = answered.call_key or ""
    answers: list[str]
    if twin == "sync":
        with psycopg.connect(dsn, autocommit=True) as c:
            answers = [str(service.resolve_call(c, key, "completed").answer) for _ in range(2)]
            service.cleanup_stuck_runs(c)
            service.cleanup_stuck_runs(c)
    else:
        async def callbacks_then_sweeps() -> list[str]:
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as c:
                said = [str((await service_async.resolve_call(c, key, "completed")).answer)
                        for _ in range(2)]
                await service_async.cleanup_stuck_runs(c)
                await service_async.cleanup_stuck_runs(c)
                return said
        answers = asyncio.run(callbacks_then_sweeps())
    assert answers == ["resolved", "already_resolved"]  # the callback, sent twice: settled once
    assert [call_row(conn, j.id)[0::4] for j in (answered, unanswered)] == [
        ("completed", "completed"), ("failed", "timed_out")]
    assert [settlements(conn, j.id) for j in (done, answered, unanswered)] == [
        [], ["call_resolved"], ["call_timed_out"]]


# -- inside the app's transaction, and a savepoint of it -----------------------------------------

@pytest.mark.parametrize("block", ["transaction", "nested"])
def test_ends_callbacks_and_timeouts_inside_the_apps_transaction(conn: Conn, dsn: str, block: str) -> None:
    run = service.create_run(conn, 1, [{"n": i} for i in range(3)])
    claim = service.claim_run(conn, "w", run.id)
    assert claim is not None
    answered, unanswered = (service.next_job(conn, run.id, "w", claim.lease_epoch) for _ in range(2))
    assert answered and unanswered

    class Undo(Exception):
        pass

    @contextlib.contextmanager
    def app_block(app: Conn, commit: bool) -> Iterator[None]:
        """The app's transaction (or a savepoint inside it), committed or rolled back."""
        with contextlib.suppress(Undo), app.transaction():
            if block == "nested":
                with contextlib.suppress(Undo), app.transaction():
                    yield
                    if not commit:
                        raise Undo
            else:
                yield
                if not commit:
                    raise Undo

    def orphans() -> list[int]:
        return [r[0] for r in conn.execute(
            "SELECT job_id FROM outbound_heartbeat.orphaned_calls ORDER BY job_id").fetchall()]

    with psycopg.connect(dsn) as app:
        for commit in (False, True):
            with app_block(app, commit):
                service.force_cancel(app, run.id, 1)
            assert orphans() == ([answered.id, unanswered.id] if commit else [])
        for commit in (False, True):
            with app_block(app, commit):
                assert service.resolve_call(app, answered.call_key or "", "completed").answer == "resolved"
            assert call_row(conn, answered.id)[0] == ("completed" if commit else "in_progress")
        conn.execute("UPDATE outbound_call_jobs SET orphaned_at = now() - interval '2 hours'"
                     " WHERE id = %s", (unanswered.id,))
        for commit in (False, True):
            with app_block(app, commit):
                service.get_active_run(app, 1)  # the read path fails the business's due orphans
            assert call_row(conn, unanswered.id)[0] == ("failed" if commit else "in_progress")
    assert orphans() == []
    assert [settlements(conn, j.id) for j in (answered, unanswered)] == [["call_resolved"], ["call_timed_out"]]


# -- a lost answer (as a restart, a crash or a failover loses it) --------------------------------

def test_lost_answers_to_next_job_and_to_a_callback_change_no_key_and_settle_once(conn: Conn, dsn: str) -> None:
    run = service.create_run(conn, 1, [{"n": i} for i in range(3)])
    claim = service.claim_run(conn, "w", run.id)
    assert claim is not None
    take = "SELECT id, call_key FROM outbound_heartbeat.next_job(%s, %s, %s, 'req-1')"
    lease = (claim.run_id, claim.worker_id, claim.lease_epoch)
    with proxy_for(dsn) as (proxy, far):
        proxy.drop_answer_to(b"outbound_heartbeat.next_job")
        with psycopg.connect(far, autocommit=True) as lossy, pytest.raises(psycopg.OperationalError):
            lossy.execute(take, lease)
        assert proxy.dropped == 1
        proxy.heal()
        with psycopg.connect(far, autocommit=True) as again:
            taken = again.execute(take, lease).fetchone()
        assert taken is not None
        # The server committed the lost call: the re-sent one answers its job and its key.
        assert conn.execute("SELECT id, call_key FROM outbound_call_jobs WHERE status = 'in_progress'"
                            ).fetchall() == [taken]
        service.force_cancel(conn, run.id)
        proxy.drop_answer_to(b"outbound_heartbeat.resolve_call")
        with psycopg.connect(far, autocommit=True) as lossy, pytest.raises(psycopg.OperationalError):
            service.resolve_call(lossy, taken[1], "completed")
        assert proxy.dropped == 2
        proxy.heal()
        with psycopg.connect(far, autocommit=True) as again:
            retried = service.resolve_call(again, taken[1], "completed")
    # The lost callback settled it; its retry finds it settled the same way, written once.
    assert (retried.answer, retried.status, retried.call_outcome) == ("already_resolved", "completed", "completed")
    assert settlements(conn, taken[0]) == ["call_resolved"]
