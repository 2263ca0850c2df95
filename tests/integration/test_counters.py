"""The counters behind polls and metrics() (sql/06_counters.sql) stay exact: open jobs per run
and runs by status, whoever writes (the API, the app's own UPDATEs, DELETE, TRUNCATE), under
concurrent transitions from several connections, through force-cancel, stale stop, finish_run
and cleanup, after the merge prune_events() does, and after adopting legacy tables with rows."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import threading
import time
import uuid
from typing import Any

import psycopg
import pytest
from psycopg import sql

from outbound_heartbeat import InvalidArgument, migrate, schema, service

from ..helpers import (
    TEST_SETTINGS,
    assert_exact,
    backdate_heartbeat,
    kept_job_counts,
    kept_run_counts,
    private_server,
    seed_legacy,
    true_job_counts,
    true_run_counts,
)

Conn = psycopg.Connection[Any]


def test_api_transitions_keep_counts_exact(conn: Conn) -> None:
    runs = [service.create_run(conn, b, [{"n": i} for i in range(5)]) for b in (1, 2, 3, 4, 5)]
    assert (runs[0].queued_jobs, runs[0].in_progress_jobs) == (5, 0)
    assert_exact(conn)
    leases = {r.id: service.claim_run(conn, f"w{r.id}", r.id) for r in runs}
    for run in runs:
        lease = leases[run.id]
        assert lease is not None
        for _ in range(2):
            job = service.next_job(conn, run.id, lease.worker_id, lease.lease_epoch)
            assert job is not None
        service.finish_job(conn, job.id, lease.worker_id, lease.lease_epoch, "completed")
    assert_exact(conn)
    active = service.get_active_run(conn, 1)
    assert active is not None and (active.queued_jobs, active.in_progress_jobs) == (3, 1)

    # force-cancel fails the queued jobs; the in-progress one stays open.
    assert service.force_cancel(conn, runs[0].id).jobs_cancelled == 3
    assert_exact(conn)
    # stale stop through the read path
    backdate_heartbeat(conn, runs[1].id, 3600)
    assert service.get_active_run(conn, 2) is None
    assert_exact(conn)
    # finish_run fails the leftovers
    lease = leases[runs[2].id]
    assert lease is not None
    assert service.finish_run(conn, runs[2].id, lease.worker_id, lease.lease_epoch, "failed").jobs_failed == 3
    assert_exact(conn)
    # the sweep: a stale run stopped, and a run with nothing left completed
    backdate_heartbeat(conn, runs[3].id, 3600)
    conn.execute("UPDATE outbound_call_jobs SET status = 'completed' WHERE run_id = %s", (runs[4].id,))
    reasons = {r.run_id: r.reason for r in service.cleanup_stuck_runs(conn)}
    assert reasons == {runs[3].id: "stale_heartbeat", runs[4].id: "empty"}
    assert_exact(conn)
    assert kept_run_counts(conn) == {"cancelled": 1, "stopped": 2, "failed": 1, "completed": 1}


def test_app_side_writes_keep_counts_exact(conn: Conn) -> None:
    """The app's telephony callbacks write job status directly; it may insert, re-key, delete
    and truncate too. The triggers see every one of those writers."""
    a = service.create_run(conn, 1, [{}] * 6)
    b = service.create_run(conn, 2, [{}] * 4)
    conn.execute("UPDATE outbound_call_jobs SET status = 'in_progress' WHERE run_id = %s AND id %% 2 = 0", (a.id,))
    conn.execute("UPDATE outbound_call_jobs SET status = 'completed' WHERE run_id = %s AND id %% 3 = 0", (a.id,))
    conn.execute("UPDATE outbound_call_jobs SET payload = '{\"x\": 1}'")  # no status change at all
    conn.execute("INSERT INTO outbound_call_jobs (run_id, business_id, status) VALUES (%s, 2, 'in_progress')",
                 (b.id,))
    conn.execute("UPDATE outbound_call_jobs SET run_id = %s WHERE id = (SELECT min(id) FROM outbound_call_jobs"
                 " WHERE run_id = %s AND status = 'queued')", (b.id, a.id))
    assert_exact(conn)
    conn.execute("DELETE FROM outbound_call_jobs WHERE run_id = %s AND status = 'queued'", (b.id,))
    assert_exact(conn)
    conn.execute("INSERT INTO outbound_call_runs (business_id, status) VALUES (9, 'paused_by_app')")
    conn.execute("UPDATE outbound_call_runs SET status = 'pending' WHERE status = 'paused_by_app'")
    conn.execute("UPDATE outbound_call_runs SET status = 'paused_by_app' WHERE status = 'pending' AND business_id = 9")
    assert_exact(conn)
    conn.execute("DELETE FROM outbound_call_runs WHERE business_id = 9")
    assert_exact(conn)
    conn.execute("TRUNCATE outbound_call_jobs, outbound_call_runs")
    assert kept_job_counts(conn) == {} and kept_run_counts(conn) == {}
    service.create_run(conn, 3, [{}])
    assert_exact(conn)


def test_heartbeats_touch_no_counter(conn: Conn) -> None:
    run = service.create_run(conn, 1, [{}, {}])
    lease = service.claim_run(conn, "w", run.id)
    assert lease is not None
    before = conn.execute("SELECT * FROM outbound_heartbeat.totals ORDER BY 1, 2, 3").fetchall()
    jobs_before = conn.execute("SELECT * FROM outbound_heartbeat.job_counts ORDER BY 1, 2").fetchall()
    for _ in range(20):
        assert service.heartbeat(conn, run.id, "w", lease.lease_epoch) == "ok"
    assert conn.execute("SELECT * FROM outbound_heartbeat.totals ORDER BY 1, 2, 3").fetchall() == before
    assert conn.execute("SELECT * FROM outbound_heartbeat.job_counts ORDER BY 1, 2").fetchall() == jobs_before


def test_concurrent_transitions_from_many_connections_stay_exact(conn: Conn, dsn: str) -> None:
    """Workers dialing, the app's callbacks finishing and requeueing jobs, transactions that
    touch two runs in opposite orders, cancels and the counter merge, all at once."""
    runs = [service.create_run(conn, b, [{"n": i} for i in range(150)]) for b in (1, 2, 3, 4)]
    errors: list[BaseException] = []
    stop = threading.Event()

    def guarded(fn: Any) -> Any:
        def body(*args: Any) -> None:
            try:
                fn(*args)
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)
                stop.set()
        return body

    @guarded
    def worker(run_id: int) -> None:
        with psycopg.connect(dsn, autocommit=True) as c:
            lease = service.claim_run(c, f"w-{run_id}", run_id)
            assert lease is not None
            for _ in range(400):
                if stop.is_set():
                    return
                job = service.next_job(c, run_id, lease.worker_id, lease.lease_epoch)
                if job is None:
                    return
                if job.id % 5:
                    # the app's callback may have finished or requeued it first
                    with contextlib.suppress(InvalidArgument):
                        service.finish_job(c, job.id, lease.worker_id, lease.lease_epoch, "completed")

    @guarded
    def callbacks(seed: int) -> None:
        rng = random.Random(seed)
        with psycopg.connect(dsn, autocommit=True) as c:
            while not stop.is_set():
                if rng.random() < 0.5:
                    c.execute("UPDATE outbound_call_jobs SET status = 'completed', updated_at = now()"
                              " WHERE id IN (SELECT id FROM outbound_call_jobs WHERE status = 'in_progress'"
                              " ORDER BY random() LIMIT 3 FOR UPDATE SKIP LOCKED)")
                else:
                    c.execute("UPDATE outbound_call_jobs SET status = 'queued'"
                              " WHERE id IN (SELECT id FROM outbound_call_jobs WHERE status = 'in_progress'"
                              " ORDER BY random() LIMIT 1 FOR UPDATE SKIP LOCKED)")

    @guarded
    def crossing(order: int) -> None:
        # Two runs touched in opposite orders by two transactions: the job rows differ, and the
        # counter rows are per backend, so neither waits on the other.
        first, second = (runs[0].id, runs[1].id) if order == 0 else (runs[1].id, runs[0].id)
        with psycopg.connect(dsn) as c:
            for _ in range(30):
                if stop.is_set():
                    return
                with c.transaction():
                    for run_id in (first, second):
                        c.execute("UPDATE outbound_call_jobs SET error_message = %s"
                                  " WHERE id = (SELECT id FROM outbound_call_jobs WHERE run_id = %s"
                                  " AND id %% 2 = %s ORDER BY id LIMIT 1)", (str(uuid.uuid4()), run_id, order))

    @guarded
    def merger() -> None:
        with psycopg.connect(dsn, autocommit=True) as c:
            while not stop.is_set():
                service.prune_events(c, 50, 1)

    threads = [threading.Thread(target=worker, args=(r.id,)) for r in runs[:3]]
    threads += [threading.Thread(target=callbacks, args=(s,)) for s in (1, 2)]
    threads += [threading.Thread(target=crossing, args=(o,)) for o in (0, 1)]
    merging = threading.Thread(target=merger)
    for t in [*threads, merging]:
        t.start()
    service.force_cancel(conn, runs[3].id)
    for t in threads[:3]:
        t.join(120)
    stop.set()
    for t in [*threads, merging]:
        t.join(60)
    assert not errors, errors
    assert_exact(conn)
    done = conn.execute("SELECT count(*) FROM outbound_call_jobs WHERE status = 'completed'").fetchone()
    assert done is not None and done[0] > 100  # the race really ran
    # After a merge every run's count sits in one row.
    service.prune_events(conn)
    assert conn.execute("SELECT count(*) FROM (SELECT run_id FROM outbound_heartbeat.job_counts"
                        " GROUP BY run_id HAVING count(*) > 1) AS x").fetchone() == (0,)
    assert_exact(conn)


def test_counts_survive_reinstall_and_a_dropped_trigger(conn: Conn, dsn: str) -> None:
    run = service.create_run(conn, 1, [{}] * 3)
    lease = service.claim_run(conn, "w", run.id)
    assert lease is not None
    service.next_job(conn, run.id, "w", lease.lease_epoch)
    for path in schema.sql_files():  # every upgrade re-applies sql/: no double counting
        conn.execute(path.read_text())
    assert_exact(conn)
    # A DBA drops a trigger; jobs change uncounted; the next install recounts from the rows.
    conn.execute("DROP TRIGGER outbound_heartbeat_count_update ON outbound_call_jobs")
    conn.execute("UPDATE outbound_call_jobs SET status = 'completed' WHERE run_id = %s", (run.id,))
    assert kept_job_counts(conn) != true_job_counts(conn)
    migrate_again = [p.read_text() for p in schema.sql_files()]
    for text in migrate_again:
        conn.execute(text)
    assert_exact(conn)


def test_legacy_tables_with_rows_are_counted_at_adoption(empty_dsn: str) -> None:
    seed_legacy(empty_dsn)
    migrate(empty_dsn)
    with psycopg.connect(empty_dsn, autocommit=True) as c:
        c.execute(TEST_SETTINGS)
        truth = true_job_counts(c)
        assert sum(q for q, _ in truth.values()) == 5 and sum(p for _, p in truth.values()) == 2
        assert_exact(c)
        # the legacy varchar status column is counted like a text one, by the app's writes too
        c.execute("UPDATE outbound_call_jobs SET status = 'in_progress' WHERE status = 'queued'")
        c.execute("UPDATE outbound_call_runs SET status = 'cancelled' WHERE status = 'pending'")
        assert_exact(c)
        metrics = {(m.name, tuple(sorted(m.labels.items()))): m.value for m in service.metrics(c)}
        assert metrics[("outbound_heartbeat_runs", (("status", "cancelled"),))] == 2
        assert metrics[("outbound_heartbeat_runs", (("status", "pending"),))] == 0


@pytest.mark.direct_only
def test_a_role_without_library_privileges_still_updates_jobs(conn: Conn, dsn: str) -> None:
    """An app role that predates the library (UPDATE on its own tables, nothing on the schema)
    keeps writing job status; the counting trigger runs with its owner's rights."""
    role = f"oh_legacy_{uuid.uuid4().hex[:8]}"
    conn.execute(sql.SQL("CREATE ROLE {}").format(sql.Identifier(role)))
    conn.execute(sql.SQL("GRANT SELECT, INSERT, UPDATE ON outbound_call_jobs TO {}").format(sql.Identifier(role)))
    try:
        run = service.create_run(conn, 1, [{}, {}])
        with psycopg.connect(dsn, autocommit=True) as app:
            app.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
            app.execute("UPDATE outbound_call_jobs SET status = 'in_progress' WHERE run_id = %s", (run.id,))
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                app.execute("SELECT * FROM outbound_heartbeat.job_counts")
        assert_exact(conn)
        assert kept_job_counts(conn)[run.id] == (0, 2)
    finally:
        conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_one_transaction_updating_jobs_one_by_one_stays_exact(conn: Conn, dsn: str) -> None:
    """An app loop that updates jobs one at a time inside one transaction: each statement after
    the first adds an overflow row instead of rewriting its counter row again (a version chain
    every later statement would walk); the merge folds them back into one row."""
    run = service.create_run(conn, 1, [{}] * 60)
    ids = [r[0] for r in conn.execute("SELECT id FROM outbound_call_jobs WHERE run_id = %s ORDER BY id",
                                      (run.id,)).fetchall()]
    with psycopg.connect(dsn) as app, app.transaction():
        for job_id in ids[:40]:
            app.execute("UPDATE outbound_call_jobs SET status = 'in_progress' WHERE id = %s", (job_id,))
        for job_id in ids[:10]:
            app.execute("UPDATE outbound_call_jobs SET status = 'completed' WHERE id = %s", (job_id,))
    assert_exact(conn)
    assert kept_job_counts(conn)[run.id] == (20, 30)
    rows = conn.execute("SELECT count(*) FROM outbound_heartbeat.job_counts WHERE run_id = %s", (run.id,)).fetchone()
    assert rows is not None and rows[0] > 40
    service.prune_events(conn)  # merged into one of them (by UPDATE: see the TRUNCATE race)
    assert conn.execute("SELECT queued, in_progress FROM outbound_heartbeat.job_counts"
                        " WHERE run_id = %s", (run.id,)).fetchall() == [(20, 30)]
    assert_exact(conn)


