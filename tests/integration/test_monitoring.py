"""The DBA views answer the DBA's monitoring queries and only read."""

from __future__ import annotations

from typing import Any

import psycopg

from outbound_heartbeat import service

from ..helpers import backdate_heartbeat, run_row, snapshot

Conn = psycopg.Connection[Any]


def test_views_answer_the_seed_queries_and_write_nothing(conn: Conn) -> None:
    runs = []
    for business, age in ((1, 5), (2, 45), (3, 400)):
        run = service.create_run(conn, business, [{}, {}])
        assert service.claim_run(conn, f"w{business}", run.id) is not None
        backdate_heartbeat(conn, run.id, age)
        runs.append(run.id)
    fresh, stale, oldest = runs
    pending = service.create_run(conn, 4, [{}]).id
    ended = service.create_run(conn, 5, []).id
    service.force_cancel(conn, ended)
    before = snapshot(conn)

    assert conn.execute("SELECT id FROM outbound_heartbeat.stale_runs ORDER BY id").fetchall() == [
        (stale,), (oldest,)
    ]
    rows = conn.execute(
        "SELECT id, locked_by_worker, extract(epoch FROM heartbeat_age)::int, stale"
        " FROM outbound_heartbeat.oldest_heartbeats"
    ).fetchall()
    assert [r[0] for r in rows] == [oldest, stale, fresh]
    assert rows[0][1] == "w3" and 400 <= rows[0][2] < 430 and rows[0][3] is True
    assert rows[2][3] is False
    counts = dict(conn.execute("SELECT status, runs FROM outbound_heartbeat.run_status_counts").fetchall())
    assert counts == {"pending": 1, "running": 3, "completed": 0, "stopped": 0, "cancelled": 1, "failed": 0}
    assert pending not in [r[0] for r in rows]

    assert snapshot(conn) == before  # reading the views reclaimed nothing
    assert run_row(conn, stale)["status"] == "running"


def test_status_counts_include_an_apps_own_status(conn: Conn) -> None:
    conn.execute("INSERT INTO outbound_call_runs (business_id, status) VALUES (1, 'paused')")
    counts = dict(conn.execute("SELECT status, runs FROM outbound_heartbeat.run_status_counts").fetchall())
    assert counts["paused"] == 1 and counts["running"] == 0
