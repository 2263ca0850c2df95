"""The web core (outbound_heartbeat.web) under every web surface: one error -> HTTP table, derived
from outbound_heartbeat.errors, that the Flask/FastAPI endpoints and the console answer alike."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
from flask import Flask
from psycopg import sql

from outbound_heartbeat import errors, service, web
from outbound_heartbeat.console import Console, Request, Viewer
from outbound_heartbeat.contrib.flask import create_blueprint

Conn = psycopg.Connection[Any]


@contextlib.contextmanager
def untrusted_trigger(conn: Conn) -> Iterator[None]:
    """A trigger on the runs table whose SECURITY INVOKER function a role outside
    outbound_heartbeat_owner owns: every API call that writes the tables refuses (OH428)."""
    role = f"oh_untrusted_{uuid.uuid4().hex[:8]}"
    conn.execute(sql.SQL("CREATE ROLE {}").format(sql.Identifier(role)))
    try:
        conn.execute("CREATE FUNCTION public.oh_untrusted_trigger() RETURNS trigger"
                      " LANGUAGE plpgsql AS 'BEGIN RETURN NEW; END'")
        conn.execute(sql.SQL("ALTER FUNCTION public.oh_untrusted_trigger() OWNER TO {}")
                     .format(sql.Identifier(role)))
        conn.execute("CREATE TRIGGER oh_untrusted BEFORE UPDATE ON public.outbound_call_runs"
                     " FOR EACH ROW EXECUTE FUNCTION public.oh_untrusted_trigger()")
        yield
    finally:
        conn.execute("DROP FUNCTION IF EXISTS public.oh_untrusted_trigger() CASCADE")
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_console_and_endpoints_answer_a_library_error_alike(dsn: str, conn: Conn) -> None:
    """A force-cancel the database refuses (OH428, UnsafeTables): the Flask blueprint, the
    FastAPI endpoints and the console all answer UnsafeTables.http_status with the same text,
    and nothing changed."""
    run = service.create_run(conn, 4, [{}, {}])
    with untrusted_trigger(conn):
        answers(dsn, conn, run.id)
    assert conn.execute("SELECT status FROM outbound_call_runs WHERE id = %s",
                        (run.id,)).fetchone() == ("pending",)


def answers(dsn: str, conn: Conn, run_id: int) -> None:
    """The three surfaces' answers to a force-cancel of ``run_id`` that raises UnsafeTables."""
    status = errors.UnsafeTables.http_status
    text = web.MESSAGES["en"][web.http_error(errors.UnsafeTables("x")).text]

    app = Flask(__name__)
    app.register_blueprint(create_blueprint(conn, lambda: 4, locale="en"))
    answer = app.test_client().post(f"{web.DEFAULT_PREFIX}/jobs/{run_id}/force-cancel")
    assert (answer.status_code, answer.get_json()) == (status, {"error": text, "code": "OH428"})

    async def fastapi_endpoints() -> web.Reply:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as aconn:
            endpoints = web.AsyncEndpoints(locale="en", connections=web.async_connections(aconn))
            return await endpoints.cancel(str(run_id), 4, force=True)

    assert asyncio.run(fastapi_endpoints()) == web.Reply(status, {"error": text, "code": "OH428"})

    viewer = Viewer(operator=True, name="ops")
    console = Console(conn, lambda native: viewer, listen=False, locale="en")
    with contextlib.closing(console):
        session = "a" * 64
        page = console.handle(Request(
            method="POST", path=f"/runs/{run_id}/force-cancel",
            form={"csrf_token": console.csrf_token(session, viewer)},
            cookies={"ohc_session": session},
        ))
    assert isinstance(page.body, bytes)
    assert page.status == status and text in page.body.decode()