# -- runs by status: noted per row, added once per statement ---------------------------------------

def runs_totals_rows(conn: Conn) -> list[tuple[Any, ...]]:
    return conn.execute("SELECT label, backend_pid, value FROM outbound_heartbeat.totals"
                        " WHERE counter = 'runs' ORDER BY 1, 2").fetchall()


def test_a_release_storm_adds_its_counts_once_per_statement(conn: Conn) -> None:
    """finish_runs() of 60 leases: one UPDATE and one INSERT of events per status, so the
    counters get one addition per label, not one (overflow) row per run."""
    leases = []
    for i in range(60):
        run = service.create_run(conn, 1, [{}, {}])
        claim = service.claim_run(conn, f"storm-{i}", run.id)
        assert claim is not None
        leases.append((run.id, claim.worker_id, claim.lease_epoch, ("completed", "failed")[i % 2]))
    rows_before = conn.execute("SELECT count(*) FROM outbound_heartbeat.totals").fetchone()
    assert rows_before is not None
    outcomes = service.finish_runs(conn, leases)
    assert {o.outcome for o in outcomes} == {"finished"}
    assert_exact(conn)
    rows_after = conn.execute("SELECT count(*) FROM outbound_heartbeat.totals").fetchone()
    assert rows_after is not None
    # two statuses: running -1 twice, completed and failed +1, 'finished' events twice
    assert rows_after[0] - rows_before[0] <= 6
    events = conn.execute("SELECT sum(value) FROM outbound_heartbeat.totals"
                          " WHERE counter = 'events' AND label = 'finished'").fetchone()
    assert events == (60,)
    # What a statement noted is folded by that statement: nothing is left over for the next.
    assert conn.execute("SELECT current_setting('outbound_heartbeat.runs_by_status', true)"
                        ).fetchone() in {("",), (None,)}


