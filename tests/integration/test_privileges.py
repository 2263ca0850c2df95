"""Least privilege: an app role that owns nothing runs a whole worker lifecycle through the API;
nobody else may call it (no PUBLIC EXECUTE); the API never lends its callers more than their
own privileges, and no caller's objects can redirect it."""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any

import psycopg
import pytest
from psycopg import sql

from outbound_heartbeat import InvalidArgument, schema, service

from ..helpers import (
    LEASE_COLUMNS,
    as_role,
    denied,
    job_statuses,
    login_dsn,
    privileges,
    refused,
    run_row,
)

Conn = psycopg.Connection[Any]


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

    added = ["outbound_heartbeat.next_job(bigint, text, bigint, text)"]
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



# -- who may call what: declared next to each function's body (_offer_to) -----------------------

#: The rule the declarations replaced, kept here only to prove they changed nothing: every
#: function without a leading underscore but for these names was the app's.
OLD_RULE_EXCLUDED = ("grant_app_role", "grant_dba_role", "hand_over_tables",
                     "prune_events", "verify_counters", "recount_counters")
OPERATOR_ONLY = {"outbound_heartbeat.prune_events(integer,integer)", "outbound_heartbeat.verify_counters()",
                 "outbound_heartbeat.recount_counters()"}


def executable(conn: Conn, role: str) -> set[str]:
    """The library's functions the role may EXECUTE, by signature."""
    rows = conn.execute(
        "SELECT p.oid::regprocedure::text FROM pg_proc p WHERE p.pronamespace = 'outbound_heartbeat'::regnamespace"
        "   AND has_function_privilege(%s, p.oid, 'EXECUTE')", (role,)).fetchall()
    return {r[0] for r in rows}


def test_app_and_dba_roles_may_call_exactly_what_the_old_name_rule_chose(
    conn: Conn, roles: dict[str, str]
) -> None:
    old_rule = {r[0] for r in conn.execute(
        "SELECT p.oid::regprocedure::text FROM pg_proc p"
        " WHERE p.pronamespace = 'outbound_heartbeat'::regnamespace AND p.proname !~ '^_'"
        "   AND p.proname <> ALL (%s)", (list(OLD_RULE_EXCLUDED),)).fetchall()}
    assert len(old_rule) >= 25 and "outbound_heartbeat.resolve_call(text,text,text,bigint,text)" in old_rule
    assert executable(conn, roles["app"]) == old_rule
    assert executable(conn, roles["dba"]) == old_rule | OPERATOR_ONLY
    assert executable(conn, roles["nobody"]) == set()
    recorded = dict(conn.execute("SELECT role::text, audience FROM outbound_heartbeat.api_roles").fetchall())
    assert {roles["app"]: "app", roles["dba"]: "dba"}.items() <= recorded.items()
    assert roles["nobody"] not in recorded


def _declare(conn: Conn, audience: str, signature: str, body: str = "SELECT 1") -> None:
    """What a later release's file does for a function it adds: body, rights, declaration."""
    returns = "integer"
    conn.execute(sql.SQL(
        "CREATE FUNCTION {sig} RETURNS {returns} LANGUAGE sql SECURITY DEFINER"
        " SET search_path = pg_catalog, pg_temp AS {body};"
        " ALTER FUNCTION {sig} OWNER TO outbound_heartbeat_owner;"
        " REVOKE ALL ON FUNCTION {sig} FROM PUBLIC;").format(
            sig=sql.SQL(signature), returns=sql.SQL(returns), body=sql.Literal(body)))
    conn.execute("SELECT outbound_heartbeat._offer_to(%s, %s)", (audience, signature))


def can_execute(conn: Conn, role: str, signature: str) -> bool:
    row = conn.execute("SELECT has_function_privilege(%s, %s, 'EXECUTE')", (role, signature)).fetchone()
    assert row is not None
    return bool(row[0])


