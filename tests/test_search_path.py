"""No caller's objects can hijack the API (DESIGN.md, principle 7). Every function pins
search_path, heartbeat() too since it runs with the owner's rights (it also qualifies every name
and operator): a hostile search_path that shadows the operators it uses must change nothing."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from outbound_heartbeat import service

from .helpers import backdate_heartbeat, run_row

#: Functions that, instead of a pinned search_path, spell out every name (see sql/04_worker.sql).
UNPINNED: set[str] = {"heartbeat"}

HOSTILE = """
CREATE SCHEMA evil;
CREATE FUNCTION evil.hijack_eq(bigint, bigint) RETURNS boolean LANGUAGE plpgsql AS
    $$ BEGIN RAISE EXCEPTION 'hijacked bigint ='; END $$;
CREATE OPERATOR evil.= (LEFTARG = bigint, RIGHTARG = bigint, FUNCTION = evil.hijack_eq);
CREATE FUNCTION evil.hijack_text_eq(text, text) RETURNS boolean LANGUAGE plpgsql AS
    $$ BEGIN RAISE EXCEPTION 'hijacked text ='; END $$;
CREATE OPERATOR evil.= (LEFTARG = text, RIGHTARG = text, FUNCTION = evil.hijack_text_eq);
CREATE FUNCTION evil.hijack_tid_eq(tid, tid) RETURNS boolean LANGUAGE plpgsql AS
    $$ BEGIN RAISE EXCEPTION 'hijacked tid ='; END $$;
CREATE OPERATOR evil.= (LEFTARG = tid, RIGHTARG = tid, FUNCTION = evil.hijack_tid_eq);
CREATE FUNCTION evil.hijack_ge(timestamptz, timestamptz) RETURNS boolean LANGUAGE plpgsql AS
    $$ BEGIN RAISE EXCEPTION 'hijacked >='; END $$;
CREATE OPERATOR evil.>= (LEFTARG = timestamptz, RIGHTARG = timestamptz, FUNCTION = evil.hijack_ge);
CREATE FUNCTION evil.hijack_minus(timestamptz, interval) RETURNS timestamptz LANGUAGE plpgsql AS
    $$ BEGIN RAISE EXCEPTION 'hijacked -'; END $$;
CREATE OPERATOR evil.- (LEFTARG = timestamptz, RIGHTARG = interval, FUNCTION = evil.hijack_minus);
CREATE FUNCTION evil.now() RETURNS timestamptz LANGUAGE plpgsql AS
    $$ BEGIN RAISE EXCEPTION 'hijacked now()'; END $$;
CREATE TABLE evil.outbound_call_runs (id bigint);
"""


def test_every_function_pins_search_path_but_the_listed_ones(conn: psycopg.Connection[Any]) -> None:
    rows = conn.execute(
        "SELECT p.proname, p.proconfig FROM pg_proc p"
        " WHERE p.pronamespace = 'outbound_heartbeat'::regnamespace"
    ).fetchall()
    assert len(rows) > 20
    for name, config in rows:
        if name in UNPINNED:
            assert not config, name
        else:
            assert config and "search_path=pg_catalog, pg_temp" in config, (name, config)


@pytest.fixture(params=["schema owner", "app role"])
def caller_dsn(request: pytest.FixtureRequest, conn: psycopg.Connection[Any], dsn: str) -> Iterator[str]:
    """The hostile caller: the database's owner, or a role made by grant_app_role() whose own
    look-alike objects come first on its search_path (the API runs with the owner's rights)."""
    if request.param == "schema owner":
        conn.execute(HOSTILE)
        yield dsn
        return
    role = f"oh_hostile_{uuid.uuid4().hex[:8]}"
    conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    conn.execute("SELECT outbound_heartbeat.grant_app_role(%s)", (role,))
    conn.execute(sql.SQL("CREATE SCHEMA evil AUTHORIZATION {}").format(sql.Identifier(role)))
    app_dsn = psycopg.conninfo.make_conninfo(dsn, user=role)
    with psycopg.connect(app_dsn, autocommit=True) as app:
        app.execute(HOSTILE.replace("CREATE SCHEMA evil;", ""))
    try:
        yield app_dsn
    finally:
        conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_hostile_search_path_cannot_hijack_heartbeat(conn: psycopg.Connection[Any], caller_dsn: str) -> None:
    dsn = caller_dsn
    # The operators really are hijacked for plain SQL under this search_path...
    with psycopg.connect(dsn, autocommit=True, options="-c search_path=evil,pg_catalog,public") as hostile:
        try:
            hostile.execute("SELECT 1::bigint = 1::bigint")
            raise AssertionError("the hostile operator was not picked up")
        except psycopg.errors.RaiseException as exc:
            assert "hijacked" in str(exc)
        run = service.create_run(hostile, 1, [{}, {}])
        claim = service.claim_run(hostile, "w1", run.id)
        assert claim is not None
        # ...but not inside the API: the hot path, a cancel request, the slow path, 'lost'.
        for _ in range(3):
            assert service.heartbeat(hostile, run.id, "w1", claim.lease_epoch) == "ok"
        service.request_cancel(hostile, run.id)
        assert service.heartbeat(hostile, run.id, "w1", claim.lease_epoch) == "cancel_requested"
        backdate_heartbeat(conn, run.id, 45)
        assert service.heartbeat(hostile, run.id, "w1", claim.lease_epoch) == "lost"
    assert run_row(conn, run.id)["status"] == "stopped"