def test_a_rollback_to_savepoint_in_the_middle_keeps_counts_exact(conn: Conn, dsn: str) -> None:
    runs = [service.create_run(conn, 1, [{}]).id for _ in range(12)]
    # The app's own trigger fails on one row after the counting trigger noted the earlier ones.
    conn.execute("CREATE FUNCTION public.oh_test_refuse_boom() RETURNS trigger LANGUAGE plpgsql AS $$"
                 " BEGIN IF NEW.status = 'boom' THEN RAISE EXCEPTION 'boom'; END IF; RETURN NULL; END $$")
    conn.execute("CREATE TRIGGER zz_oh_test_refuse_boom AFTER UPDATE ON outbound_call_runs"
                 " FOR EACH ROW EXECUTE FUNCTION public.oh_test_refuse_boom()")
    try:
        with psycopg.connect(dsn) as app:
            with app.transaction():
                app.execute("UPDATE outbound_call_runs SET status = 'paused' WHERE id = ANY(%s)", (runs[:3],))
                with contextlib.suppress(psycopg.errors.RaiseException), app.transaction():
                    app.execute("UPDATE outbound_call_runs SET status = 'held' WHERE id = ANY(%s)", (runs[3:6],))
                    app.execute("UPDATE outbound_call_runs SET status = CASE WHEN id = %s THEN 'boom'"
                                " ELSE 'doomed' END WHERE id = ANY(%s)", (runs[8], runs[6:9]))
                with contextlib.suppress(RuntimeError), app.transaction():
                    app.execute("UPDATE outbound_call_runs SET status = 'rolled_back' WHERE id = ANY(%s)",
                                (runs[9:11],))
                    raise RuntimeError("rollback to savepoint")
                app.execute("UPDATE outbound_call_runs SET status = 'kept' WHERE id = %s", (runs[11],))
            assert_exact(conn)
            assert kept_run_counts(conn) == {"paused": 3, "pending": 8, "kept": 1}
    finally:
        conn.execute("DROP TRIGGER zz_oh_test_refuse_boom ON outbound_call_runs")
        conn.execute("DROP FUNCTION public.oh_test_refuse_boom()")


