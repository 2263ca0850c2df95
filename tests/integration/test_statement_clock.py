"""Liveness follows the database's clock at the moment of the statement, never the start of the
caller's transaction (now()), and a heartbeat never moves last_heartbeat_at back.

The scene: stale_after 4 s, a lease beating every second on its own connection; the app opens
a transaction, works 5 s, then calls heartbeat() / next_job() / heartbeat_leases() in it and
commits. The heartbeat's age must not jump, the run must not be stopped and the lease's own
beats must go on answering 'ok'. And a reader inside a long transaction must see a dead run as
dead. Real time is the behaviour here (5 s of app work each), hence a slow module.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import psycopg
import pytest

from outbound_heartbeat import service, service_async
from outbound_heartbeat.records import Claim

from ..helpers import job_statuses, run_row

pytestmark = pytest.mark.slow

Conn = psycopg.Connection[Any]

STALE_AFTER = 4.0
BEAT_EVERY = 1.0
APP_WORK = 5.0


def set_stale_after(conn: Conn, seconds: float) -> None:
    conn.execute(
        "UPDATE outbound_heartbeat.settings SET stale_after = make_interval(secs => %s)",
        (seconds,),
    )


def heartbeat_age(dsn: str, run_id: int) -> float:
    """The heartbeat's age on the database clock, read from a fresh autocommit connection."""
    with psycopg.connect(dsn, autocommit=True) as other:
        row = other.execute(
            "SELECT extract(epoch FROM clock_timestamp() - last_heartbeat_at)::float8"
            " FROM outbound_call_runs WHERE id = %s",
            (run_id,),
        ).fetchone()
    assert row is not None and row[0] is not None
    return float(row[0])


def claimed_run(conn: Conn, business: int, jobs: int = 5) -> Claim:
    run = service.create_run(conn, business, [{"n": i} for i in range(jobs)])
    claim = service.claim_run(conn, f"worker-{run.id}", run.id)
    assert claim is not None
    return claim


@contextmanager
def beating(dsn: str, claim: Claim) -> Iterator[list[str]]:
    """The lease's own heartbeat: every BEAT_EVERY seconds on a connection of its own."""
    answers: list[str] = []
    stop = threading.Event()

    def loop() -> None:
        with psycopg.connect(dsn, autocommit=True) as beat_conn:
            while not stop.is_set():
                answers.append(service.heartbeat(
                    beat_conn, claim.run_id, claim.worker_id, claim.lease_epoch))
                stop.wait(BEAT_EVERY)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 5
        while not answers and time.monotonic() < deadline:
            time.sleep(0.05)
        assert answers == ["ok"]
        yield answers
    finally:
        stop.set()
        thread.join(10)


def call_in_app_transaction(app: Conn, call: str, claim: Claim) -> object:
    lease = (claim.run_id, claim.worker_id, claim.lease_epoch)
    if call == "heartbeat":
        return service.heartbeat(app, *lease)
    if call == "heartbeat_nested":  # in a savepoint of the app's transaction
        with app.transaction():
            return service.heartbeat(app, *lease)
    if call == "next_job":
        job = service.next_job(app, *lease)
        assert job is not None
        return job.id
    return [status for _, status in service.heartbeat_leases(app, [lease])]


