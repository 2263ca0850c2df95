"""The operator CLI on real PostgreSQL: every subcommand's output, JSON and exit status."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from outbound_heartbeat import cli, service

from ..helpers import backdate_heartbeat, run_row

Conn = psycopg.Connection[Any]
SCRIPT = Path(sys.executable).parent / "outbound-heartbeat"


def run_cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = cli.main(list(argv), out=out)
    return code, out.getvalue()


def running_run(conn: Conn, business: int, jobs: int = 3, worker: str = "w1") -> int:
    run = service.create_run(conn, business, [{"n": i} for i in range(jobs)])
    claim = service.claim_run(conn, worker, run.id)
    assert claim is not None
    return run.id


def test_unreachable_database_is_one_line(capsys: Any) -> None:
    code, _ = run_cli("status", "--dsn", "host=127.0.0.1 port=1 dbname=x connect_timeout=2")
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith("outbound-heartbeat status: error: cannot connect") and err.count("\n") == 1
    code, _ = run_cli("health", "--dsn", "host=127.0.0.1 port=1 dbname=x connect_timeout=2")
    assert code == 3  # Nagios UNKNOWN


def test_database_from_environment(conn: Conn, dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    run_id = running_run(conn, 7)
    monkeypatch.setenv("DATABASE_URL", dsn)
    code, out = run_cli("status")
    assert code == 0 and str(run_id) in out


def test_migrate_apply_list_rollback(empty_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    every = ["0001.install-sql", "0002.monitoring", "0003.online-upgrade", "0004.guarantees-cross",
             "0005.call-keys-and-orphans"]
    code, out = run_cli("migrate", "list", "--dsn", empty_dsn)
    assert code == 0 and out.splitlines() == [f"[pending] {m}" for m in every]
    code, out = run_cli("migrate", "--dsn", empty_dsn)
    assert code == 0 and out.splitlines() == [f"applied {m}" for m in every]
    code, out = run_cli("migrate", "apply", "--dsn", empty_dsn)
    assert code == 0 and "up to date" in out
    capsys.readouterr()
    # The newest migration offers no rollback: one line says so, nothing changes.
    code, out = run_cli("migrate", "rollback", "--dsn", empty_dsn)
    err = capsys.readouterr().err
    assert code == 1 and out == "" and "error: 0005.call-keys-and-orphans cannot be rolled back" in err, err
    code, out = run_cli("migrate", "list", "--dsn", empty_dsn)
    assert out.splitlines() == [f"[applied] {m}" for m in every]


def test_status_table_json_and_filter(conn: Conn, dsn: str) -> None:
    assert run_cli("status", "--dsn", dsn) == (0, "no active runs\n")
    live = running_run(conn, 1, jobs=2)
    dead = running_run(conn, 2, jobs=4, worker="w2")
    pending = service.create_run(conn, 3, [{}]).id
    backdate_heartbeat(conn, dead, 45)

    code, out = run_cli("status", "--dsn", dsn)
    assert code == 0
    lines = {int(line.split()[0]): line.split() for line in out.splitlines()[1:]}
    assert set(lines) == {live, dead, pending}
    assert lines[dead][1:4] == ["2", "running", "w2"] and lines[dead][5] == "STALE"
    assert lines[live][5] == "no" and lines[pending][2] == "pending"
    assert 44 <= float(lines[dead][4].rstrip("s")) < 60

    code, out = run_cli("status", "--json", "--dsn", dsn)
    runs = {r["id"]: r for r in json.loads(out)}
    assert runs[dead]["stale"] is True and runs[dead]["queued_jobs"] == 4
    assert runs[live]["stale"] is False and runs[live]["heartbeat_age"] < 30
    assert runs[pending]["heartbeat_age"] is None
    code, out = run_cli("status", "--json", "--business", "1", "--dsn", dsn)
    assert [r["id"] for r in json.loads(out)] == [live]
    # status only reads: the stale run is still running afterwards.
    assert run_row(conn, dead)["status"] == "running"


def test_sweep_reclaims_and_reports(conn: Conn, dsn: str) -> None:
    dead = running_run(conn, 1, jobs=5)
    live = running_run(conn, 2, worker="w2")
    backdate_heartbeat(conn, dead, 60)
    code, out = run_cli("sweep", "--dsn", dsn)
    assert code == 0
    assert out == f"run {dead} (business 1, worker w1): stopped, reason stale_heartbeat, 5 queued jobs failed\n"
    assert run_row(conn, dead)["status"] == "stopped"
    assert run_row(conn, live)["status"] == "running"
    assert run_cli("sweep", "--dsn", dsn) == (0, "nothing to reclaim\n")

    # The live run of w2 may be another live process with that name: left alone until stale.
    code, out = run_cli("sweep", "--on-startup", "--worker-id", "w2", "--json", "--dsn", dsn)
    assert (code, json.loads(out)) == (0, [])
    backdate_heartbeat(conn, live, 60)
    code, out = run_cli("sweep", "--on-startup", "--worker-id", "w2", "--json", "--dsn", dsn)
    [reclaimed] = json.loads(out)
    assert code == 0 and reclaimed["run_id"] == live and reclaimed["reason"] == "on_startup"


def test_sweep_on_startup_needs_worker_id(conn: Conn, dsn: str, capsys: Any) -> None:
    before = run_row(conn, running_run(conn, 1))
    assert run_cli("sweep", "--on-startup", "--dsn", dsn)[0] == 2  # a usage error
    err = capsys.readouterr().err
    assert "--worker-id" in err and err.count("\n") == 1
    assert run_row(conn, before["id"]) == before


def test_force_cancel_prints_jobs_cancelled_and_is_idempotent(conn: Conn, dsn: str) -> None:
    run_id = running_run(conn, 4, jobs=15)
    code, out = run_cli("force-cancel", str(run_id), "--dsn", dsn)
    assert code == 0
    assert out == f"run {run_id} (business 4): cancelled (was running), 15 jobs cancelled\n"
    assert run_row(conn, run_id)["status"] == "cancelled"
    code, out = run_cli("force-cancel", str(run_id), "--json", "--dsn", dsn)
    assert code == 0 and json.loads(out)["jobs_cancelled"] == 0


def test_cancel_asks_the_worker(conn: Conn, dsn: str) -> None:
    run_id = running_run(conn, 4)
    code, out = run_cli("cancel", str(run_id), "--dsn", dsn)
    assert code == 0 and "cancel requested" in out
    row = run_row(conn, run_id)
    assert row["status"] == "running" and row["cancel_requested_at"] is not None
    pending = service.create_run(conn, 4, [{}, {}]).id
    code, out = run_cli("cancel", str(pending), "--dsn", dsn)
    assert "cancelled (was pending), 2 jobs cancelled" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["force-cancel", "999999"], "does not exist"),
        (["cancel", "999999"], "does not exist"),
        (["force-cancel", "{run}", "--business", "5"], "business"),
    ],
)
def test_cancel_errors_exit_1_and_change_nothing(
    conn: Conn, dsn: str, capsys: Any, argv: list[str], message: str
) -> None:
    run_id = running_run(conn, 4, jobs=3)
    before = run_row(conn, run_id)
    code, out = run_cli(*[a.format(run=run_id) for a in argv], "--dsn", dsn)
    err = capsys.readouterr().err
    assert code == 1 and out == "" and message in err.lower() and err.count("\n") == 1
    assert run_row(conn, run_id) == before


def test_missing_schema_says_to_migrate(empty_dsn: str, capsys: Any) -> None:
    code, _ = run_cli("status", "--dsn", empty_dsn)
    err = capsys.readouterr().err
    assert code == 1 and "outbound-heartbeat migrate" in err and err.count("\n") == 1


def test_health_defaults_to_stale_after(conn: Conn, dsn: str) -> None:
    # stale_after is 30 s: a run 45 s silent is dead, though a fixed 2 min alert would not be due.
    dead = running_run(conn, 98)
    backdate_heartbeat(conn, dead, 45)
    code, out = run_cli("health", "--dsn", dsn)
    assert code == 2 and f"CRITICAL stale_heartbeat run {dead}" in out
    code, out = run_cli("health", "--alert-after", "2min", "--dsn", dsn)
    assert code == 0 and out.startswith("OUTBOUND_HEARTBEAT OK")


def test_health_exit_codes_follow_nagios(conn: Conn, dsn: str) -> None:
    code, out = run_cli("health", "--dsn", dsn)
    assert code == 0 and out.startswith("OUTBOUND_HEARTBEAT OK")

    for business in range(6):
        running_run(conn, 10 + business)
    code, out = run_cli("health", "--dsn", dsn)
    assert code == 1 and "WARNING too_many_running" in out

    dead = running_run(conn, 99)
    backdate_heartbeat(conn, dead, 180)
    code, out = run_cli("health", "--dsn", dsn)
    assert code == 2 and out.startswith("OUTBOUND_HEARTBEAT CRITICAL - 1 critical, 1 warning")
    assert f"CRITICAL stale_heartbeat run {dead}" in out

    code, out = run_cli("health", "--json", "--max-stuck", "10", "--alert-after", "5min", "--dsn", dsn)
    assert code == 0 and json.loads(out) == {"status": "ok", "exit_code": 0, "alerts": []}
    code, out = run_cli("health", "--json", "--alert-after", "90s", "--max-stuck", "10", "--dsn", dsn)
    report = json.loads(out)
    assert code == 2 and [a["run_id"] for a in report["alerts"]] == [dead]


def parse_prometheus(text: str) -> dict[str, float]:
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_metrics_prometheus_exposition(conn: Conn, dsn: str) -> None:
    live = running_run(conn, 1, jobs=3)
    dead = running_run(conn, 2, jobs=2, worker="w2")
    service.create_run(conn, 3, [{}])
    done = running_run(conn, 4, worker="w4")
    service.force_cancel(conn, done)
    backdate_heartbeat(conn, dead, 100)
    code, out = run_cli("metrics", "--dsn", dsn)
    assert code == 0
    m = parse_prometheus(out)
    assert m['outbound_heartbeat_runs{status="running"}'] == 2
    assert m['outbound_heartbeat_runs{status="pending"}'] == 1
    assert m['outbound_heartbeat_runs{status="cancelled"}'] == 1
    assert m['outbound_heartbeat_runs{status="stopped"}'] == 0
    assert m['outbound_heartbeat_open_jobs{status="queued"}'] == 3 + 2 + 1
    assert m["outbound_heartbeat_stale_runs"] == 1
    assert 99 <= m["outbound_heartbeat_oldest_heartbeat_age_seconds"] < 130
    assert m['outbound_heartbeat_events_total{event="created"}'] == 4
    assert m['outbound_heartbeat_events_total{event="force_cancelled"}'] == 1
    assert out.count("# TYPE outbound_heartbeat_runs gauge") == 1
    assert "# TYPE outbound_heartbeat_events_total counter" in out
    assert live  # the live run counts as running and not stale


def test_events_filters_and_order(conn: Conn, dsn: str) -> None:
    a = running_run(conn, 1)
    b = running_run(conn, 2, worker="w2")
    service.force_cancel(conn, a)
    code, out = run_cli("events", "--run", str(a), "--json", "--dsn", dsn)
    assert code == 0
    assert [e["event"] for e in json.loads(out)] == ["created", "claimed", "force_cancelled"]
    code, out = run_cli("events", "--business", "2", "--json", "--dsn", dsn)
    assert {e["run_id"] for e in json.loads(out)} == {b}
    code, out = run_cli("events", "--limit", "2", "--json", "--dsn", dsn)
    assert [e["event"] for e in json.loads(out)] == ["claimed", "force_cancelled"]
    code, out = run_cli("events", "--run", str(a), "--dsn", dsn)
    assert out.splitlines()[0].split()[:4] == ["at", "(UTC)", "run", "business"]
    assert "force_cancelled" in out.splitlines()[-1]
    assert run_cli("events", "--run", "999999", "--dsn", dsn) == (0, "no events\n")


def test_console_script_and_module_entry_points(conn: Conn, dsn: str) -> None:
    dead = running_run(conn, 1)
    backdate_heartbeat(conn, dead, 300)
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    by_script = subprocess.run([str(SCRIPT), "health", "--dsn", dsn], capture_output=True, text=True, env=env, timeout=60)
    by_module = subprocess.run([sys.executable, "-m", "outbound_heartbeat", "health", "--dsn", dsn],
                               capture_output=True, text=True, env=env, timeout=60)
    for done in (by_script, by_module):
        assert done.returncode == 2, done.stderr
        assert f"CRITICAL stale_heartbeat run {dead}" in done.stdout
    missing = subprocess.run([str(SCRIPT), "sweep"], capture_output=True, text=True, env=env, timeout=60)
    assert missing.returncode == 2 and "--dsn" in missing.stderr and missing.stdout == ""


@pytest.mark.parametrize("argv", [["console", "--port", "{port}", "--dsn", "{dsn}"],
                                  ["demo", "--console-port", "{port}"]])
def test_a_port_in_use_is_one_line_naming_it(dsn: str, argv: list[str]) -> None:
    # Exit 1 (not 2): the command is well formed and works once the port is free.
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        started = time.monotonic()
        done = subprocess.run([str(SCRIPT), *[a.format(port=port, dsn=dsn) for a in argv]],
                              capture_output=True, text=True, timeout=60)
    flag = argv[1]
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and f"{flag} {port}" in lines[0] and "in use" in lines[0], done.stderr
    assert "Traceback" not in done.stderr and "started a throwaway" not in done.stdout
    assert time.monotonic() - started < 30  # refused before any server starts


@pytest.mark.parametrize("table", ["outbound_heartbeat.settings", "public.outbound_call_runs"])
@pytest.mark.parametrize("command", [
    ["health"], ["status"], ["metrics"], ["events"], ["events", "--verify"], ["sweep"],
    ["force-cancel", "RUN"],
])
def test_commands_give_up_behind_an_exclusive_lock(
    conn: Conn, dsn: str, table: str, command: list[str]
) -> None:
    # VACUUM FULL, ALTER TABLE or an open TRUNCATE hold ACCESS EXCLUSIVE: a check that waited
    # for ever would be killed by its scheduler and read as CRITICAL instead of UNKNOWN.
    run_id = running_run(conn, 1)
    command = [str(run_id) if arg == "RUN" else arg for arg in command]
    with psycopg.connect(dsn) as holder:
        holder.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        done = subprocess.run(
            [str(SCRIPT), *command, "--dsn", dsn, "--timeout", "1s"],
            capture_output=True, text=True, timeout=30,
        )
        elapsed = time.monotonic() - started
        holder.rollback()
    # Never a hang: the command either did not need the locked table, or gave up on time.
    assert elapsed < 15, elapsed
    if command == ["health"] or done.returncode != 0:
        assert done.returncode == (3 if command == ["health"] else 1), done.stdout + done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "--timeout 1.0s" in lines[0], done.stderr
        assert "lock" in lines[0]
    # Nothing was changed: the run is still running, its lease intact.
    row = run_row(conn, run_id)
    assert (row["status"], row["locked_by_worker"]) == ("running", "w1")


def test_timeout_is_validated_like_every_duration(dsn: str, capsys: Any) -> None:
    for value in ("-5s", "0", "soon"):
        with pytest.raises(SystemExit) as exc:
            cli.main(["status", "--dsn", dsn, "--timeout", value])
        assert exc.value.code == 2
        assert "--timeout" in capsys.readouterr().err