def test_an_apps_multi_row_and_nested_status_updates_stay_exact(conn: Conn) -> None:
    runs = [service.create_run(conn, 7, [{}]).id for _ in range(10)]
    others = [service.create_run(conn, 8, [{}]).id for _ in range(3)]
    conn.execute("UPDATE outbound_call_runs SET status = CASE WHEN id %% 3 = 0 THEN 'a' ELSE 'b' END"
                 " WHERE id = ANY(%s)", (runs,))
    assert_exact(conn)
    conn.execute("UPDATE outbound_call_runs SET status = 'b' WHERE id = ANY(%s)", (runs,))  # some unchanged
    assert_exact(conn)
    # The app's own AFTER ROW trigger updates other runs' status: a nested statement, which
    # folds what the outer one noted so far; the outer statement folds the rest.
    conn.execute("CREATE FUNCTION public.oh_test_cascade() RETURNS trigger LANGUAGE plpgsql AS $$"
                 " BEGIN IF NEW.status = 'nest' THEN UPDATE public.outbound_call_runs SET status = 'child'"
                 " WHERE business_id = 8 AND status <> 'child'; END IF; RETURN NULL; END $$")
    for name in ("aa_oh_test_cascade", "zz_oh_test_cascade"):  # before and after ours
        conn.execute(f"CREATE TRIGGER {name} AFTER UPDATE ON outbound_call_runs"
                     " FOR EACH ROW EXECUTE FUNCTION public.oh_test_cascade()")
    try:
        conn.execute("UPDATE outbound_call_runs SET status = 'nest' WHERE id = ANY(%s)", (runs[:4],))
        assert_exact(conn)
        assert kept_run_counts(conn)["child"] == len(others)
    finally:
        for name in ("aa_oh_test_cascade", "zz_oh_test_cascade"):
            conn.execute(f"DROP TRIGGER {name} ON outbound_call_runs")
        conn.execute("DROP FUNCTION public.oh_test_cascade()")
    # INSERT ... ON CONFLICT DO UPDATE and MERGE set status too.
    conn.execute("INSERT INTO outbound_call_runs (id, business_id, status) VALUES (%s, 7, 'x')"
                 " ON CONFLICT (id) DO UPDATE SET status = 'upserted'", (runs[5],))
    conn.execute("MERGE INTO outbound_call_runs AS r USING (SELECT unnest(%s::bigint[]) AS id) AS s"
                 " ON r.id = s.id WHEN MATCHED THEN UPDATE SET status = 'merged'", (runs[6:9],))
    assert_exact(conn)
    assert kept_run_counts(conn)["merged"] == 3


def test_a_heartbeat_fires_no_counting_trigger_and_stays_hot(conn: Conn) -> None:
    run = service.create_run(conn, 1, [{}])
    lease = service.claim_run(conn, "hot", run.id)
    assert lease is not None
    query = (
        "SELECT coalesce(pg_stat_get_xact_function_calls('outbound_heartbeat._note_run_status()'::regprocedure), 0)"
        "     + coalesce(pg_stat_get_xact_function_calls('outbound_heartbeat._fold_run_statuses()'::regprocedure), 0)"
        "     + coalesce(pg_stat_get_xact_function_calls('outbound_heartbeat._count_runs()'::regprocedure), 0),"
        "       pg_stat_get_xact_tuples_updated('outbound_call_runs'::regclass),"
        "       pg_stat_get_xact_tuples_hot_updated('outbound_call_runs'::regclass)")
    with conn.transaction():
        conn.execute("SET LOCAL track_functions = 'all'")
        before = conn.execute(query).fetchone()
        for _ in range(10):
            row = conn.execute("SELECT outbound_heartbeat.heartbeat(%s, 'hot', %s)", (run.id, lease.lease_epoch))
            assert row.fetchone() == ("ok",)
        after = conn.execute(query).fetchone()
    assert before is not None and after is not None
    # (pending statistics of earlier transactions may be in both readings: the difference counts)
    assert tuple(a - b for a, b in zip(after, before, strict=True)) == (0, 10, 10)


def test_an_earlier_releases_row_by_row_trigger_is_swapped_without_a_recount(conn: Conn) -> None:
    # The earlier release: one _count_runs() per changed row, no statement trigger.
    conn.execute("DROP TRIGGER outbound_heartbeat_count_status_fold ON outbound_call_runs")
    conn.execute("DROP TRIGGER outbound_heartbeat_count_status ON outbound_call_runs")
    conn.execute("CREATE TRIGGER outbound_heartbeat_count_status AFTER UPDATE OF status ON outbound_call_runs"
                 " FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)"
                 " EXECUTE FUNCTION outbound_heartbeat._count_runs()")
    runs = [service.create_run(conn, 1, [{}]).id for _ in range(4)]
    conn.execute("UPDATE outbound_call_runs SET status = 'cancelled' WHERE id = ANY(%s)", (runs[:2],))
    assert_exact(conn)
    before = runs_totals_rows(conn)
    for path in schema.sql_files():
        conn.execute(path.read_text())
    assert runs_totals_rows(conn) == before  # swapped under the lock: nothing recounted
    functions = dict(conn.execute(
        "SELECT tgname, tgfoid::regprocedure::text FROM pg_trigger"
        " WHERE tgrelid = 'outbound_call_runs'::regclass AND tgname LIKE 'outbound_heartbeat_count_status%%'"
    ).fetchall())
    assert functions == {"outbound_heartbeat_count_status": "outbound_heartbeat._note_run_status()",
                         "outbound_heartbeat_count_status_fold": "outbound_heartbeat._fold_run_statuses()"}
    conn.execute("UPDATE outbound_call_runs SET status = 'failed' WHERE id = ANY(%s)", (runs[1:],))
    assert_exact(conn)
    # A DBA drops the statement trigger: changes go uncounted; the next install recounts.
    conn.execute("DROP TRIGGER outbound_heartbeat_count_status_fold ON outbound_call_runs")
    conn.execute("UPDATE outbound_call_runs SET status = 'completed' WHERE id = ANY(%s)", (runs,))
    assert kept_run_counts(conn) != true_run_counts(conn)
    for path in schema.sql_files():
        conn.execute(path.read_text())
    assert_exact(conn)


# -- a TRUNCATE racing the merge prune_events() does ----------------------------------------------