@pytest.mark.parametrize("call", ["heartbeat", "heartbeat_nested", "next_job", "heartbeat_leases"])
def test_a_call_inside_a_long_app_transaction_keeps_the_heartbeat_fresh(
    conn: Conn, dsn: str, call: str
) -> None:
    set_stale_after(conn, STALE_AFTER)
    claim = claimed_run(conn, 2901)
    with beating(dsn, claim) as answers:
        with psycopg.connect(dsn) as app:  # not autocommit: the app's own transaction
            app.execute("SELECT 1")  # the transaction (and its now()) starts here
            time.sleep(APP_WORK)  # the app's work
            before = heartbeat_age(dsn, claim.run_id)
            result = call_in_app_transaction(app, call, claim)
            app.commit()
        after = heartbeat_age(dsn, claim.run_id)
        # main: the call wrote now() = the transaction's start, 5 s back (the age jumped to 5 s)
        assert before < 2.5
        assert after < 2.5, f"{call} in the app's transaction moved the heartbeat back to {after:.1f} s"

        # Nobody may judge the run dead now: not a reader, not the lease's own next beat.
        active = service.get_active_run(conn, 2901)
        assert active is not None and active.id == claim.run_id and active.status == "running"
        time.sleep(BEAT_EVERY + 0.5)
        assert set(answers) == {"ok"}
    assert run_row(conn, claim.run_id)["status"] == "running"
    statuses = job_statuses(conn, claim.run_id)
    assert "failed" not in statuses.values()
    if call == "next_job":
        assert statuses[int(str(result))] == "in_progress"
    elif call == "heartbeat_leases":
        assert result == ["ok"]
    else:
        assert result == "ok"


def test_an_async_heartbeat_inside_a_long_app_transaction_through_pgbouncer(
    conn: Conn, dsn: str, pgbouncer: Any
) -> None:
    set_stale_after(conn, STALE_AFTER)
    claim = claimed_run(conn, 2902)
    bounced = pgbouncer.dsn_for(dsn)

    async def app_request() -> str:
        app = await psycopg.AsyncConnection.connect(bounced, prepare_threshold=None)
        async with app:
            await app.execute("SELECT 1")
            await asyncio.sleep(APP_WORK)
            status = await service_async.heartbeat(
                app, claim.run_id, claim.worker_id, claim.lease_epoch)
            await app.commit()
            return str(status)

    with beating(dsn, claim) as answers:
        assert asyncio.run(app_request()) == "ok"
        assert heartbeat_age(dsn, claim.run_id) < 2.5
        assert service.get_active_run(conn, 2902) is not None
        time.sleep(BEAT_EVERY + 0.5)
        assert set(answers) == {"ok"}


def test_a_claim_inside_a_long_app_transaction_starts_a_fresh_heartbeat(conn: Conn, dsn: str) -> None:
    set_stale_after(conn, STALE_AFTER)
    run = service.create_run(conn, 2905, [{"n": i} for i in range(3)])
    with psycopg.connect(dsn) as app:
        app.execute("SELECT 1")
        time.sleep(APP_WORK)
        claim = service.claim_run(app, "claimer", run.id)
        assert claim is not None
        app.commit()
    # main: the claim wrote the transaction's start, so the fresh lease was already stale.
    assert heartbeat_age(dsn, run.id) < 2.5
    assert service.get_active_run(conn, 2905) is not None
    assert service.heartbeat(conn, claim.run_id, claim.worker_id, claim.lease_epoch) == "ok"
    assert run_row(conn, run.id)["status"] == "running"


@pytest.mark.parametrize("where", ["transaction", "savepoint"])
def test_a_reader_inside_a_long_transaction_sees_a_dead_run_as_dead(
    conn: Conn, dsn: str, where: str
) -> None:
    set_stale_after(conn, STALE_AFTER)
    with psycopg.connect(dsn) as reader:
        reader.execute("SELECT 1")  # the reader's transaction starts; its now() stays here
        claim = claimed_run(conn, 2903)  # beats once (the claim), then its worker dies
        time.sleep(APP_WORK)
        # "savepoint": the reads and the stop in a savepoint of that transaction (nested)
        with reader.transaction() if where == "savepoint" else contextlib.nullcontext():
            runs = {r.id: r for r in service.list_active_runs(reader)}
            assert runs[claim.run_id].stale, "a run silent for 5 s (stale_after 4 s) looked fresh"
            assert runs[claim.run_id].heartbeat_age is not None
            assert runs[claim.run_id].heartbeat_age.total_seconds() > STALE_AFTER
            row = reader.execute(
                "SELECT stale FROM outbound_heartbeat.active_runs WHERE id = %s", (claim.run_id,)
            ).fetchone()
            assert row == (True,)
            alerts = service.health_check(reader, alert_after=timedelta(seconds=STALE_AFTER))
            assert [a.run_id for a in alerts if a.check_name == "stale_heartbeat"] == [claim.run_id]
            # The read path stops it, in the reader's transaction.
            assert service.get_active_run(reader, 2903) is None
        reader.commit()
    assert run_row(conn, claim.run_id)["status"] == "stopped"
    assert job_statuses(conn, claim.run_id) and set(job_statuses(conn, claim.run_id).values()) == {"failed"}


