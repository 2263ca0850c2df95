"""An app role that owns the app tables (the common deployment: the app's role created them).

As an owner it can attach code to the tables (a trigger, a WHEN clause, a column default, ...)
that the API, which runs as outbound_heartbeat_owner, would run with rights the app lacks;
it can disable the library's triggers and write the lease columns. grant_app_role() refuses such
a role (or warns with allow_table_owner), the API refuses (OH428) to run code a role outside the
trusted set wrote, and hand_over_tables() / ``outbound-heartbeat handover`` move the tables to a
separate owner, online, after which none of it is possible (docs/security.md, "Who owns the
tables")."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from outbound_heartbeat import InvalidArgument, RunLocked, UnsafeTables, admin, cli, schema, service
from outbound_heartbeat.upgrade import LockPolicy, apply_sql_online

from ..helpers import LEASE_COLUMNS, backdate_heartbeat, login_dsn, privileges, refused

Conn = psycopg.Connection[Any]
TABLES = ("public.outbound_call_runs", "public.outbound_call_jobs")


@pytest.fixture
def owner_app(conn: Conn, roles: dict[str, str]) -> Iterator[str]:
    """A login role that owns both app tables, as when the app's own role created them (granted
    the app's rights before it took them, as an earlier release let it)."""
    role = f"oh_owner_app_{uuid.uuid4().hex[:8]}"
    conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    conn.execute("SELECT outbound_heartbeat.grant_app_role(%s)", (role,))
    conn.execute(sql.SQL("CREATE SCHEMA {} AUTHORIZATION {}").format(sql.Identifier(role), sql.Identifier(role)))
    for table in TABLES:
        conn.execute(sql.SQL("ALTER TABLE {} OWNER TO {}").format(sql.SQL(table), sql.Identifier(role)))
    try:
        yield role
    finally:
        conn.execute("RESET ROLE")
        for table in TABLES:  # back to the test's superuser, so DROP OWNED leaves them
            conn.execute(sql.SQL("ALTER TABLE {} OWNER TO CURRENT_USER").format(sql.SQL(table)))
        conn.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(sql.Identifier(role)))
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def owners(conn: Conn) -> list[str]:
    rows = conn.execute("SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid = ANY(%s::regclass[])"
                        " ORDER BY oid", (list(TABLES),)).fetchall()
    return [r[0] for r in rows]


def sqlstate_of(conn: Conn, query: str, params: Any = None) -> tuple[str | None, str]:
    try:
        conn.execute(query, params)
    except psycopg.Error as exc:
        return exc.sqlstate, exc.diag.message_primary or ""
    return None, ""


# -- grant_app_role() ---------------------------------------------------------------------------


def test_grant_app_role_refuses_a_role_that_owns_the_tables(conn: Conn, owner_app: str) -> None:
    before = privileges(conn, owner_app)
    with pytest.raises(psycopg.Error) as err:
        conn.execute("SELECT outbound_heartbeat.grant_app_role(%s)", (owner_app,))
    assert err.value.sqlstate == "OH400" and err.value.diag.column_name == "role_name"
    message = err.value.diag.message_primary or ""
    assert f"role {owner_app} owns public.outbound_call_runs" in message, message
    assert "hand_over_tables" in (err.value.diag.message_hint or "")
    assert privileges(conn, owner_app) == before  # nothing granted or revoked
    with pytest.raises(psycopg.Error) as err:
        conn.execute("SELECT outbound_heartbeat.grant_dba_role(%s)", (owner_app,))
    assert err.value.sqlstate == "OH400"


def test_grant_app_role_refuses_a_role_that_can_set_role_to_the_owner(conn: Conn, roles: dict[str, str]) -> None:
    app = roles["nobody"]
    # Member of the tables' owner (the test's superuser) is every superuser's case; here: a
    # member of outbound_heartbeat_owner, the owner of the library's functions.
    conn.execute(sql.SQL("GRANT outbound_heartbeat_owner TO {}").format(sql.Identifier(app)))
    try:
        with pytest.raises(InvalidArgument) as err:
            admin.grant_app_role(conn, app)
        assert err.value.argument == "role_name"
        assert f"role {app} can SET ROLE to outbound_heartbeat_owner, which owns" in err.value.message
    finally:
        conn.execute(sql.SQL("REVOKE outbound_heartbeat_owner FROM {}").format(sql.Identifier(app)))


