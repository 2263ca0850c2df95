"""Python-side argument checks of every public call (outbound_heartbeat.arguments), sync and
async: InvalidArgument naming the argument, nothing sent to the server (the same call on a
closed connection raises InvalidArgument, not a connection error) and nothing changed in the
database. Among them the bugs seen on main: ``create_run(conn, 1.5)`` made a run for business
2, ``force_cancel(<business 43's run>, business_id=42.6)`` cancelled it, a str id leaked
InvalidTextRepresentation, an id past bigint NumericValueOutOfRange, zero-width and NBSP worker
ids were accepted, and a lone surrogate raised a raw UnicodeEncodeError."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import psycopg
import pytest

from outbound_heartbeat import InvalidArgument, service, service_async
from outbound_heartbeat.arguments import is_blank

from ..helpers import snapshot

Conn = psycopg.Connection[Any]
BIG = 2**63
# (function, positional arguments after conn, keyword arguments, the argument named).
# "{run}" / "{job}" / "{epoch}" are filled with business 43's live run, its job and epoch.
CASES: list[tuple[str, tuple[Any, ...], dict[str, Any], str]] = [
    ("create_run", (1.5,), {}, "business_id"),
    ("create_run", (True,), {}, "business_id"),
    ("create_run", ("43",), {}, "business_id"),
    ("create_run", (BIG,), {}, "business_id"),
    ("create_run", (-BIG - 1,), {}, "business_id"),
    ("create_run", (None,), {}, "business_id"),
    ("create_run", (43, {"not": "an array"}), {}, "jobs"),
    ("create_run", (43, "[]"), {}, "jobs"),
    ("create_run", (43, [{"phone": "\ud800"}]), {}, "jobs"),
    ("create_run", (43, [{"\udfff": 1}]), {}, "jobs"),
    ("create_run", (43, [{"phone": "05\x0012"}]), {}, "jobs"),
    ("create_run", (43, [float("nan")]), {}, "jobs"),
    ("create_run", (43, [object()]), {}, "jobs"),
    ("claim_run", ("\u200b",), {}, "worker_id"),
    ("claim_run", ("\u00a0",), {}, "worker_id"),
    ("claim_run", ("\ufeff\u2060\u200d",), {}, "worker_id"),
    ("claim_run", ("\t\n\u3000",), {}, "worker_id"),
    ("claim_run", ("\u3164",), {}, "worker_id"),
    ("claim_run", ("",), {}, "worker_id"),
    ("claim_run", ("w\ud800",), {}, "worker_id"),
    ("claim_run", ("w\x00",), {}, "worker_id"),
    ("claim_run", ("w" * 201,), {}, "worker_id"),
    ("claim_run", (b"w1",), {}, "worker_id"),
    ("claim_run", (None,), {}, "worker_id"),
    ("claim_run", ("w2", 1.0), {}, "run_id"),
    ("claim_run", ("w2", "17"), {}, "run_id"),
    ("heartbeat", ("{run}", "w1", -1), {}, "lease_epoch"),
    ("heartbeat", ("{run}", "w1", 1.0), {}, "lease_epoch"),
    ("heartbeat", ("{run}", "w1", BIG), {}, "lease_epoch"),
    ("heartbeat", ("1", "w1", 1), {}, "run_id"),
    ("heartbeat", ("{run}", "\u200b", 1), {}, "worker_id"),
    ("next_job", ("{run}", "\u00a0", "{epoch}"), {}, "worker_id"),
    ("next_job", (BIG, "w1", "{epoch}"), {}, "run_id"),
    ("next_job", ("{run}", "w1", False), {}, "lease_epoch"),
    ("finish_job", ("{job}.0", "w1", "{epoch}", "completed"), {}, "job_id"),
    ("finish_job", ("{job}", "w1", "{epoch}", "completed"), {"error": "\udc00"}, "error"),
    ("finish_job", ("{job}", "w1", "{epoch}", "completed"), {"error": 5}, "error"),
    ("finish_job", ("{job}", "w1", "{epoch}", 1), {}, "status"),
    ("finish_job", ("{job}", "w1", "{epoch}", "completed\ud800"), {}, "status"),
    ("finish_run", ("{run}", "w1", "{epoch}"), {"status": None}, "status"),
    ("finish_run", ("{run}", " \u200b ", "{epoch}"), {}, "worker_id"),
    ("get_active_run", (42.6,), {}, "business_id"),
    ("get_active_run", (43,), {"stale_after": timedelta(0)}, "stale_after"),
    ("get_active_run", (43,), {"stale_after": timedelta(seconds=-5)}, "stale_after"),
    ("get_active_run", (43,), {"stale_after": timedelta(days=36_001)}, "stale_after"),
    ("get_active_run", (43,), {"stale_after": 30}, "stale_after"),
    ("request_cancel", ("{run}",), {"business_id": 42.6}, "business_id"),
    ("request_cancel", ("{run}",), {"business_id": True}, "business_id"),
    ("request_cancel", (str,), {}, "run_id"),
    ("force_cancel", ("{run}",), {"business_id": 42.6}, "business_id"),
    ("force_cancel", ("{run}",), {"business_id": "43"}, "business_id"),
    ("force_cancel", ("{run}.0",), {"business_id": 43}, "run_id"),
    ("force_cancel", (BIG,), {"business_id": 43}, "run_id"),
    ("cleanup_stuck_runs", (), {"on_startup": 1}, "on_startup"),
    ("cleanup_stuck_runs", (), {"on_startup": True, "worker_id": "\u200b"}, "worker_id"),
    ("health_check", (timedelta(seconds=-1),), {}, "alert_after"),
    ("health_check", ("2 minutes",), {}, "alert_after"),
    ("health_check", (), {"max_stuck": 2**31}, "max_stuck"),
    ("health_check", (), {"max_stuck": 1.5}, "max_stuck"),
    ("list_events", (), {"run_id": 1.5}, "run_id"),
    ("list_events", (), {"business_id": "43"}, "business_id"),
    ("list_events", (), {"max_rows": 0}, "max_rows"),
    ("list_events", (), {"max_rows": 100_001}, "max_rows"),
    # The set-based calls of a process's hub: the rows' shape, then each field by its name.
    ("heartbeat_leases", ([("{run}", "w1")],), {}, "leases"),
    ("heartbeat_leases", ("{run}",), {}, "leases"),
    ("heartbeat_leases", (None,), {}, "leases"),
    ("heartbeat_leases", ([("{run}", "w1", "{epoch}", "completed")],), {}, "leases"),
    ("heartbeat_leases", ([("{run}.0", "w1", "{epoch}")],), {}, "run_id"),
    ("finish_runs", ([("{run}", "w1", "{epoch}")],), {}, "leases"),
    ("finish_runs", ("w1",), {}, "leases"),
    ("finish_runs", ([7],), {}, "leases"),
    ("finish_runs", ([("{run}", "w1", "{epoch}.0", "completed")],), {}, "lease_epoch"),
    ("finish_runs", ([("{run}", "w1", "{epoch}", None)],), {}, "status"),
]


def fill(value: Any, ctx: dict[str, int]) -> Any:
    if isinstance(value, list | tuple):  # the leases of a set-based call
        return type(value)(fill(v, ctx) for v in value)
    if isinstance(value, str) and value.startswith("{") and "}" in value:
        key, _, rest = value[1:].partition("}")
        if key in ctx:
            return float(ctx[key]) if rest == ".0" else ctx[key]
    return value


def arguments(args: tuple[Any, ...], kwargs: dict[str, Any], ctx: dict[str, int]
              ) -> tuple[list[Any], dict[str, Any]]:
    return [fill(a, ctx) for a in args], {k: fill(v, ctx) for k, v in kwargs.items()}


def business_43_live_run(conn: Conn) -> dict[str, int]:
    run = service.create_run(conn, 43, [{"phone": "1"}, {"phone": "2"}])
    claim = service.claim_run(conn, "w1", run.id)
    assert claim is not None
    job = service.next_job(conn, run.id, "w1", claim.lease_epoch)
    assert job is not None
    return {"run": run.id, "job": job.id, "epoch": claim.lease_epoch}


def ids(case: tuple[str, tuple[Any, ...], dict[str, Any], str]) -> str:
    # No memory address (object() at 0x...): every xdist worker must collect the same ids.
    shown = re.sub(r" at 0x[0-9a-f]+", "", ascii((case[1], case[2])))
    return f"{case[0]}-{case[3]}-{shown[:40]}"


@pytest.mark.parametrize("case", CASES, ids=[ids(c) for c in CASES])
def test_sync_refuses_before_sending(conn: Conn, dsn: str,
                                     case: tuple[str, tuple[Any, ...], dict[str, Any], str]) -> None:
    name, args, kwargs, argument = case
    ctx = business_43_live_run(conn)
    before = snapshot(conn)
    function: Callable[..., Any] = getattr(service, name)
    positional, named = arguments(args, kwargs, ctx)
    with pytest.raises(InvalidArgument) as raised:
        function(conn, *positional, **named)
    assert raised.value.argument == argument and argument in raised.value.message
    assert raised.value.http_status == 400
    assert snapshot(conn) == before
    closed = psycopg.connect(dsn)
    closed.close()
    with pytest.raises(InvalidArgument):  # not OperationalError: nothing was sent
        function(closed, *positional, **named)


def test_async_refuses_before_sending(conn: Conn, dsn: str) -> None:
    ctx = business_43_live_run(conn)
    before = snapshot(conn)

    async def every_case() -> list[str]:
        named_arguments = []
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as aconn:
            for name, args, kwargs, argument in CASES:
                positional, named = arguments(args, kwargs, ctx)
                with pytest.raises(InvalidArgument) as raised:
                    await getattr(service_async, name)(aconn, *positional, **named)
                assert raised.value.argument == argument, (name, args, kwargs)
                named_arguments.append(argument)
        return named_arguments

    assert len(asyncio.run(every_case())) == len(CASES)
    assert snapshot(conn) == before


def test_the_seen_bugs_are_gone(conn: Conn) -> None:
    """On main: business 2 got a run, and business 43's run was cancelled by 42.6."""
    ctx = business_43_live_run(conn)
    with pytest.raises(InvalidArgument):
        service.create_run(conn, 1.5)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        service.force_cancel(conn, ctx["run"], business_id=42.6)  # type: ignore[arg-type]
    assert conn.execute("SELECT count(*) FROM outbound_call_runs WHERE business_id = 2").fetchone() == (0,)
    assert conn.execute("SELECT status FROM outbound_call_runs WHERE id = %s",
                        (ctx["run"],)).fetchone() == ("running",)


