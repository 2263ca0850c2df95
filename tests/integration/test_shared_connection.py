"""One psycopg connection shared by every request of a web app (docs/embedding.md).

8 threads x 40 requests (cancel and force-cancel, several businesses, some from the wrong
business) through the Flask blueprint and the FastAPI router, each on ONE shared connection:
every 200 is committed in the database, every release hook is for the run its own request
ended (once), no notice handler of ours is left behind, and the connection ends idle.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest

from outbound_heartbeat import calls

from ..helpers import claim_runs, create_runs, run_rows

Conn = psycopg.Connection[Any]

THREADS = 8
PER_THREAD = 40
BUSINESSES = (11, 12, 13, 14)


@dataclass(frozen=True)
class Request:
    run_id: int
    business: int  # the run's own business
    caller: int  # the business the request acts for
    force: bool
    was_running: bool


@dataclass
class Answer:
    request: Request
    status: int
    body: Any


def plan(conn: Conn) -> list[list[Request]]:
    """One distinct run per request, half running, half pending; every 10th from another
    business (must be 403 and change nothing). Made and claimed by the API's functions in two
    statements (tests/helpers.py), not 480 calls: the setup is not what is tested here."""
    shape = [(t, i, BUSINESSES[(t + i) % len(BUSINESSES)])
             for t in range(THREADS) for i in range(PER_THREAD)]
    run_ids = create_runs(conn, [business for _, _, business in shape],
                          [{"n": n} for n in range(3)])
    claim_runs(conn, [(f"w{run_id}", run_id)
                      for run_id, (_, i, _) in zip(run_ids, shape, strict=True) if i % 2 == 0])
    work: list[list[Request]] = [[] for _ in range(THREADS)]
    for run_id, (t, i, business) in zip(run_ids, shape, strict=True):
        caller = business if i % 10 != 9 else BUSINESSES[(t + i + 1) % len(BUSINESSES)]
        work[t].append(Request(run_id, business, caller, force=i % 4 < 2, was_running=i % 2 == 0))
    return work


def race(work: list[list[Request]], send: Callable[[Request], tuple[int, Any]]) -> list[Answer]:
    answers: list[Answer] = []
    lock = threading.Lock()
    barrier = threading.Barrier(THREADS)

    def worker(mine: list[Request]) -> None:
        barrier.wait()
        for req in mine:
            try:
                status, body = send(req)
            except Exception as exc:  # a crash in the app counts as a 500
                status, body = 500, repr(exc)
            with lock:
                answers.append(Answer(req, status, body))

    threads = [threading.Thread(target=worker, args=(mine,)) for mine in work]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    return answers


def verify(conn: Conn, answers: list[Answer], hooked: list[tuple[int, int]],
           shared: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> dict[str, int]:
    """The numbers first (printed for the report), then the assertions."""
    numbers: Counter[str] = Counter()
    expected_hooks = set()
    rows = run_rows(conn, [a.request.run_id for a in answers])
    for a in answers:
        row = rows[a.request.run_id]
        numbers[f"http_{a.status}"] += 1
        if a.status != 200:
            continue
        ok = (
            row["status"] == "cancelled"
            if a.request.force or not a.request.was_running
            else row["cancel_requested_at"] is not None
        )
        numbers["200_committed" if ok else "200_not_committed"] += 1
        if a.request.force:
            expected_hooks.add((a.request.run_id, a.request.business))
    hook_counts = Counter(hooked)
    numbers["hooks_foreign"] = sum(1 for h in hooked if h not in expected_hooks)
    numbers["hooks_missing"] = len(expected_hooks - set(hooked))
    numbers["hooks_twice"] = sum(1 for n in hook_counts.values() if n > 1)
    numbers["handlers_left"] = sum(
        isinstance(h, calls.EventCollector) for h in shared._notice_handlers
    )
    numbers["left_not_idle"] = int(
        shared.info.transaction_status != psycopg.pq.TransactionStatus.IDLE
    )
    print("shared-connection numbers:", dict(sorted(numbers.items())))

    total = THREADS * PER_THREAD
    wrong_business = sum(1 for a in answers if a.request.caller != a.request.business)
    assert len(answers) == total
    assert numbers["http_403"] == wrong_business
    assert numbers["http_200"] == total - wrong_business
    assert numbers["200_not_committed"] == 0
    for a in answers:
        if a.status == 403:  # refused: the run is as it was
            row = rows[a.request.run_id]
            assert row["status"] == ("running" if a.request.was_running else "pending")
            assert row["cancel_requested_at"] is None
    assert numbers["hooks_foreign"] == numbers["hooks_missing"] == numbers["hooks_twice"] == 0
    assert set(hooked) == expected_hooks
    assert numbers["handlers_left"] == 0
    assert numbers["left_not_idle"] == 0
    return dict(numbers)


@pytest.mark.parametrize("autocommit", [True, False], ids=["autocommit", "transactional"])
def test_flask_on_one_shared_connection(conn: Conn, dsn: str, autocommit: bool) -> None:
    from flask import Flask, request

    from outbound_heartbeat.contrib.flask import create_blueprint

    work = plan(conn)
    hooked: list[tuple[int, int]] = []
    hook_lock = threading.Lock()

    def hook(run_id: int, business_id: int) -> None:
        with hook_lock:
            hooked.append((run_id, business_id))

    def tenant() -> int | None:
        return int(request.headers["X-Business-Id"])

    with psycopg.connect(dsn, autocommit=autocommit) as shared:
        app = Flask("shared")
        app.register_blueprint(create_blueprint(shared, tenant, locale="en", hooks=[hook]))

        def send(req: Request) -> tuple[int, Any]:
            path = f"/api/outbound_calls/jobs/{req.run_id}/{'force-cancel' if req.force else 'cancel'}"
            response = app.test_client().post(path, headers={"X-Business-Id": str(req.caller)})
            return response.status_code, response.get_json(silent=True)

        answers = race(work, send)
        verify(conn, answers, hooked, shared)


@pytest.mark.parametrize("autocommit", [True, False], ids=["autocommit", "transactional"])
def test_fastapi_on_one_shared_async_connection(conn: Conn, dsn: str, autocommit: bool) -> None:
    import asyncio

    from fastapi import FastAPI, Header
    from fastapi.testclient import TestClient

    from outbound_heartbeat.contrib.fastapi import create_router

    work = plan(conn)
    hooked: list[tuple[int, int]] = []

    async def hook(run_id: int, business_id: int) -> None:
        await asyncio.sleep(0)  # an async hook that yields: other requests run meanwhile
        hooked.append((run_id, business_id))

    async def tenant(x_business_id: str = Header()) -> int | None:
        return int(x_business_id)

    app = FastAPI()
    with TestClient(app, raise_server_exceptions=False) as client:
        # The connection belongs to the app's event loop (the test client's portal), and the
        # router is given that very AsyncConnection, as an app would at startup.
        shared = client.portal.call(
            lambda: psycopg.AsyncConnection.connect(dsn, autocommit=autocommit))
        app.include_router(create_router(shared, tenant, locale="en", hooks=[hook]))

        def send(req: Request) -> tuple[int, Any]:
            path = f"/api/outbound_calls/jobs/{req.run_id}/{'force-cancel' if req.force else 'cancel'}"
            response = client.post(path, headers={"X-Business-Id": str(req.caller)})
            try:
                return response.status_code, response.json()
            except ValueError:
                return response.status_code, response.text

        try:
            answers = race(work, send)
            verify(conn, answers, hooked, shared)
        finally:
            client.portal.call(shared.close)
