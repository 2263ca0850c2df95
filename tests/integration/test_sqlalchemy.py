"""The API inside a SQLAlchemy unit of work (contrib.sqlalchemy), against real PostgreSQL:
the Flask-SQLAlchemy example app end to end with Flask's test client (its own models and
routes, our endpoints on its db.session), and a plain Session: hooks on the real commit only
(not a begin_nested() release), none after a rollback, the session's settings as found."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import psycopg
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from outbound_heartbeat import Event, InvalidArgument, service
from outbound_heartbeat.contrib import sqlalchemy as oh

from ..helpers import run_row, sqlalchemy_url

Conn = psycopg.Connection[Any]
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "flask_sqlalchemy_app.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("flask_sqlalchemy_example", EXAMPLE)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # SQLAlchemy resolves the models' annotations through it
    spec.loader.exec_module(module)
    return module


def outside(dsn: str, run_id: int) -> dict[str, Any]:
    with psycopg.connect(dsn, autocommit=True) as other:
        return run_row(other, run_id)


def test_example_app_end_to_end(dsn: str, conn: Conn) -> None:
    module = load_example()
    hooked: list[tuple[int, int, str]] = []
    app = module.create_app(
        sqlalchemy_url(dsn), locale="en",
        hooks=[lambda run, business: hooked.append((run, business, outside(dsn, run)["status"]))])
    client = app.test_client()
    as_42 = {"X-Business-Id": "42"}

    # The app creates a run through its own models and routes.
    created = client.post("/campaigns", json={"phones": ["+972500000001", "+972500000002",
                                                         "+972500000003"]}, headers=as_42)
    assert created.status_code == 201
    run_id = created.get_json()["run_id"]
    assert outside(dsn, run_id)["status"] == "pending" and outside(dsn, run_id)["business_id"] == 42

    # Our endpoint on the app's session sees it.
    active = client.get("/api/outbound_calls/jobs/active", headers=as_42)
    assert active.status_code == 200
    assert active.get_json()["id"] == run_id and active.get_json()["queued"] == 3

    # A worker dials one call; the provider's callback (the app's route) finishes it.
    claim = service.claim_run(conn, "dialer-1", run_id)
    assert claim is not None
    job = service.next_job(conn, run_id, "dialer-1", claim.lease_epoch)
    assert job is not None
    done = client.post("/telephony/callback", json={"job_id": job.id, "status": "completed"})
    assert done.status_code == 200 and done.get_json()["changed"] is True
    again = client.post("/telephony/callback", json={"job_id": job.id, "status": "failed"})
    assert again.get_json() == {"job_id": job.id, "status": "completed", "changed": False}

    # Another business cannot cancel it; nothing changes, no hook.
    denied = client.post(f"/api/outbound_calls/jobs/{run_id}/force-cancel",
                         headers={"X-Business-Id": "43"})
    assert denied.status_code == 403 and outside(dsn, run_id)["status"] == "running"
    assert hooked == []

    # Force-cancel through our endpoint: committed by the session, then the hook.
    cancelled = client.post(f"/api/outbound_calls/jobs/{run_id}/force-cancel", headers=as_42)
    assert cancelled.status_code == 200
    assert cancelled.get_json()["jobs_cancelled"] == 2
    assert hooked == [(run_id, 42, "cancelled")]
    assert client.get("/api/outbound_calls/jobs/active", headers=as_42).status_code == 404
    assert client.get("/api/outbound_calls/jobs/active").status_code == 401


def test_example_app_stop_route_commit_and_rollback(dsn: str, conn: Conn) -> None:
    module = load_example()
    hooked: list[tuple[int, int]] = []
    app = module.create_app(sqlalchemy_url(dsn), hooks=[lambda r, b: hooked.append((r, b))])
    client = app.test_client()
    as_7 = {"X-Business-Id": "7"}
    run_id = client.post("/campaigns", json={"phones": ["1", "2"]}, headers=as_7).get_json()["run_id"]
    assert service.claim_run(conn, "dialer-7", run_id) is not None

    # The app's own part fails after the cancel: both roll back, no hook runs.
    refused = client.post(f"/campaigns/{run_id}/stop", json={"reason": "x" * 101}, headers=as_7)
    assert refused.status_code == 422
    assert outside(dsn, run_id)["status"] == "running" and hooked == []
    with psycopg.connect(dsn, autocommit=True) as other:
        statuses = other.execute("SELECT status FROM outbound_call_jobs WHERE run_id = %s",
                                 (run_id,)).fetchall()
    assert statuses == [("queued",), ("queued",)]

    # Both parts commit together; the hook runs after the commit.
    stopped = client.post(f"/campaigns/{run_id}/stop", json={"reason": "customer asked"},
                          headers=as_7)
    assert stopped.status_code == 200 and stopped.get_json()["jobs_cancelled"] == 2
    assert outside(dsn, run_id)["status"] == "cancelled" and hooked == [(run_id, 7)]
    with psycopg.connect(dsn, autocommit=True) as other:
        notes = other.execute("SELECT error_message FROM outbound_call_jobs WHERE run_id = %s",
                              (run_id,)).fetchall()
    assert all("stopped by the operator: customer asked" in n for (n,) in notes)


@pytest.fixture
def engine(dsn: str) -> Any:
    eng: Engine = create_engine(sqlalchemy_url(dsn))
    yield eng
    eng.dispose()


def running(conn: Conn, business: int) -> int:
    run = service.create_run(conn, business, [{}])
    assert service.claim_run(conn, f"w{run.id}", run.id) is not None
    return run.id


def test_session_hooks_on_the_real_commit_only(engine: Engine, conn: Conn, dsn: str) -> None:
    first, second, third = running(conn, 3), running(conn, 3), running(conn, 3)
    fired: list[int] = []

    def hook(events: list[Event]) -> None:
        fired.extend(e.run_id for e in events)

    with Session(engine) as session:
        session.execute(text("SELECT 1"))  # the app's unit of work is under way
        oh.force_cancel(session, first, 3, on_commit=hook)
        with session.begin_nested():  # a savepoint released is not a commit
            oh.force_cancel(session, second, 3, on_commit=hook)
        assert fired == [] and outside(dsn, first)["status"] == "running"
        nested = session.begin_nested()
        oh.force_cancel(session, third, 3, on_commit=hook)
        nested.rollback()  # this one call is undone with its savepoint
        session.commit()
    assert sorted(fired) == sorted([first, second])
    assert [outside(dsn, r)["status"] for r in (first, second, third)] == [
        "cancelled", "cancelled", "running"]

    with Session(engine) as session:
        oh.force_cancel(session, third, 3, on_commit=hook)  # the first statement of the session
        session.rollback()
    assert third not in fired and outside(dsn, third)["status"] == "running"


def test_session_and_core_connection_errors_and_settings(engine: Engine, conn: Conn, dsn: str) -> None:
    run_id = running(conn, 5)
    with Session(engine) as session:
        session.execute(text("SET LOCAL TimeZone = 'Asia/Tokyo'"))
        session.execute(text("SET LOCAL search_path = public, pg_temp"))
        before = session.execute(text("SELECT current_setting('TimeZone'), current_setting('search_path')")).one()
        assert oh.get_active_run(session, 5) is not None
        with pytest.raises(InvalidArgument) as bad:
            oh.force_cancel(session, run_id, business_id=5.0)  # type: ignore[arg-type]
        assert bad.value.argument == "business_id"
        from outbound_heartbeat import AccessDenied
        with pytest.raises(AccessDenied):
            oh.force_cancel(session, run_id, 6)
        # Our refused call was a savepoint: the app's transaction goes on.
        assert session.execute(text("SELECT current_setting('TimeZone'), current_setting('search_path')")).one() == before
        session.commit()
    with engine.connect() as connection:  # Core: settled by the server's word on the commit
        result = oh.force_cancel(connection, run_id, 5)
        assert result.status == "cancelled" and outside(dsn, run_id)["status"] == "running"
        connection.commit()
    assert outside(dsn, run_id)["status"] == "cancelled"