def test_allow_table_owner_grants_with_a_loud_warning(conn: Conn, owner_app: str, caplog: Any,
                                                      capsys: Any, dsn: str) -> None:
    with caplog.at_level("WARNING", logger="outbound_heartbeat.admin"):
        warnings = admin.grant_app_role(conn, owner_app, allow_table_owner=True)
    assert len(warnings) == 1 and warnings[0].startswith(f"UNSAFE grant_app_role('{owner_app}'"), warnings
    assert "owns public.outbound_call_runs" in warnings[0]
    assert any("[SECURITY] UNSAFE grant_app_role" in r.getMessage() for r in caplog.records)
    assert "heartbeat EXECUTE" in privileges(conn, owner_app)
    # The CLI: refused without the flag (one line, exit 1), a WARNING on stderr with it.
    assert cli.main(["grant-app-role", owner_app, "--dsn", dsn]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"role {owner_app} owns public.outbound_call_runs" in err
    assert cli.main(["grant-app-role", owner_app, "--allow-table-owner", "--dsn", dsn]) == 0
    captured = capsys.readouterr()
    assert "WARNING: UNSAFE grant_app_role(" in captured.err
    assert "UNSAFE" in captured.out


def test_the_old_signatures_are_gone(conn: Conn) -> None:
    rows = conn.execute("SELECT p.oid::regprocedure::text FROM pg_proc p"
                        " WHERE p.pronamespace = 'outbound_heartbeat'::regnamespace"
                        " AND p.proname IN ('grant_app_role', 'grant_dba_role') ORDER BY 1").fetchall()
    assert [r[0] for r in rows] == ["outbound_heartbeat.grant_app_role(text,boolean,boolean)",
                                    "outbound_heartbeat.grant_dba_role(text,boolean)"]


# -- the attack: the app's own code on its tables, run by the API --------------------------------

#: A function the app role writes: with the API's rights it forges an audit event, deletes
#: another business's events and grants itself _record_event. As the app role it can do none.
EVIL = """
GRANT USAGE ON SCHEMA {schema} TO PUBLIC;
CREATE FUNCTION {schema}.evil() RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO outbound_heartbeat.run_events (run_id, business_id, event) VALUES (-1, 999, 'forged');
    GRANT EXECUTE ON FUNCTION outbound_heartbeat._record_event(bigint, bigint, text, text, jsonb) TO {role};
    RETURN true;
END $$;
CREATE FUNCTION {schema}.evil_trigger() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM {schema}.evil(); RETURN NEW; END $$;
CREATE FUNCTION {schema}.harmless_trigger() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp AS $$ BEGIN RETURN NEW; END $$;
"""

VECTORS = {
    "trigger": "CREATE TRIGGER aaa_app BEFORE INSERT OR UPDATE ON public.outbound_call_runs"
               " FOR EACH ROW EXECUTE FUNCTION {schema}.evil_trigger()",
    "WHEN clause": "CREATE TRIGGER aaa_app BEFORE INSERT OR UPDATE ON public.outbound_call_runs"
                   " FOR EACH ROW WHEN ({schema}.evil()) EXECUTE FUNCTION {schema}.harmless_trigger()",
    "column default": "ALTER TABLE public.outbound_call_runs ADD COLUMN app_note boolean;"
                      " ALTER TABLE public.outbound_call_runs ALTER COLUMN app_note SET DEFAULT {schema}.evil()",
}


def forged(conn: Conn, app: str) -> tuple[int, bool]:
    row = conn.execute(
        "SELECT (SELECT count(*) FROM outbound_heartbeat.run_events WHERE event = 'forged'),"
        " has_function_privilege(%s, 'outbound_heartbeat._record_event(bigint, bigint, text, text, jsonb)',"
        " 'EXECUTE')", (app,)).fetchone()
    assert row is not None
    return int(row[0]), bool(row[1])


@pytest.mark.parametrize("vector", sorted(VECTORS))
def test_the_api_never_runs_the_app_roles_code_with_its_rights(
    conn: Conn, dsn: str, owner_app: str, vector: str
) -> None:
    run = service.create_run(conn, 4, [{}, {}])
    claim = service.claim_run(conn, "w", run.id)
    assert claim is not None
    names = {"schema": sql.Identifier(owner_app).as_string(conn), "role": sql.Identifier(owner_app).as_string(conn)}
    with psycopg.connect(login_dsn(dsn, owner_app), autocommit=True) as app:
        app.execute(EVIL.format(**names))
        app.execute(VECTORS[vector].format(**names))
        # As itself the app role can do none of it.
        assert refused(app, f"SELECT {names['schema']}.evil()") == "42501"
        runs_before = conn.execute("SELECT count(*) FROM outbound_call_runs").fetchone()
        for call in (lambda: service.create_run(app, 4, [{}]),
                     lambda: service.claim_run(app, "w2"),
                     lambda: service.heartbeat(app, run.id, "w", claim.lease_epoch),
                     lambda: service.heartbeat_leases(app, [(run.id, "w", claim.lease_epoch)]),
                     lambda: service.next_job(app, run.id, "w", claim.lease_epoch),
                     lambda: service.finish_runs(app, [(run.id, "w", claim.lease_epoch, "completed")]),
                     lambda: service.get_active_run(app, 4),
                     lambda: service.cleanup_stuck_runs(app),
                     lambda: service.force_cancel(app, run.id, 4)):
            with pytest.raises(UnsafeTables) as err:
                call()
            assert err.value.sqlstate == "OH428"
            assert "public.outbound_call_runs" in err.value.message
        assert conn.execute("SELECT count(*) FROM outbound_call_runs").fetchone() == runs_before
    assert forged(conn, owner_app) == (0, False)
    assert service.verify_events(conn) == []
    # Its SECURITY DEFINER trigger functions run with its own rights: those the API runs.
    conn.execute("ALTER TABLE public.outbound_call_runs DROP COLUMN IF EXISTS app_note")
    conn.execute("DROP TRIGGER IF EXISTS aaa_app ON public.outbound_call_runs")
    conn.execute(sql.SQL("CREATE TRIGGER aaa_app BEFORE INSERT OR UPDATE ON public.outbound_call_runs"
                         " FOR EACH ROW EXECUTE FUNCTION {}.harmless_trigger()").format(sql.Identifier(owner_app)))
    with psycopg.connect(login_dsn(dsn, owner_app), autocommit=True) as app:
        assert service.heartbeat(app, run.id, "w", claim.lease_epoch) == "ok"
        assert service.create_run(app, 4, [{}]).status == "pending"


#: Code an owning app role attaches that names no function of its own, yet runs with the API's
#: rights: a library function (only the owner may EXECUTE _record_event) and a built-in that runs
#: SQL text. Set as a default after the column exists, so nothing runs as the app role.
BORROWED = {
    "library function": "(outbound_heartbeat._record_event(-1, 999, 'forged', 'x', '{}'::jsonb))::text",
    "query_to_xml": "(pg_catalog.query_to_xml('SELECT outbound_heartbeat._record_event(-1, 999, ''forged'',"
                    " ''x'', ''{}''::jsonb)', false, false, ''))::text",
    # reads, into a column the app can read, a table only the API's owner may
    "table_to_xml": "(pg_catalog.table_to_xml('outbound_heartbeat.run_events'::regclass, false, false, ''))::text",
}


@pytest.mark.parametrize("vector", sorted(BORROWED))
def test_a_default_borrowing_the_apis_functions_is_refused(
    conn: Conn, dsn: str, owner_app: str, vector: str
) -> None:
    with psycopg.connect(login_dsn(dsn, owner_app), autocommit=True) as app:
        app.execute("ALTER TABLE public.outbound_call_runs ADD COLUMN app_note text")
        app.execute("ALTER TABLE public.outbound_call_runs ALTER COLUMN app_note SET DEFAULT " + BORROWED[vector])
        runs_before = conn.execute("SELECT count(*) FROM outbound_call_runs").fetchone()
        try:
            with pytest.raises(UnsafeTables) as err:
                service.create_run(app, 4, [{}])
            assert err.value.sqlstate == "OH428" and "app_note" in err.value.message, err.value.message
        finally:
            conn.execute("ALTER TABLE public.outbound_call_runs DROP COLUMN IF EXISTS app_note")
    assert conn.execute("SELECT count(*) FROM outbound_call_runs").fetchone() == runs_before
    assert forged(conn, owner_app) == (0, False)
    # Without it, the same role's tables work.
    with psycopg.connect(login_dsn(dsn, owner_app), autocommit=True) as app:
        assert service.create_run(app, 4, [{}]).status == "pending"


def test_an_owning_app_roles_ordinary_schema_work_is_not_refused(conn: Conn, dsn: str, owner_app: str) -> None:
    """What an app that owns its tables ordinarily adds (uuid and serial defaults, a CHECK on
    status, a generated column, its own partial index, its own table referencing the runs) runs
    only built-in code: the guard must accept it, through a whole run."""
    schema = sql.Identifier(owner_app).as_string(conn)
    conn.execute(f"GRANT CREATE ON SCHEMA public TO {schema}")  # it created its tables there
    with psycopg.connect(login_dsn(dsn, owner_app), autocommit=True) as app:
        for statement in (
            "ALTER TABLE public.outbound_call_runs ADD COLUMN ref uuid NOT NULL DEFAULT gen_random_uuid()",
            f"CREATE SEQUENCE {schema}.run_seq",
            # the API inserts with its owner's rights: a default's sequence must be usable by it
            f"GRANT USAGE ON SCHEMA {schema} TO outbound_heartbeat_owner",
            f"GRANT USAGE ON SEQUENCE {schema}.run_seq TO outbound_heartbeat_owner",
            f"ALTER TABLE public.outbound_call_runs ADD COLUMN seq bigint DEFAULT nextval('{schema}.run_seq')",
            "ALTER TABLE public.outbound_call_runs ADD CONSTRAINT app_status_ck CHECK"
            " (status IN ('pending', 'running', 'completed', 'failed', 'cancelled', 'stopped'))",
            "ALTER TABLE public.outbound_call_jobs ADD COLUMN phone text,"
            " ADD COLUMN phone_digits text GENERATED ALWAYS AS (regexp_replace(phone, '[^0-9]', '', 'g')) STORED",
            "CREATE INDEX app_jobs_phone_idx ON public.outbound_call_jobs (lower(phone)) WHERE status = 'queued'",
            f"CREATE TABLE {schema}.app_calls (id bigserial PRIMARY KEY, run_id bigint REFERENCES public.outbound_call_runs,"
            " note text DEFAULT now()::text)",
        ):
            app.execute(statement)
        try:
            run = service.create_run(app, 4, [{}, {}])
            claim = service.claim_run(app, "w", run.id)
            assert claim is not None
            assert service.heartbeat(app, run.id, "w", claim.lease_epoch) == "ok"
            assert service.next_job(app, run.id, "w", claim.lease_epoch) is not None
            app.execute(f"INSERT INTO {schema}.app_calls (run_id) VALUES (%s)", (run.id,))
            service.force_cancel(app, run.id, 4)
        finally:
            app.execute(f"DROP TABLE {schema}.app_calls")
            app.execute("DROP INDEX app_jobs_phone_idx")
            app.execute("ALTER TABLE public.outbound_call_jobs DROP COLUMN phone CASCADE")
            app.execute("ALTER TABLE public.outbound_call_runs DROP CONSTRAINT app_status_ck,"
                        " DROP COLUMN ref, DROP COLUMN seq")
            app.execute(f"DROP SEQUENCE {schema}.run_seq")


def test_a_disabled_epoch_guard_is_refused_not_obeyed(conn: Conn, dsn: str, owner_app: str) -> None:
    """A fenced-out lease heartbeating 'ok' again: the owner disabled the epoch trigger
    and lowered lease_epoch. The API refuses to act while the guard is off."""
    run = service.create_run(conn, 4, [{}])
    first = service.claim_run(conn, "w", run.id)
    assert first is not None
    conn.execute("UPDATE outbound_call_runs SET lease_epoch = lease_epoch + 1 WHERE id = %s", (run.id,))
    with psycopg.connect(login_dsn(dsn, owner_app), autocommit=True) as app:
        assert service.heartbeat(app, run.id, "w", first.lease_epoch) == "lost"  # fenced out
        app.execute("ALTER TABLE outbound_call_runs DISABLE TRIGGER outbound_heartbeat_epoch_never_down")
        app.execute("UPDATE outbound_call_runs SET lease_epoch = %s WHERE id = %s", (first.lease_epoch, run.id))
        with pytest.raises(UnsafeTables) as err:
            service.heartbeat(app, run.id, "w", first.lease_epoch)
        assert "outbound_heartbeat_epoch_never_down is disabled" in err.value.message


# -- the handover -------------------------------------------------------------------------------


def test_handover_moves_the_tables_and_leaves_exactly_the_app_grants(
    conn: Conn, dsn: str, roles: dict[str, str], owner_app: str
) -> None:
    run = service.create_run(conn, 4, [{}, {}])
    claim = service.claim_run(conn, "w", run.id)
    assert claim is not None
    rows = conn.execute("SELECT * FROM outbound_heartbeat.hand_over_tables(%s)", (owner_app,)).fetchall()
    assert sorted(rows) == [(t, owner_app, "outbound_heartbeat_owner") for t in ("public.outbound_call_jobs",
                                                                                  "public.outbound_call_runs")]
    assert owners(conn) == ["outbound_heartbeat_owner"] * 2
    assert privileges(conn, owner_app) == privileges(conn, roles["app"])
    # Idempotent: nothing moves, the grants stay.
    assert conn.execute("SELECT * FROM outbound_heartbeat.hand_over_tables(%s)", (owner_app,)).fetchall() == []
    assert privileges(conn, owner_app) == privileges(conn, roles["app"])
    with psycopg.connect(login_dsn(dsn, owner_app), autocommit=True) as app:
        # Now none of the owner's powers is left...
        for statement in (
            "ALTER TABLE outbound_call_runs DISABLE TRIGGER outbound_heartbeat_epoch_never_down",
            "ALTER TABLE outbound_call_runs ADD COLUMN x int DEFAULT 1",
            "CREATE TRIGGER t BEFORE UPDATE ON outbound_call_runs FOR EACH ROW EXECUTE FUNCTION"
            " outbound_heartbeat._refuse_lower_epoch()",
            "TRUNCATE outbound_call_jobs",
            *[f"UPDATE outbound_call_runs SET {c} = NULL WHERE id = {run.id}" for c in LEASE_COLUMNS],
        ):
            assert refused(app, statement) == "42501", statement
        # ...and the API works as before, for the live lease too.
        assert service.heartbeat(app, run.id, "w", claim.lease_epoch) == "ok"
        assert service.next_job(app, run.id, "w", claim.lease_epoch) is not None
        assert service.create_run(app, 4, [{}]).status == "pending"


def test_handover_refuses_code_the_app_attached_and_changes_nothing(
    conn: Conn, dsn: str, owner_app: str
) -> None:
    names = {"schema": sql.Identifier(owner_app).as_string(conn), "role": sql.Identifier(owner_app).as_string(conn)}
    with psycopg.connect(login_dsn(dsn, owner_app), autocommit=True) as app:
        app.execute(EVIL.format(**names))
        app.execute(VECTORS["WHEN clause"].format(**names))
    before = privileges(conn, owner_app)
    with pytest.raises(InvalidArgument) as err:
        admin.hand_over_tables(conn, owner_app)
    assert err.value.argument == "app_role"
    assert "trigger aaa_app on table public.outbound_call_runs calls function" in err.value.message
    assert owners(conn) == [owner_app] * 2 and privileges(conn, owner_app) == before
    with pytest.raises(InvalidArgument) as err:
        admin.hand_over_tables(conn, owner_app, owner_role=owner_app)
    assert err.value.argument == "owner_role"


def test_handover_is_online_short_lock_attempts_then_oh423(conn: Conn, dsn: str, owner_app: str) -> None:
    run = service.create_run(conn, 4, [{}])
    with psycopg.connect(dsn) as holder:
        holder.execute("SELECT 1 FROM outbound_call_runs WHERE id = %s FOR UPDATE", (run.id,))
        holder_pid = holder.info.backend_pid
        started = time.monotonic()
        with pytest.raises(RunLocked) as err:
            admin.hand_over_tables(conn, owner_app, lock_timeout=__import__("datetime").timedelta(milliseconds=100),
                                   attempts=3)
        assert f"pid {holder_pid}" in err.value.message
        assert time.monotonic() - started < 5
        assert owners(conn) == [owner_app] * 2  # nothing changed
        # While the handover waits, an app statement queues at most one lock attempt.
        waits: list[float] = []

        def app_statement() -> None:
            time.sleep(0.3)
            with psycopg.connect(dsn, autocommit=True) as other:
                t0 = time.monotonic()
                other.execute("SELECT count(*) FROM outbound_call_jobs")
                waits.append(time.monotonic() - t0)

        thread = threading.Thread(target=app_statement)
        thread.start()
        release = threading.Timer(1.5, holder.rollback)
        release.start()
        moved, _ = admin.hand_over_tables(conn, owner_app, attempts=20)
        thread.join()
        release.join()
    assert {m.moved for m in moved} == {"public.outbound_call_runs", "public.outbound_call_jobs"}
    assert owners(conn) == ["outbound_heartbeat_owner"] * 2
    assert waits and waits[0] < 1.5, waits  # never queued behind the handover for long


def test_cli_handover_one_command(conn: Conn, dsn: str, roles: dict[str, str], owner_app: str,
                                  capsys: Any) -> None:
    assert cli.main(["handover", "--app-role", owner_app, "--dsn", dsn]) == 0
    out = capsys.readouterr().out
    assert f"public.outbound_call_runs: owner {owner_app} -> outbound_heartbeat_owner" in out
    assert f"{owner_app} now holds exactly grant_app_role's rights" in out
    assert privileges(conn, owner_app) == privileges(conn, roles["app"])
    assert cli.main(["handover", "--app-role", owner_app, "--dsn", dsn]) == 0
    assert "nothing to move" in capsys.readouterr().out
    assert cli.main(["handover", "--app-role", "no_such_role_here", "--dsn", dsn]) == 1
    assert "app_role must name an existing role" in capsys.readouterr().err


def test_handover_takes_back_a_migrating_app_roles_membership(conn: Conn, dsn: str, owner_app: str) -> None:
    """The app role that ran the migrations is a member of outbound_heartbeat_owner: the
    handover revokes that too (it could SET ROLE to the API's owner otherwise)."""
    conn.execute(sql.SQL("GRANT outbound_heartbeat_owner TO {}").format(sql.Identifier(owner_app)))
    # ...and, having run them, owns the library's schema and its tables too.
    for statement in ("ALTER SCHEMA outbound_heartbeat OWNER TO {}",
                      "ALTER TABLE outbound_heartbeat.run_events OWNER TO {}",
                      "ALTER TABLE outbound_heartbeat.settings OWNER TO {}"):
        conn.execute(sql.SQL(statement).format(sql.Identifier(owner_app)))
    moved, _ = admin.hand_over_tables(conn, owner_app)
    changes = [(m.moved, m.from_owner, m.to_owner) for m in moved]
    assert ("membership in outbound_heartbeat_owner", owner_app, None) in changes
    for name in ("outbound_heartbeat", "outbound_heartbeat.run_events", "outbound_heartbeat.settings",
                 "public.outbound_call_runs"):
        assert (name, owner_app, "outbound_heartbeat_owner") in changes, changes
    row = conn.execute("SELECT pg_has_role(%s, 'outbound_heartbeat_owner', 'MEMBER'),"
                       " (SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = 'outbound_heartbeat')",
                       (owner_app,)).fetchone()
    assert row == (False, "outbound_heartbeat_owner")
    with psycopg.connect(login_dsn(dsn, owner_app), autocommit=True) as app:
        assert refused(app, "DELETE FROM outbound_heartbeat.run_events") == "42501"
        assert service.create_run(app, 4, [{}]).status == "pending"


def test_a_trigger_running_a_function_the_app_role_can_replace_is_refused(
    conn: Conn, dsn: str, roles: dict[str, str]
) -> None:
    """Separate-owner deployment: the DBA attaches a trigger whose SECURITY INVOKER function the
    app role owns. The app can replace that body at will, so the API refuses to run it."""
    app = roles["app"]
    schema = sql.Identifier(f"{app}_code")
    conn.execute(sql.SQL("CREATE SCHEMA {} AUTHORIZATION {}").format(schema, sql.Identifier(app)))
    names = {"schema": schema.as_string(conn), "role": sql.Identifier(app).as_string(conn)}
    with psycopg.connect(login_dsn(dsn, app), autocommit=True) as own:
        own.execute(EVIL.format(**names))
    conn.execute(sql.SQL("CREATE TRIGGER aaa_dba BEFORE INSERT OR UPDATE ON public.outbound_call_runs"
                         " FOR EACH ROW EXECUTE FUNCTION {}.evil_trigger()").format(schema))
    try:
        with psycopg.connect(login_dsn(dsn, app), autocommit=True) as own:
            with pytest.raises(UnsafeTables) as err:
                service.create_run(own, 4, [{}])
            assert f"trigger aaa_dba runs {app}_code.evil_trigger(), a SECURITY INVOKER" in err.value.message
            assert f"owned by {app}" in err.value.message
        assert forged(conn, app) == (0, False)
        # Made SECURITY DEFINER, it runs with the app role's own rights: the API runs it, and
        # the forgery inside it fails for want of those rights.
        conn.execute(sql.SQL("ALTER FUNCTION {}.evil_trigger() SECURITY DEFINER").format(schema))
        with psycopg.connect(login_dsn(dsn, app), autocommit=True) as own:
            assert refused(own, "SELECT * FROM outbound_heartbeat.create_run(4, '[]')") == "42501"
        assert forged(conn, app) == (0, False)
    finally:
        conn.execute("DROP TRIGGER aaa_dba ON public.outbound_call_runs")


@pytest.mark.parametrize("call", ["heartbeat", "next_job", "create_run"])
def test_a_grant_to_the_owner_role_does_not_vouch_for_an_app_owned_trigger_function(
    conn: Conn, dsn: str, roles: dict[str, str], call: str
) -> None:
    """Separate-owner deployment, the trigger the app's own SECURITY DEFINER function (accepted:
    it runs with the app's rights). The app role then makes it SECURITY INVOKER and grants the
    owner role EXECUTE WITH GRANT OPTION on it, which any function's owner may do: the guard
    still refuses (OH428), nothing runs with the owner role's rights."""
    app = roles["app"]
    schema = sql.Identifier(f"{app}_code")
    conn.execute(sql.SQL("CREATE SCHEMA {} AUTHORIZATION {}").format(schema, sql.Identifier(app)))
    names = {"schema": schema.as_string(conn), "role": sql.Identifier(app).as_string(conn)}
    with psycopg.connect(login_dsn(dsn, app), autocommit=True) as own:
        own.execute(EVIL.format(**names))
        own.execute(sql.SQL("ALTER FUNCTION {}.evil_trigger() SECURITY DEFINER").format(schema))
    run = service.create_run(conn, 4, [{}, {}])
    claim = service.claim_run(conn, "w", run.id)
    assert claim is not None
    conn.execute(sql.SQL("CREATE TRIGGER aaa_dba BEFORE INSERT OR UPDATE ON public.outbound_call_runs"
                         " FOR EACH ROW EXECUTE FUNCTION {}.evil_trigger()").format(schema))
    try:
        with psycopg.connect(login_dsn(dsn, app), autocommit=True) as own:
            own.execute(sql.SQL("ALTER FUNCTION {}.evil_trigger() SECURITY INVOKER").format(schema))
            own.execute(sql.SQL("GRANT EXECUTE ON FUNCTION {}.evil_trigger() TO outbound_heartbeat_owner"
                                " WITH GRANT OPTION").format(schema))
            with pytest.raises(UnsafeTables) as err:
                if call == "heartbeat":
                    service.heartbeat(own, run.id, "w", claim.lease_epoch)
                elif call == "next_job":
                    service.next_job(own, run.id, "w", claim.lease_epoch)
                else:
                    service.create_run(own, 4, [{}])
            assert f"trigger aaa_dba runs {app}_code.evil_trigger(), a SECURITY INVOKER" in err.value.message
        assert forged(conn, app) == (0, False)
    finally:
        conn.execute("DROP TRIGGER aaa_dba ON public.outbound_call_runs")


#: Code the DBA attaches to the runs table (its owner, a trusted role) that calls {fn}: a
#: CHECK, a default, a generated column, a policy, an index, a domain, an operator, a WHEN
#: clause. Each step but the last is followed by an accepted call (the quick test stores that
#: state); the last step is the attachment the guard must see.
ATTACHED: dict[str, list[str]] = {
    "CHECK constraint": ["ALTER TABLE public.outbound_call_runs ADD CONSTRAINT aaa_dba CHECK ({fn}(id))"],
    "column default": ["ALTER TABLE public.outbound_call_runs ADD COLUMN aaa_dba boolean",
                       "ALTER TABLE public.outbound_call_runs ALTER COLUMN aaa_dba SET DEFAULT {fn}(0)"],
    "generated column": ["ALTER TABLE public.outbound_call_runs"
                         " ADD COLUMN aaa_dba boolean GENERATED ALWAYS AS ({fn}(id)) STORED"],
    # a policy added while row security is on (no change to the table's pg_class row)
    "RLS policy": ["CREATE POLICY aaa_dba_all ON public.outbound_call_runs USING (true);"
                   " ALTER TABLE public.outbound_call_runs ENABLE ROW LEVEL SECURITY",
                   "CREATE POLICY aaa_dba ON public.outbound_call_runs AS RESTRICTIVE USING ({fn}(id))"],
    "index expression": ["CREATE INDEX aaa_dba ON public.outbound_call_runs ({fn}(id))"],
    "index predicate": ["CREATE INDEX aaa_dba ON public.outbound_call_runs (id) WHERE {fn}(id)"],
    "domain CHECK": ["CREATE DOMAIN public.aaa_dba AS boolean CHECK ({fn}(0));"
                     " ALTER TABLE public.outbound_call_runs ADD COLUMN aaa_dba public.aaa_dba"],
    # the column's type changes without a rewrite, then the domain gains its CHECK: neither
    # touches the table's pg_class row
    "domain CHECK added later": ["CREATE DOMAIN public.aaa_dba AS text;"
                                 " ALTER TABLE public.outbound_call_runs ADD COLUMN aaa_dba text",
                                 "ALTER TABLE public.outbound_call_runs ALTER COLUMN aaa_dba TYPE public.aaa_dba",
                                 "ALTER DOMAIN public.aaa_dba ADD CONSTRAINT aaa_dba_check CHECK ({fn}(0))"],
    "operator": ["CREATE OPERATOR public.=== (FUNCTION = {fn2}, LEFTARG = bigint, RIGHTARG = bigint);"
                 " ALTER TABLE public.outbound_call_runs ADD CONSTRAINT aaa_dba CHECK (id OPERATOR(public.===) id)"],
    "WHEN clause": ["CREATE TRIGGER aaa_dba BEFORE INSERT OR UPDATE ON public.outbound_call_runs FOR EACH ROW"
                    " WHEN ({fn}(NEW.id)) EXECUTE FUNCTION public.aaa_dba_trigger()"],
}

#: The functions attached, harmless when attached: IMMUTABLE (an index's or a generated column's
#: must be), SECURITY INVOKER.
HOOKS = """
CREATE FUNCTION {schema}.hook(bigint) RETURNS boolean LANGUAGE plpgsql IMMUTABLE AS $$ BEGIN RETURN true; END $$;
CREATE FUNCTION {schema}.hook2(bigint, bigint) RETURNS boolean LANGUAGE plpgsql IMMUTABLE
    AS $$ BEGIN RETURN true; END $$;
"""

#: What the app role then makes of its functions: their bodies forge, with the caller's rights.
REPLACED = """
CREATE OR REPLACE FUNCTION {schema}.hook(bigint) RETURNS boolean LANGUAGE plpgsql IMMUTABLE
    AS $$ BEGIN PERFORM {schema}.evil(); RETURN true; END $$;
CREATE OR REPLACE FUNCTION {schema}.hook2(bigint, bigint) RETURNS boolean LANGUAGE plpgsql IMMUTABLE
    AS $$ BEGIN PERFORM {schema}.evil(); RETURN true; END $$;
"""

#: A DBA's trigger function (SECURITY INVOKER, owned by the DBA: trusted), for the WHEN clause.
DBA_TRIGGER = ("CREATE FUNCTION public.aaa_dba_trigger() RETURNS trigger LANGUAGE plpgsql"
               " AS $$ BEGIN RETURN NEW; END $$")

API_CALLS = ["heartbeat", "next_job", "create_run", "force_cancel"]


def tables_state(conn: Conn) -> tuple[Any, ...]:
    row = conn.execute("SELECT (SELECT array_agg(r::text ORDER BY r.id) FROM outbound_call_runs AS r),"
                       " (SELECT array_agg(j::text ORDER BY j.id) FROM outbound_call_jobs AS j)").fetchone()
    assert row is not None
    return tuple(row)


def call_api(app: Conn, call: str, run_id: int, lease_epoch: int) -> object:
    if call == "heartbeat":
        return service.heartbeat(app, run_id, "w", lease_epoch)
    if call == "next_job":
        return service.next_job(app, run_id, "w", lease_epoch)
    if call == "create_run":
        return service.create_run(app, 4, [{}])
    return service.force_cancel(app, run_id, 4)


@pytest.mark.parametrize("call", API_CALLS)
@pytest.mark.parametrize("vector", sorted(ATTACHED))
def test_code_the_dba_attached_calling_a_function_the_app_role_can_replace_is_refused(
    conn: Conn, dsn: str, roles: dict[str, str], vector: str, call: str
) -> None:
    """Separate-owner deployment: the tables' owner (the DBA, trusted) attaches code that calls a
    SECURITY INVOKER function the app role owns, harmless when attached. The app role then
    replaces its body: the API refuses (OH428, naming what calls it) before anything is
    written, whether or not the quick test had vouched for the table just before."""
    app = roles["app"]
    schema_name = sql.Identifier(f"{app}_code")
    conn.execute(sql.SQL("CREATE SCHEMA {} AUTHORIZATION {}").format(schema_name, sql.Identifier(app)))
    names = {"schema": schema_name.as_string(conn), "role": sql.Identifier(app).as_string(conn)}
    conn.execute(DBA_TRIGGER)
    with psycopg.connect(login_dsn(dsn, app), autocommit=True) as own:
        own.execute(EVIL.format(**names))
        own.execute(HOOKS.format(**names))
    run = service.create_run(conn, 4, [{}, {}])
    claim = service.claim_run(conn, "w", run.id)
    assert claim is not None
    *before, attach = ATTACHED[vector]
    code = {"fn": f"{names['schema']}.hook", "fn2": f"{names['schema']}.hook2"}
    try:
        with psycopg.connect(login_dsn(dsn, app), autocommit=True) as own:
            assert service.heartbeat(own, run.id, "w", claim.lease_epoch) == "ok"  # vetted and stored
            for step in before:
                conn.execute(step.format(**code))
                assert service.heartbeat(own, run.id, "w", claim.lease_epoch) == "ok"
            conn.execute(attach.format(**code))
            own.execute(REPLACED.format(**names))
            state = tables_state(conn)
            with pytest.raises(UnsafeTables) as err:
                call_api(own, call, run.id, claim.lease_epoch)
            assert err.value.sqlstate == "OH428"
            message = err.value.message
            assert "public.outbound_call_runs: " in message and "aaa_dba" in message, message
            assert f"calls function {app}_code.hook" in message, message
            assert f"SECURITY INVOKER function owned by {app}" in message, message
        assert tables_state(conn) == state  # nothing written
        assert forged(conn, app) == (0, False)
    finally:  # what the DBA attached goes with the app's functions (the role is dropped next)
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(schema_name))
        conn.execute("ALTER TABLE public.outbound_call_runs DISABLE ROW LEVEL SECURITY")


