"""``outbound-heartbeat demo``: a worker is SIGKILLed mid-call, its run is reclaimed and its
calls are accounted for.

Two businesses, one run each, two real worker subprocesses (``example_worker``) dialing through
the fake telephony provider (:mod:`outbound_heartbeat.fake_provider`, a SQLite file). One worker
is killed with SIGKILL while a call rings; every second the demo asks for the business's active
run, as the web UI does, and shows the heartbeat ageing until that very call stops the run and
marks the ringing call orphaned. The provider then finishes that call and POSTs its status
callback to the Flask adapter's ``POST /calls/<key>/status``, served by the demo on 127.0.0.1
(without Flask installed, the demo calls ``resolve_call`` as that endpoint would, and says so).
The other run is force-cancelled while its worker dials: its call is orphaned too, and no
callback ever comes for it; ``health_check`` and ``metrics`` raise the orphan alert, then the
orphan timeout fails it. Then the audit trail of both runs is printed.

Without ``dsn`` it runs on a throwaway PostgreSQL (``outbound_heartbeat.testing``) whose
``stale_after`` and ``call_orphan_timeout`` it sets to the demo's. With ``dsn`` it migrates that
database, leaves its settings alone (the reader passes the threshold to ``get_active_run``; the
unanswered call, which would wait for that database's own ``call_orphan_timeout``, is settled by
the demo itself with ``resolve_call``, said on screen) and leaves the two ended runs and their
events behind.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TextIO

import psycopg

from . import calls, schema, service
from .fake_provider import FakeProvider
from .records import AuditEvent, Run
from .worker_process import WorkerProcess

__all__ = [
    "DIAL_SECONDS",
    "JOBS_PER_RUN",
    "ORPHAN_TIMEOUT",
    "OWN_DB_BUSINESSES",
    "THROWAWAY_BUSINESSES",
    "DemoFailed",
    "demo_phone",
    "run",
]


#: Business ids on a throwaway database, and on yours (chosen to stand out in your tables).
THROWAWAY_BUSINESSES = (1, 2)
OWN_DB_BUSINESSES = (990001, 990002)
JOBS_PER_RUN = 30
DIAL_SECONDS = 1.0
MIN_THRESHOLD, MAX_THRESHOLD = 3.0, 600.0
#: The throwaway database's call_orphan_timeout: an orphaned call no callback settles is failed
#: this long after its run ended (the library's default is 1 h).
ORPHAN_TIMEOUT = timedelta(seconds=4)


def demo_phone(i: int) -> str:
    """A number no one can dial: 555-0100..0199 is reserved for fiction in the NANP."""
    return f"+1-202-555-{100 + i % 100:04d}"


class DemoFailed(RuntimeError):
    """The demo did not see what it promises (the library would be broken)."""


@contextlib.contextmanager
def _database(dsn: str | None, out: TextIO) -> Iterator[tuple[str, bool]]:
    if dsn:
        yield dsn, False
        return
    from .testing import start_server

    server = start_server()
    try:
        created = server.create_database()
        where = f"port {server.cluster.port}" if server.cluster else server.kind
        out.write(f"started a throwaway PostgreSQL ({server.kind} server, {where})\n")
        yield created, True
    finally:
        server.close()
        out.write("throwaway PostgreSQL stopped and removed\n")


def _close_all(workers: list[WorkerProcess]) -> None:
    for w in workers:
        w.close()


def _say(out: TextIO, t0: float, text: str) -> None:
    out.write(f"[{time.monotonic() - t0:5.1f}s] {text}\n")
    out.flush()


@contextlib.contextmanager
def _console(db: str, out: TextIO, port: int | None) -> Iterator[None]:
    """The operator console on this database while the demo runs (``port`` None: none). It
    only watches (stop_stale=False): the demo's own reader is the one that stops the run."""
    if port is None:
        yield
        return
    from .console import new_token, standalone

    token = new_token()
    try:
        server = standalone(db, token, port=port, poll_interval=1.0, stop_stale=False).start()
    except OSError as exc:  # the port is taken (the CLI checks it first; a race remains)
        raise DemoFailed(f"cannot serve the console on port {port}: {exc}") from exc
    try:
        out.write(f"console: open {server.url}/?token={token} to watch the bars\n")
        out.flush()
        yield
    finally:
        server.close()


