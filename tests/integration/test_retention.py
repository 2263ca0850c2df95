"""Retention of the audit trail: prune_events() deletes only run_events rows past the
events_retention setting, in batches, and nothing of the app's; the events counter does not go
back; bad arguments change nothing; only the schema's owner may prune; the CLI's `prune`."""

from __future__ import annotations

import io
from typing import Any

import psycopg
import pytest
from psycopg import sql

from outbound_heartbeat import InvalidArgument, cli, service

from ..helpers import old_events, snapshot

Conn = psycopg.Connection[Any]


def events_total(conn: Conn) -> float:
    return sum(m.value for m in service.metrics(conn) if m.name == "outbound_heartbeat_events_total")


def seed_history(conn: Conn, old_runs: int = 7) -> list[int]:
    """Runs with two events each (created, force_cancelled); those of the first old_runs runs
    were written a year ago."""
    ids = []
    for b in range(old_runs + 2):
        if b < old_runs:
            row = conn.execute("INSERT INTO outbound_call_runs (business_id, status) VALUES (%s, 'cancelled')"
                               " RETURNING id", (b + 1,)).fetchone()
            assert row is not None
            old_events(conn, row[0], b + 1, ["created", "force_cancelled"])
            ids.append(row[0])
        else:
            run = service.create_run(conn, b + 1, [{}])
            service.force_cancel(conn, run.id)
            ids.append(run.id)
    return ids


def test_prunes_only_events_past_retention_in_batches(conn: Conn) -> None:
    ids = seed_history(conn)  # 7 old runs x 2 events (created, force_cancelled) = 14 old events
    app_tables = snapshot(conn)[:2]
    total = events_total(conn)
    first = service.prune_events(conn, batch_size=5, max_batches=2)
    assert (first.events_deleted, first.batches, first.done) == (10, 2, False)
    second = service.prune_events(conn, batch_size=5, max_batches=10)
    assert (second.events_deleted, second.batches, second.done) == (4, 1, True)
    left = conn.execute("SELECT DISTINCT run_id FROM outbound_heartbeat.run_events ORDER BY 1").fetchall()
    assert [r[0] for r in left] == ids[7:]
    assert snapshot(conn)[:2] == app_tables  # runs and jobs untouched
    assert events_total(conn) == total  # a counter: pruning does not take events back
    assert service.prune_events(conn).events_deleted == 0


def test_retention_is_a_setting(conn: Conn) -> None:
    seed_history(conn, old_runs=0)
    for run_id in (1001, 1002):
        old_events(conn, run_id, 1, ["created", "force_cancelled"], age="2 days")
    assert service.prune_events(conn).events_deleted == 0  # default 90 days
    conn.execute("UPDATE outbound_heartbeat.settings SET events_retention = interval '1 day'")
    assert service.prune_events(conn).events_deleted == 4
    with pytest.raises(psycopg.errors.CheckViolation):
        conn.execute("UPDATE outbound_heartbeat.settings SET events_retention = interval '0'")


@pytest.mark.parametrize("args, column", [((0, 1), "batch_size"), ((1, 0), "max_batches"),
                                          ((None, 1), "batch_size"), ((2_000_000, 1), "batch_size")])
def test_bad_arguments_change_nothing(conn: Conn, args: tuple[Any, Any], column: str) -> None:
    seed_history(conn)
    before = snapshot(conn)
    with pytest.raises(InvalidArgument) as err:
        service.prune_events(conn, *args)
    assert err.value.sqlstate == "OH400" and err.value.argument == column
    assert snapshot(conn) == before


def test_operators_prune_the_app_cannot(conn: Conn, dsn: str) -> None:
    seed_history(conn)
    app, dba = "oh_app_prune", "oh_dba_prune"
    for role, grant in ((app, "grant_app_role"), (dba, "grant_dba_role")):
        conn.execute(sql.SQL("CREATE ROLE {}").format(sql.Identifier(role)))
        conn.execute(sql.SQL("SELECT outbound_heartbeat.{}(%s)").format(sql.Identifier(grant)), (role,))
    try:
        before = snapshot(conn)
        with psycopg.connect(dsn, autocommit=True) as session:
            session.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(app)))
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                service.prune_events(session)
        assert snapshot(conn) == before
        with psycopg.connect(dsn, autocommit=True) as session:
            session.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(dba)))
            assert service.prune_events(session).events_deleted == 14
    finally:
        for role in (app, dba):
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_cli_prune_loops_in_short_batches(conn: Conn, dsn: str) -> None:
    seed_history(conn)
    out = io.StringIO()
    assert cli.main(["prune", "--dsn", dsn, "--batch-size", "3", "--json"], out=out) == 0
    assert '"events_deleted": 14' in out.getvalue() and '"batches": 5' in out.getvalue()
    assert '"done": true' in out.getvalue()
    out = io.StringIO()
    assert cli.main(["prune", "--dsn", dsn], out=out) == 0
    assert out.getvalue().startswith("deleted 0 events older than")
    assert " in 1 batch" in out.getvalue() and "batches" not in out.getvalue()  # plural right


def test_plan_uses_the_created_at_index(conn: Conn) -> None:
    conn.execute("INSERT INTO outbound_heartbeat.run_events (run_id, business_id, event, created_at)"
                 " SELECT g, 1, 'created', now() - make_interval(days => g % 200)"
                 " FROM generate_series(1, 20000) AS g")
    conn.execute("ANALYZE outbound_heartbeat.run_events")
    plan = "\n".join(r[0] for r in conn.execute(
        "EXPLAIN SELECT ctid FROM outbound_heartbeat.run_events WHERE created_at < now() - interval '190 days'"
        " ORDER BY created_at LIMIT 100").fetchall())
    assert "run_events_created_idx" in plan, plan
