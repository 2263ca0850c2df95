"""The tamper-evident audit trail (docs/security.md): every run_events row is chained to the
previous one of its run, verify_events() and `events --verify` report the first broken link,
a pruned prefix of a run is tolerated but a row deleted in the middle is not, concurrent writers
of one run never fork its chain, and a refused cross-business call leaves a [SECURITY] event."""

from __future__ import annotations

import io
import threading
import time
from typing import Any

import psycopg
import pytest
from psycopg import sql

from outbound_heartbeat import AccessDenied, cli, service
from outbound_heartbeat.schema import sql_dir
from outbound_heartbeat.testing import Server
from outbound_heartbeat.upgrade import apply_sql_online

from ..helpers import FROZEN_SQL, TEST_SETTINGS, old_events, run_row

Conn = psycopg.Connection[Any]


def login(dsn: str, role: str, **kwargs: Any) -> Conn:
    return psycopg.connect(psycopg.conninfo.make_conninfo(dsn, user=role), **kwargs)


def finished_run(app: Conn, business_id: int = 7) -> int:
    """A run with four events: created, claimed, cancel_requested, finished."""
    run = service.create_run(app, business_id, [{}, {}])
    claim = service.claim_run(app, "w", run.id)
    assert claim is not None
    service.request_cancel(app, run.id, business_id)
    service.finish_run(app, run.id, "w", claim.lease_epoch, "cancelled")
    return run.id


def event_ids(conn: Conn, run_id: int) -> list[int]:
    return [r[0] for r in conn.execute(
        "SELECT id FROM outbound_heartbeat.run_events WHERE run_id = %s ORDER BY id", (run_id,))]


def verify(argv_run: int | None, dsn: str) -> tuple[int, str]:
    out = io.StringIO()
    argv = ["events", "--verify", "--dsn", dsn] + (["--run", str(argv_run)] if argv_run else [])
    return cli.main(argv, out=out), out.getvalue()


def test_every_event_is_chained_and_verifies(conn: Conn, dsn: str, roles: dict[str, str]) -> None:
    with login(dsn, roles["app"], autocommit=True) as app:
        run_id = finished_run(app)
        assert service.verify_events(app) == []
    chain = conn.execute(
        "SELECT c.event_id, c.prev_id, c.prev_hash IS NULL, length(c.hash) FROM outbound_heartbeat.run_event_chain c"
        " WHERE c.run_id = %s ORDER BY c.event_id", (run_id,)).fetchall()
    ids = event_ids(conn, run_id)
    assert [c[0] for c in chain] == ids and len(ids) == 4
    assert [c[1] for c in chain] == [None, *ids[:-1]]  # each link points at the previous event
    assert chain[0][2] and all(c[3] == 32 for c in chain)
    assert verify(None, dsn) == (0, "audit trail intact\n")


def test_an_event_altered_by_the_dba_is_found(conn: Conn, dsn: str, roles: dict[str, str]) -> None:
    with login(dsn, roles["app"], autocommit=True) as app:
        run_id = finished_run(app)
        other = finished_run(app, business_id=8)
    claimed = event_ids(conn, run_id)[1]
    with login(dsn, roles["dba"], autocommit=True) as dba:
        # The DBA may fix anything, events included, but not the chain that vouches for them.
        dba.execute("UPDATE outbound_heartbeat.run_events SET detail = detail || '{\"lease_epoch\": 0}'"
                    " WHERE id = %s", (claimed,))
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            dba.execute("UPDATE outbound_heartbeat.run_event_chain SET hash = NULL")
        broken = service.verify_events(dba)
    assert [(b.run_id, b.event_id, b.problem) for b in broken] == [(run_id, claimed, "altered")]
    assert broken[0].expected != broken[0].found
    assert service.verify_events(conn, other) == []
    code, text = verify(None, dsn)
    assert code == 1 and text.splitlines() == [
        f"run {run_id}: event {claimed} altered (expected {broken[0].expected}, found {broken[0].found})"]
    assert verify(other, dsn)[0] == 0