@contextlib.contextmanager
def _callback_endpoint(db: str, out: TextIO) -> Iterator[str | None]:
    """The Flask adapter's status-callback endpoint (``POST /calls/<key>/status``) served on
    127.0.0.1, any free port, while the demo runs: yields the callback URL template the workers
    give the provider, or None when Flask (the ``flask`` extra) is not installed."""
    if importlib.util.find_spec("flask") is None:
        out.write("status callbacks: Flask is not installed (extra 'flask'), so no endpoint:"
                  " the demo calls resolve_call() with the provider's outcome, as the endpoint"
                  " would\n")
        yield None
        return
    from flask import Flask, request
    from psycopg_pool import ConnectionPool
    from werkzeug.serving import WSGIRequestHandler, make_server

    from .contrib.flask import create_blueprint
    from .web import DEFAULT_PREFIX

    class Quiet(WSGIRequestHandler):
        def log(self, type: str, message: str, *args: Any) -> None:
            """No access log: the demo says what each callback did."""

    def tenant() -> int | None:
        # The demo's stand-in for the app's authentication of the provider (its request
        # signature mapped to a business): the business the worker put in the callback URL.
        raw = request.args.get("business", "")
        return int(raw) if raw.isdigit() else None

    with ConnectionPool(db, kwargs={"autocommit": True}, min_size=1, max_size=2) as pool:
        app = Flask("outbound_heartbeat_demo")
        app.register_blueprint(create_blueprint(pool, tenant, locale="en"))
        server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=Quiet)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            base = f"http://127.0.0.1:{server.server_port}{DEFAULT_PREFIX}"
            out.write(f"status callbacks: POST {base}/calls/<call key>/status (the Flask"
                      " adapter, served by the demo)\n")
            out.flush()
            yield base + "/calls/{call_key}/status?business={business_id}"
        finally:
            server.shutdown()
            server.server_close()
            thread.join(5)


def _short(call_key: str) -> str:
    """A call key without its random part: the key is the callback's credential."""
    return call_key.rsplit("-", 1)[0] + "-..."


def _orphans(conn: psycopg.Connection[Any], run_ids: list[int]) -> list[tuple[Any, ...]]:
    """The orphaned calls of these runs as ``orphaned_calls`` lists them (the console's and
    ``outbound-heartbeat status``'s source): job, run, business, reason, age, time left."""
    return conn.execute(
        "SELECT o.job_id, o.run_id, o.business_id, o.orphan_reason,"
        " extract(epoch FROM o.orphan_age)::float8,"
        " extract(epoch FROM o.times_out_at - statement_timestamp())::float8"
        " FROM outbound_heartbeat.orphaned_calls AS o WHERE o.run_id = ANY(%s) ORDER BY o.job_id",
        (run_ids,),
    ).fetchall()


def _show_orphans(out: TextIO, rows: list[tuple[Any, ...]]) -> None:
    for job_id, run_id, business_id, reason, age, left in rows:
        out.write(f"         orphaned_calls: job {job_id} (run {run_id}, business {business_id}):"
                  f" {reason}, orphaned {age:.1f} s ago, no callback yet, times out in"
                  f" {max(left, 0.0):.1f} s\n")


def _job(conn: psycopg.Connection[Any], job_id: int) -> tuple[Any, ...]:
    row = conn.execute(
        "SELECT status, call_outcome, call_key, error_message,"
        " (SELECT count(*) FROM outbound_heartbeat.run_events AS e"
        "   WHERE e.event IN ('call_resolved', 'call_timed_out')"
        "     AND e.run_id = j.run_id AND (e.detail ->> 'job_id')::bigint = j.id)"
        " FROM public.outbound_call_jobs AS j WHERE j.id = %s",
        (job_id,),
    ).fetchone()
    if row is None:
        raise DemoFailed(f"job {job_id} vanished")
    return tuple(row)


def _next_call(worker: WorkerProcess) -> dict[str, Any]:
    """The worker's next call placed at the provider from now on (ringing for DIAL_SECONDS)."""
    worker.steps()  # what it said so far is past
    return worker.wait_for("placed", timeout=30)


