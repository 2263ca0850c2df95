"""Asking the telephony provider about orphaned calls (reconcile_calls(), the CLI's reconcile and
sweep --hook, the fake provider's hook), on a real PostgreSQL: each answer settles a call once,
through resolve_call(..., source='provider')."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from outbound_heartbeat import cli, errors, service, service_async
from outbound_heartbeat.fake_provider import PATH_ENV, FakeProvider, KeyVoided
from outbound_heartbeat.reconciliation import Reconciled, load_hook
from outbound_heartbeat.records import Job

from ..helpers import backdate_heartbeat, hand_out, snapshot, start

Conn = psycopg.Connection[Any]
ROOT = Path(__file__).resolve().parents[2]



def orphans(conn: Conn, count: int, business_id: int = 1) -> list[Job]:
    """``count`` calls in progress when their run was force-cancelled: orphaned."""
    claim = start(conn, business_id, jobs=count + 1)
    calls = [hand_out(conn, claim) for _ in range(count)]
    service.force_cancel(conn, claim.run_id)
    return calls


def key(job: Job) -> str:
    assert job.call_key is not None
    return job.call_key


def job_row(conn: Conn, job_id: int) -> tuple[Any, ...]:
    row = conn.execute("SELECT status, call_outcome, error_message FROM outbound_call_jobs"
                       " WHERE id = %s", (job_id,)).fetchone()
    assert row is not None
    return tuple(row)


def settled_events(conn: Conn, job_id: int) -> list[tuple[str, str | None]]:
    rows = conn.execute(
        "SELECT event, detail ->> 'source' FROM outbound_heartbeat.run_events"
        " WHERE event IN ('call_resolved', 'call_reconciled', 'call_requeued', 'call_timed_out')"
        " AND (detail ->> 'job_id')::bigint = %s ORDER BY id", (job_id,)).fetchall()
    return [(r[0], r[1]) for r in rows]


def backdate_orphan(conn: Conn, job_id: int, age: str) -> None:
    conn.execute("UPDATE outbound_call_jobs SET orphaned_at = now() - %s::interval WHERE id = %s",
                 (age, job_id))


class Asked:
    """A hook answering from a table by key, recording the keys it was asked about."""

    def __init__(self, answers: dict[str, Reconciled | Exception | object | None]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    def __call__(self, call_key: str) -> Reconciled | None:
        self.asked.append(call_key)
        answer = self.answers.get(call_key)
        if isinstance(answer, Exception):
            raise answer
        return answer  # type: ignore[return-value]


# -- each answer -------------------------------------------------------------------------------

def test_each_answer_settles_its_call_once_and_a_failing_hook_stops_nothing(
        conn: Conn, caplog: pytest.LogCaptureFixture) -> None:
    done, failed, never, ringing, broken, nonsense = orphans(conn, 6)
    hook = Asked({
        key(done): Reconciled("completed", "answered, 42 s"),
        key(failed): Reconciled("failed", "busy"),
        key(never): Reconciled("not_placed", "the provider never placed it"),
        key(ringing): None,
        key(broken): RuntimeError("provider API down"),
        key(nonsense): "completed",  # not a Reconciled: the hook's bug, counted
    })
    with caplog.at_level(logging.WARNING, logger="outbound_heartbeat"):
        report = service.reconcile_calls(conn, hook)
    assert hook.asked == [key(c) for c in (done, failed, never, ringing, broken, nonsense)]
    assert (report.asked, report.settled, report.requeued, report.already_settled, report.unknown,
            report.hook_errors, report.locked) == (6, 3, 0, 0, 1, 2, 0)
    assert [(c.job_id, c.result, c.outcome) for c in report.calls] == [
        (done.id, "settled", "completed"), (failed.id, "settled", "failed"),
        (never.id, "settled", "not_placed"), (ringing.id, "unknown", None),
        (broken.id, "hook_error", None), (nonsense.id, "hook_error", None)]
    assert report.calls[4].detail == "RuntimeError: provider API down"
    assert job_row(conn, done.id) == ("completed", "completed", None)
    assert job_row(conn, failed.id) == ("failed", "failed", "busy")
    assert job_row(conn, never.id) == ("failed", "not_placed", "the provider never placed it")
    for still in (ringing, broken, nonsense):
        assert job_row(conn, still.id) == ("in_progress", None, None)
    for settled in (done, failed, never):
        assert settled_events(conn, settled.id) == [("call_reconciled", "provider")]
    left = conn.execute("SELECT job_id FROM outbound_heartbeat.orphaned_calls ORDER BY job_id").fetchall()
    assert left == [(ringing.id,), (broken.id,), (nonsense.id,)]
    # Logged with the job, never with the key (the status callback's credential).
    failures = [r.getMessage() for r in caplog.records if "reconcile hook failed" in r.getMessage()]
    assert len(failures) == 2 and all(f.startswith("[CALL]") for f in failures)
    assert not any(key(c) in r.getMessage() for r in caplog.records for c in (broken, nonsense))


def test_a_detail_postgresql_cannot_store_is_the_hooks_error_and_the_pass_goes_on(conn: Conn) -> None:
    # A provider's detail with a NUL or an unpaired surrogate (binary garbage from its API) is
    # the hook's bad answer for that call: counted, the call left orphaned, the others asked.
    nul, surrogate, fine = orphans(conn, 3)
    hook = Asked({key(nul): Reconciled("completed", "answered\x00"),
                  key(surrogate): Reconciled("failed", "busy \ud800"),
                  key(fine): Reconciled("completed", "answered")})
    report = service.reconcile_calls(conn, hook)
    assert hook.asked == [key(nul), key(surrogate), key(fine)]
    assert [(c.job_id, c.result) for c in report.calls] == [
        (nul.id, "hook_error"), (surrogate.id, "hook_error"), (fine.id, "settled")]
    assert report.calls[0].detail == "ValueError: the hook's detail must not contain NUL characters"
    assert report.calls[1].detail == "ValueError: the hook's detail must not contain unpaired surrogates"
    assert job_row(conn, nul.id) == job_row(conn, surrogate.id) == ("in_progress", None, None)
    assert job_row(conn, fine.id)[:2] == ("completed", "completed")


def test_a_second_pass_settles_nothing_twice(conn: Conn) -> None:
    done, ringing = orphans(conn, 2)
    hook = Asked({key(done): Reconciled("completed"), key(ringing): None})
    first = service.reconcile_calls(conn, hook)
    assert (first.asked, first.settled, first.unknown) == (2, 1, 1)
    before = snapshot(conn)
    second = service.reconcile_calls(conn, hook)
    # Only the call still orphaned is asked again; nothing is written.
    assert (second.asked, second.settled, second.unknown) == (1, 0, 1)
    assert hook.asked[2:] == [key(ringing)]
    assert snapshot(conn) == before
    assert settled_events(conn, done.id) == [("call_reconciled", "provider")]


def test_not_placed_on_a_run_that_retries_is_requeued_under_a_new_key(conn: Conn) -> None:
    claim = start(conn, jobs=2, retry_unplaced=True)
    call = hand_out(conn, claim)
    # The worker's process dies; the same worker restarts and resumes its run: the call it had
    # handed out is orphaned on a run that is still open.
    backdate_heartbeat(conn, claim.run_id, 3600)
    resumed = service.claim_run(conn, claim.worker_id)
    assert resumed is not None and resumed.resumed
    report = service.reconcile_calls(conn, Asked({key(call): Reconciled("not_placed")}))
    assert (report.asked, report.requeued, report.settled) == (1, 1, 0)
    assert report.calls[0].result == "requeued"
    assert job_row(conn, call.id)[:2] == ("queued", "not_placed")
    assert settled_events(conn, call.id) == [("call_requeued", "provider")]
    # Handed out again (the queue's order decides when): a new attempt, a new key.
    retried = hand_out(conn, resumed)
    if retried.id != call.id:
        retried = hand_out(conn, resumed)
    assert retried.id == call.id and retried.call_key != call.call_key


# -- scope and bounds --------------------------------------------------------------------------

def test_a_business_reconciles_its_own_orphans_only(conn: Conn) -> None:
    (mine,) = orphans(conn, 1, business_id=1)
    (theirs,) = orphans(conn, 1, business_id=2)
    hook = Asked({key(mine): Reconciled("completed"), key(theirs): Reconciled("completed")})
    report = service.reconcile_calls(conn, hook, business_id=1)
    assert hook.asked == [key(mine)] and report.settled == 1
    assert job_row(conn, theirs.id) == ("in_progress", None, None)
    event = conn.execute("SELECT business_id, detail ->> 'by_business' FROM outbound_heartbeat.run_events"
                         " WHERE event = 'call_reconciled'").fetchall()
    assert event == [(1, "1")]
    assert service.reconcile_calls(conn, hook, business_id=3).asked == 0


def test_the_oldest_orphans_first_at_most_limit(conn: Conn) -> None:
    young, old, older = orphans(conn, 3)
    backdate_orphan(conn, old.id, "10 minutes")
    backdate_orphan(conn, older.id, "20 minutes")
    hook = Asked({})
    assert service.reconcile_calls(conn, hook, limit=2).unknown == 2
    assert hook.asked == [key(older), key(old)]
    listed = service.list_orphaned_call_keys(conn)
    assert [(o.job_id, o.call_key) for o in listed] == [(c.id, key(c)) for c in (older, old, young)]
    assert listed[0].times_out_at > listed[0].orphaned_at


def test_bad_arguments_are_refused_before_anything_is_asked(conn: Conn) -> None:
    (call,) = orphans(conn, 1)
    hook = Asked({key(call): Reconciled("completed")})
    for kwargs, argument in (({"limit": 0}, "limit"), ({"limit": 100_001}, "limit"),
                             ({"business_id": "1"}, "business_id")):
        with pytest.raises(errors.InvalidArgument) as caught:
            service.reconcile_calls(conn, hook, **kwargs)
        assert caught.value.argument == argument or argument in caught.value.message
    with pytest.raises(errors.InvalidArgument) as caught:
        service.reconcile_calls(conn, "not a hook")  # type: ignore[arg-type]
    assert caught.value.argument == "hook"

    async def coroutine_hook(call_key: str) -> Reconciled | None:
        return Reconciled("completed")

    with pytest.raises(errors.InvalidArgument, match="service_async"):
        service.reconcile_calls(conn, coroutine_hook)  # type: ignore[arg-type]
    assert hook.asked == []
    with pytest.raises(psycopg.Error) as sql_error:
        conn.execute("SELECT * FROM outbound_heartbeat.list_orphaned_call_keys(max_calls => 0)")
    assert sql_error.value.sqlstate == "OH400"
    assert job_row(conn, call.id) == ("in_progress", None, None)


def test_a_call_whose_row_is_held_is_left_for_the_next_pass(dsn: str, conn: Conn) -> None:
    held, free = orphans(conn, 2)
    conn.execute("UPDATE outbound_heartbeat.settings SET lock_timeout = interval '200 milliseconds'")
    hook = Asked({key(held): Reconciled("completed"), key(free): Reconciled("completed")})
    with psycopg.connect(dsn) as other:  # an app transaction holding the job's row
        other.execute("SELECT 1 FROM outbound_call_jobs WHERE id = %s FOR UPDATE", (held.id,))
        report = service.reconcile_calls(conn, hook)
        other.rollback()
    assert [(c.job_id, c.result) for c in report.calls] == [(held.id, "locked"), (free.id, "settled")]
    assert report.locked == 1 and report.calls[0].outcome == "completed"
    assert job_row(conn, held.id) == ("in_progress", None, None)
    assert service.reconcile_calls(conn, hook).settled == 1  # the next pass settles it
    assert job_row(conn, held.id)[:2] == ("completed", "completed")


# -- the asyncio twin --------------------------------------------------------------------------

def test_the_async_service_takes_sync_and_coroutine_hooks(dsn: str, conn: Conn) -> None:
    sync_done, async_done, ringing = orphans(conn, 3)

    async def coroutine_hook(call_key: str) -> Reconciled | None:
        await asyncio.sleep(0)
        if call_key == key(async_done):
            return Reconciled("failed", "no answer")
        if call_key == key(ringing):
            raise TimeoutError("the provider did not answer")
        return None

    async def main() -> tuple[Any, Any]:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as aconn:
            first = await service_async.reconcile_calls(
                aconn, Asked({key(sync_done): Reconciled("completed")}), limit=1)
            second = await service_async.reconcile_calls(aconn, coroutine_hook)
            return first, second

    first, second = asyncio.run(main())
    assert (first.asked, first.settled) == (1, 1)
    assert (second.asked, second.settled, second.hook_errors) == (2, 1, 1)
    assert job_row(conn, sync_done.id)[:2] == ("completed", "completed")
    assert job_row(conn, async_done.id) == ("failed", "failed", "no answer")
    assert job_row(conn, ringing.id) == ("in_progress", None, None)


# -- exactly once against a racing callback ----------------------------------------------------

def race_once(dsn: str, conn: Conn) -> tuple[str, str]:
    """One orphan; the provider's answer (failed) and its status callback (completed) released
    at the same instant. Returns (the reconcile's result, the event that settled it)."""
    (call,) = orphans(conn, 1)
    barrier = threading.Barrier(2)
    answers: dict[str, Any] = {}

    def hook(call_key: str) -> Reconciled:
        barrier.wait(10)
        return Reconciled("failed", "the provider says no answer")

    def reconcile() -> None:
        with psycopg.connect(dsn, autocommit=True) as c:
            answers["reconcile"] = service.reconcile_calls(c, hook)

    def callback() -> None:
        with psycopg.connect(dsn, autocommit=True) as c:
            barrier.wait(10)
            answers["callback"] = service.resolve_call(c, key(call), "completed")

    threads = [threading.Thread(target=reconcile), threading.Thread(target=callback)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert set(answers) == {"reconcile", "callback"}, answers
    report, callback_answer = answers["reconcile"], answers["callback"]
    settled = settled_events(conn, call.id)
    assert len(settled) == 1, settled  # exactly one outcome, audited once
    result = report.calls[0].result
    if settled[0][0] == "call_reconciled":
        assert (result, callback_answer.answer) == ("settled", "already_resolved")
        assert job_row(conn, call.id)[:2] == ("failed", "failed")
    else:
        assert settled[0][0] == "call_resolved"
        assert (result, callback_answer.answer) == ("already_settled", "resolved")
        assert job_row(conn, call.id)[:2] == ("completed", "completed")
    return result, settled[0][0]


def test_a_callback_racing_the_reconcile_settles_once(dsn: str, conn: Conn) -> None:
    seen = [race_once(dsn, conn) for _ in range(10)]
    assert {event for _, event in seen} <= {"call_reconciled", "call_resolved"}


# -- as the app role, whoever owns the tables; through PgBouncer; inside the app's transaction --

def give_tables_to(conn: Conn, role: str) -> None:
    for table in ("outbound_call_runs", "outbound_call_jobs"):
        conn.execute(sql.SQL("ALTER TABLE public.{} OWNER TO {}").format(
            sql.Identifier(table), sql.Identifier(role)))


@pytest.mark.parametrize("owner", ["separate", "app"])
def test_the_app_role_reconciles_its_business(
        dsn: str, conn: Conn, roles: dict[str, str], owner: str) -> None:
    mine, racing = orphans(conn, 2, business_id=4)
    (theirs,) = orphans(conn, 1, business_id=5)
    row = conn.execute("SELECT pg_get_userbyid(relowner) FROM pg_class"
                       " WHERE oid = 'public.outbound_call_runs'::regclass").fetchone()
    assert row is not None
    if owner == "app":
        give_tables_to(conn, roles["app"])
    try:
        app_dsn = psycopg.conninfo.make_conninfo(dsn, user=roles["app"])
        with psycopg.connect(app_dsn, autocommit=True) as app:
            # A callback settles one call while the pass is asking about it: settled once.
            def hook(call_key: str) -> Reconciled:
                if call_key == key(racing):
                    service.resolve_call(app, call_key, "completed", None, 4)
                return Reconciled("failed", "no answer")

            report = service.reconcile_calls(app, hook, business_id=4)
    finally:
        if owner == "app":
            give_tables_to(conn, row[0])  # so the fixture can drop the role
    assert [(c.job_id, c.result) for c in report.calls] == [
        (mine.id, "settled"), (racing.id, "already_settled")]
    assert job_row(conn, mine.id)[:2] == ("failed", "failed")
    assert job_row(conn, racing.id)[:2] == ("completed", "completed")
    assert settled_events(conn, racing.id) == [("call_resolved", "callback")]
    assert job_row(conn, theirs.id) == ("in_progress", None, None)


def test_through_pgbouncer(dsn: str, conn: Conn, request: pytest.FixtureRequest) -> None:
    bounced = request.getfixturevalue("pgbouncer").dsn_for(dsn)
    done, ringing = orphans(conn, 2)
    hook = Asked({key(done): Reconciled("completed")})
    with psycopg.connect(bounced, autocommit=True, prepare_threshold=None) as c:
        first = service.reconcile_calls(c, hook)
        second = service.reconcile_calls(c, hook)
    assert (first.settled, first.unknown, second.settled, second.unknown) == (1, 1, 0, 1)
    assert settled_events(conn, done.id) == [("call_reconciled", "provider")]
    assert job_row(conn, ringing.id) == ("in_progress", None, None)


class Rollback(Exception):
    pass


@pytest.mark.parametrize("depth", ["transaction", "nested"])
def test_inside_the_apps_transaction_its_commit_decides(dsn: str, conn: Conn, depth: str) -> None:
    (call,) = orphans(conn, 1)
    hook = Asked({key(call): Reconciled("completed")})
    levels = 1 if depth == "transaction" else 2
    with psycopg.connect(dsn, autocommit=True) as app:
        with pytest.raises(Rollback), contextlib.ExitStack() as blocks:
            for _ in range(levels):
                blocks.enter_context(service.transaction(app))
            assert service.reconcile_calls(app, hook).settled == 1
            raise Rollback
        assert job_row(conn, call.id) == ("in_progress", None, None)  # rolled back with it
        assert settled_events(conn, call.id) == []
        with contextlib.ExitStack() as blocks:
            for _ in range(levels):
                blocks.enter_context(service.transaction(app))
            assert service.reconcile_calls(app, hook).settled == 1
    assert job_row(conn, call.id)[:2] == ("completed", "completed")
    assert settled_events(conn, call.id) == [("call_reconciled", "provider")]


# -- metrics -----------------------------------------------------------------------------------

def test_metrics_count_the_calls_the_provider_settled(conn: Conn) -> None:
    done, callback = orphans(conn, 2)
    service.reconcile_calls(conn, Asked({key(done): Reconciled("completed")}))
    service.resolve_call(conn, key(callback), "failed")
    settled = {m.labels["by"]: m.value for m in service.metrics(conn)
               if m.name == "outbound_heartbeat_calls_settled_total"}
    assert settled == {"callback": 1, "provider": 1, "timeout": 0}


# -- the fake provider's hook and the CLI ------------------------------------------------------

def run_cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = cli.main(list(argv), out=out)
    return code, out.getvalue()


def exploding_hook(call_key: str) -> Reconciled | None:
    """A hook for the CLI tests: the provider's API is down."""
    raise ConnectionError("provider API unreachable")


def url_quoting_hook(call_key: str) -> Reconciled | None:
    """A hook for the CLI tests whose error names the URL it asked, key included (as an HTTP
    client's error does)."""
    raise ConnectionError(f"500 Server Error for url: https://provider.invalid/calls/{call_key}")


async def async_completed_hook(call_key: str) -> Reconciled | None:
    """A coroutine-function hook for the CLI tests."""
    return Reconciled("completed", "async hook")


def fake_calls(conn: Conn, provider: FakeProvider) -> tuple[Job, Job, Job]:
    """Three orphans as the provider sees them: one completed, one still ringing, one never
    dialed (the worker died between next_job and dial)."""
    done, ringing, never = orphans(conn, 3)
    provider.dial(key(done), "+15550001")
    provider.finish(key(done), "completed")
    provider.dial(key(ringing), "+15550002")
    return done, ringing, never


def test_cli_reconcile_with_the_fake_providers_hook(
        dsn: str, conn: Conn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "provider.sqlite"
    provider = FakeProvider(path)
    done, ringing, never = fake_calls(conn, provider)
    monkeypatch.setenv(PATH_ENV, str(path))
    code, out = run_cli("reconcile", "--dsn", dsn, "--hook",
                        "outbound_heartbeat.fake_provider:hook_from_env", "--json")
    assert code == 0, out
    report = json.loads(out)
    assert {k: report[k] for k in ("asked", "settled", "unknown", "hook_errors")} == \
        {"asked": 3, "settled": 2, "unknown": 1, "hook_errors": 0}
    assert [(c["job_id"], c["result"], c["outcome"]) for c in report["calls"]] == [
        (done.id, "settled", "completed"), (ringing.id, "unknown", None),
        (never.id, "settled", "not_placed")]
    assert not any(key(c) in out for c in (done, ringing, never))  # keys are credentials
    assert job_row(conn, done.id)[:2] == ("completed", "completed")
    assert job_row(conn, never.id)[:2] == ("failed", "not_placed")
    # The voided key can never ring later: a paused dialer that wakes up is refused.
    with pytest.raises(KeyVoided):
        provider.dial(key(never), "+15550003")
    # Text, and a second pass: only the ringing call is asked again.
    provider.finish(key(ringing), "failed")
    code, out = run_cli("reconcile", "--dsn", dsn, "--hook",
                        "outbound_heartbeat.fake_provider:hook_from_env", "--business-id", "1")
    assert code == 0
    assert out.splitlines() == [
        "asked the provider about 1 orphaned call: 1 settled, 0 requeued, 0 already settled,"
        " 0 unknown (ask again later), 0 hook errors, 0 locked",
        f"job {ringing.id} (run {ringing.run_id}, business 1): settled (failed: the provider"
        " reports the call failed)"]
    assert run_cli("reconcile", "--dsn", dsn, "--hook",
                   "outbound_heartbeat.fake_provider:hook_from_env") == \
        (0, "no orphaned calls to reconcile\n")


def test_cli_reconcile_as_a_process(dsn: str, conn: Conn, tmp_path: Path) -> None:
    path = tmp_path / "provider.sqlite"
    done, _, _ = fake_calls(conn, FakeProvider(path))
    env = {**os.environ, PATH_ENV: str(path), "DATABASE_URL": dsn}
    proc = subprocess.run(
        [sys.executable, "-m", "outbound_heartbeat", "reconcile", "--hook",
         "outbound_heartbeat.fake_provider:hook_from_env", "--limit", "1"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout.splitlines()[1].startswith(f"job {done.id} ") and "settled (completed" in proc.stdout
    assert job_row(conn, done.id)[0] == "completed"


def test_cli_reconcile_reports_a_failing_hook_and_exits_1(
        dsn: str, conn: Conn, capsys: pytest.CaptureFixture[str]) -> None:
    (call,) = orphans(conn, 1)
    code, out = run_cli("reconcile", "--dsn", dsn, "--hook",
                        "tests.integration.test_reconcile:exploding_hook")
    err = capsys.readouterr().err
    assert code == 1
    assert f"job {call.id} (run {call.run_id}, business 1): hook_error" \
           " (ConnectionError: provider API unreachable)" in out
    assert err.splitlines()[-1] == ("outbound-heartbeat reconcile: error: the hook failed for 1 of 1"
                                    " orphaned calls (each error is in its call's line; they stay orphaned)")
    assert job_row(conn, call.id) == ("in_progress", None, None)
    # A coroutine-function hook runs on the asyncio service.
    code, out = run_cli("reconcile", "--dsn", dsn, "--hook",
                        "tests.integration.test_reconcile:async_completed_hook")
    assert code == 0 and "1 settled" in out and job_row(conn, call.id)[0] == "completed"


def test_a_hook_error_naming_the_key_never_leaks_it(
        dsn: str, conn: Conn, caplog: pytest.LogCaptureFixture,
        capsys: pytest.CaptureFixture[str]) -> None:
    # The key is the status callback's credential: a hook whose error quotes it (an HTTP
    # client's error names the URL it asked) must not carry it into the log, the report or
    # the CLI's output.
    (call,) = orphans(conn, 1)
    with caplog.at_level(logging.WARNING, logger="outbound_heartbeat"):
        report = service.reconcile_calls(conn, url_quoting_hook)
    assert report.hook_errors == 1
    assert report.calls[0].detail == ("ConnectionError: 500 Server Error for url:"
                                      " https://provider.invalid/calls/<call key>")
    assert key(call) not in caplog.text and "<call key>" in caplog.text
    for extra in ([], ["--json"]):
        code, out = run_cli("reconcile", "--dsn", dsn, "--hook",
                            "tests.integration.test_reconcile:url_quoting_hook", *extra)
        assert code == 1
        assert key(call) not in out + capsys.readouterr().err and "<call key>" in out
    assert job_row(conn, call.id) == ("in_progress", None, None)


@pytest.mark.parametrize(("argv", "code", "says"), [
    (["--hook", "no_such_module_here:hook"], 2, "argument --hook: cannot import no_such_module_here"),
    (["--hook", "outbound_heartbeat.fake_provider"], 2, "argument --hook: 'outbound_heartbeat.fake_provider'"
                                                        " is not MODULE:ATTR"),
    (["--hook", "outbound_heartbeat.fake_provider:nothing"], 2, "argument --hook: outbound_heartbeat"
                                                               ".fake_provider has no attribute nothing"),
    (["--hook", "outbound_heartbeat.fake_provider:PATH_ENV"], 2, "is not callable"),
    (["--hook", "outbound_heartbeat.fake_provider:hook_from_env"], 1,
     "--hook: outbound_heartbeat.fake_provider:hook_from_env() raised ValueError: set"
     " OUTBOUND_HEARTBEAT_FAKE_PROVIDER"),
    ([], 2, "the following arguments are required: --hook"),
    (["--hook", "x:y", "--limit", "0"], 2, "argument --limit: '0' must be an integer from 1 to 100000"),
    (["--hook", "x:y", "--business-id", "-3"], 2, "argument --business/--business-id"),
])
def test_cli_reconcile_usage_errors_are_one_line(
        dsn: str, conn: Conn, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        argv: list[str], code: int, says: str) -> None:
    monkeypatch.delenv(PATH_ENV, raising=False)
    orphans(conn, 1)
    before = snapshot(conn)
    assert exit_status(["reconcile", "--dsn", dsn, *argv]) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err, err
    assert snapshot(conn) == before


@pytest.mark.parametrize(("name", "source", "says"), [
    ("adv_hook_missing_setting", "import os\nTOKEN = os.environ['NO_SUCH_PROVIDER_TOKEN_HERE']\ndef hook(k):\n    return None\n",
     "KeyError: 'NO_SUCH_PROVIDER_TOKEN_HERE'"),
    ("adv_hook_syntax_error", "def hook(k)\n    return None\n", "SyntaxError"),
])
def test_cli_reconcile_a_hook_module_failing_at_import_is_one_line(
        dsn: str, conn: Conn, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path, name: str, source: str, says: str) -> None:
    # A hook module that raises while imported (a missing setting, a typo) is a usage error of
    # one line naming the module, not a traceback.
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    orphans(conn, 1)
    before = snapshot(conn)
    assert exit_status(["reconcile", "--dsn", dsn, "--hook", f"{name}:hook"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"argument --hook: cannot import {name}: " in err and says in err, err
    assert snapshot(conn) == before


def exit_status(argv: list[str]) -> int:
    """The CLI's exit status: argparse's own usage errors raise SystemExit, the rest return."""
    try:
        return cli.main(argv, out=io.StringIO())
    except SystemExit as exc:
        return int(exc.code or 0)


def test_cli_sweep_asks_the_provider_before_the_timeout(
        dsn: str, conn: Conn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "provider.sqlite"
    provider = FakeProvider(path)
    done, ringing, _ = fake_calls(conn, provider)
    for call in (done, ringing):
        backdate_orphan(conn, call.id, "2 hours")  # both past call_orphan_timeout
    monkeypatch.setenv(PATH_ENV, str(path))
    code, out = run_cli("sweep", "--dsn", dsn, "--hook",
                        "outbound_heartbeat.fake_provider:hook_from_env", "--json")
    assert code == 0, out
    swept = json.loads(out)
    assert (swept["reconciled"]["settled"], swept["reconciled"]["unknown"]) == (2, 1)
    assert swept["reclaimed"] == []
    # The provider knew the first one completed: settled so, not timed out; the one still
    # ringing is what the timeout fails.
    assert settled_events(conn, done.id) == [("call_reconciled", "provider")]
    assert job_row(conn, done.id)[:2] == ("completed", "completed")
    assert settled_events(conn, ringing.id) == [("call_timed_out", None)]
    assert run_cli("sweep", "--dsn", dsn) == (0, "nothing to reclaim\n")


def test_load_hook_tells_a_hook_from_a_factory() -> None:
    assert load_hook("tests.integration.test_reconcile:exploding_hook") is exploding_hook
    factory_made: Callable[[str], Any] = load_hook("tests.integration.test_reconcile:_factory")
    assert factory_made("k") == Reconciled("failed", "from the factory")


def _factory() -> Callable[[str], Reconciled | None]:
    return lambda call_key: Reconciled("failed", "from the factory")