def _blocked_on_a_lock(conn: Conn, pid: int, timeout: float = 20.0) -> None:
    """Waits until backend ``pid`` waits for a lock (a row or a table)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = conn.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
        if row is not None and row[0] == "Lock":
            return
        time.sleep(0.02)
    raise AssertionError(f"backend {pid} never waited for a lock")


def _race_truncate_with_a_merge(conn: Conn, dsn: str, statement: str) -> None:
    """The merge (inside prune_events) holds its counter rows in an open transaction while
    ``statement`` runs on another connection and waits for it; then the merge commits."""
    outcome: list[BaseException] = []
    with psycopg.connect(dsn) as merging, psycopg.connect(dsn, autocommit=True) as truncating:
        pid = truncating.info.backend_pid
        with merging.transaction():
            merged = service.prune_events(merging)
            assert merged.counter_rows_merged > 0  # the merge really took rows

            def truncate() -> None:
                try:
                    truncating.execute(statement)
                except BaseException as exc:  # reported below
                    outcome.append(exc)

            thread = threading.Thread(target=truncate)
            thread.start()
            _blocked_on_a_lock(conn, pid)
        thread.join(30)
        assert not thread.is_alive()
    assert not outcome, outcome


def _counters_from_several_backends(conn: Conn, dsn: str) -> list[int]:
    runs = [service.create_run(conn, b, [{}] * 4) for b in (1, 2)]
    with psycopg.connect(dsn, autocommit=True) as other:
        other.execute("UPDATE outbound_call_jobs SET status = 'in_progress' WHERE id % 2 = 0")
        other.execute("UPDATE outbound_call_runs SET status = 'running'")
    conn.execute("UPDATE outbound_call_runs SET status = 'failed' WHERE id = %s", (runs[1].id,))
    return [r.id for r in runs]


def test_a_truncate_of_jobs_racing_the_merge_leaves_no_phantom_count(conn: Conn, dsn: str) -> None:
    _counters_from_several_backends(conn, dsn)
    _race_truncate_with_a_merge(conn, dsn, "TRUNCATE outbound_call_jobs")
    assert true_job_counts(conn) == {}
    assert kept_job_counts(conn) == {}
    assert_exact(conn)
    active = service.get_active_run(conn, 1)
    assert active is not None and (active.queued_jobs, active.in_progress_jobs) == (0, 0)
    open_jobs = {tuple(sorted(m.labels.items())): m.value for m in service.metrics(conn)
                 if m.name == "outbound_heartbeat_open_jobs"}
    assert set(open_jobs.values()) == {0}


def test_a_truncate_of_runs_racing_the_merge_leaves_no_phantom_count(conn: Conn, dsn: str) -> None:
    _counters_from_several_backends(conn, dsn)
    _race_truncate_with_a_merge(conn, dsn, "TRUNCATE outbound_call_runs CASCADE")
    assert kept_run_counts(conn) == true_run_counts(conn) == {}
    assert kept_job_counts(conn) == {}
    assert service.verify_counters(conn) == []


def test_a_merge_waiting_behind_a_truncate_counts_nothing_twice(conn: Conn, dsn: str) -> None:
    """The other order: the TRUNCATE's transaction holds the counter rows; the merge skips
    them (SKIP LOCKED) and never waits for it."""
    _counters_from_several_backends(conn, dsn)
    with psycopg.connect(dsn) as truncating, truncating.transaction():
        truncating.execute("TRUNCATE outbound_call_jobs")
        with psycopg.connect(dsn, autocommit=True) as merging:
            merging.execute("SET lock_timeout = '5s'")
            service.prune_events(merging)
    assert kept_job_counts(conn) == true_job_counts(conn) == {}
    assert_exact(conn)


# -- writers the counting triggers do not see: detection and the online recount -------------------

def _alerts(conn: Conn, check: str) -> list[Any]:
    return [a for a in service.health_check(conn) if a.check_name == check]


def test_writes_with_the_triggers_off_are_found_and_recounted_online(conn: Conn, dsn: str) -> None:
    """session_replication_role = replica (logical replication's apply, pg_restore
    --disable-triggers, bulk loaders) fires no ordinary trigger: the counters drift."""
    runs = [service.create_run(conn, b, [{}] * 5) for b in (1, 2, 3)]
    service.claim_run(conn, "w", runs[0].id)
    service.claim_run(conn, "w2", runs[1].id)
    assert service.verify_counters(conn) == []
    with psycopg.connect(dsn, autocommit=True) as loader:
        loader.execute("SET session_replication_role = replica")
        loader.execute("INSERT INTO outbound_call_jobs (run_id, business_id, status)"
                       " SELECT %s, 1, 'queued' FROM generate_series(1, 2)", (runs[0].id,))
        loader.execute("UPDATE outbound_call_jobs SET status = 'in_progress' WHERE run_id = %s"
                       " AND id IN (SELECT id FROM outbound_call_jobs WHERE run_id = %s ORDER BY id LIMIT 2)",
                       (runs[1].id, runs[1].id))
        loader.execute("UPDATE outbound_call_runs SET status = 'completed' WHERE id = %s", (runs[1].id,))
        loader.execute("INSERT INTO outbound_call_runs (business_id, status) VALUES (9, 'completed')")
    assert kept_job_counts(conn) != true_job_counts(conn)
    assert kept_run_counts(conn) != true_run_counts(conn)
    drift = {(d.counter, d.run_id, d.status): (d.kept, d.actual) for d in service.verify_counters(conn)}
    assert drift == {
        ("jobs", runs[0].id, "queued"): (5, 7),
        ("jobs", runs[1].id, "queued"): (5, 3),
        ("jobs", runs[1].id, "in_progress"): (0, 2),
        ("runs", None, "completed"): (0, 2),
        ("runs", None, "running"): (2, 1),
    }
    # health_check finds the drift of the open statuses cheaply (the open runs only).
    assert [a.severity for a in _alerts(conn, "counter_drift")] == ["warning"]
    corrected = service.recount_counters(conn)
    assert {(d.counter, d.run_id, d.status): (d.kept, d.actual) for d in corrected} == drift
    assert_exact(conn)
    assert service.verify_counters(conn) == [] and service.recount_counters(conn) == []
    assert _alerts(conn, "counter_drift") == []
    active = service.get_active_run(conn, 1)
    assert active is not None and active.queued_jobs == 7
    service.prune_events(conn)  # the correction rows merge like any other
    assert_exact(conn)


def test_a_disabled_counting_trigger_is_reported_and_the_install_recounts(conn: Conn, dsn: str) -> None:
    run = service.create_run(conn, 1, [{}] * 5)
    other = service.create_run(conn, 2, [{}] * 2)
    assert _alerts(conn, "counting_trigger") == []
    conn.execute("ALTER TABLE outbound_call_jobs DISABLE TRIGGER USER")
    conn.execute("ALTER TABLE outbound_call_runs DISABLE TRIGGER outbound_heartbeat_count_status_fold")
    try:
        alerts = _alerts(conn, "counting_trigger")
        named = " ".join(a.detail for a in alerts)
        assert {a.severity for a in alerts} == {"warning"} and len(alerts) == 5, alerts
        assert "outbound_heartbeat_count_update" in named and "disabled" in named
        assert "outbound_heartbeat_count_status_fold" in named
        conn.execute("UPDATE outbound_call_jobs SET status = 'in_progress' WHERE run_id = %s", (run.id,))
        conn.execute("UPDATE outbound_call_runs SET status = 'completed' WHERE id = %s", (other.id,))
        assert kept_job_counts(conn) != true_job_counts(conn)
        # Re-applying sql/ (every upgrade does) notices the disabled triggers, enables them
        # and recounts; with everything in place it changes nothing.
        notices: list[str] = []
        conn.add_notice_handler(lambda d: notices.append(str(d.message_primary)))
        for path in schema.sql_files():
            conn.execute(path.read_text())
        assert any("outbound_heartbeat_count_update" in n and "disabled" in n for n in notices), notices
        assert _alerts(conn, "counting_trigger") == []
        assert_exact(conn)
        enabled = conn.execute("SELECT DISTINCT tgenabled FROM pg_trigger WHERE tgname LIKE 'outbound_heartbeat_count%%'"
                               ).fetchall()
        assert enabled == [("O",)]
    finally:
        conn.execute("ALTER TABLE outbound_call_jobs ENABLE TRIGGER USER")
        conn.execute("ALTER TABLE outbound_call_runs ENABLE TRIGGER USER")


def test_migrate_recounts_when_a_trigger_was_disabled_and_says_so(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:  # a clone of the migrated template
        run = service.create_run(c, 1, [{}] * 3)
        c.execute("ALTER TABLE outbound_call_jobs DISABLE TRIGGER outbound_heartbeat_count_update")
        c.execute("UPDATE outbound_call_jobs SET status = 'in_progress' WHERE run_id = %s", (run.id,))
        # the newest migration, which re-applies sql/, forgotten and re-run
        c.execute("DELETE FROM _yoyo_migration WHERE migration_id = %s", (schema.status(dsn).applied[-1],))
    report = migrate(dsn)
    assert any("outbound_heartbeat_count_update" in w and "disabled" in w for w in report.warnings), report
    with psycopg.connect(dsn, autocommit=True) as c:
        assert_exact(c)


def test_the_online_recount_waits_for_no_writer_and_stays_exact_under_writes(conn: Conn, dsn: str) -> None:
    runs = [service.create_run(conn, b, [{}] * 40) for b in (1, 2)]
    with psycopg.connect(dsn, autocommit=True) as loader:
        loader.execute("SET session_replication_role = replica")
        loader.execute("UPDATE outbound_call_jobs SET status = 'completed' WHERE id % 5 = 0")
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        try:
            with psycopg.connect(dsn, autocommit=True) as c:
                while not stop.is_set():
                    status = rng.choice(["queued", "in_progress", "completed"])
                    c.execute("UPDATE outbound_call_jobs SET status = %s WHERE id IN (SELECT id FROM"
                              " outbound_call_jobs ORDER BY random() LIMIT 3 FOR UPDATE SKIP LOCKED)", (status,))
        except BaseException as exc:  # reported below
            errors.append(exc)

    # An app transaction holding job rows (and its counter rows) open: the recount never waits.
    with psycopg.connect(dsn) as holder, holder.transaction():
        holder.execute("UPDATE outbound_call_jobs SET status = 'in_progress' WHERE run_id = %s", (runs[1].id,))
        threads = [threading.Thread(target=writer, args=(s,)) for s in (1, 2)]
        for t in threads:
            t.start()
        try:
            with psycopg.connect(dsn, autocommit=True) as dba:
                dba.execute("SET lock_timeout = '2s'")
                for _ in range(5):
                    service.recount_counters(dba)
        finally:
            stop.set()
            for t in threads:
                t.join(30)
    assert not errors, errors
    assert_exact(conn)
    assert service.verify_counters(conn) == []


def test_recount_and_verify_are_an_operators_calls(conn: Conn, dsn: str, roles: dict[str, str]) -> None:
    service.create_run(conn, 1, [{}])
    with psycopg.connect(dsn, autocommit=True) as app:
        app.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(roles["app"])))
        for call in (service.recount_counters, service.verify_counters):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                call(app)
    with psycopg.connect(dsn, autocommit=True) as dba:
        dba.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(roles["dba"])))
        assert service.verify_counters(dba) == service.recount_counters(dba) == []


def test_health_check_stays_cheap_with_the_drift_checks(conn: Conn) -> None:
    """The drift checks read the open runs and the counters: never the jobs or runs history."""
    run = service.create_run(conn, 1, [{}] * 3)
    conn.execute("INSERT INTO outbound_call_runs (business_id, status)"
                 " SELECT 5, 'completed' FROM generate_series(1, 3000)")
    conn.execute("INSERT INTO outbound_call_jobs (run_id, business_id, status)"
                 " SELECT %s, 1, 'completed' FROM generate_series(1, 3000)", (run.id,))
    conn.execute("ANALYZE outbound_call_runs, outbound_call_jobs")
    query = ("SELECT coalesce(sum(pg_stat_get_xact_tuples_fetched(c.oid) + pg_stat_get_xact_tuples_returned(c.oid)), 0)"
             "  FROM pg_class c WHERE c.oid IN ('outbound_call_runs'::regclass, 'outbound_call_jobs'::regclass)")
    with conn.transaction():
        before = conn.execute(query).fetchone()
        assert conn.execute("SELECT count(*) FROM outbound_heartbeat.health_check()").fetchone() == (0,)
        after = conn.execute(query).fetchone()
    assert before is not None and after is not None
    assert after[0] - before[0] < 100  # 6000 rows of history: none of them read


# -- the runs-by-status note cannot be forged -----------------------------------------------------

def test_the_app_role_cannot_forge_everyones_run_counts(conn: Conn, dsn: str, roles: dict[str, str]) -> None:
    service.create_run(conn, 1, [{}])
    with psycopg.connect(dsn) as app:
        app.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(roles["app"])))
        app.commit()
        with app.transaction():
            xid = app.execute("SELECT pg_current_xact_id()::text").fetchone()
            assert xid is not None
            app.execute("SELECT set_config('outbound_heartbeat.runs_by_status', %s, true)",
                        (f'{xid[0]}:{{"running": 1000, "failed": -7}}',))
            app.execute("UPDATE outbound_call_runs SET status = status WHERE false")
        assert kept_run_counts(conn) == true_run_counts(conn) == {"pending": 1}
        # Nor can it write what the triggers note, or the counters.
        for statement in ("INSERT INTO outbound_heartbeat.run_status_notes VALUES (pg_current_xact_id(), NULL, 'x')",
                          "INSERT INTO outbound_heartbeat.totals VALUES ('runs', 'running', 0, 1000)"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege), app.transaction():
                app.execute(statement)
    assert kept_run_counts(conn) == true_run_counts(conn) == {"pending": 1}
    runs_gauge = {m.labels["status"]: m.value for m in service.metrics(conn) if m.name == "outbound_heartbeat_runs"}
    assert runs_gauge["running"] == 0 and runs_gauge["failed"] == 0 and runs_gauge["pending"] == 1


def test_the_recount_command_checks_and_corrects(conn: Conn, dsn: str) -> None:
    import io

    from outbound_heartbeat import cli

    run = service.create_run(conn, 1, [{}] * 3)
    with psycopg.connect(dsn, autocommit=True) as loader:
        loader.execute("SET session_replication_role = replica")
        loader.execute("UPDATE outbound_call_jobs SET status = 'in_progress' WHERE run_id = %s", (run.id,))
    conn.execute("ALTER TABLE outbound_call_runs DISABLE TRIGGER outbound_heartbeat_count_insert")
    try:
        out = io.StringIO()
        assert cli.main(["recount", "--check", "--dsn", dsn], out) == 1
        assert out.getvalue().splitlines() == [
            "warning: trigger outbound_heartbeat_count_insert on public.outbound_call_runs is disabled: writes"
            " to that table go uncounted; re-apply the schema (outbound-heartbeat migrate) or enable it,"
            " then run outbound-heartbeat recount",
            f"jobs of run {run.id}: in_progress: the counters say 0, the table has 3",
            f"jobs of run {run.id}: queued: the counters say 3, the table has 0",
        ]
        out = io.StringIO()
        assert cli.main(["recount", "--dsn", dsn], out) == 0
        assert out.getvalue().splitlines()[1:] == [f"corrected jobs of run {run.id}: in_progress 0 -> 3",
                                                   f"corrected jobs of run {run.id}: queued 3 -> 0"]
        assert_exact(conn)
    finally:
        conn.execute("ALTER TABLE outbound_call_runs ENABLE TRIGGER outbound_heartbeat_count_insert")
    out = io.StringIO()
    assert cli.main(["recount", "--check", "--dsn", dsn], out) == 0
    assert out.getvalue() == "counters exact\n"
    out = io.StringIO()
    assert cli.main(["recount", "--json", "--dsn", dsn], out) == 0
    assert json.loads(out.getvalue()) == {"corrected": True, "drift": [], "trigger_problems": []}


#: The previous release's status note: a custom setting any session may set (the forgery below).
PREVIOUS_RELEASE_NOTE_FUNCTIONS = r"""
CREATE OR REPLACE FUNCTION outbound_heartbeat._note_run_status()
RETURNS trigger
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_tag text := pg_catalog.pg_current_xact_id()::text || ':';
    v_setting text := pg_catalog.current_setting('outbound_heartbeat.runs_by_status', true);
    v_noted jsonb := '{}';