@pytest.mark.parametrize("vector", sorted(ATTACHED))
def test_the_same_code_calling_a_trusted_roles_function_runs(
    conn: Conn, dsn: str, roles: dict[str, str], vector: str
) -> None:
    """The same attachments calling a function a trusted role owns (here the DBA's, SECURITY
    INVOKER): the guard accepts them, and every call runs."""
    app = roles["app"]
    conn.execute(DBA_TRIGGER)
    conn.execute("CREATE SCHEMA aaa_dba_code")
    conn.execute(HOOKS.format(schema="aaa_dba_code"))
    run = service.create_run(conn, 4, [{}, {}])
    claim = service.claim_run(conn, "w", run.id)
    assert claim is not None
    code = {"fn": "aaa_dba_code.hook", "fn2": "aaa_dba_code.hook2"}
    for step in ATTACHED[vector]:
        conn.execute(step.format(**code))
    with psycopg.connect(login_dsn(dsn, app), autocommit=True) as own:
        for _ in range(2):  # the full check, then the quick test's stored state
            assert service.heartbeat(own, run.id, "w", claim.lease_epoch) == "ok"
        assert service.next_job(own, run.id, "w", claim.lease_epoch) is not None
        assert service.create_run(own, 4, [{}]).status == "pending"
        service.force_cancel(own, run.id, 4)
    assert conn.execute("SELECT status FROM outbound_call_runs WHERE id = %s", (run.id,)).fetchone() == ("cancelled",)


