"""Least privilege: an app role that owns nothing runs a whole worker lifecycle through the API;
nobody else may call it (no PUBLIC EXECUTE); the API never lends its callers more than their
own privileges, and no caller's objects can redirect it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from outbound_heartbeat import InvalidArgument, service

Conn = psycopg.Connection[Any]


@pytest.fixture
def roles(conn: Conn) -> Iterator[dict[str, str]]:
    suffix = uuid.uuid4().hex[:8]
    names = {kind: f"oh_{kind}_{suffix}" for kind in ("app", "dba", "nobody")}
    for name in names.values():
        conn.execute(sql.SQL("CREATE ROLE {}").format(sql.Identifier(name)))
    conn.execute("SELECT outbound_heartbeat.grant_app_role(%s)", (names["app"],))
    conn.execute("SELECT outbound_heartbeat.grant_dba_role(%s)", (names["dba"],))
    try:
        yield names
    finally:
        conn.execute("RESET ROLE")
        for name in names.values():
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def as_role(dsn: str, role: str) -> Conn:
    conn = psycopg.connect(dsn, autocommit=True)
    conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
    return conn


def denied(conn: Conn, query: str, params: Any = None) -> bool:
    try:
        conn.execute(query, params)
    except psycopg.errors.InsufficientPrivilege:
        return True
    return False


def test_app_role_runs_a_whole_lifecycle_without_owning_anything(conn: Conn, dsn: str, roles: dict[str, str]) -> None:
    with as_role(dsn, roles["app"]) as app:
        run = service.create_run(app, 7, [{"phone": "1"}, {"phone": "2"}, {"phone": "3"}])
        claim = service.claim_run(app, "dialer-1", run.id)
        assert claim is not None
        assert service.heartbeat(app, run.id, "dialer-1", claim.lease_epoch) == "ok"
        job = service.next_job(app, run.id, "dialer-1", claim.lease_epoch)
        assert job is not None
        assert service.finish_job(app, job.id, "dialer-1", claim.lease_epoch, "completed").outcome == "finished"
        active = service.get_active_run(app, 7)
        assert active is not None and active.queued_jobs == 2
        assert service.request_cancel(app, run.id, 7).status == "running"
        assert service.heartbeat(app, run.id, "dialer-1", claim.lease_epoch) == "cancel_requested"
        assert service.finish_run(app, run.id, "dialer-1", claim.lease_epoch, "cancelled").jobs_failed == 2
        other = service.create_run(app, 7, [{}])
        assert service.force_cancel(app, other.id, 7).jobs_cancelled == 1
        assert service.cleanup_stuck_runs(app) == []
        assert service.health_check(app) == []
        assert next(e.event for e in service.list_events(app, run_id=run.id)) == "finished"
        assert service.metrics(app)
        app.execute("SELECT * FROM outbound_heartbeat.active_runs").fetchall()
        # ...and nothing more: no deletes, no truncation, no settings change.
        assert denied(app, "DELETE FROM outbound_call_runs WHERE id = %s", (run.id,))
        assert denied(app, "DELETE FROM outbound_heartbeat.run_events")
        assert denied(app, "TRUNCATE outbound_call_jobs")
        assert denied(app, "UPDATE outbound_heartbeat.settings SET stale_after = interval '1 hour'")
    owners = conn.execute(
        "SELECT DISTINCT pg_get_userbyid(relowner) FROM pg_class WHERE relname IN"
        " ('outbound_call_runs', 'outbound_call_jobs', 'run_events', 'settings')").fetchall()
    assert (roles["app"],) not in owners


def test_dba_role_changes_settings_but_deletes_nothing(dsn: str, roles: dict[str, str]) -> None:
    with as_role(dsn, roles["dba"]) as dba:
        dba.execute("UPDATE outbound_heartbeat.settings SET stale_after = interval '20 seconds'")
        run = service.create_run(dba, 3, [{}])
        assert service.force_cancel(dba, run.id).jobs_cancelled == 1
        assert denied(dba, "DELETE FROM outbound_call_runs")


def test_no_public_execute(conn: Conn, dsn: str, roles: dict[str, str]) -> None:
    run = service.create_run(conn, 1, [{}])
    with as_role(dsn, roles["nobody"]) as nobody:
        assert denied(nobody, "SELECT outbound_heartbeat.force_cancel(%s)", (run.id,))
    # Even with the schema opened to it, the role gets no function PUBLIC could reach.
    conn.execute(sql.SQL("GRANT USAGE ON SCHEMA outbound_heartbeat TO {}").format(sql.Identifier(roles["nobody"])))
    with as_role(dsn, roles["nobody"]) as nobody:
        for query in (f"SELECT outbound_heartbeat.force_cancel({run.id})",
                      "SELECT outbound_heartbeat.heartbeat(1, 'w', 1)",
                      "SELECT outbound_heartbeat._end_runs(ARRAY[1::bigint], 'stopped', 'x', 'x')",
                      "SELECT * FROM outbound_heartbeat.cleanup_stuck_runs()"):
            assert denied(nobody, query), query
    unexpected = conn.execute(
        "SELECT p.proname FROM pg_proc p WHERE p.pronamespace = 'outbound_heartbeat'::regnamespace"
        " AND has_function_privilege('public', p.oid, 'EXECUTE')").fetchall()
    assert unexpected == []
    assert conn.execute("SELECT status FROM outbound_call_runs WHERE id = %s", (run.id,)).fetchone() == ("pending",)


def test_api_lends_no_privilege_and_ignores_the_callers_objects(conn: Conn, dsn: str, roles: dict[str, str]) -> None:
    app = roles["app"]
    conn.execute("CREATE SCHEMA secret")
    conn.execute("CREATE TABLE secret.keys (k text)")
    conn.execute(sql.SQL("CREATE SCHEMA mine AUTHORIZATION {}").format(sql.Identifier(app)))
    with as_role(dsn, app) as caller:
        assert denied(caller, "SELECT * FROM secret.keys")
        # The caller's own look-alike table and a function shadowing now(), first on its path.
        caller.execute("CREATE TABLE mine.outbound_call_runs (LIKE public.outbound_call_runs)")
        caller.execute("CREATE FUNCTION mine.now() RETURNS timestamptz LANGUAGE sql"
                       " AS $$ SELECT timestamptz '2000-01-01' $$")
        caller.execute("SET search_path = mine, pg_catalog, public")
        run = service.create_run(caller, 5, [{}])
        claim = service.claim_run(caller, "w", run.id)
        assert claim is not None
        assert service.heartbeat(caller, run.id, "w", claim.lease_epoch) == "ok"
        assert caller.execute("SELECT count(*) FROM mine.outbound_call_runs").fetchone() == (0,)
        assert denied(caller, "SELECT outbound_heartbeat.grant_app_role(%s)", (roles["nobody"],))
    row = conn.execute("SELECT business_id, last_heartbeat_at > now() - interval '1 minute'"
                       " FROM public.outbound_call_runs WHERE id = %s", (run.id,)).fetchone()
    assert row == (5, True)  # written to the real table, on the real clock


def test_grant_to_a_missing_role_is_oh400(conn: Conn) -> None:
    with pytest.raises(psycopg.Error) as err:
        conn.execute("SELECT outbound_heartbeat.grant_app_role('no_such_role_anywhere')")
    assert err.value.sqlstate == "OH400" and err.value.diag.column_name == "role_name"
    assert InvalidArgument.sqlstate == "OH400"


def test_upgrade_grants_new_functions_to_roles_granted_before(
    conn: Conn, dsn: str, roles: dict[str, str]
) -> None:
    """A release that adds a function (or a new signature) must not break an app role granted
    under the previous release: re-applying sql/ (what each release's upgrade migration does)
    grants it what the role could not have had."""
    from outbound_heartbeat.schema import sql_files

    added = ["outbound_heartbeat._completed_under_lease(bigint, text, bigint)",
             "outbound_heartbeat.next_job(bigint, text, bigint, text)"]
    for signature in added:  # as if granted before these existed
        conn.execute(sql.SQL("REVOKE EXECUTE ON FUNCTION {} FROM {}").format(
            sql.SQL(signature), sql.Identifier(roles["app"])))
    with as_role(dsn, roles["app"]) as app:
        run = service.create_run(app, 7, [{}])
        claim = service.claim_run(app, "dialer-1", run.id)
        assert claim is not None
        assert denied(app, "SELECT * FROM outbound_heartbeat.next_job(%s, 'dialer-1', %s)",
                      (run.id, claim.lease_epoch))
    with conn.transaction():
        for path in sql_files():
            conn.execute(path.read_text(encoding="utf-8"))  # type: ignore[arg-type]
    with as_role(dsn, roles["app"]) as app:
        assert service.next_job(app, run.id, "dialer-1", claim.lease_epoch) is not None
    with as_role(dsn, roles["nobody"]) as nobody:  # nobody else gained anything
        assert denied(nobody, "SELECT outbound_heartbeat.heartbeat(1, 'x', 1)")
    for signature in added:
        row = conn.execute("SELECT has_function_privilege(%s, %s, 'EXECUTE')",
                           (roles["app"], signature)).fetchone()
        assert row == (True,)
