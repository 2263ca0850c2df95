"""The demo (the README's second command) runs end to end: on a throwaway server, and on a
database given with --dsn, whose settings it must leave alone."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest

from outbound_heartbeat import service

from ..helpers import backdate_heartbeat, job_statuses, run_row

SCRIPT = Path(sys.executable).parent / "outbound-heartbeat"


def check_story(out: str, throwaway: bool = True) -> None:
    killed = re.search(r"SIGKILL worker demo-dialer-a mid-call: its call to \+1-202-555-01\d\d"
                       r" \(key oh1-(\d+)-\d+-\d+-\.\.\.\) is ringing at the provider", out)
    assert killed, out
    stopped = re.search(r"404 no active run: this very call stopped run \d+ ([\d.]+) s after the kill", out)
    assert stopped, out
    # Threshold 6 s; the kill lands up to one heartbeat interval (2 s) after the last beat, and
    # the reader polls every second: generous slack for a busy machine.
    assert 4.0 <= float(stopped.group(1)) < 16.0, out
    assert "1 in-progress call marked orphaned (left to the telephony callback)" in out
    # The killed worker's ringing call, as orphaned_calls lists it: reason and age.
    job = killed.group(1)
    assert re.search(rf"orphaned_calls: job {job} \(run \d+, business \d+\): run stopped: worker"
                     r" heartbeat stale, orphaned [\d.]+ s ago, no callback yet", out), out
    assert "zombie heartbeat with the dead worker's lease now answers 'lost'" in out
    # Settled by the provider's status callback through the Flask endpoint, once.
    assert re.search(rf"the provider ends that call \(completed\) and POSTs its status callback to"
                     rf" the endpoint: HTTP 200: job {job} completed, call outcome completed,"
                     r" settled by callback", out), out
    assert ("the same callback again (a provider's retry): HTTP 200: still 1 settlement in the"
            " audit trail (settled once)") in out
    cancelled = re.search(r"force-cancel run \d+ \(worker alive, mid-call\): running -> cancelled,"
                          r" (\d+) jobs cancelled, 1 in-progress call marked orphaned", out)
    assert cancelled and int(cancelled.group(1)) > 0, out
    second = re.search(r"orphaned_calls: job (\d+) \(run \d+, business \d+\): run force-cancelled",
                       out)
    assert second, out
    assert "force-cancel again: 0 jobs cancelled" in out
    # The alert on the call no callback settles, and the gauge Prometheus watches.
    check = "orphan_timeout_overdue" if throwaway else "orphaned_calls"
    severity = "critical" if throwaway else "warning"
    assert re.search(rf"alert: {severity} {check}: run \d+ \(business \d+\): 1 orphaned call\(s\)"
                     r" without a callback", out), out
    assert re.search(r"metrics\(\): outbound_heartbeat_orphaned_calls [1-9]\d*,"
                     r" outbound_heartbeat_oldest_orphaned_call_age_seconds [\d.]+", out), out
    if throwaway:
        assert re.search(rf"that read also failed the orphan past call_orphan_timeout: job"
                         rf" {second.group(1)} failed, call outcome timed_out \(call orphaned \(run"
                         r" force-cancelled\) and not resolved within 00:00:04\)", out), out
    else:
        assert re.search(r"your call_orphan_timeout \(1:00:00\) is left alone: the demo settles"
                         rf" its own orphan instead \(resolve_call: job {second.group(1)} failed,"
                         r" resolved\)", out), out
    assert "orphaned calls left of the demo's runs: 0 (every call accounted for)" in out
    assert "log: [STALE_DETECTION]" in out and "log: [FORCE_CANCEL]" in out
    timeline = re.findall(r"^\s+\+\s*[\d.]+s run \d+\s+(\w+)", out, re.MULTILINE)
    assert timeline.count("created") == 2 and "stale_stopped" in timeline and "force_cancelled" in timeline
    assert "call_resolved" in timeline
    assert ("call_timed_out" in timeline) == throwaway


def test_demo_on_a_throwaway_server() -> None:
    done = subprocess.run([str(SCRIPT), "demo"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "started a throwaway PostgreSQL" in done.stdout
    assert "throwaway PostgreSQL stopped and removed" in done.stdout
    check_story(done.stdout)


def test_demo_on_your_database_keeps_your_settings(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        before = conn.execute("SELECT * FROM outbound_heartbeat.settings").fetchall()
    done = subprocess.run([str(SCRIPT), "demo", "--dsn", dsn], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "your settings table is not changed" in done.stdout
    check_story(done.stdout, throwaway=False)
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("SELECT * FROM outbound_heartbeat.settings").fetchall() == before
        statuses: Any = dict(conn.execute(
            "SELECT business_id, status FROM outbound_call_runs ORDER BY id").fetchall())
        assert statuses == {990001: "stopped", 990002: "cancelled"}
        assert service.get_active_run(conn, 990001) is None
        # Every call accounted for: none left orphaned, each settled once, nothing timed out.
        assert conn.execute("SELECT count(*) FROM outbound_heartbeat.orphaned_calls").fetchone() == (0,)
        outcomes: Any = dict(conn.execute(
            "SELECT r.business_id, array_agg(j.call_outcome ORDER BY j.id)"
            " FROM outbound_call_jobs AS j JOIN outbound_call_runs AS r ON r.id = j.run_id"
            " WHERE j.orphaned_at IS NOT NULL GROUP BY r.business_id").fetchall())
        assert outcomes == {990001: ["completed"], 990002: ["failed"]}
    # A second demo on the same database works: the ended runs are no obstacle.
    again = subprocess.run([str(SCRIPT), "demo", "--dsn", dsn], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr


def test_demo_refuses_before_writing_anything(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        busy = service.create_run(conn, 990002, [{}])
        done = subprocess.run([str(SCRIPT), "demo", "--dsn", dsn], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 1, done.stdout + done.stderr
        assert f"business 990002 already has an open run ({busy.id}, pending): nothing was created" in done.stderr
        runs = conn.execute("SELECT id FROM outbound_call_runs ORDER BY id").fetchall()
        assert runs == [(busy.id,)]  # no run for 990001 was left behind for a real dialer


def test_demo_threshold_is_checked_before_a_server_starts() -> None:
    done = subprocess.run([str(SCRIPT), "demo", "--threshold", "2h"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1 and "from 3 s" in done.stderr, done.stdout + done.stderr
    assert "started a throwaway PostgreSQL" not in done.stdout


@pytest.mark.parametrize("sigint", ["default", "inherited_ignored"])
def test_interrupted_demo_cancels_its_runs(dsn: str, sigint: str) -> None:
    # inherited_ignored: as a shell without job control starts a background command.
    command = [str(SCRIPT), "demo", "--dsn", dsn]
    if sigint == "inherited_ignored":
        command = ["bash", "-c", 'trap "" INT; exec "$@"', "demo", *command]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        seen = []
        for line in proc.stdout:  # bounded by the demo itself and the timeout below
            seen.append(line)
            if "claimed run" in line:
                break
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 130, "".join(seen) + rest + err
    assert "its runs were force-cancelled, their calls settled as failed" in rest
    with psycopg.connect(dsn, autocommit=True) as conn:
        statuses = conn.execute(
            "SELECT status FROM outbound_call_runs WHERE business_id IN (990001, 990002)"
        ).fetchall()
        phones = conn.execute("SELECT DISTINCT payload->>'to' FROM outbound_call_jobs").fetchall()
        orphans = conn.execute("SELECT count(*) FROM outbound_heartbeat.orphaned_calls").fetchone()
    assert len(statuses) == 2 and {s for (s,) in statuses} == {"cancelled"}
    assert orphans == (0,)  # a call in flight at the Ctrl-C is settled, not left to a timeout
    assert all(p.startswith("+1-202-555-01") for (p,) in phones)


def test_demo_never_judges_a_live_run_with_its_own_threshold(dsn: str) -> None:
    # A real worker of business 990001 beats every 9 s, allowed by the database's 30 s; its
    # last beat is 4 s old. The demo's 3 s threshold must not stop it: the demo refuses.
    with psycopg.connect(dsn, autocommit=True) as conn:
        run = service.create_run(conn, 990001, [{"n": i} for i in range(5)])
        claim = service.claim_run(conn, "real-dialer", run.id)
        assert claim is not None
        backdate_heartbeat(conn, run.id, 4)
        before = conn.execute("SELECT count(*) FROM outbound_call_runs").fetchone()
    done = subprocess.run([str(SCRIPT), "demo", "--dsn", dsn, "--threshold", "3s", "--no-console"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"business 990001 already has an open run ({run.id}, running" in done.stderr
    assert "nothing was created" in done.stderr
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM outbound_call_runs").fetchone() == before
        row = run_row(conn, run.id)
        assert (row["status"], row["locked_by_worker"], row["lease_epoch"]) == (
            "running", "real-dialer", claim.lease_epoch)
        assert set(job_statuses(conn, run.id).values()) == {"queued"}
        assert service.heartbeat(conn, run.id, "real-dialer", claim.lease_epoch) == "ok"