def run(
    dsn: str | None = None,
    out: TextIO = sys.stdout,
    threshold: float = 6.0,
    console_port: int | None = 0,
    pause: float = 0.0,
) -> int:
    """Runs the demo; returns 0, or raises DemoFailed when the library misbehaved. The console
    is served on ``console_port`` (0: any free port, None: no console); ``pause`` seconds are
    waited before the kill and after the end, to open and watch it."""
    if not MIN_THRESHOLD <= threshold <= MAX_THRESHOLD:
        # Checked before any server starts or any row is written.
        raise DemoFailed(
            f"the demo threshold must be from {MIN_THRESHOLD:g} s (workers beat every 2 s)"
            f" to {MAX_THRESHOLD:g} s, not {threshold:g} s"
        )
    stale_after = timedelta(seconds=threshold)
    workers: list[WorkerProcess] = []
    with _database(dsn, out) as (db, throwaway), contextlib.ExitStack() as stack:
        stack.callback(_close_all, workers)
        # Ctrl-C must force-cancel the demo's runs; a shell without job control starts its
        # background commands with SIGINT ignored, and Python keeps an inherited SIG_IGN.
        if (signal.getsignal(signal.SIGINT) is signal.SIG_IGN
                and threading.current_thread() is threading.main_thread()):
            stack.callback(signal.signal, signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.default_int_handler)
        # The library's tagged log lines ([STALE_DETECTION], [FORCE_CANCEL], ...) are part of
        # what the demo shows: they appear under the step that caused them.
        handler = logging.StreamHandler(out)
        handler.setFormatter(logging.Formatter("         log: %(message)s"))
        handler.setLevel(logging.WARNING)
        logger = logging.getLogger("outbound_heartbeat")
        stack.callback(logger.setLevel, logger.level)
        logger.setLevel(min(logger.getEffectiveLevel(), logging.WARNING))
        stack.callback(setattr, logger, "propagate", logger.propagate)
        logger.propagate = False
        logger.addHandler(handler)
        stack.callback(logger.removeHandler, handler)
        report = schema.migrate(db)
        out.write(f"migrations applied: {', '.join(report.applied) or 'none (up to date)'}\n")
        stack.enter_context(_console(db, out, console_port))
        with psycopg.connect(db, autocommit=True) as conn:
            if throwaway:
                conn.execute(
                    "UPDATE outbound_heartbeat.settings SET stale_after = %s,"
                    " restart_grace = interval '0', call_orphan_timeout = %s",
                    (stale_after, ORPHAN_TIMEOUT),
                )
                out.write(
                    f"demo threshold: a heartbeat older than {threshold:g} s is dead, an orphaned"
                    f" call without a callback fails after {ORPHAN_TIMEOUT.total_seconds():g} s"
                    " (set in this throwaway database; the defaults are 30 s and 1 h)\n"
                )
                businesses = THROWAWAY_BUSINESSES
            else:
                out.write(
                    f"demo threshold: {threshold:g} s, passed to"
                    " get_active_run(stale_after => ...); your settings table is not changed\n"
                )
                businesses = OWN_DB_BUSINESSES
            scene = _Scene(
                db, out, stale_after, pause, throwaway,
                FakeProvider(Path(stack.enter_context(tempfile.TemporaryDirectory(
                    prefix="outbound-heartbeat-demo-"))) / "provider.sqlite3"),
                stack.enter_context(_callback_endpoint(db, out)),
            )
            _demo(conn, scene, businesses, workers)
            if pause > 0:
                out.write(f"the console stays up {pause:g} s more\n")
                out.flush()
                time.sleep(pause)
    return 0


@dataclass(frozen=True)
class _Scene:
    """What the story runs on: the database, the screen, the thresholds, the fake provider and
    the status-callback URL template (None: no endpoint, no Flask)."""

    db: str
    out: TextIO
    stale_after: timedelta
    pause: float
    throwaway: bool
    provider: FakeProvider
    callback_url: str | None