@pytest.mark.parametrize("vector", sorted(ATTACHED))
def test_accepted_code_is_vetted_once_then_each_beat_takes_the_quick_test_alone(
    conn: Conn, dsn: str, roles: dict[str, str], vector: str
) -> None:
    """Once the full check has accepted the tables and stored their fingerprint, each beat
    (heartbeat() and heartbeat_leases()) finds it unchanged: no full check again, and, since
    the accepted state lists functions, their owners and domains probed once per beat
    (_vetted_calls_unchanged), also by a beat whose plan is cached."""
    app = roles["app"]
    conn.execute(DBA_TRIGGER)
    conn.execute("CREATE SCHEMA aaa_dba_code")
    conn.execute(HOOKS.format(schema="aaa_dba_code"))
    run = service.create_run(conn, 4, [{}, {}])
    claim = service.claim_run(conn, "w", run.id)
    assert claim is not None
    code = {"fn": "aaa_dba_code.hook", "fn2": "aaa_dba_code.hook2"}
    for step in ATTACHED[vector]:
        conn.execute(step.format(**code))
    counts = ("SELECT pg_stat_get_xact_function_calls('outbound_heartbeat._foreign_table_code'::regproc),"
              " pg_stat_get_xact_function_calls('outbound_heartbeat._vetted_calls_unchanged'::regproc)")
    with psycopg.connect(login_dsn(dsn, app), autocommit=True) as own:
        assert service.heartbeat(own, run.id, "w", claim.lease_epoch) == "ok"  # the full check stores it
    for _ in range(8):  # the beats' plans made (each runs the plan-time guard), then cached
        assert service.heartbeat(conn, run.id, "w", claim.lease_epoch) == "ok"
        assert service.heartbeat_leases(conn, [(run.id, "w", claim.lease_epoch)]) == [(run.id, "ok")]
    # Counted on the superuser's connection (track_functions is superuser-only). The full check
    # must never run (NULL: never called); the accepted functions are probed by each beat, also
    # on a cached plan (at least once per beat). How many times a plan evaluates the probe
    # follows the plan's shape, which the statistics autovacuum gathers at its own moment decide
    # (twice for two beats on a quiet machine, 11 seen under load): bounded, not exact.
    with conn.transaction():
        conn.execute("SET LOCAL track_functions = 'all'")
        assert service.heartbeat(conn, run.id, "w", claim.lease_epoch) == "ok"
        assert service.heartbeat_leases(conn, [(run.id, "w", claim.lease_epoch)]) == [(run.id, "ok")]
        full, probes = conn.execute(counts).fetchone() or (None, None)
    assert full is None
    assert probes is not None and 2 <= probes <= 16, probes