def test_pruned_events_verify_a_row_deleted_any_other_way_does_not(conn: Conn, dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as app:
        holed, tail, head = finished_run(app), finished_run(app), finished_run(app)
        pruned = service.create_run(app, 7, [{}]).id
    newer = event_ids(conn, pruned)
    old = old_events(conn, pruned, 7, ["note", "note"])  # chained after it, written long ago
    anchor = conn.execute("SELECT hash FROM outbound_heartbeat.run_event_chain WHERE event_id = %s",
                          (old[-1],)).fetchone()
    assert service.prune_events(conn).events_deleted == 2
    assert conn.execute("SELECT count(*) FROM outbound_heartbeat.run_event_chain WHERE event_id = ANY(%s)",
                        (old,)).fetchone() == (0,)  # their links went with them
    assert service.verify_events(conn, pruned) == []
    # As the owner the API runs as (which may delete events, for retention), not through
    # prune_events(): a middle row, the last row, the first row. Each link stays and says so.
    conn.execute("SET ROLE outbound_heartbeat_owner")
    middle, last, first = event_ids(conn, holed)[1], event_ids(conn, tail)[-1], event_ids(conn, head)[0]
    conn.execute("DELETE FROM outbound_heartbeat.run_events WHERE id = ANY(%s)", ([middle, last, first],))
    conn.execute("RESET ROLE")
    assert [(b.run_id, b.event_id, b.problem) for b in service.verify_events(conn)] == [
        (holed, middle, "deleted"), (tail, last, "deleted"), (head, first, "deleted")]
    # The pruned run keeps chaining: its head (the newest link, pruned) anchors the next event.
    with psycopg.connect(dsn, autocommit=True) as app, pytest.raises(AccessDenied):
        service.force_cancel(app, pruned, 99)
    survivors = event_ids(conn, pruned)
    assert survivors[:-1] == newer
    assert conn.execute("SELECT prev_id, prev_hash FROM outbound_heartbeat.run_event_chain WHERE event_id = %s",
                        (survivors[-1],)).fetchone() == (old[-1], anchor[0] if anchor else None)
    assert service.verify_events(conn, pruned) == []


def test_events_pruned_out_of_chain_order_verify(conn: Conn) -> None:
    # Chain order is not created_at order here: the run's second event is its oldest, so
    # batches of one prune it first; in between, the run still verifies.
    first = old_events(conn, 77, 7, ["created"], age="2 years")
    second = old_events(conn, 77, 7, ["note"], age="3 years")
    recent = old_events(conn, 77, 7, ["note"], age="1 second")
    pruned = service.prune_events(conn, batch_size=1, max_batches=1)
    assert (pruned.events_deleted, pruned.done) == (1, False)
    assert event_ids(conn, 77) == first + recent
    assert service.verify_events(conn, 77) == []
    assert service.prune_events(conn, batch_size=1, max_batches=5).events_deleted == 1
    assert event_ids(conn, 77) == recent and second[0] < recent[0]
    assert service.verify_events(conn, 77) == []


def test_concurrent_writers_of_one_run_never_fork_its_chain(conn: Conn, dsn: str, roles: dict[str, str]) -> None:
    with login(dsn, roles["app"], autocommit=True) as app:
        run = service.create_run(app, 1, [{}])
    errors: list[BaseException] = []
    barrier = threading.Barrier(6)

    def hammer(business: int) -> None:
        try:
            with login(dsn, roles["app"], autocommit=True) as own:
                barrier.wait()
                for _ in range(15):
                    own.execute("SELECT outbound_heartbeat.audit_access_denied(%s, %s, 'force_cancel')",
                                (run.id, business))
        except BaseException as exc:  # reported by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(100 + i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    links = conn.execute("SELECT count(*), count(DISTINCT prev_id), count(*) FILTER (WHERE prev_id IS NULL)"
                         " FROM outbound_heartbeat.run_event_chain WHERE run_id = %s", (run.id,)).fetchone()
    assert links == (91, 90, 1)  # one line: every link has its own predecessor, one genesis
    assert service.verify_events(conn, run.id) == []


