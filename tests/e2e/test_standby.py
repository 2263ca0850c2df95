"""Status from a hot standby: the read-only surfaces (views, list_active_runs, list_events,
metrics, health_check) and the CLI's read commands work on a streaming replica and show the
primary's state; the calls that stop stale runs or write say, with one clear error (OH503,
ReadOnlyServer, HTTP 503), that they belong on the primary."""

from __future__ import annotations

import io
from typing import Any

import psycopg
import pytest

from outbound_heartbeat import ReadOnlyServer, cli, service, web

from ..helpers import backdate_heartbeat, primary_and_standby, wait_replayed

READ_ONLY_QUERIES = {
    "active_runs": "SELECT id, business_id, status, locked_by_worker, queued_jobs, in_progress_jobs,"
                   " stale FROM outbound_heartbeat.active_runs ORDER BY id",
    "list_active_runs": "SELECT id, status, stale FROM outbound_heartbeat.list_active_runs() ORDER BY id",
    "stale_runs": "SELECT id FROM outbound_heartbeat.stale_runs ORDER BY id",
    "oldest_heartbeats": "SELECT id, locked_by_worker, stale FROM outbound_heartbeat.oldest_heartbeats",
    "run_status_counts": "SELECT * FROM outbound_heartbeat.run_status_counts",
    "list_events": "SELECT id, run_id, event FROM outbound_heartbeat.list_events()",
    "metrics": "SELECT name, labels, value FROM outbound_heartbeat.metrics()"
               " WHERE name <> 'outbound_heartbeat_oldest_heartbeat_age_seconds'",
    "health_check": "SELECT severity, check_name, run_id FROM outbound_heartbeat.health_check("
                    "interval '1 minute')",
}


def run_cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    return cli.main(list(argv), out), out.getvalue()


def test_read_only_surfaces_on_a_standby_show_the_primarys_state() -> None:
    with primary_and_standby() as (_, primary_dsn, _standby, standby_dsn):
        with psycopg.connect(primary_dsn, autocommit=True) as conn:
            conn.execute("UPDATE outbound_heartbeat.settings SET restart_grace = interval '0'")
            live = service.create_run(conn, 1, [{"n": 1}, {"n": 2}])
            dead = service.create_run(conn, 2, [{"n": 1}])
            service.create_run(conn, 3, [{"n": 1}])  # pending
            for run, worker in ((live, "w-live"), (dead, "w-dead")):
                assert service.claim_run(conn, worker, run.id) is not None
            backdate_heartbeat(conn, dead.id, 600)  # dead for 10 minutes, not swept yet
        wait_replayed(primary_dsn, standby_dsn)
        with psycopg.connect(primary_dsn) as primary, psycopg.connect(standby_dsn) as standby:
            row = standby.execute("SELECT pg_is_in_recovery()").fetchone()
            assert row == (True,)
            for name, query in READ_ONLY_QUERIES.items():
                on_primary = primary.execute(query).fetchall()
                assert on_primary, name
                assert standby.execute(query).fetchall() == on_primary, name
            stale = standby.execute("SELECT id FROM outbound_heartbeat.stale_runs").fetchall()
            assert stale == [(dead.id,)]

        # The CLI's read commands take the standby's DSN.
        code, text = run_cli("status", "--dsn", standby_dsn, "--json")
        assert code == 0 and str(dead.id) in text and "w-live" in text
        code, text = run_cli("health", "--dsn", standby_dsn, "--alert-after", "1min")
        assert code == 2 and str(dead.id) in text  # critical: the dead run, seen from the standby
        code, text = run_cli("metrics", "--dsn", standby_dsn)
        assert code == 0 and "outbound_heartbeat_stale_runs 1" in text
        code, text = run_cli("events", "--dsn", standby_dsn, "--run", str(live.id))
        assert code == 0 and "claimed" in text


def test_calls_that_write_on_a_standby_raise_read_only_server(capsys: pytest.CaptureFixture[str]) -> None:
    with primary_and_standby() as (_, primary_dsn, _standby, standby_dsn):
        with psycopg.connect(primary_dsn, autocommit=True) as conn:
            conn.execute("UPDATE outbound_heartbeat.settings SET restart_grace = interval '0'")
            run = service.create_run(conn, 1, [{"n": 1}])
            claim = service.claim_run(conn, "w-dead", run.id)
            assert claim is not None
            backdate_heartbeat(conn, run.id, 600)
        wait_replayed(primary_dsn, standby_dsn)
        with psycopg.connect(standby_dsn, autocommit=True) as conn:
            calls: dict[str, Any] = {
                "get_active_run": lambda: service.get_active_run(conn, 1),
                "cleanup_stuck_runs": lambda: service.cleanup_stuck_runs(conn),
                "force_cancel": lambda: service.force_cancel(conn, run.id),
                "request_cancel": lambda: service.request_cancel(conn, run.id),
                "heartbeat": lambda: service.heartbeat(conn, run.id, "w-dead", claim.lease_epoch),
                "claim_run": lambda: service.claim_run(conn, "w-new"),
            }
            for name, call in calls.items():
                with pytest.raises(ReadOnlyServer) as caught:
                    call()
                assert "primary" in caught.value.message, name
                assert caught.value.http_status == 503
            # psql users of the functions that stop stale runs see the documented SQLSTATE.
            for query, params in (("SELECT * FROM outbound_heartbeat.get_active_run(1)", None),
                                  ("SELECT * FROM outbound_heartbeat.cleanup_stuck_runs()", None),
                                  ("SELECT outbound_heartbeat.heartbeat(%s, 'w-dead', %s)",
                                   (run.id, claim.lease_epoch)),
                                  ("SELECT * FROM outbound_heartbeat.force_cancel(%s)", (run.id,))):
                with pytest.raises(psycopg.Error) as raw:
                    conn.execute(query, params)
                assert raw.value.sqlstate == "OH503", query
                assert raw.value.diag.message_primary is not None
                assert "read-only server" in raw.value.diag.message_primary
        # Nothing changed: the primary still has the run running, as the standby shows it.
        with psycopg.connect(primary_dsn, autocommit=True) as conn:
            row = conn.execute("SELECT status FROM outbound_call_runs WHERE id = %s", (run.id,)).fetchone()
            assert row == ("running",)

        code, _ = run_cli("sweep", "--dsn", standby_dsn)
        assert code != 0
        assert "read-only server" in capsys.readouterr().err


def test_read_only_server_maps_to_503_in_both_locales() -> None:
    err = ReadOnlyServer("read-only server: call the primary")
    for locale in ("en", "he"):
        reply = web.reply_for_error(err, web.messages(locale))
        assert reply.status == 503
        assert reply.body["code"] == "OH503"
        assert reply.body["error"] == web.messages(locale)["read_only"]