#: Code the app role attaches to the DBA-owned runs table once the DBA granted it TRIGGER, and
#: a change of owner: each a catalog change no beat's cached plan may outlive.
LATE_ATTACHED = {
    "trigger": "CREATE TRIGGER aaa_app BEFORE UPDATE ON public.outbound_call_runs"
               " FOR EACH ROW EXECUTE FUNCTION {schema}.evil_trigger()",
    "WHEN clause": "CREATE TRIGGER aaa_app BEFORE UPDATE ON public.outbound_call_runs"
                   " FOR EACH ROW WHEN ({schema}.evil()) EXECUTE FUNCTION {schema}.harmless_trigger()",
    "statement trigger": "CREATE TRIGGER aaa_app AFTER UPDATE ON public.outbound_call_runs"
                         " FOR EACH STATEMENT EXECUTE FUNCTION {schema}.evil_trigger()",
}


def app_code(conn: Conn, app: str, *, trigger: bool = False) -> tuple[sql.Identifier, dict[str, str]]:
    """A schema the app role owns, for its functions (EVIL), and the names EVIL is formatted
    with; ``trigger``: the app role may also create triggers on the runs table."""
    schema_name = sql.Identifier(f"{app}_code")
    conn.execute(sql.SQL("CREATE SCHEMA {} AUTHORIZATION {}").format(schema_name, sql.Identifier(app)))
    if trigger:
        conn.execute(sql.SQL("GRANT TRIGGER ON public.outbound_call_runs TO {}").format(sql.Identifier(app)))
    return schema_name, {"schema": schema_name.as_string(conn), "role": sql.Identifier(app).as_string(conn)}