def test_a_heartbeat_that_waited_for_the_row_never_writes_an_older_time(conn: Conn, dsn: str) -> None:
    """A beat whose statement (and transaction) started earlier but got the row later keeps the
    newer beat that was committed meanwhile."""
    set_stale_after(conn, 30)
    claim = claimed_run(conn, 2904)
    lease = (claim.run_id, claim.worker_id, claim.lease_epoch)
    waiting: list[str] = []
    with psycopg.connect(dsn) as app, psycopg.connect(dsn) as holder:
        app.execute("SELECT 1")  # the app's transaction starts first
        time.sleep(0.2)
        holder.execute("SELECT 1 FROM outbound_call_runs WHERE id = %s FOR UPDATE", (claim.run_id,))

        def early_beat() -> None:  # the app beats in its transaction and waits for the row
            waiting.append(service.heartbeat(app, *lease))
            app.commit()

        thread = threading.Thread(target=early_beat)
        thread.start()
        time.sleep(1.0)
        # The row holder beats later (its statement starts a second after the waiting one) ...
        assert service.heartbeat(holder, *lease) == "ok"
        row = holder.execute(
            "SELECT last_heartbeat_at FROM outbound_call_runs WHERE id = %s", (claim.run_id,)
        ).fetchone()
        assert row is not None
        holder.commit()
        thread.join(10)
    assert waiting == ["ok"]
    # ... and the beat that waited for the row does not move it back.
    assert run_row(conn, claim.run_id)["last_heartbeat_at"] >= row[0]


@pytest.mark.parametrize("call", ["heartbeat", "heartbeat_leases", "next_job"])
def test_a_beat_after_the_clock_went_back_does_not_keep_a_time_in_the_future(
    conn: Conn, dsn: str, call: str
) -> None:
    """Beats written before the server's clock was stepped back an hour (NTP, a promoted standby
    whose clock lags) lie in its future: the next beat must bring the heartbeat back to the
    clock, or the run of a lease that dies then would look alive for that hour."""
    set_stale_after(conn, STALE_AFTER)
    claim = claimed_run(conn, 2905)
    lease = (claim.run_id, claim.worker_id, claim.lease_epoch)
    conn.execute("UPDATE outbound_call_runs SET last_heartbeat_at = clock_timestamp() + interval '1 hour'"
                 " WHERE id = %s", (claim.run_id,))
    if call == "heartbeat":
        assert service.heartbeat(conn, *lease) == "ok"
    elif call == "heartbeat_leases":
        assert service.heartbeat_leases(conn, [lease]) == [(claim.run_id, "ok")]
    else:
        assert service.next_job(conn, *lease) is not None
    assert heartbeat_age(dsn, claim.run_id) >= 0
    # The lease dies now: its run is judged stale after stale_after, not after the hour.
    conn.execute("UPDATE outbound_call_runs SET last_heartbeat_at = last_heartbeat_at - %s"
                 " WHERE id = %s", (timedelta(seconds=STALE_AFTER + 1), claim.run_id))
    service.get_active_run(conn, 2905)
    assert run_row(conn, claim.run_id)["status"] == "stopped"