def test_a_repeatable_read_writer_fails_rather_than_fork_the_chain(conn: Conn, dsn: str) -> None:
    run = service.create_run(conn, 1, [{}])
    audit = "SELECT outbound_heartbeat.audit_access_denied(%s, %s, 'force_cancel')"
    with psycopg.connect(dsn) as late:
        late.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        late.execute("SELECT 1")  # its snapshot predates the next event
        conn.execute(audit, (run.id, 2))
        with pytest.raises(psycopg.errors.SerializationFailure):
            late.execute(audit, (run.id, 3))
        late.rollback()
        late.execute(audit, (run.id, 3))  # the retry chains after the other writer's event
        late.commit()
    assert service.verify_events(conn, run.id) == []
    assert conn.execute("SELECT count(DISTINCT prev_id) FROM outbound_heartbeat.run_event_chain WHERE run_id = %s",
                        (run.id,)).fetchone() == (2,)


@pytest.mark.parametrize("action", ["force_cancel", "request_cancel"])
def test_a_cross_business_attempt_leaves_a_security_event(
    conn: Conn, dsn: str, roles: dict[str, str], action: str, caplog: pytest.LogCaptureFixture
) -> None:
    with login(dsn, roles["app"], autocommit=True) as app:
        run = service.create_run(app, 1, [{}, {}])
        claim = service.claim_run(app, "w", run.id)
        assert claim is not None
        before = run_row(conn, run.id)
        with pytest.raises(AccessDenied):
            getattr(service, action)(app, run.id, 2)
        assert run_row(conn, run.id) == before  # the run is unchanged
        # Inside the app's own transaction too: the refusal is audited when the app commits.
        with login(dsn, roles["app"]) as in_tx:
            in_tx.execute("SELECT 1")
            with pytest.raises(AccessDenied):
                getattr(service, action)(in_tx, run.id, 3)
            in_tx.commit()
        events = [e for e in service.list_events(app, run_id=run.id) if e.event == "access_denied"]
    assert [(e.business_id, e.detail) for e in events] == [
        (3, {"action": action, "owner_business_id": 1}), (2, {"action": action, "owner_business_id": 1})]
    assert any("[SECURITY]" in r.getMessage() and "access_denied" in r.getMessage() for r in caplog.records)
    assert run_row(conn, run.id) == before
    assert service.verify_events(conn, run.id) == []


def test_only_a_genuine_refusal_can_be_audited(conn: Conn, dsn: str, roles: dict[str, str]) -> None:
    with login(dsn, roles["app"], autocommit=True) as app:
        run = service.create_run(app, 1, [{}])
        for args, column in (((run.id, 1, "force_cancel"), "business_id"),
                             ((run.id, 2, "_end_runs"), "action"),
                             ((run.id, 2, "no_such_call"), "action")):
            with pytest.raises(psycopg.Error) as err:
                app.execute("SELECT outbound_heartbeat.audit_access_denied(%s, %s, %s)", args)
            assert err.value.sqlstate == "OH400" and err.value.diag.column_name == column
        with pytest.raises(psycopg.Error) as err:
            app.execute("SELECT outbound_heartbeat.audit_access_denied(%s, 2, 'force_cancel')", (run.id + 1000,))
        assert err.value.sqlstate == "OH404"
    assert conn.execute("SELECT count(*) FROM outbound_heartbeat.run_events WHERE event = 'access_denied'"
                        ).fetchone() == (0,)


# -- the hash covers the exact row; pruning checks what it drops; links go with pruned rows only --

#: The same instant's digits in the other era (UTC): what the old format could not tell apart.
BC_CREATED_AT = ("(to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || ' BC')::timestamp"
                 " AT TIME ZONE 'UTC'")