def claimed_run(conn: Conn) -> tuple[Any, Any]:
    """A run of two jobs, claimed by worker "w": (run, claim)."""
    run = service.create_run(conn, 4, [{}, {}])
    claim = service.claim_run(conn, "w", run.id)
    assert claim is not None
    return run, claim


def beat(conn: Conn, beat_call: str, run_id: int, lease_epoch: int) -> str:
    if beat_call == "heartbeat":
        return service.heartbeat(conn, run_id, "w", lease_epoch)
    [(_, status)] = service.heartbeat_leases(conn, [(run_id, "w", lease_epoch)])
    return status


@pytest.mark.parametrize("beat_call", ["heartbeat", "heartbeat_leases"])
@pytest.mark.parametrize("vector", sorted(LATE_ATTACHED))
def test_a_beat_whose_plan_is_cached_refuses_code_attached_after_it(
    conn: Conn, dsn: str, roles: dict[str, str], vector: str, beat_call: str
) -> None:
    """The beats check the table guard when their UPDATE is planned, not on each call. A
    worker's connection that has beaten long enough to cache its plan, then code attached from
    another connection: the very next beat on the warm connection refuses (OH428), nothing
    written, nothing forged."""
    app = roles["app"]
    schema_name, names = app_code(conn, app, trigger=True)
    run, claim = claimed_run(conn)
    try:
        with psycopg.connect(login_dsn(dsn, app), autocommit=True) as warm:
            for _ in range(12):  # past PL/pgSQL's five custom plans: the generic plan is cached
                assert beat(warm, beat_call, run.id, claim.lease_epoch) == "ok"
            with psycopg.connect(login_dsn(dsn, app), autocommit=True) as other:
                other.execute(EVIL.format(**names))
                other.execute(LATE_ATTACHED[vector].format(**names))
            state = tables_state(conn)
            with pytest.raises(UnsafeTables) as err:
                beat(warm, beat_call, run.id, claim.lease_epoch)
            assert err.value.sqlstate == "OH428" and "aaa_app" in err.value.message, err.value.message
            # And again: a refusal is not cached either.
            with pytest.raises(UnsafeTables):
                beat(warm, beat_call, run.id, claim.lease_epoch)
        assert tables_state(conn) == state
        assert forged(conn, app) == (0, False)
        # Dropped, the table is vetted again and the same warm pattern beats.
        conn.execute("DROP TRIGGER aaa_app ON public.outbound_call_runs")
        with psycopg.connect(login_dsn(dsn, app), autocommit=True) as warm:
            for _ in range(3):
                assert beat(warm, beat_call, run.id, claim.lease_epoch) == "ok"
    finally:
        conn.execute("DROP TRIGGER IF EXISTS aaa_app ON public.outbound_call_runs")
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(schema_name))


@pytest.mark.parametrize("beat_call", ["heartbeat", "heartbeat_leases"])
def test_a_beat_whose_plan_is_cached_refuses_once_the_table_is_handed_to_an_untrusted_role(
    conn: Conn, dsn: str, roles: dict[str, str], beat_call: str
) -> None:
    """A new owner is a new pg_class row: the warm connection's next beat plans again, and
    the table's new owner, outside the trusted set, may attach what it likes: its trigger
    is refused at once."""
    app = roles["app"]
    schema_name, names = app_code(conn, app)
    run, claim = claimed_run(conn)
    try:
        with psycopg.connect(login_dsn(dsn, app), autocommit=True) as warm:
            for _ in range(12):
                assert beat(warm, beat_call, run.id, claim.lease_epoch) == "ok"
            conn.execute(sql.SQL("ALTER TABLE public.outbound_call_runs OWNER TO {}").format(sql.Identifier(app)))
            with psycopg.connect(login_dsn(dsn, app), autocommit=True) as other:
                other.execute(EVIL.format(**names))
                other.execute(LATE_ATTACHED["trigger"].format(**names))
            with pytest.raises(UnsafeTables) as err:
                beat(warm, beat_call, run.id, claim.lease_epoch)
            assert "aaa_app" in err.value.message, err.value.message
        assert forged(conn, app) == (0, False)
    finally:
        conn.execute("DROP TRIGGER IF EXISTS aaa_app ON public.outbound_call_runs")
        conn.execute("ALTER TABLE public.outbound_call_runs OWNER TO CURRENT_USER")
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(schema_name))


def _wait_until_blocked_on_a_lock(conn: Conn, pid: int) -> None:
    for _ in range(400):
        row = conn.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
        if row is not None and row[0] == "Lock":
            return
        time.sleep(0.05)
    raise AssertionError("the beat never waited for the attaching transaction's lock")


def answer_while_code_is_attached(conn: Conn, attacher_dsn: str, attach: str, caller: Conn,
                                  call: Callable[[], object]) -> object:
    """``attach`` left uncommitted on a connection of its own; ``call`` sent on ``caller`` from
    another thread meanwhile, and once it waits for the table's lock, ``attach`` committed:
    ``call``'s answer, or what it raised."""
    answers: list[object] = []

    def waiting_call() -> None:
        try:
            answers.append(call())
        except Exception as exc:  # handed back to the test thread
            answers.append(exc)

    with psycopg.connect(attacher_dsn) as attacher:  # one transaction, held open
        attacher.execute(attach)
        waiter = threading.Thread(target=waiting_call)
        waiter.start()
        _wait_until_blocked_on_a_lock(conn, caller.info.backend_pid)
        attacher.commit()
    waiter.join(30)
    assert len(answers) == 1, answers
    return answers[0]


@pytest.mark.parametrize("beat_call", ["heartbeat", "heartbeat_leases"])
def test_a_warm_beat_that_waited_for_the_attaching_transaction_refuses_its_code(
    conn: Conn, dsn: str, roles: dict[str, str], beat_call: str
) -> None:
    """The app role holds CREATE TRIGGER uncommitted (its lock) until a warm worker's beat waits
    for it, then commits: that beat, whose plan is made again once it has the lock, reads the
    catalogs after the lock (not under its statement's older snapshot) and refuses (OH428), as
    does every beat after it; the trigger never runs with the owner's rights."""
    app = roles["app"]
    schema_name, names = app_code(conn, app, trigger=True)
    run, claim = claimed_run(conn)
    try:
        with psycopg.connect(login_dsn(dsn, app), autocommit=True) as warm:
            for _ in range(12):
                assert beat(warm, beat_call, run.id, claim.lease_epoch) == "ok"
            with psycopg.connect(login_dsn(dsn, app), autocommit=True) as other:
                other.execute(EVIL.format(**names))
            answer = answer_while_code_is_attached(
                conn, login_dsn(dsn, app), LATE_ATTACHED["trigger"].format(**names), warm,
                lambda: beat(warm, beat_call, run.id, claim.lease_epoch))
            assert isinstance(answer, UnsafeTables), answer
            for _ in range(3):  # nor is a plan made from the older state kept
                with pytest.raises(UnsafeTables):
                    beat(warm, beat_call, run.id, claim.lease_epoch)
        assert forged(conn, app) == (0, False)
    finally:
        conn.execute("DROP TRIGGER IF EXISTS aaa_app ON public.outbound_call_runs")
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(schema_name))