def test_a_function_declared_later_reaches_the_granted_roles_and_no_other(
    conn: Conn, dsn: str, roles: dict[str, str]
) -> None:
    """An upgrade adding a function grants it at once to the roles grant_app_role() or
    grant_dba_role() was run for: not to a role granted one function by hand, nor to a new role
    that took a dropped app role's name."""
    app, dba, nobody = roles["app"], roles["dba"], roles["nobody"]
    conn.execute(sql.SQL("GRANT USAGE ON SCHEMA outbound_heartbeat TO {0};"
                         " GRANT EXECUTE ON FUNCTION outbound_heartbeat.metrics() TO {0}").format(
        sql.Identifier(nobody)))
    gone = f"{app}_gone"
    conn.execute(sql.SQL("CREATE ROLE {}").format(sql.Identifier(gone)))
    try:
        conn.execute("SELECT outbound_heartbeat.grant_app_role(%s)", (gone,))
        conn.execute(sql.SQL("DROP OWNED BY {0}; DROP ROLE {0}; CREATE ROLE {0}").format(sql.Identifier(gone)))

        _declare(conn, "app", "outbound_heartbeat.added_later()")
        _declare(conn, "dba", "outbound_heartbeat.added_for_operators()")
        assert [can_execute(conn, r, "outbound_heartbeat.added_later()") for r in (app, dba, nobody, gone)] == [
            True, True, False, False]
        assert [can_execute(conn, r, "outbound_heartbeat.added_for_operators()") for r in (app, dba, nobody, gone)] == [
            False, True, False, False]
        with as_role(dsn, app) as caller:
            assert caller.execute("SELECT outbound_heartbeat.added_later()").fetchone() == (1,)
            assert denied(caller, "SELECT outbound_heartbeat.added_for_operators()")
        assert conn.execute("SELECT count(*) FROM outbound_heartbeat.api_roles"
                            " WHERE role::text = %s", (gone,)).fetchone() == (0,)  # forgotten when dropped

        # Dropped, or re-created with another signature: the old row breaks no grant and goes.
        conn.execute("DROP FUNCTION outbound_heartbeat.added_later()")
        conn.execute("SELECT outbound_heartbeat.grant_app_role(%s)", (app,))
        _declare(conn, "app", "outbound_heartbeat.added_later(integer)", "SELECT $1")
        conn.execute("SELECT outbound_heartbeat.grant_dba_role(%s)", (dba,))
        assert conn.execute("SELECT signature FROM outbound_heartbeat.api_functions"
                            " WHERE signature LIKE '%%added_later%%'").fetchall() == [
            ("outbound_heartbeat.added_later(integer)",)]
        for role in (app, dba):
            assert can_execute(conn, role, "outbound_heartbeat.added_later(integer)")
    finally:
        conn.execute(sql.SQL("DROP OWNED BY {0}; DROP ROLE {0}").format(sql.Identifier(gone)))


@pytest.mark.parametrize("audience, function, column", [
    ("ops", "outbound_heartbeat.metrics()", "p_audience"),
    (None, "outbound_heartbeat.metrics()", "p_audience"),
    ("app", "outbound_heartbeat._require(boolean, text, text)", "p_function"),
    ("app", "pg_catalog.now()", "p_function"),
])
def test_a_declaration_names_what_it_refuses(conn: Conn, audience: str | None, function: str, column: str) -> None:
    before = conn.execute("SELECT * FROM outbound_heartbeat.api_functions ORDER BY 1").fetchall()
    with pytest.raises(psycopg.Error) as err:
        conn.execute("SELECT outbound_heartbeat._offer_to(%s, %s)", (audience, function))
    assert err.value.sqlstate == "OH400" and err.value.diag.column_name == column
    assert conn.execute("SELECT * FROM outbound_heartbeat.api_functions ORDER BY 1").fetchall() == before


# -- least privilege, part two: definer rights, forgeries refused, legacy and upgrade ----------