def test_valid_edges_still_accepted(conn: Conn) -> None:
    worker = "d\u200bialer-\u00e9-\U0001f4de"  # visible characters around a zero-width one
    run = service.create_run(conn, 2**63 - 1, [{"name": "\u05e9\u05dc\u05d5\u05dd"}])
    assert run.business_id == 2**63 - 1
    assert service.claim_run(conn, worker, run.id) is not None
    assert service.get_active_run(conn, 2**63 - 1, timedelta(days=36_000)) is not None
    assert service.list_events(conn, max_rows=100_000)
    assert not is_blank("a\u200b") and is_blank("\u200b\u00a0\ufeff \t")


# The SQL functions refuse the same inputs for psql callers (outbound_heartbeat._is_blank).
@pytest.mark.parametrize("worker", ["\u200b", "\u00a0", "\t", "\ufeff", " \u3000\u2060 ", "\U000e0020"])
def test_sql_refuses_invisible_worker_ids(conn: Conn, worker: str) -> None:
    before = snapshot(conn)
    with pytest.raises(psycopg.Error) as raised:
        conn.execute("SELECT * FROM outbound_heartbeat.claim_run(%s)", (worker,))
    assert raised.value.sqlstate == "OH400" and raised.value.diag.column_name == "worker_id"
    assert snapshot(conn) == before


def test_sql_and_python_agree_on_blank_characters(conn: Conn) -> None:
    # Every character of the Basic Multilingual Plane, one by one: the two rules must agree.
    chars = [chr(c) for c in range(1, 0x10000) if not 0xD800 <= c <= 0xDFFF]
    rows = conn.execute(
        "SELECT c FROM unnest(%s::text[]) AS c WHERE outbound_heartbeat._is_blank(c)", (chars,)
    ).fetchall()
    sql_blank = {r[0] for r in rows}
    python_blank = {c for c in chars if is_blank(c)}
    assert sorted(map(hex, map(ord, sql_blank ^ python_blank))) == []
    assert not is_blank("dialer\u200b-1")