def test_a_warm_beat_in_a_statement_older_than_the_attached_code_refuses_it(
    conn: Conn, dsn: str, roles: dict[str, str]
) -> None:
    """No lock wait at all: the worker's statement took its snapshot, the app role's trigger is
    committed, then that statement beats: refused (OH428), and the next beat too."""
    app = roles["app"]
    schema_name, names = app_code(conn, app, trigger=True)
    run, claim = claimed_run(conn)
    try:
        with psycopg.connect(login_dsn(dsn, app), autocommit=True) as warm:
            for _ in range(12):
                assert service.heartbeat(warm, run.id, "w", claim.lease_epoch) == "ok"
            with psycopg.connect(login_dsn(dsn, app), autocommit=True) as other:
                other.execute(EVIL.format(**names))
            answers: list[object] = []

            def slow_statement() -> None:
                try:
                    answers.append(warm.execute(
                        "WITH pause AS MATERIALIZED (SELECT pg_sleep(1.5))"
                        " SELECT outbound_heartbeat.heartbeat(%s, 'w', %s) FROM pause",
                        (run.id, claim.lease_epoch)).fetchone())
                except psycopg.Error as exc:
                    answers.append(exc)

            waiter = threading.Thread(target=slow_statement)
            waiter.start()
            time.sleep(0.3)
            with psycopg.connect(login_dsn(dsn, app), autocommit=True) as other:
                other.execute(LATE_ATTACHED["trigger"].format(**names))
            waiter.join(30)
            assert len(answers) == 1 and isinstance(answers[0], psycopg.Error), answers
            assert answers[0].sqlstate == "OH428", answers
            with pytest.raises(UnsafeTables):
                service.heartbeat(warm, run.id, "w", claim.lease_epoch)
        assert forged(conn, app) == (0, False)
    finally:
        conn.execute("DROP TRIGGER IF EXISTS aaa_app ON public.outbound_call_runs")
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(schema_name))


@pytest.mark.parametrize("beat_call", ["heartbeat", "heartbeat_leases"])
def test_an_inheritance_child_of_the_runs_table_is_refused(
    conn: Conn, dsn: str, roles: dict[str, str], beat_call: str
) -> None:
    """A child table of the runs table (the DBA made it, then gave it to the app role): the
    beats' UPDATE writes its rows too, so its trigger would run with the API's rights. A warm
    connection's next beat, and every API call, refuse (OH428), naming the child; nothing
    forged. Dropped, the beats run again."""
    app = roles["app"]
    schema_name, names = app_code(conn, app)
    run, claim = claimed_run(conn)
    try:
        with psycopg.connect(login_dsn(dsn, app), autocommit=True) as warm:
            for _ in range(12):
                assert beat(warm, beat_call, run.id, claim.lease_epoch) == "ok"
            conn.execute(sql.SQL("CREATE TABLE {}.kid () INHERITS (public.outbound_call_runs)").format(schema_name))
            conn.execute(sql.SQL("ALTER TABLE {}.kid OWNER TO {}").format(schema_name, sql.Identifier(app)))
            with psycopg.connect(login_dsn(dsn, app), autocommit=True) as other:
                other.execute(EVIL.format(**names))
                other.execute(f"CREATE TRIGGER aaa_app BEFORE UPDATE ON {names['schema']}.kid"
                              f" FOR EACH ROW EXECUTE FUNCTION {names['schema']}.evil_trigger()")
                # a row the beat's fence matches, in the child
                other.execute(f"INSERT INTO {names['schema']}.kid SELECT * FROM public.outbound_call_runs"
                              " WHERE id = %s", (run.id,))
            with pytest.raises(UnsafeTables) as err:
                beat(warm, beat_call, run.id, claim.lease_epoch)
            assert f"{app}_code.kid" in err.value.message and "inheritance child" in err.value.message
            with pytest.raises(UnsafeTables):
                service.create_run(warm, 4, [{}])
        assert forged(conn, app) == (0, False)
        conn.execute(sql.SQL("DROP TABLE {}.kid").format(schema_name))
        with psycopg.connect(login_dsn(dsn, app), autocommit=True) as warm:
            assert beat(warm, beat_call, run.id, claim.lease_epoch) == "ok"
    finally:
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(schema_name))


@pytest.mark.parametrize("call", ["create_run", "claim_run", "heartbeat", "next_job"])
def test_code_an_owning_app_role_commits_while_a_call_waits_is_refused(
    conn: Conn, dsn: str, owner_app: str, call: str
) -> None:
    """The owning app role times it itself: its CREATE TRIGGER left uncommitted, one of its own
    API calls sent meanwhile waits for the table's lock, then the trigger commits. The call,
    whose table guard runs once it holds the lock, refuses (OH428): the trigger never runs with
    the API's rights, not even that once."""
    names = {"schema": sql.Identifier(owner_app).as_string(conn), "role": sql.Identifier(owner_app).as_string(conn)}
    run = service.create_run(conn, 4, [{}, {}])
    claim = service.claim_run(conn, "w", run.id)
    assert claim is not None
    pending = service.create_run(conn, 4, [{}]).id
    with psycopg.connect(login_dsn(dsn, owner_app), autocommit=True) as app:
        app.execute(EVIL.format(**names))
        calls: dict[str, Callable[[], object]] = {
            "create_run": lambda: service.create_run(app, 4, [{}]),
            "claim_run": lambda: service.claim_run(app, "w2", pending),
            "heartbeat": lambda: service.heartbeat(app, run.id, "w", claim.lease_epoch),
            "next_job": lambda: service.next_job(app, run.id, "w", claim.lease_epoch),
        }
        answer = answer_while_code_is_attached(
            conn, login_dsn(dsn, owner_app), VECTORS["trigger"].format(**names), app, calls[call])
        assert isinstance(answer, UnsafeTables), answer
    assert forged(conn, owner_app) == (0, False)
    conn.execute("DROP TRIGGER aaa_app ON public.outbound_call_runs")


def test_the_beats_run_the_guard_when_planned_not_on_each_call(conn: Conn) -> None:
    """Twenty beats of each kind on one connection: the plan-time guard runs for PL/pgSQL's
    first custom plans and the generic plan, then never again; the full check never runs."""
    run = service.create_run(conn, 4, [{}])
    claim = service.claim_run(conn, "w", run.id)
    assert claim is not None
    counts = ("SELECT pg_stat_get_xact_function_calls('outbound_heartbeat._vetted_owner'::regproc),"
              " pg_stat_get_xact_function_calls('outbound_heartbeat._foreign_table_code'::regproc)")
    service.heartbeat(conn, run.id, "w", claim.lease_epoch)  # stores the accepted state if need be

    def counted(beat: Callable[[], object]) -> tuple[Any, Any]:
        for _ in range(20):
            beat()
        planned = conn.execute(counts).fetchone()
        for _ in range(20):
            beat()
        return planned, conn.execute(counts).fetchone()

    # A plan made again meanwhile (autovacuum's ANALYZE of a table or catalog it reads
    # invalidates it) runs the plan-time guard once more: such an attempt is made again.
    for _ in range(3):
        with conn.transaction():
            conn.execute("SET LOCAL track_functions = 'all'")
            planned_once, after_once = counted(
                lambda: service.heartbeat(conn, run.id, "w", claim.lease_epoch) == "ok" or pytest.fail("not ok"))
            planned_twice, after_twice = counted(
                lambda: service.heartbeat_leases(conn, [(run.id, "w", claim.lease_epoch)]) == [(run.id, "ok")]
                or pytest.fail("not ok"))
        if after_once == planned_once and after_twice == planned_twice:
            break
    assert after_once == planned_once and after_twice == planned_twice  # cached: not run again
    assert planned_once is not None and planned_twice is not None
    assert planned_once[1] is None and planned_twice[1] is None  # the full search: never
    # (folded twice per plan: the CASE's test and its owner)
    assert 1 <= (planned_once[0] or 0) <= 12 and (planned_once[0] or 0) < (planned_twice[0] or 0) <= 24