def forgeries(run_id: int, business_id: int) -> list[tuple[str, Any]]:
    """Forgeries an app role could once make, and its neighbours."""
    return [
        ("INSERT INTO outbound_heartbeat.run_events (run_id, business_id, event, created_at)"
         " VALUES (%s, %s, 'force_cancelled', now() - interval '1 day')", (run_id, business_id)),
        ("INSERT INTO outbound_heartbeat.run_events (id, run_id, business_id, event) OVERRIDING SYSTEM VALUE"
         " VALUES (1, %s, %s, 'force_cancelled')", (run_id, business_id)),
        ("SELECT outbound_heartbeat._record_event(%s, %s, 'force_cancelled', NULL, '{}')", (run_id, business_id)),
        ("SELECT * FROM outbound_heartbeat._end_runs(ARRAY[%s]::bigint[], 'completed', 'finished', 'forged')",
         (run_id,)),
        ("SELECT * FROM outbound_heartbeat._lock_run_for_caller(%s, NULL)", (run_id,)),
        ("SELECT outbound_heartbeat._chain_event(1, %s, %s, 'x', NULL, '{}', now())", (run_id, business_id)),
        *[(f"UPDATE outbound_call_runs SET {column} = NULL WHERE id = %s", (run_id,))
          for column in LEASE_COLUMNS if column != "lease_epoch"],
        ("UPDATE outbound_call_runs SET lease_epoch = 0 WHERE id = %s", (run_id,)),
        ("UPDATE outbound_heartbeat.run_events SET detail = '{}' WHERE run_id = %s", (run_id,)),
        ("DELETE FROM outbound_heartbeat.run_events WHERE run_id = %s", (run_id,)),
        ("UPDATE outbound_heartbeat.run_event_chain SET hash = NULL WHERE run_id = %s", (run_id,)),
        ("DELETE FROM outbound_heartbeat.run_event_heads WHERE run_id = %s", (run_id,)),
        ("UPDATE outbound_heartbeat.settings SET stale_after = interval '1 hour'", None),
        ("SELECT outbound_heartbeat.grant_app_role(current_user)", None),
        ("DELETE FROM outbound_call_jobs WHERE run_id = %s", (run_id,)),
    ]


def test_every_forgery_is_refused_with_42501(conn: Conn, dsn: str, roles: dict[str, str]) -> None:
    run = service.create_run(conn, 4, [{}, {}])
    claim = service.claim_run(conn, "w", run.id)
    assert claim is not None
    lease = "SELECT status, locked_by_worker, lock_ts, lease_epoch, cancel_requested_at FROM outbound_call_runs" \
            " WHERE id = %s"
    before = conn.execute(lease, (run.id,)).fetchone()
    events = conn.execute("SELECT count(*) FROM outbound_heartbeat.run_events").fetchone()
    with psycopg.connect(login_dsn(dsn, roles["app"]), autocommit=True) as app:
        for query, params in forgeries(run.id, 4):
            assert refused(app, query, params) == "42501", query
        # The API still works for that role: the lease holds, the epoch only goes up.
        assert service.heartbeat(app, run.id, "w", claim.lease_epoch) == "ok"
    assert conn.execute(lease, (run.id,)).fetchone() == before
    assert conn.execute("SELECT count(*) FROM outbound_heartbeat.run_events").fetchone() == events
    assert service.verify_events(conn) == []


def test_nobody_lowers_an_epoch_not_even_the_dba(conn: Conn, dsn: str, roles: dict[str, str]) -> None:
    run = service.create_run(conn, 4, [{}])
    claim = service.claim_run(conn, "w", run.id)
    assert claim is not None
    with psycopg.connect(login_dsn(dsn, roles["dba"]), autocommit=True) as dba:
        with pytest.raises(psycopg.Error) as err:
            dba.execute("UPDATE outbound_call_runs SET lease_epoch = lease_epoch - 1 WHERE id = %s", (run.id,))
        assert err.value.sqlstate == "OH400" and err.value.diag.column_name == "lease_epoch"
        # ...but fixes anything else by hand: a lock, a status, the settings.
        dba.execute("UPDATE outbound_call_runs SET locked_by_worker = NULL, status = 'failed',"
                    " lease_epoch = lease_epoch + 1 WHERE id = %s", (run.id,))
        dba.execute("UPDATE outbound_heartbeat.settings SET lock_timeout = interval '3 seconds'")
    assert run_row(conn, run.id)["lease_epoch"] == claim.lease_epoch + 1


