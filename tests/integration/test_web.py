"""The Flask blueprint and the FastAPI router, through each framework's test client, in both
locales: every status code, tenant isolation, release hooks after commit."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from outbound_heartbeat import service, web

from ..helpers import Client, backdate_heartbeat, make_client, run_row, snapshot, until

Conn = psycopg.Connection[Any]
HE = web.MESSAGES["he"]
EN = web.MESSAGES["en"]


@pytest.fixture(params=["flask", "fastapi"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=["he", "en"])
def locale(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def client(kind: str, dsn: str, locale: str) -> Iterator[Client]:
    yield from make_client(kind, dsn, locale)


def running_run(conn: Conn, business: int, jobs: int) -> int:
    run = service.create_run(conn, business, [{"phone": str(i)} for i in range(jobs)])
    assert service.claim_run(conn, f"w{business}", run.id) is not None
    return run.id


def test_active_200_then_404_when_stale(client: Client, conn: Conn, locale: str) -> None:
    text = web.MESSAGES[locale]
    assert client.call("get", "/jobs/active") == (404, {"error": text["no_active"], "code": "no_active"})
    run_id = running_run(conn, 1, jobs=4)
    status, body = client.call("get", "/jobs/active")
    assert status == 200
    assert body["id"] == run_id and body["status"] == "running" and body["queued"] == 4
    assert body["in_progress"] == 0 and body["worker"] == "w1" and body["heartbeat_age_seconds"] < 5
    assert client.released == []
    backdate_heartbeat(conn, run_id, 31)
    assert client.call("get", "/jobs/active")[0] == 404
    row = run_row(conn, run_id)
    assert row["status"] == "stopped" and row["locked_by_worker"] is None
    assert client.released == [(run_id, 1)]  # this very call reclaimed it, then the hooks ran


def test_force_cancel_message_and_count(client: Client, conn: Conn, locale: str) -> None:
    run_id = running_run(conn, 1, jobs=15)
    status, body = client.call("post", f"/jobs/{run_id}/force-cancel")
    expected = {"he": "התור בוטל מיידית (15 שיחות בוטלו)",
                "en": "Queue cancelled immediately (15 calls cancelled)"}[locale]
    assert status == 200
    assert body["success"] is True and body["message"] == expected and body["jobs_cancelled"] == 15
    assert run_row(conn, run_id)["status"] == "cancelled"
    assert client.released == [(run_id, 1)]
    status, body = client.call("post", f"/jobs/{run_id}/force-cancel")
    assert status == 200 and body["jobs_cancelled"] == 0
    assert body["message"] == web.MESSAGES[locale]["already_ended"]
    assert client.released == [(run_id, 1)]  # nothing ended the second time: no hook


def test_other_business_gets_403_and_nothing_changes(
    client: Client, conn: Conn, locale: str, caplog: pytest.LogCaptureFixture
) -> None:
    run_id = running_run(conn, 1, jobs=3)
    before = snapshot(conn)
    with caplog.at_level(logging.WARNING, logger="outbound_heartbeat"):
        for path in (f"/jobs/{run_id}/force-cancel", f"/jobs/{run_id}/cancel"):
            status, body = client.call("post", path, business=2)
            assert (status, body["error"]) == (403, web.MESSAGES[locale]["no_access"])
    after = snapshot(conn)
    # Nothing changed but the audit trail, which now holds each refusal (docs/security.md).
    assert after[:2] == before[:2] and after[3:] == before[3:]
    assert [(e[3], e[2]) for e in after[2][len(before[2]):]] == [("access_denied", 2)] * 2
    # Each refusal is logged twice: the refused call, and its audit event.
    assert sum("[SECURITY]" in r.getMessage() for r in caplog.records) == 4
    assert client.released == []


@pytest.mark.parametrize("raw", ["abc", "0", "-1", "1.5", "99999999999999999999", "9223372036854775808", "١٢"])
def test_malformed_id_is_400(kind: str, dsn: str, raw: str) -> None:
    for client in make_client(kind, dsn, "en"):
        for action in ("cancel", "force-cancel"):
            assert client.call("post", f"/jobs/{raw}/{action}") == (400, {"error": EN["bad_id"], "code": "OH400"})


def test_unknown_run_is_404_and_missing_tenant_401(client: Client, locale: str) -> None:
    text = web.MESSAGES[locale]
    assert client.call("post", "/jobs/987654/force-cancel") == (404, {"error": text["not_found"], "code": "OH404"})
    assert client.call("post", "/jobs/987654/cancel")[0] == 404
    assert client.call("get", "/jobs/active", business=None) == (401, {"error": text["unauthorized"], "code": "unauthorized"})
    assert client.call("post", "/jobs/1/force-cancel", business=None)[0] == 401


def test_cancel_running_and_pending(client: Client, conn: Conn, locale: str) -> None:
    text = web.MESSAGES[locale]
    run_id = running_run(conn, 1, jobs=2)
    status, body = client.call("post", f"/jobs/{run_id}/cancel")
    assert status == 200 and body["message"] == text["cancel_requested"] and body["status"] == "running"
    assert run_row(conn, run_id)["cancel_requested_at"] is not None
    pending = service.create_run(conn, 1, [{}, {}, {}]).id
    status, body = client.call("post", f"/jobs/{pending}/cancel")
    assert status == 200 and body["message"] == text["cancelled"].format(n=3) and body["jobs_cancelled"] == 3


def test_locked_run_is_423(client: Client, conn: Conn, dsn: str) -> None:
    run_id = running_run(conn, 1, jobs=2)
    conn.execute("UPDATE outbound_heartbeat.settings SET lock_timeout = interval '200 milliseconds'")
    with psycopg.connect(dsn) as holder:
        holder.execute("SELECT 1 FROM outbound_call_runs WHERE id = %s FOR UPDATE", (run_id,))
        status, body = client.call("post", f"/jobs/{run_id}/force-cancel")
        holder.rollback()
    assert status == 423 and body["code"] == "OH423"
    assert run_row(conn, run_id)["status"] == "running"


def test_failing_hook_never_undoes_the_cancel(kind: str, dsn: str, conn: Conn,
                                              caplog: pytest.LogCaptureFixture) -> None:
    seen_committed: list[str] = []

    def check_committed(run_id: int, business_id: int) -> None:
        with psycopg.connect(dsn) as other:  # another session sees the cancel: it has committed
            row = other.execute("SELECT status FROM outbound_call_runs WHERE id = %s", (run_id,)).fetchone()
            seen_committed.append(row[0] if row else "?")

    def broken(run_id: int, business_id: int) -> None:
        raise ConnectionError("redis is down")

    run_id = running_run(conn, 1, jobs=5)
    # Short retries, and all of them waited for below: a retry timer left running logs into the
    # next test of this worker.
    hooks = web.ReleaseHooks([broken, check_committed], retry_delay=0.01)
    with caplog.at_level(logging.ERROR, logger="outbound_heartbeat.web"):
        for client in make_client(kind, dsn, "he", hooks=hooks):
            status, body = client.call("post", f"/jobs/{run_id}/force-cancel")
            assert status == 200 and body["jobs_cancelled"] == 5
            assert client.released == [(run_id, 1)]
        assert seen_committed == ["cancelled"]
        assert run_row(conn, run_id)["status"] == "cancelled"


        def failures() -> list[logging.LogRecord]:
            return [r for r in caplog.records if r.exc_text and "[RELEASE_HOOK]" in r.getMessage()
                    and "redis is down" in r.exc_text]

        until(lambda: len(failures()) == 4, 10, "the failing hook's four attempts")
    assert "attempt 4 of 4" in failures()[-1].getMessage()
    assert run_row(conn, run_id)["status"] == "cancelled"


def test_custom_prefix(kind: str, dsn: str, conn: Conn) -> None:
    run_id = running_run(conn, 1, jobs=1)
    for client in make_client(kind, dsn, "en", prefix="/v2/calls"):
        assert client.call("get", "/jobs/active")[1]["id"] == run_id
        client.prefix = web.DEFAULT_PREFIX
        assert client.call("get", "/jobs/active")[0] == 404  # not mounted there


@pytest.mark.parametrize("use_sqlalchemy", [False, True])
def test_example_flask_app(dsn: str, conn: Conn, use_sqlalchemy: bool) -> None:
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "flask_app.py"
    spec = importlib.util.spec_from_file_location("flask_app_example", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    url = "postgresql://" + "/".join(
        [f"{conn.info.user}@{conn.info.host}:{conn.info.port}", conn.info.dbname])
    app = module.create_app(url, use_sqlalchemy=use_sqlalchemy)
    client = app.test_client()
    run_id = running_run(conn, 42, jobs=15)
    response = client.post(f"/api/outbound_calls/jobs/{run_id}/force-cancel", headers={"X-Business-Id": "42"})
    assert response.status_code == 200
    assert response.get_json()["message"] == "התור בוטל מיידית (15 שיחות בוטלו)"
    assert run_row(conn, run_id)["status"] == "cancelled"  # committed, seen from another session
    assert client.get("/api/outbound_calls/jobs/active", headers={"X-Business-Id": "42"}).status_code == 404
    assert client.get("/api/outbound_calls/jobs/active").status_code == 401
    assert client.get("/").data == b"your app"