def _demo(
    conn: psycopg.Connection[Any],
    scene: _Scene,
    businesses: tuple[int, int],
    workers: list[WorkerProcess],
) -> None:
    t0 = time.monotonic()
    runs: list[Run] = []
    # All or nothing: both businesses are checked, then both runs created, in one transaction.
    # The check only reads: an open run of these businesses is somebody's (a real worker's, or
    # an earlier demo's), and only the database's own stale_after may judge it dead, never the
    # demo's shorter threshold, so the demo leaves it alone and refuses.
    with conn.transaction():
        for run in service.list_active_runs(conn):
            if run.business_id in businesses:
                beat = (f", heartbeat {run.heartbeat_age.total_seconds():.1f} s old"
                        if run.heartbeat_age is not None else "")
                raise DemoFailed(
                    f"business {run.business_id} already has an open run ({run.id},"
                    f" {run.status}{beat}): nothing was created"
                )
        for biz in businesses:
            jobs = [{"to": demo_phone(i), "demo": True} for i in range(JOBS_PER_RUN)]
            runs.append(service.create_run(conn, biz, jobs))
    try:
        _story(conn, scene, businesses, workers, runs, t0)
    except BaseException:
        # Ctrl-C or a failure: no demo run may stay open for a real dialer to pick up, and no
        # call of theirs stays orphaned, waiting for a timeout. A fresh connection: the demo's
        # own may be cut mid-statement by the interrupt.
        _close_all(workers)
        with contextlib.suppress(Exception), psycopg.connect(scene.db, autocommit=True) as cleanup:
            for run in runs:
                service.force_cancel(cleanup, run.id)
            for (key,) in cleanup.execute(
                "SELECT j.call_key FROM outbound_heartbeat.orphaned_calls AS o"
                " JOIN public.outbound_call_jobs AS j ON j.id = o.job_id"
                " WHERE o.run_id = ANY(%s)", ([r.id for r in runs],)
            ).fetchall():
                service.resolve_call(cleanup, key, "failed", "the demo stopped early")
            scene.out.write("demo stopped early: its runs were force-cancelled, their calls"
                            " settled as failed\n")
        raise