def test_the_app_role_writes_what_its_own_code_writes(conn: Conn, dsn: str, roles: dict[str, str]) -> None:
    with psycopg.connect(login_dsn(dsn, roles["app"]), autocommit=True) as app:
        # An ORM creating a run and its jobs itself, then the worker API taking it from there.
        row = app.execute("INSERT INTO outbound_call_runs (business_id, status) VALUES (9, 'pending')"
                          " RETURNING id").fetchone()
        assert row is not None
        run_id = row[0]
        app.execute("INSERT INTO outbound_call_jobs (run_id, business_id, payload) VALUES (%s, 9, '{}'),"
                    " (%s, 9, '{}')", (run_id, run_id))
        claim = service.claim_run(app, "w", run_id)
        assert claim is not None
        job = service.next_job(app, run_id, "w", claim.lease_epoch)
        assert job is not None
        # A telephony status callback finishing a dialled job by plain UPDATE.
        app.execute("UPDATE outbound_call_jobs SET status = 'completed', error_message = NULL,"
                    " updated_at = now() WHERE id = %s", (job.id,))
        app.execute("UPDATE outbound_call_runs SET updated_at = now() WHERE id = %s", (run_id,))
        assert service.finish_run(app, run_id, "w", claim.lease_epoch).jobs_failed == 1
        assert refused(app, "UPDATE outbound_call_runs SET lease_epoch = lease_epoch + 1 WHERE id = %s",
                       (run_id,)) == "42501"
    assert job_statuses(conn, run_id) == {job.id: "completed", job.id + 1: "failed"}


def test_a_lease_and_the_flask_adapter_run_as_the_app_role(conn: Conn, dsn: str, roles: dict[str, str]) -> None:
    from flask import Flask

    from outbound_heartbeat.contrib.flask import create_blueprint
    from outbound_heartbeat.lease import Lease

    app_dsn = login_dsn(dsn, roles["app"])
    run = service.create_run(conn, 11, [{}, {}])
    with Lease(app_dsn, "lease-worker", run.id, interval=1) as lease:
        job = lease.next_job()
        assert job is not None
        lease.finish_job(job.id, "completed")
        with psycopg.connect(app_dsn, autocommit=True) as pooled:
            web = Flask(__name__)
            web.register_blueprint(create_blueprint(lambda: contextlib.nullcontext(pooled),
                                                    lambda: 11))
            client = web.test_client()
            assert client.get("/api/outbound_calls/jobs/active").status_code == 200
            assert client.post(f"/api/outbound_calls/jobs/{run.id}/cancel").status_code == 200
            other = service.create_run(conn, 12, [{}])
            assert client.post(f"/api/outbound_calls/jobs/{other.id}/force-cancel").status_code == 403
            deadline = time.monotonic() + 15
            while not lease.cancel_requested and time.monotonic() < deadline:
                time.sleep(0.1)
            assert lease.cancel_requested
    assert run_row(conn, run.id)["status"] == "cancelled"
    denied_events = [e for e in service.list_events(conn, run_id=other.id) if e.event == "access_denied"]
    assert [(e.business_id, e.detail["owner_business_id"]) for e in denied_events] == [(11, 12)]


def test_legacy_option_lets_old_workers_write_their_lock_until_granted_again(
    conn: Conn, dsn: str, roles: dict[str, str]
) -> None:
    run = service.create_run(conn, 5, [{}])
    legacy_write = "UPDATE outbound_call_runs SET locked_by_worker = 'old-worker', lock_ts = now(),"\
                   " status = 'running' WHERE id = %s"
    conn.execute("SELECT outbound_heartbeat.grant_app_role(%s, legacy => true)", (roles["app"],))
    with psycopg.connect(login_dsn(dsn, roles["app"]), autocommit=True) as app:
        assert refused(app, legacy_write, (run.id,)) is None
        for column in ("last_heartbeat_at", "lease_epoch", "cancel_requested_at"):
            assert refused(app, f"UPDATE outbound_call_runs SET {column} = NULL WHERE id = %s",
                           (run.id,)) == "42501", column
    conn.execute("SELECT outbound_heartbeat.grant_app_role(%s)", (roles["app"],))  # rolling deploy done
    with psycopg.connect(login_dsn(dsn, roles["app"]), autocommit=True) as app:
        assert refused(app, legacy_write, (run.id,)) == "42501"
    # The legacy worker's run is judged by lock_ts (no heartbeat) and reclaimed like any other.
    assert run_row(conn, run.id)["locked_by_worker"] == "old-worker"