BEGIN
    IF pg_catalog.starts_with(v_setting, v_tag) THEN
        v_noted := pg_catalog.substr(v_setting, pg_catalog.length(v_tag) + 1)::jsonb;
    END IF;
    IF OLD.status IS NOT NULL THEN
        v_noted := v_noted || pg_catalog.jsonb_build_object(
            OLD.status::text, COALESCE((v_noted ->> OLD.status::text)::bigint, 0) - 1);
    END IF;
    IF NEW.status IS NOT NULL THEN
        v_noted := v_noted || pg_catalog.jsonb_build_object(
            NEW.status::text, COALESCE((v_noted ->> NEW.status::text)::bigint, 0) + 1);
    END IF;
    PERFORM pg_catalog.set_config('outbound_heartbeat.runs_by_status', v_tag || v_noted::text, true);
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION outbound_heartbeat._fold_run_statuses()
RETURNS trigger
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_setting text := pg_catalog.current_setting('outbound_heartbeat.runs_by_status', true);
    v_tag text := pg_catalog.pg_current_xact_id_if_assigned()::text || ':';
    v_labels text[];
    v_values bigint[];
BEGIN
    IF v_tag IS NULL OR NOT COALESCE(pg_catalog.starts_with(v_setting, v_tag), false) THEN
        RETURN NULL;
    END IF;
    PERFORM pg_catalog.set_config('outbound_heartbeat.runs_by_status', '', true);
    SELECT pg_catalog.array_agg(d.key), pg_catalog.array_agg(d.value::bigint) INTO v_labels, v_values
      FROM pg_catalog.jsonb_each_text(pg_catalog.substr(v_setting, pg_catalog.length(v_tag) + 1)::jsonb) AS d
     WHERE d.value::bigint <> 0;
    IF v_labels IS NOT NULL THEN
        PERFORM outbound_heartbeat._add_totals('runs', v_labels, v_values);
    END IF;
    RETURN NULL;