@pytest.mark.parametrize("call", API_CALLS)
def test_a_vouched_function_made_security_invoker_is_refused_at_the_next_call(
    conn: Conn, dsn: str, roles: dict[str, str], call: str
) -> None:
    """The DBA's CHECK calls the app role's SECURITY DEFINER function (it runs with the app's
    rights: accepted, and the quick test stores that). The app role then replaces it, SECURITY
    INVOKER: no row of the table changes, yet the next call refuses (OH428)."""
    app = roles["app"]
    schema_name = sql.Identifier(f"{app}_code")
    conn.execute(sql.SQL("CREATE SCHEMA {} AUTHORIZATION {}").format(schema_name, sql.Identifier(app)))
    names = {"schema": schema_name.as_string(conn), "role": sql.Identifier(app).as_string(conn)}
    with psycopg.connect(login_dsn(dsn, app), autocommit=True) as own:
        own.execute(EVIL.format(**names))
        own.execute(HOOKS.format(**names))
        own.execute(f"ALTER FUNCTION {names['schema']}.hook(bigint) SECURITY DEFINER")
    run = service.create_run(conn, 4, [{}, {}])
    claim = service.claim_run(conn, "w", run.id)
    assert claim is not None
    conn.execute(f"ALTER TABLE public.outbound_call_runs ADD CONSTRAINT aaa_dba CHECK ({names['schema']}.hook(id))")
    try:
        with psycopg.connect(login_dsn(dsn, app), autocommit=True) as own:
            for _ in range(2):  # the full check accepts it; then the quick test alone
                assert service.heartbeat(own, run.id, "w", claim.lease_epoch) == "ok"
            own.execute(REPLACED.format(**names))  # SECURITY INVOKER again: REPLACED does not say DEFINER
            state = tables_state(conn)
            with pytest.raises(UnsafeTables) as err:
                call_api(own, call, run.id, claim.lease_epoch)
            assert f"constraint aaa_dba on table public.outbound_call_runs calls function {app}_code.hook(bigint)," \
                   f" a SECURITY INVOKER function owned by {app}" in err.value.message, err.value.message
        assert tables_state(conn) == state
        assert forged(conn, app) == (0, False)
    finally:
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(schema_name))


@pytest.mark.parametrize("beat", ["heartbeat", "heartbeat_leases"])
def test_a_beat_that_stops_its_stale_run_vets_the_jobs_table_too(
    conn: Conn, dsn: str, roles: dict[str, str], beat: str
) -> None:
    """A fresh lease's beat writes the runs table only, so its quick test vets that table
    alone; a beat that finds its lease stale stops the run and fails its queued jobs, so code
    the app role can replace on the jobs table is refused (OH428) before anything is written."""
    app = roles["app"]
    schema = sql.Identifier(f"{app}_code")
    conn.execute(sql.SQL("CREATE SCHEMA {} AUTHORIZATION {}").format(schema, sql.Identifier(app)))
    names = {"schema": schema.as_string(conn), "role": sql.Identifier(app).as_string(conn)}
    with psycopg.connect(login_dsn(dsn, app), autocommit=True) as own:
        own.execute(EVIL.format(**names))
    run = service.create_run(conn, 4, [{}, {}])
    claim = service.claim_run(conn, "w", run.id)
    assert claim is not None
    lease = (run.id, "w", claim.lease_epoch)
    conn.execute(sql.SQL("CREATE TRIGGER aaa_dba BEFORE UPDATE ON public.outbound_call_jobs"
                         " FOR EACH ROW EXECUTE FUNCTION {}.evil_trigger()").format(schema))
    try:
        with psycopg.connect(login_dsn(dsn, app), autocommit=True) as own:
            def send() -> str:
                if beat == "heartbeat":
                    return service.heartbeat(own, *lease)
                return service.heartbeat_leases(own, [lease])[0][1]

            assert send() == "ok"  # the runs table alone: nothing of the app's runs
            backdate_heartbeat(conn, run.id, 3600)
            with pytest.raises(UnsafeTables) as err:
                send()
            assert "trigger aaa_dba runs" in err.value.message
        assert forged(conn, app) == (0, False)
        statuses = conn.execute("SELECT r.status, array_agg(DISTINCT j.status) FROM outbound_call_runs AS r"
                                " JOIN outbound_call_jobs AS j ON j.run_id = r.id WHERE r.id = %s"
                                " GROUP BY r.status", (run.id,)).fetchone()
        assert statuses == ("running", ["queued"])  # nothing was written
    finally:
        conn.execute("DROP TRIGGER aaa_dba ON public.outbound_call_jobs")


def test_an_owning_app_role_cannot_silence_the_counters_unseen(conn: Conn, dsn: str, owner_app: str) -> None:
    """Counts with the app role owning its tables: it may disable the counting triggers and
    write around them, and forge nothing it can hide: the API refuses (OH428) while a counting
    trigger is off, health_check and verify_counters name the drift, the operator's recount
    corrects it; the counters themselves stay out of its reach."""
    run = service.create_run(conn, 4, [{}, {}, {}])
    assert service.verify_counters(conn) == []
    with psycopg.connect(login_dsn(dsn, owner_app), autocommit=True) as app:
        app.execute("ALTER TABLE outbound_call_jobs DISABLE TRIGGER outbound_heartbeat_count_update")
        app.execute("UPDATE outbound_call_jobs SET status = 'in_progress' WHERE run_id = %s", (run.id,))
        with pytest.raises(UnsafeTables) as err:
            service.create_run(app, 4, [{}])
        assert err.value.sqlstate == "OH428"
        assert "library trigger outbound_heartbeat_count_update is disabled" in err.value.message
        for forged in ("UPDATE outbound_heartbeat.job_counts SET queued = 3",
                       "INSERT INTO outbound_heartbeat.totals VALUES ('runs', 'running', 0, 1000)"):
            assert refused(app, forged) == "42501"
    alerts = {a.check_name for a in service.health_check(conn)}
    assert "counting_trigger" in alerts, alerts
    drift = {(d.counter, d.run_id, d.status): (d.kept, d.actual) for d in service.verify_counters(conn)}
    assert drift == {("jobs", run.id, "queued"): (3, 0), ("jobs", run.id, "in_progress"): (0, 3)}
    conn.execute("ALTER TABLE outbound_call_jobs ENABLE TRIGGER outbound_heartbeat_count_update")
    assert len(service.recount_counters(conn)) == 2
    assert service.verify_counters(conn) == []
    active = service.get_active_run(conn, 4)
    assert active is not None and (active.queued_jobs, active.in_progress_jobs) == (0, 3)


def test_an_upgrade_waits_for_an_owning_app_role_only_in_short_attempts(
    conn: Conn, dsn: str, owner_app: str
) -> None:
    """An upgrade (sql/ re-applied, as every migration does) with the app role owning its
    tables: the app's open transaction holding its rows holds back no step; the table lock
    only the owner may take holds each step back one short attempt at a time, naming the app's
    session, and the re-apply completes once the app's transaction ends."""
    run = service.create_run(conn, 4, [{}])
    policy = LockPolicy(lock_timeout=0.2, attempts=50, first_pause=0.1, max_pause=0.2)
    with psycopg.connect(login_dsn(dsn, owner_app)) as app, \
            psycopg.connect(dsn, autocommit=True) as installer:
        app.execute("SELECT 1 FROM outbound_call_runs WHERE id = %s FOR UPDATE", (run.id,))
        assert apply_sql_online(installer, schema.sql_dir(), policy) == []
        app.rollback()
        pid = app.info.backend_pid
        app.execute("LOCK TABLE outbound_call_runs IN ACCESS EXCLUSIVE MODE")  # the owner's right
        outcome: dict[str, Any] = {}
        upgrade = threading.Thread(target=lambda: outcome.update(
            waits=apply_sql_online(installer, schema.sql_dir(), policy)))
        upgrade.start()
        time.sleep(1.5)
        assert upgrade.is_alive()  # retrying ...
        app.rollback()  # ... until the owning app's transaction ends
        upgrade.join(60)
    waits = outcome["waits"]
    assert len(waits) >= 3
    assert all(w.waited < policy.lock_timeout + 0.5 for w in waits), waits
    # Every wait names the app's session; only the last may have timed out in the instant
    # the app let go (a busy machine), and then it says so instead.
    assert all(f"pid {pid}" in w.holders for w in waits[:-1]), waits
    assert f"pid {pid}" in waits[-1].holders or "since let go" in waits[-1].holders, waits
    with psycopg.connect(login_dsn(dsn, owner_app), autocommit=True) as app:
        assert service.heartbeat(app, run.id, "nobody", 1) == "lost"  # the API works after it
