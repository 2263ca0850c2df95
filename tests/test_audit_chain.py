"""The tamper-evident audit trail (docs/security.md): every run_events row is chained to the
previous one of its run, verify_events() and `events --verify` report the first broken link,
a pruned prefix of a run is tolerated but a row deleted in the middle is not, concurrent writers
of one run never fork its chain, and a refused cross-business call leaves a [SECURITY] event."""

from __future__ import annotations

import io
import threading
from typing import Any

import psycopg
import pytest

from outbound_heartbeat import AccessDenied, cli, service

from .helpers import run_row

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


def test_a_pruned_prefix_is_tolerated_a_deleted_middle_row_is_not(conn: Conn, dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as app:
        pruned, holed, tail = finished_run(app), finished_run(app), finished_run(app)
    # Retention deletes as the owner: the two oldest events of one run, everything of none else.
    conn.execute("SET ROLE outbound_heartbeat_owner")
    conn.execute("DELETE FROM outbound_heartbeat.run_events WHERE id = ANY(%s)", (event_ids(conn, pruned)[:2],))
    middle = event_ids(conn, holed)[1]
    conn.execute("DELETE FROM outbound_heartbeat.run_events WHERE id = %s", (middle,))
    last = event_ids(conn, tail)[-1]
    conn.execute("DELETE FROM outbound_heartbeat.run_events WHERE id = %s", (last,))
    conn.execute("RESET ROLE")
    assert service.verify_events(conn, pruned) == []
    assert [(b.run_id, b.event_id, b.problem) for b in service.verify_events(conn)] == [
        (holed, middle, "deleted"), (tail, last, "deleted")]
    # The surviving events of the pruned run keep chaining: a new event still verifies.
    with psycopg.connect(dsn, autocommit=True) as app, pytest.raises(AccessDenied):
        service.force_cancel(app, pruned, 99)
    survivors = event_ids(conn, pruned)
    assert conn.execute("SELECT prev_id FROM outbound_heartbeat.run_event_chain WHERE event_id = %s",
                        (survivors[-1],)).fetchone() == (survivors[-2],)
    assert service.verify_events(conn, pruned) == []


def test_a_prefix_pruned_in_any_order_verifies(conn: Conn, dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as app:
        run_id = finished_run(app)
    first, second, *_ = event_ids(conn, run_id)
    conn.execute("SET ROLE outbound_heartbeat_owner")
    conn.execute("DELETE FROM outbound_heartbeat.run_events WHERE id = %s", (second,))
    assert [b.problem for b in service.verify_events(conn, run_id)] == ["deleted"]  # a hole, for now
    conn.execute("DELETE FROM outbound_heartbeat.run_events WHERE id = %s", (first,))  # the next batch
    conn.execute("RESET ROLE")
    assert service.verify_events(conn, run_id) == []


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