END
$$;
"""


def test_the_upgrade_from_the_settings_note_takes_the_runs_lock_once_and_stays_exact(conn: Conn, dsn: str) -> None:
    """Re-applying sql/ over the previous release's note functions replaces them under the runs
    table's trigger lock (a statement between its row triggers and its fold would lose its
    note); once replaced, a re-apply takes that lock no more."""
    runs = [service.create_run(conn, 1, [{}]).id for _ in range(4)]
    conn.execute(PREVIOUS_RELEASE_NOTE_FUNCTIONS)
    conn.execute("UPDATE outbound_call_runs SET status = 'failed' WHERE id = ANY(%s)", (runs[:2],))
    assert_exact(conn)

    def reapply(timeout: str) -> None:
        with conn.transaction():
            conn.execute("SELECT set_config('lock_timeout', %s, true)", (timeout,))
            for path in schema.sql_files():
                conn.execute(path.read_text())

    with psycopg.connect(dsn) as writer:
        writer.execute("UPDATE outbound_call_runs SET status = 'stopped' WHERE id = %s", (runs[2],))
        with pytest.raises(psycopg.errors.LockNotAvailable):
            reapply("300ms")
        writer.commit()
    reapply("5s")
    assert_exact(conn)
    with psycopg.connect(dsn) as writer:  # replaced: no lock on the runs table any more
        writer.execute("UPDATE outbound_call_runs SET status = 'cancelled' WHERE id = %s", (runs[3],))
        reapply("300ms")
        writer.commit()
    assert_exact(conn)
    with conn.transaction():
        xid = conn.execute("SELECT pg_current_xact_id()::text").fetchone()
        assert xid is not None
        conn.execute("SELECT set_config('outbound_heartbeat.runs_by_status', %s, true)",
                     (f'{xid[0]}:{{"running": 1000}}',))
        conn.execute("UPDATE outbound_call_runs SET status = status WHERE false")
    assert_exact(conn)


def test_two_recounts_at_once_correct_the_drift_once(conn: Conn, dsn: str) -> None:
    run = service.create_run(conn, 1, [{}] * 4)
    with psycopg.connect(dsn, autocommit=True) as loader:
        loader.execute("SET session_replication_role = replica")
        loader.execute("UPDATE outbound_call_jobs SET status = 'completed' WHERE run_id = %s", (run.id,))
    second: list[Any] = []
    with psycopg.connect(dsn) as first, psycopg.connect(dsn, autocommit=True) as other:
        with first.transaction():
            assert len(service.recount_counters(first)) == 1
            thread = threading.Thread(target=lambda: second.append(service.recount_counters(other)))
            thread.start()
            _blocked_on_a_lock(conn, other.info.backend_pid)
        thread.join(30)
    assert second == [[]]  # it read after the first committed: nothing left to correct
    assert_exact(conn)
    with psycopg.connect(dsn) as rr:
        rr.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        with pytest.raises(InvalidArgument) as refused:
            service.recount_counters(rr)
        assert refused.value.argument == "transaction_isolation"


def test_recount_async_and_through_pgbouncer(conn: Conn, dsn: str, pgbouncer: Any) -> None:
    """The async twin, and the transaction-mode pooler: a forged note left at session level on
    a pooled server connection is no note, and the recount needs no session state."""
    import asyncio

    from outbound_heartbeat import service_async

    bounced = pgbouncer.dsn_for(dsn)
    runs = [service.create_run(conn, 1, [{}] * 2).id for _ in range(3)]
    with psycopg.connect(bounced, autocommit=True, prepare_threshold=None) as other:
        other.execute("SET outbound_heartbeat.runs_by_status = '0:{\"running\": 1000}'")
        other.execute("SET session_replication_role = replica")  # left on the server connection too
        other.execute("UPDATE outbound_call_jobs SET status = 'failed' WHERE run_id = %s", (runs[0],))
    for run in runs:
        with psycopg.connect(bounced, autocommit=True, prepare_threshold=None) as app:
            app.execute("RESET session_replication_role")
            app.execute("UPDATE outbound_call_runs SET status = 'failed' WHERE id = %s", (run,))

    async def main() -> tuple[list[Any], list[Any], list[Any]]:
        async with await psycopg.AsyncConnection.connect(bounced, autocommit=True, prepare_threshold=None) as a:
            return (await service_async.verify_counters(a), await service_async.recount_counters(a),
                    await service_async.verify_counters(a))

    before, corrected, after = asyncio.run(main())
    assert [(d.counter, d.run_id, d.status, d.kept, d.actual) for d in before] == [
        ("jobs", runs[0], "queued", 2, 0)]
    assert corrected == before and after == []
    assert_exact(conn)


@pytest.mark.slow  # a private server, a backend SIGKILLed, crash recovery (a restart)
def test_notes_left_by_a_crash_are_gone_and_counts_stay_exact() -> None:
    """A backend killed between its row triggers' notes and its statement's fold: crash
    recovery ends its transaction (the unlogged notes need no cleanup); counting goes on exactly."""
    with private_server() as (_cluster, app_dsn):
        with psycopg.connect(app_dsn, autocommit=True) as c:
            runs = [service.create_run(c, 1, [{}]).id for _ in range(3)]
            c.execute("CREATE FUNCTION public.oh_test_stall() RETURNS trigger LANGUAGE plpgsql AS $$"
                      " BEGIN PERFORM pg_sleep(30); RETURN NULL; END $$")
            c.execute("CREATE TRIGGER zz_oh_test_stall AFTER UPDATE ON outbound_call_runs"
                      " FOR EACH ROW WHEN (NEW.status = 'stall') EXECUTE FUNCTION public.oh_test_stall()")
            c.execute("CHECKPOINT")  # the test server runs with synchronous_commit off
            before = c.execute("SELECT checkpoint_lsn FROM pg_control_checkpoint()").fetchone()
        stalled = psycopg.connect(app_dsn, autocommit=True)
        pid = stalled.info.backend_pid

        def stall() -> None:
            with contextlib.suppress(psycopg.Error):
                stalled.execute("UPDATE outbound_call_runs SET status = 'stall' WHERE id = ANY(%s)", (runs[:2],))

        thread = threading.Thread(target=stall)
        thread.start()
        with psycopg.connect(app_dsn, autocommit=True) as c:
            deadline = time.monotonic() + 20
            # Our row trigger fires before the app's zz_ one: the notes are written by then.
            while c.execute("SELECT wait_event FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone() != ("PgSleep",):
                assert time.monotonic() < deadline, "the statement never reached the stalling trigger"
                time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)
        thread.join(30)
        stalled.close()
        # Recovered once crash recovery's end-of-recovery checkpoint is there: a connection that
        # succeeds before the postmaster even noticed the crash would be cut a moment later.
        deadline = time.monotonic() + 60
        while True:
            try:
                with psycopg.connect(app_dsn, autocommit=True) as c:
                    now = c.execute("SELECT checkpoint_lsn FROM pg_control_checkpoint()").fetchone()
                if now != before:
                    break
            except psycopg.OperationalError:
                pass
            assert time.monotonic() < deadline, "no crash recovery seen"
            time.sleep(0.2)
        with psycopg.connect(app_dsn, autocommit=True) as c:
            assert c.execute("SELECT count(*) FROM outbound_heartbeat.run_status_notes").fetchone() == (0,)
            assert_exact(c)
            c.execute("DROP TRIGGER zz_oh_test_stall ON outbound_call_runs")
            c.execute("UPDATE outbound_call_runs SET status = 'cancelled' WHERE id = ANY(%s)", (runs[1:],))
            assert_exact(c)
            assert service.verify_counters(c) == []


def test_recount_inside_the_apps_transaction_commits_or_rolls_back_with_it(conn: Conn, dsn: str) -> None:
    run = service.create_run(conn, 1, [{}] * 2)
    with psycopg.connect(dsn, autocommit=True) as loader:
        loader.execute("SET session_replication_role = replica")
        loader.execute("UPDATE outbound_call_jobs SET status = 'in_progress' WHERE run_id = %s", (run.id,))
    with psycopg.connect(dsn) as app:
        with contextlib.suppress(RuntimeError), app.transaction():
            assert len(service.recount_counters(app)) == 2
            raise RuntimeError("the app rolls back")
        assert len(service.verify_counters(app)) == 2  # nothing was corrected
        with app.transaction():
            assert len(service.recount_counters(app)) == 2
            with app.transaction():  # nested: a savepoint of its own
                assert service.recount_counters(app) == []
        app.commit()
    assert_exact(conn)