def _story(
    conn: psycopg.Connection[Any],
    scene: _Scene,
    businesses: tuple[int, int],
    workers: list[WorkerProcess],
    runs: list[Run],
    t0: float,
) -> None:
    out, provider, stale_after = scene.out, scene.provider, scene.stale_after
    threshold = stale_after.total_seconds()
    biz_a, biz_b = businesses
    run_a, run_b = runs
    _say(out, t0, f"business {biz_a}: run {run_a.id}, business {biz_b}: run {run_b.id},"
                  f" {JOBS_PER_RUN} queued calls each")

    # Both dial through the fake provider, each call under its call key. A's provider POSTs a
    # status callback for each call it ends; B's never does (its last call is the one that
    # only the orphan timeout settles).
    names = ("demo-dialer-a", "demo-dialer-b")
    for name, run, url in zip(names, runs, (scene.callback_url, None), strict=True):
        workers.append(WorkerProcess(
            scene.db, "--worker-id", name, "--run-id", str(run.id), "--dial-seconds",
            str(DIAL_SECONDS), "--provider", provider.path,
            *(("--callback-url", url) if url else ())))
    for name, run, w in zip(names, runs, workers, strict=True):
        claimed = w.wait_for("claimed", timeout=30)
        _say(out, t0, f"worker {name} (pid {w.pid}) claimed run {run.id}, lease epoch"
                      f" {claimed['epoch']}, heartbeat every {claimed['interval']:g} s")
    worker_a, worker_b = workers
    for w in workers:
        w.wait_for("dialed", timeout=30)
    if pause := scene.pause:
        _say(out, t0, f"waiting {pause:g} s before the kill (open the console now)")
        time.sleep(pause)
    epoch_a = worker_a.seen[0]["epoch"]

    ringing = _next_call(worker_a)
    worker_a.signal(signal.SIGKILL)
    worker_a.wait_exit(10)
    killed_at = time.monotonic()
    at_provider = provider.lookup(ringing["call_key"])
    _say(out, t0, f"SIGKILL worker demo-dialer-a mid-call: its call to {ringing['to']} (key"
                  f" {_short(ringing['call_key'])}) is {at_provider.status if at_provider else '?'}"
                  f" at the provider; run {run_a.id} is still 'running' in the table, with nobody"
                  " to finish it")
    out.write(f"         every second: GET /jobs/active for business {biz_a}"
              f" (get_active_run), threshold {threshold:g} s\n")
    while True:
        active, events = service.execute(conn, calls.get_active_run(biz_a, stale_after))
        waited = time.monotonic() - killed_at
        if active is None:
            break
        age = active.heartbeat_age.total_seconds() if active.heartbeat_age else 0.0
        _say(out, t0, f"  200 run {active.id} {active.status}, heartbeat {age:4.1f} s old,"
                      f" {active.queued_jobs} queued, {active.in_progress_jobs} in progress")
        if waited > threshold + 10:
            raise DemoFailed(f"run {run_a.id} was not reclaimed {waited:.0f} s after the kill")
        time.sleep(1.0)
    stopped = next((e for e in events if e.event == "stale_stopped"), None)
    if stopped is None:
        raise DemoFailed(f"run {run_a.id} left the active set without a stale_stopped event")
    orphans_a = _orphans(conn, [run_a.id])
    _say(out, t0, f"  404 no active run: this very call stopped run {run_a.id}"
                  f" {waited:.1f} s after the kill: {stopped.detail['jobs_failed']} queued jobs"
                  f" failed, {len(orphans_a)} in-progress call marked orphaned (left to the"
                  " telephony callback), lock cleared")
    _show_orphans(out, orphans_a)
    if [o[0] for o in orphans_a] != [ringing["job_id"]]:
        raise DemoFailed(f"the killed worker's call (job {ringing['job_id']}) is not the one"
                         f" orphaned: {orphans_a}")
    zombie = service.heartbeat(conn, run_a.id, "demo-dialer-a", epoch_a)
    _say(out, t0, f"a zombie heartbeat with the dead worker's lease now answers {zombie!r}")

    _settle_by_callback(conn, scene, t0, ringing, biz_a)

    _next_call(worker_b)
    result = service.force_cancel(conn, run_b.id, business_id=biz_b)
    orphans_b = _orphans(conn, [run_b.id])
    _say(out, t0, f"force-cancel run {run_b.id} (worker alive, mid-call): {result.previous_status}"
                  f" -> {result.status}, {result.jobs_cancelled} jobs cancelled, {len(orphans_b)}"
                  " in-progress call marked orphaned")
    _show_orphans(out, orphans_b)
    code = worker_b.wait_exit(30)
    last = [s for s in worker_b.steps() if s in ("released", "lost")]
    _say(out, t0, f"worker demo-dialer-b learned it at its next heartbeat and stopped dialing"
                  f" (exit {code}, said {last[-1] if last else 'nothing'!r})")
    again = service.force_cancel(conn, run_b.id, business_id=biz_b)
    _say(out, t0, f"force-cancel again: {again.jobs_cancelled} jobs cancelled (idempotent)")
    if len(orphans_b) != 1:
        raise DemoFailed(f"run {run_b.id} was cancelled mid-call, yet orphaned {orphans_b}")
    _time_out(conn, scene, t0, orphans_b[0][0], biz_b, [run_a.id, run_b.id])

    out.write("\naudit trail (outbound_heartbeat.run_events):\n")
    events_a = service.list_events(conn, run_id=run_a.id)
    events_b = service.list_events(conn, run_id=run_b.id)
    timeline: list[AuditEvent] = sorted(events_a + events_b, key=lambda e: e.id)
    first = timeline[0].created_at
    for e in timeline:
        offset = (e.created_at - first).total_seconds()
        detail = json.dumps(e.detail, sort_keys=True)
        out.write(f"  +{offset:5.1f}s run {e.run_id:<4} {e.event:<16} {e.worker_id or '-':<14}"
                  f" {detail}\n")
    _say(out, t0, "done")