def test_regranting_moves_a_role_of_the_old_model_to_the_new_one(conn: Conn, roles: dict[str, str]) -> None:
    app = roles["nobody"]
    # What grant_app_role() of the previous release granted.
    for statement in (
        "GRANT USAGE ON SCHEMA outbound_heartbeat TO {}",
        "GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA outbound_heartbeat TO {}",
        "GRANT SELECT, INSERT, UPDATE ON public.outbound_call_runs, public.outbound_call_jobs TO {}",
        "GRANT SELECT ON outbound_heartbeat.settings TO {}",
        "GRANT SELECT, INSERT ON outbound_heartbeat.run_events TO {}",
    ):
        conn.execute(sql.SQL(statement).format(sql.Identifier(app)))
    old = privileges(conn, app)
    assert {"run_events INSERT", "outbound_call_runs.lease_epoch UPDATE", "_end_runs EXECUTE"} <= old
    conn.execute("SELECT outbound_heartbeat.grant_app_role(%s)", (app,))
    assert privileges(conn, app) == privileges(conn, roles["app"])
    new = privileges(conn, app)
    leaked = sorted(p for p in new if p.startswith("_") or (" INSERT" in p and p.startswith("run_events")))
    assert leaked == []
    assert not any(f".{column} UPDATE" in p for p in new for column in LEASE_COLUMNS)
    assert {"outbound_call_runs.status UPDATE", "outbound_call_jobs.status UPDATE", "heartbeat EXECUTE",
            "run_events SELECT", "outbound_call_runs.business_id INSERT", "outbound_call_jobs INSERT"} <= new


def test_reapplying_sql_twice_keeps_definer_rights_and_grants(conn: Conn, roles: dict[str, str]) -> None:
    before = privileges(conn, roles["app"])
    conn.execute("SET client_min_messages = warning")
    for _ in range(2):
        for path in schema.sql_files():
            conn.execute(path.read_text(encoding="utf-8"))
    conn.execute("RESET client_min_messages")
    rows = conn.execute(
        "SELECT p.proname, p.prosecdef, pg_get_userbyid(p.proowner), p.proconfig FROM pg_proc p"
        " WHERE p.pronamespace = 'outbound_heartbeat'::regnamespace").fetchall()
    assert len(rows) > 25
    for name, definer, owner, config in rows:
        if name in ("grant_app_role", "grant_dba_role", "hand_over_tables"):
            assert not definer, name  # granting stays with the schema's owner, as the invoker
        else:
            assert (definer, owner) == (True, "outbound_heartbeat_owner"), name
        assert "search_path=pg_catalog, pg_temp" in config, name
    assert privileges(conn, roles["app"]) == before
    assert conn.execute(
        "SELECT count(*) FROM pg_proc p, aclexplode(p.proacl) a"
        " WHERE p.pronamespace = 'outbound_heartbeat'::regnamespace AND p.proname LIKE '\\_%%'"
        " AND a.grantee <> p.proowner").fetchone() == (0,)
    role = conn.execute("SELECT rolcanlogin, rolsuper FROM pg_roles WHERE rolname = 'outbound_heartbeat_owner'"
                        ).fetchone()
    assert role == (False, False)


def test_notify_cannot_be_revoked_so_listeners_check_the_audit_trail(
    conn: Conn, dsn: str, roles: dict[str, str]
) -> None:
    run = service.create_run(conn, 6, [{}])
    conn.execute("LISTEN outbound_heartbeat")
    spoof = json.dumps({"event": "force_cancelled", "run_id": run.id, "business_id": 6})
    with psycopg.connect(login_dsn(dsn, roles["app"]), autocommit=True) as app:
        # PostgreSQL has no privilege on NOTIFY: any role can send any payload on any channel.
        assert refused(app, "SELECT pg_notify('outbound_heartbeat', %s)", (spoof,)) is None
    received = [n.payload for n in conn.notifies(timeout=5, stop_after=1)]
    conn.execute("UNLISTEN outbound_heartbeat")
    assert received == [spoof]
    # What a listener must do with a hint: the audit trail has no such transition.
    assert [e.event for e in service.list_events(conn, run_id=run.id)] == ["created"]
    assert run_row(conn, run.id)["status"] == "pending"
