"""``outbound-heartbeat demo``: a worker is SIGKILLed mid-run and its run is reclaimed.

Two businesses, one run each, two real worker subprocesses (``example_worker``). One worker is
killed with SIGKILL; every second the demo asks for the business's active run, as the web UI
does, and shows the heartbeat ageing until that very call stops the run. The other run is
force-cancelled while its worker is alive. Then the audit trail of both runs is printed.

Without ``dsn`` it runs on a throwaway PostgreSQL (``outbound_heartbeat.testing``) whose
``stale_after`` it sets to the demo threshold. With ``dsn`` it migrates that database, leaves its
settings alone (the reader passes the threshold to ``get_active_run`` instead) and leaves the two
ended runs and their events behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any, TextIO

import psycopg

from . import calls, schema, service
from .records import AuditEvent, Run
from .worker_process import WorkerProcess

__all__ = [
    "DIAL_SECONDS",
    "JOBS_PER_RUN",
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
                    "UPDATE outbound_heartbeat.settings"
                    " SET stale_after = %s, restart_grace = interval '0'",
                    (stale_after,),
                )
                out.write(
                    f"demo threshold: a heartbeat older than {threshold:g} s is dead"
                    " (set in this throwaway database; the default is 30 s)\n"
                )
                businesses = THROWAWAY_BUSINESSES
            else:
                out.write(
                    f"demo threshold: {threshold:g} s, passed to"
                    " get_active_run(stale_after => ...); your settings table is not changed\n"
                )
                businesses = OWN_DB_BUSINESSES
            _demo(conn, db, out, businesses, stale_after, workers, pause)
            if pause > 0:
                out.write(f"the console stays up {pause:g} s more\n")
                out.flush()
                time.sleep(pause)
    return 0


def _demo(
    conn: psycopg.Connection[Any],
    db: str,
    out: TextIO,
    businesses: tuple[int, int],
    stale_after: timedelta,
    workers: list[WorkerProcess],
    pause: float = 0.0,
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
            jobs = [{"phone": demo_phone(i), "demo": True} for i in range(JOBS_PER_RUN)]
            runs.append(service.create_run(conn, biz, jobs))
    try:
        _story(conn, db, out, businesses, stale_after, workers, runs, t0, pause)
    except BaseException:
        # Ctrl-C or a failure: no demo run may stay open for a real dialer to pick up.
        # A fresh connection: the demo's own may be cut mid-statement by the interrupt.
        _close_all(workers)
        with contextlib.suppress(Exception), psycopg.connect(db, autocommit=True) as cleanup:
            for run in runs:
                service.force_cancel(cleanup, run.id)
            out.write("demo stopped early: its runs were force-cancelled\n")
        raise


def _story(
    conn: psycopg.Connection[Any],
    db: str,
    out: TextIO,
    businesses: tuple[int, int],
    stale_after: timedelta,
    workers: list[WorkerProcess],
    runs: list[Run],
    t0: float,
    pause: float,
) -> None:
    threshold = stale_after.total_seconds()
    biz_a, biz_b = businesses
    run_a, run_b = runs
    _say(out, t0, f"business {biz_a}: run {run_a.id}, business {biz_b}: run {run_b.id},"
                  f" {JOBS_PER_RUN} queued calls each")

    for name, run in (("demo-dialer-a", run_a), ("demo-dialer-b", run_b)):
        w = WorkerProcess(db, "--worker-id", name, "--run-id", str(run.id),
                          "--dial-seconds", str(DIAL_SECONDS))
        workers.append(w)
        claimed = w.wait_for("claimed", timeout=30)
        _say(out, t0, f"worker {name} (pid {w.pid}) claimed run {run.id}, lease epoch"
                      f" {claimed['epoch']}, heartbeat every {claimed['interval']:g} s")
    worker_a, worker_b = workers
    for w in workers:
        w.wait_for("dialed", timeout=30)
    time.sleep(2 * DIAL_SECONDS)
    if pause > 0:
        _say(out, t0, f"waiting {pause:g} s before the kill (open the console now)")
        time.sleep(pause)
    epoch_a = worker_a.seen[0]["epoch"]

    worker_a.signal(signal.SIGKILL)
    worker_a.wait_exit(10)
    killed_at = time.monotonic()
    _say(out, t0, f"SIGKILL worker demo-dialer-a: run {run_a.id} is still 'running' in the"
                  " table, with nobody to finish it")
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
    in_progress = conn.execute(
        "SELECT count(*) FROM public.outbound_call_jobs"
        " WHERE run_id = %s AND status = 'in_progress'",
        (run_a.id,),
    ).fetchone()
    _say(out, t0, f"  404 no active run: this very call stopped run {run_a.id}"
                  f" {waited:.1f} s after the kill: {stopped.detail['jobs_failed']} queued jobs"
                  f" failed, {in_progress[0] if in_progress else '?'} in-progress call left to the"
                  " telephony callbacks, lock cleared")
    zombie = service.heartbeat(conn, run_a.id, "demo-dialer-a", epoch_a)
    _say(out, t0, f"a zombie heartbeat with the dead worker's lease now answers {zombie!r}")

    result = service.force_cancel(conn, run_b.id, business_id=biz_b)
    _say(out, t0, f"force-cancel run {run_b.id} (worker alive): {result.previous_status} ->"
                  f" {result.status}, {result.jobs_cancelled} jobs cancelled")
    code = worker_b.wait_exit(30)
    last = [s for s in worker_b.steps() if s in ("released", "lost")]
    _say(out, t0, f"worker demo-dialer-b learned it at its next heartbeat and stopped dialing"
                  f" (exit {code}, said {last[-1] if last else 'nothing'!r})")
    again = service.force_cancel(conn, run_b.id, business_id=biz_b)
    _say(out, t0, f"force-cancel again: {again.jobs_cancelled} jobs cancelled (idempotent)")

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