@pytest.mark.parametrize("new_created_at", [
    pytest.param(BC_CREATED_AT, id="bc"),  # the old format wrote no era: this went unnoticed
    pytest.param("timestamptz '1900-01-01 00:00:00+00'", id="1900"),  # reported until a prune
    pytest.param("timestamptz '-infinity'", id="-infinity"),
    pytest.param("created_at - interval '1 microsecond'", id="1us"),
])
def test_a_dba_cannot_erase_a_run_by_moving_its_events(
    conn: Conn, dsn: str, roles: dict[str, str], new_created_at: str
) -> None:
    with login(dsn, roles["app"], autocommit=True) as app:
        moved, kept = finished_run(app), finished_run(app, business_id=8)
    old = old_events(conn, 4242, 9, ["created", "note"])  # genuinely old: retention deletes them
    ids = event_ids(conn, moved)
    with login(dsn, roles["dba"], autocommit=True) as dba:
        dba.execute(sql.SQL("UPDATE outbound_heartbeat.run_events SET created_at = {} WHERE run_id = %s").format(
            sql.SQL(new_created_at)), (moved,))
        broken = [(b.run_id, b.event_id, b.problem) for b in service.verify_events(dba)]
        assert broken == [(moved, ids[0], "altered")]
        # Past any retention now, yet prune_events() keeps every row that no longer matches its
        # link (and the link): the run stays in the report.
        result = service.prune_events(dba)
        assert (result.events_deleted, result.done) == (2, True)
        assert event_ids(conn, 4242) == [] and old
        assert event_ids(conn, moved) == ids
        assert [(b.run_id, b.event_id, b.problem) for b in service.verify_events(dba)] == broken
        assert service.prune_events(dba).events_deleted == 0
    assert service.verify_events(conn, kept) == []
    assert verify(moved, dsn)[0] == 1