def _settle_by_callback(
    conn: psycopg.Connection[Any], scene: _Scene, t0: float, ringing: dict[str, Any],
    business_id: int,
) -> None:
    """The provider ends the dead worker's call and reports it: through the Flask endpoint
    (twice, as a provider retries), or, without Flask, by resolve_call() as it would."""
    out, key, job_id = scene.out, ringing["call_key"], ringing["job_id"]
    scene.provider.finish(key, "completed")
    if scene.callback_url is not None:
        codes = [scene.provider.send_callback(key) for _ in range(2)]
        how = f"POSTs its status callback to the endpoint: HTTP {codes[0]}"
        retry = f"the same callback again (a provider's retry): HTTP {codes[1]}"
    else:
        answers = [service.resolve_call(conn, key, "completed", "fake provider status callback",
                                        business_id).answer for _ in range(2)]
        how = f"reports it: resolve_call() (no Flask: as the endpoint would) answers {answers[0]!r}"
        retry = f"the same report again answers {answers[1]!r}"
    status, outcome, _, _, settled = _job(conn, job_id)
    _say(out, t0, f"the provider ends that call (completed) and {how}: job {job_id}"
                  f" {status}, call outcome {outcome}, settled by callback")
    _say(out, t0, f"{retry}: still {settled} settlement in the audit trail (settled once)")
    if (status, outcome, settled) != ("completed", "completed", 1):
        raise DemoFailed(f"the callback did not settle job {job_id} once: {status}, {outcome},"
                         f" {settled} settlements")


def _time_out(
    conn: psycopg.Connection[Any], scene: _Scene, t0: float, job_id: int, business_id: int,
    run_ids: list[int],
) -> None:
    """The call no callback settles: the orphan alert fires, then the orphan timeout fails it
    (on the throwaway database; on yours, whose call_orphan_timeout the demo leaves alone, the
    demo settles it itself)."""
    out = scene.out
    wait = ORPHAN_TIMEOUT.total_seconds() if scene.throwaway else 1.0
    deadline = time.monotonic() + wait + 10
    while (orphans := _orphans(conn, run_ids)) and max(o[4] for o in orphans) <= wait:
        if time.monotonic() > deadline:
            raise DemoFailed(f"the orphaned call of job {job_id} never aged past {wait:g} s")
        time.sleep(0.2)
    alerts = [a for a in service.health_check(conn, alert_after=timedelta(seconds=1))
              if a.run_id in run_ids and "orphan" in a.check_name]
    _say(out, t0, "no callback for that call: health_check(alert_after => 1 s), as"
                  " `outbound-heartbeat health` runs it, raises the orphan alert:")
    for a in alerts:
        out.write(f"         alert: {a.severity} {a.check_name}: {a.detail}\n")
    gauges = {m.name: m.value for m in service.metrics(conn) if "orphan" in m.name}
    age = gauges.get("outbound_heartbeat_oldest_orphaned_call_age_seconds", 0.0)
    out.write(f"         metrics(): outbound_heartbeat_orphaned_calls"
              f" {gauges.get('outbound_heartbeat_orphaned_calls', 0.0):g},"
              f" outbound_heartbeat_oldest_orphaned_call_age_seconds {age:.1f} (the Prometheus"
              " rules' OutboundHeartbeatOrphanTimeoutOverdue fires on this gauge past the"
              " timeout: > 3900 s with the 1 h default)\n")
    if not alerts:
        raise DemoFailed(f"health_check() raised no orphan alert for job {job_id}")
    if scene.throwaway:
        service.get_active_run(conn, business_id, scene.stale_after)
        status, outcome, _, error, settled = _job(conn, job_id)
        _say(out, t0, f"GET /jobs/active for business {business_id}: that read also failed the"
                      f" orphan past call_orphan_timeout: job {job_id} {status}, call outcome"
                      f" {outcome} ({error})")
        if (status, outcome, settled) != ("failed", "timed_out", 1):
            raise DemoFailed(f"the orphan of job {job_id} was not timed out once: {status},"
                             f" {outcome}, {settled} settlements")
    else:
        timeout = conn.execute("SELECT call_orphan_timeout FROM"
                               " outbound_heartbeat.current_settings()").fetchone()
        key = _job(conn, job_id)[2]
        answer = service.resolve_call(
            conn, key, "failed", "no callback came: settled by the demo", business_id)
        _say(out, t0, f"your call_orphan_timeout ({timeout[0] if timeout else '?'}) is left"
                      f" alone: the demo settles its own orphan instead (resolve_call: job"
                      f" {job_id} {answer.status}, {answer.answer}); the timeout would have"
                      " failed it then")
    left = len(_orphans(conn, run_ids))
    _say(out, t0, f"orphaned calls left of the demo's runs: {left} (every call accounted for)")
    if left:
        raise DemoFailed(f"{left} orphaned call(s) of the demo's runs left open")
