"""No caller's objects can hijack the API (docs/security.md). Every function pins
search_path, heartbeat() too since it runs with the owner's rights (it also qualifies every name
and operator): a hostile search_path that shadows the operators it uses must change nothing."""

from __future__ import annotations

import datetime
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from outbound_heartbeat import service

from .helpers import backdate_heartbeat, run_row

#: Functions that, instead of a pinned search_path, spell out every name (see sql/08_worker_lease.sql).
UNPINNED: set[str] = set()

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


def test_hostile_search_path_cannot_hijack_heartbeat_leases(conn: psycopg.Connection[Any], caller_dsn: str) -> None:
    # The set call's lean statement (every lease fresh) and its full path (a lease lost).
    with psycopg.connect(caller_dsn, autocommit=True, options="-c search_path=evil,pg_catalog,public") as hostile:
        claims = []
        for i in range(3):
            run = service.create_run(hostile, 1, [{}])
            claim = service.claim_run(hostile, f"set-{i}", run.id)
            assert claim is not None
            claims.append((run.id, claim.worker_id, claim.lease_epoch))
        for _ in range(3):
            assert service.heartbeat_leases(hostile, claims) == [(c[0], "ok") for c in claims]
        backdate_heartbeat(conn, claims[1][0], 45)
        assert [s for _, s in service.heartbeat_leases(hostile, claims)] == ["ok", "lost", "ok"]
    assert run_row(conn, claims[1][0])["status"] == "stopped"


@pytest.mark.parametrize("zone", ["America/St_Johns", "Pacific/Kiritimati", "Asia/Kathmandu", "UTC"])
def test_no_time_zone_or_date_style_changes_a_staleness_verdict(
        conn: psycopg.Connection[Any], dsn: str, zone: str) -> None:
    # heartbeat() has no TimeZone pin: its bound is computed in UTC explicitly. A day-long
    # stale_after (whole days follow the time zone's calendar in timestamptz arithmetic).
    saved = conn.execute("SELECT stale_after, restart_grace FROM outbound_heartbeat.settings").fetchone()
    assert saved is not None
    conn.execute("UPDATE outbound_heartbeat.settings SET stale_after = interval '1 day',"
                 " restart_grace = interval '0'")
    try:
        options = f"-c TimeZone={zone} -c DateStyle=SQL,DMY -c IntervalStyle=sql_standard"
        with psycopg.connect(dsn, autocommit=True, options=options) as odd:
            leases = []
            for i, age in enumerate([86_340, 86_460, 86_340, 86_460, 86_340]):  # a minute in, out
                run = service.create_run(conn, 1, [{}])
                claim = service.claim_run(conn, f"tz-{i}", run.id)
                assert claim is not None
                backdate_heartbeat(conn, run.id, age)
                leases.append((run.id, claim.worker_id, claim.lease_epoch))
            assert service.heartbeat(odd, *leases[0]) == "ok"
            assert service.heartbeat(odd, *leases[1]) == "lost"
            assert [s for _, s in service.heartbeat_leases(odd, [leases[2]])] == ["ok"]
            assert [s for _, s in service.heartbeat_leases(odd, leases[3:])] == ["lost", "ok"]
    finally:
        conn.execute("UPDATE outbound_heartbeat.settings SET stale_after = %s, restart_grace = %s", saved)


def _dst_just_ended(now: datetime.datetime) -> str:
    """A POSIX time zone (UTC+0, daylight time UTC+1) whose daylight time ended two hours before
    ``now``: in it, ``now - interval '1 day'`` is 25 hours back, not 24."""
    end = (now - datetime.timedelta(hours=1)).astimezone(datetime.UTC)  # local DST wall time
    day = end.timetuple().tm_yday - 1  # zero-based, Feb 29 counted: the POSIX "n" form
    start = day + 100 if day <= 265 else day - 100
    return f"XXX0YYY,{start}/0,{day}/{end:%H:%M:%S}"


@pytest.mark.parametrize("call", ["heartbeat", "heartbeat_leases"])
def test_a_daylight_saving_change_in_the_callers_zone_moves_no_staleness_bound(
        conn: psycopg.Connection[Any], dsn: str, call: str) -> None:
    # A heartbeat 24.5 h old with stale_after '1 day' is stale, in UTC as the sweeper reckons;
    # a bound computed in a zone whose clocks went back an hour since would call it fresh.
    saved = conn.execute("SELECT stale_after, restart_grace FROM outbound_heartbeat.settings").fetchone()
    assert saved is not None
    conn.execute("UPDATE outbound_heartbeat.settings SET stale_after = interval '1 day',"
                 " restart_grace = interval '0'")
    try:
        row = conn.execute("SELECT now()").fetchone()
        assert row is not None
        zone = _dst_just_ended(row[0])
        with psycopg.connect(dsn, autocommit=True, options=f"-c TimeZone={zone}") as caller:
            shifted = caller.execute("SELECT now() - (now() - interval '1 day')").fetchone()
            assert shifted is not None and shifted[0] == datetime.timedelta(hours=25)  # the trap is set
            run = service.create_run(conn, 1, [{}])
            claim = service.claim_run(conn, "dst", run.id)
            assert claim is not None
            backdate_heartbeat(conn, run.id, 24.5 * 3600)
            lease = (run.id, "dst", claim.lease_epoch)
            if call == "heartbeat":
                assert service.heartbeat(caller, *lease) == "lost"
            else:
                assert service.heartbeat_leases(caller, [lease]) == [(run.id, "lost")]
        assert run_row(conn, run.id)["status"] == "stopped"
    finally:
        conn.execute("UPDATE outbound_heartbeat.settings SET stale_after = %s, restart_grace = %s", saved)