def test_deleting_the_newest_events_never_hides_a_run(conn: Conn, dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as app:
        first, second, third = finished_run(app), finished_run(app), finished_run(app)
    cut, gone = event_ids(conn, second)[2], event_ids(conn, third)[0]
    # The table's owner (or a superuser) deletes the newest events of the table: the tail of
    # one run and every event of the next. Their links stay; both runs are reported.
    conn.execute("DELETE FROM outbound_heartbeat.run_events WHERE id >= %s", (cut,))
    assert event_ids(conn, third) == []
    assert [(b.run_id, b.event_id, b.problem) for b in service.verify_events(conn)] == [
        (second, cut, "deleted"), (third, gone, "deleted")]
    assert [b.problem for b in service.verify_events(conn, third)] == ["deleted"]
    assert service.verify_events(conn, first) == []
    code, text = verify(None, dsn)
    assert code == 1 and len(text.splitlines()) == 2


def test_a_run_deleted_after_a_prune_is_still_reported(conn: Conn) -> None:
    pruned = old_events(conn, 4242, 9, ["created", "claimed"])
    recent = old_events(conn, 4242, 9, ["note", "finished"], age="1 minute")
    assert service.prune_events(conn).events_deleted == 2
    assert event_ids(conn, 4242) == recent and service.verify_events(conn, 4242) == []
    # The head of the run (its anchor) and the links of the events not pruned stay: deleting
    # what is left of the run by hand is reported, whoever does it.
    assert conn.execute("SELECT event_id FROM outbound_heartbeat.run_event_heads WHERE run_id = 4242"
                        ).fetchone() == (recent[-1],)
    conn.execute("DELETE FROM outbound_heartbeat.run_events WHERE run_id = 4242")
    assert [(b.run_id, b.event_id, b.problem) for b in service.verify_events(conn)] == [
        (4242, recent[0], "deleted")]
    assert pruned[-1] < recent[0]


def test_prune_removes_a_link_only_with_its_verified_event(conn: Conn) -> None:
    ids = old_events(conn, 4242, 9, ["created", "claimed", "finished"])
    conn.execute("UPDATE outbound_heartbeat.run_events SET detail = '{\"by\": \"dba\"}' WHERE id = %s", (ids[1],))
    # Batches of one: the altered row is read, kept, and the batch goes on past it.
    result = service.prune_events(conn, batch_size=1, max_batches=10)
    assert (result.events_deleted, result.batches, result.done) == (2, 3, True)  # the last one finds none
    assert event_ids(conn, 4242) == [ids[1]]
    assert conn.execute("SELECT event_id FROM outbound_heartbeat.run_event_chain WHERE run_id = 4242"
                        ).fetchall() == [(ids[1],)]
    assert [(b.event_id, b.problem) for b in service.verify_events(conn, 4242)] == [(ids[1], "altered")]


def test_a_row_edited_while_prune_deletes_it_is_kept(conn: Conn, dsn: str, roles: dict[str, str]) -> None:
    ids = old_events(conn, 4242, 9, ["created", "claimed"])
    with login(dsn, roles["dba"]) as dba:  # the edit is open when prune_events() checks the row
        dba.execute("UPDATE outbound_heartbeat.run_events SET detail = '{\"forged\": true}' WHERE id = %s", (ids[0],))
        commit = threading.Timer(0.5, dba.commit)
        commit.start()
        started = time.monotonic()
        result = service.prune_events(conn)  # checked the committed row, then waits for the edit
        waited = time.monotonic() - started
        commit.join()
    assert waited >= 0.4  # the race really ran
    assert result.events_deleted == 1 and event_ids(conn, 4242) == [ids[0]]
    assert [(b.event_id, b.problem) for b in service.verify_events(conn, 4242)] == [(ids[0], "altered")]


# -- no session setting changes a hash or a verdict --------------------------------------------

SESSION_SETTINGS = [
    ("standard_conforming_strings", "off"),
    ("bytea_output", "escape"),
    ("DateStyle", "German, DMY"),
    ("DateStyle", "SQL, MDY"),
    ("IntervalStyle", "sql_standard"),
    ("IntervalStyle", "iso_8601"),
    ("TimeZone", "Asia/Kathmandu"),
    ("TimeZone", "America/St_Johns"),
    ("extra_float_digits", "-15"),
    ("extra_float_digits", "3"),
]


def sql_finished_run(conn: Conn, business_id: int) -> int:
    """finished_run() through the SQL API only (the Python records parse ISO dates only)."""
    row = conn.execute("SELECT (outbound_heartbeat.create_run(%s, '[{}, {}]'::jsonb)).id", (business_id,)).fetchone()
    assert row is not None
    epoch = conn.execute("SELECT (outbound_heartbeat.claim_run('w', %s)).lease_epoch", (row[0],)).fetchone()
    assert epoch is not None
    conn.execute("SELECT (outbound_heartbeat.request_cancel(%s, %s)).previous_status", (row[0], business_id))
    conn.execute("SELECT (outbound_heartbeat.finish_run(%s, 'w', %s, 'cancelled')).outcome", (row[0], epoch[0]))
    return int(row[0])


@pytest.mark.parametrize("setting, value", SESSION_SETTINGS)
def test_no_session_setting_changes_a_hash_or_a_verdict(conn: Conn, dsn: str, setting: str, value: str) -> None:
    plain = finished_run(conn, business_id=1)
    detail = '{"price": 0.1, "ratio": 1e-7, "path": "C:\\\\dir\\\\x", "name": "Zo\u00eb", "tz": "+05:45"}'
    with psycopg.connect(dsn, autocommit=True) as odd:
        odd.execute("SELECT set_config(%s, %s, false)", (setting, value))
        assert odd.execute("SELECT current_setting(%s)", (setting,)).fetchone() == (value,)
        theirs = sql_finished_run(odd, business_id=2)
        odd.execute("INSERT INTO outbound_heartbeat.run_events (run_id, business_id, event, detail, created_at)"
                    " VALUES (%s, 2, 'note', %s::jsonb, now() - interval '1 year')", (4242, detail))
        old_events(odd, 4242, 2, ["note"], age="2 years")
        # Every untouched run verifies, in that session and in a default one.
        assert service.verify_events(odd) == []
        assert service.verify_events(conn) == []
        # A real edit is still found, in both.
        altered = event_ids(conn, theirs)[1]
        conn.execute("UPDATE outbound_heartbeat.run_events SET worker_id = 'x' WHERE id = %s", (altered,))
        expected = [(theirs, altered, "altered")]
        assert [(b.run_id, b.event_id, b.problem) for b in service.verify_events(odd)] == expected
        assert [(b.run_id, b.event_id, b.problem) for b in service.verify_events(conn)] == expected
        # Retention under that setting checks and deletes the two old events, nothing else.
        assert odd.execute("SELECT events_deleted FROM outbound_heartbeat.prune_events()").fetchone() == (2,)
    assert service.verify_events(conn, plain) == []
    assert [(b.run_id, b.event_id, b.problem) for b in service.verify_events(conn)] == expected


# -- links of hash format 1 (written before format 2) after the upgrade -------------------------

#: The last release whose links are all hash format 1 (migration 0003.online-upgrade).
FORMAT_1_RELEASE = "0003"


def build_format_1_release(dsn: str) -> None:
    """That release's sql/ (its frozen copy in migrations/frozen/), applied as its own install
    did: every file once, in name order."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for path in sorted((FROZEN_SQL / FORMAT_1_RELEASE).glob("*.sql")):
            conn.execute(path.read_bytes())
        conn.execute(TEST_SETTINGS)


def test_format_1_links_keep_verifying_after_the_upgrade(pg_server: Server) -> None:
    dsn = pg_server.create_database()
    try:
        build_format_1_release(dsn)
        with psycopg.connect(dsn, autocommit=True) as conn:
            untouched, edited, moved = finished_run(conn), finished_run(conn, 8), finished_run(conn, 9)
            old_ok = old_events(conn, 4242, 9, ["created", "note"])
            old_bad = old_events(conn, 4343, 9, ["created"])
            with psycopg.connect(dsn, autocommit=True) as odd:  # its genesis links hash 'x' first
                odd.execute("SET standard_conforming_strings = off")
                odd_run = sql_finished_run(odd, 10)
            # Tampering before the upgrade: an edit, a move to BC (format 1 misses it), a backdate.
            conn.execute("UPDATE outbound_heartbeat.run_events SET detail = '{}' WHERE id = %s",
                         (event_ids(conn, edited)[1],))
            conn.execute(sql.SQL("UPDATE outbound_heartbeat.run_events SET created_at = {} WHERE run_id = %s").format(
                sql.SQL(BC_CREATED_AT)), (moved,))
            conn.execute("UPDATE outbound_heartbeat.run_events SET created_at = created_at - interval '1 day'"
                         " WHERE id = %s", (old_bad[0],))
            before = {b.run_id for b in service.verify_events(conn)}
            assert before == {edited, odd_run, 4343}  # the BC move unseen, the 'x' genesis a false alarm

            apply_sql_online(conn, sql_dir())  # what an upgrade step does
            assert conn.execute("SELECT DISTINCT hash_version FROM outbound_heartbeat.run_event_chain"
                                ).fetchall() == [(1,)]
            broken = {(b.run_id, b.event_id, b.problem) for b in service.verify_events(conn)}
            assert broken == {(edited, event_ids(conn, edited)[1], "altered"),
                              (moved, event_ids(conn, moved)[0], "altered"), (4343, old_bad[0], "altered")}
            # New events chain after format 1 links in format 2.
            with pytest.raises(AccessDenied):
                service.force_cancel(conn, untouched, 99)
            with pytest.raises(AccessDenied):
                service.force_cancel(conn, odd_run, 99)
            assert conn.execute("SELECT count(*), min(c.prev_id) IS NOT NULL FROM outbound_heartbeat.run_event_chain AS c"
                                " WHERE c.hash_version = 2").fetchone() == (2, True)
            assert service.verify_events(conn, untouched) == [] and service.verify_events(conn, odd_run) == []
            # Retention checks format 1 links too: the verified old events go, the backdated one stays.
            assert service.prune_events(conn).events_deleted == 2
            assert event_ids(conn, 4242) == [] and event_ids(conn, 4343) == old_bad and len(old_ok) == 2
            assert {(b.run_id, b.event_id, b.problem) for b in service.verify_events(conn)} == broken
    finally:
        pg_server.drop_database(str(psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]))
