"""The console against a hostile client, over real sockets and real servers (the standalone
server, werkzeug's threaded server for the Flask mount, uvicorn for the FastAPI mount): request
bodies are not read before ``authorize`` nor past the form limit; the event streams hold no
thread of the app's pool and are limited per viewer and in total; ``?token=`` injects no header;
no value can cut or rename an event-stream frame."""

from __future__ import annotations

import gc
import html
import json
import logging
import socket
import threading
import time
import tracemalloc
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from outbound_heartbeat import service
from outbound_heartbeat.console import (
    Console,
    ConsoleServer,
    HttpRequest,
    Request,
    standalone,
    token_authorizer,
)

from ..console_support import (
    raw_request,
    serve_asgi,
    serve_wsgi,
    sse_events,
    viewer_from_any_cookie,
)
from ..helpers import run_row, snapshot

Conn = psycopg.Connection[Any]
TOKEN = "hardening-token-0123456789"
PREFIX = "/outbound-heartbeat"
MIB = 1024 * 1024


class BodyBytesRead:
    """WSGI middleware: how many bytes of request bodies the app read (werkzeug's server then
    drains what is left itself, outside the app, before it closes the connection)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.read = 0

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        raw, counter = environ["wsgi.input"], self

        class Counted:
            def read(self, *args: Any) -> bytes:
                data: bytes = raw.read(*args)
                counter.read += len(data)
                return data

            def readline(self, *args: Any) -> bytes:
                data: bytes = raw.readline(*args)
                counter.read += len(data)
                return data

            def __iter__(self) -> Iterator[bytes]:
                return iter(self.readline, b"")

        environ["wsgi.input"] = Counted()
        return self.app(environ, start_response)


FLASK_READS: list[BodyBytesRead] = []


@contextmanager
def console_server(kind: str, pool: ConnectionPool, **options: Any) -> Iterator[tuple[int, str]]:
    """The console mounted by ``kind`` on a real server: (port, path prefix). The Flask app's
    body reads are counted in FLASK_READS[-1]."""
    options.setdefault("listen", False)
    options.setdefault("poll_interval", 5.0)
    if kind == "standalone":
        console = Console(pool, viewer_from_any_cookie, **options)
        with ConsoleServer(console) as server:
            yield server.port, ""
    elif kind == "flask":
        from flask import Flask

        from outbound_heartbeat.contrib.flask_console import create_console_blueprint

        app = Flask("hardening")
        blueprint = create_console_blueprint(pool, viewer_from_any_cookie, **options)
        app.register_blueprint(blueprint)
        app.wsgi_app = BodyBytesRead(app.wsgi_app)  # type: ignore[method-assign]
        FLASK_READS.append(app.wsgi_app)  # type: ignore[arg-type]
        try:
            with serve_wsgi(app) as port:
                yield port, PREFIX
        finally:
            blueprint.console.close()  # type: ignore[attr-defined]
    else:
        from fastapi import FastAPI

        from outbound_heartbeat.contrib.fastapi_console import create_console_router

        api = FastAPI()
        router = create_console_router(pool, viewer_from_any_cookie, **options)
        api.include_router(router)
        try:
            with serve_asgi(api) as port:
                yield port, PREFIX
        finally:
            router.console.close()  # type: ignore[attr-defined]


def post_head(path: str, viewer: str | None, length: str | None, extra: str = "") -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1",
             "Content-Type: application/x-www-form-urlencoded"]
    if viewer:
        lines.append(f"Cookie: viewer={viewer}")
    if length is not None:
        lines.append(f"Content-Length: {length}")
    if extra:
        lines.append(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# -- 5: request bodies ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["standalone", "flask", "fastapi"])
def test_a_post_is_answered_from_its_headers_before_its_body_is_sent(
    kind: str, dsn: str, conn: Conn
) -> None:
    """No body byte is ever sent: each answer can only come from the headers. Unauthorized: 401
    (authorize runs first); then a length over the form limit: 413; negative or not a number:
    400; none, or chunked: 411. Nothing changes in the database."""
    run = service.create_run(conn, 5, [{}, {}])
    before = snapshot(conn)
    with ConnectionPool(dsn, kwargs={"autocommit": True}, min_size=1, max_size=2) as pool, \
            console_server(kind, pool) as (port, prefix):
        path = f"{prefix}/runs/{run.id}/force-cancel"
        cases = [
            (None, str(64 * MIB), "", 401),
            (None, "-1", "", {401, 400}),  # uvicorn itself refuses a negative length: 400
            ("op", str(64 * MIB), "", 413),
            ("op", "-1", "", 400),
            ("op", "12abc", "", 400),
            ("op", None, "", 411),
            ("op", None, "Transfer-Encoding: chunked", 411),
        ]
        if kind != "flask":  # (a WSGI app sees one CONTENT_LENGTH: the server's framing)
            cases.append(("op", "5", "Content-Length: 99", 400))  # two lengths
        for viewer, length, extra, expected in cases:
            started = time.monotonic()
            try:
                status, _, body = raw_request(port, post_head(path, viewer, length, extra), 5.0)
            except (TimeoutError, OSError) as exc:
                pytest.fail(f"{kind}: no answer to {viewer} {length} {extra} before the body: {exc!r}")
            wanted = expected if isinstance(expected, set) else {expected}
            assert status in wanted, (kind, viewer, length, extra, status, body[:300])
            assert time.monotonic() - started < 4.0
    assert run_row(conn, run.id)["status"] == "pending"
    assert snapshot(conn) == before


@pytest.mark.parametrize(("kind", "length"), [
    ("standalone", "-1"), ("standalone", str(16 * MIB)), ("flask", str(16 * MIB)),
    ("fastapi", str(16 * MIB)),
])
def test_an_unauthorized_body_is_not_buffered(kind: str, length: str, dsn: str) -> None:
    """A client that sends 16 MiB after its headers anyway: the server answers 401 and closes
    the connection. The standalone and uvicorn servers: this process's traced Python memory
    (server and client) grows by far less than the body; Flask: the app reads none of it
    (werkzeug's development server drains the rest itself, 10 MB at a time, outside the app).
    Before: the whole body was read, and for Flask parsed, before the 401."""
    chunk = b"a=" + b"x" * (64 * 1024 - 2)
    with ConnectionPool(dsn, kwargs={"autocommit": True}, min_size=1, max_size=2) as pool, \
            console_server(kind, pool) as (port, prefix):
        head = post_head(f"{prefix}/sweep", None, length)
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sent = [0]

        def send_body() -> None:
            try:
                sock.sendall(head)
                for _ in range(16 * MIB // len(chunk)):
                    sock.sendall(chunk)
                    sent[0] += len(chunk)
                sock.shutdown(socket.SHUT_WR)  # an end of the body for a length of -1
            except OSError:
                pass  # the server closed on us: the point

        gc.collect()
        tracemalloc.start()
        try:
            sender = threading.Thread(target=send_body, daemon=True)
            sender.start()
            data = b""
            while b"\r\n\r\n" not in data:
                try:
                    got = sock.recv(65536)
                except OSError:
                    break
                if not got:
                    break
                data += got
            sender.join(20)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
            sock.close()
        assert data.startswith(b"HTTP/1.1 401") or data.startswith(b"HTTP/1.0 401"), data[:200]
        if kind == "flask":
            assert FLASK_READS[-1].read == 0
        else:
            assert peak < 4 * MIB, f"{kind}: {peak / MIB:.1f} MiB traced, {sent[0] / MIB:.1f} MiB sent"


def test_an_admitted_form_is_read_within_its_length(dsn: str, conn: Conn) -> None:
    """The body of an authorized POST arrives after its headers, in two parts: it is waited
    for and read (exactly its length), and the action runs."""
    run = service.create_run(conn, 5, [{}, {}])
    with ConnectionPool(dsn, kwargs={"autocommit": True}, min_size=1, max_size=2) as pool, \
            console_server("standalone", pool) as (port, _):
        status, headers, page = raw_request(
            port, f"GET /runs/{run.id}/force-cancel HTTP/1.1\r\nHost: x\r\nCookie: viewer=op"
            "\r\n\r\n".encode())
        assert status == 200
        session = next(v for k, v in headers if k.lower() == "set-cookie").split(";")[0]
        token = page.decode().split('name="csrf_token" value="')[1].split('"')[0]
        body = f"csrf_token={token}".encode()
        head = (f"POST /runs/{run.id}/force-cancel HTTP/1.1\r\nHost: x\r\n"
                f"Cookie: viewer=op; {session}\r\nContent-Length: {len(body)}\r\n"
                "Content-Type: application/x-www-form-urlencoded\r\n\r\n").encode()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(head + body[:10])
            time.sleep(0.3)
            sock.sendall(body[10:])
            answer = b""
            while b"calls cancelled" not in answer:
                got = sock.recv(65536)
                assert got, answer
                answer += got
        assert answer.startswith(b"HTTP/1.1 200")
    assert run_row(conn, run.id)["status"] == "cancelled"


# -- 6: event streams ----------------------------------------------------------------------------


def stream_request(viewer: str) -> Request:
    native = HttpRequest({}, {"viewer": viewer}, {})
    return Request("GET", "/stream", "", {}, {}, {"viewer": viewer}, native)


def test_streams_are_limited_per_viewer_and_in_total(dsn: str) -> None:
    from outbound_heartbeat.console import EventStream
    with ConnectionPool(dsn, kwargs={"autocommit": True}, min_size=1, max_size=2) as pool:
        with pytest.raises(ValueError, match="max_streams_per_viewer"):
            Console(pool, viewer_from_any_cookie, listen=False, max_streams_per_viewer=0)
        with pytest.raises(ValueError, match="max_streams"):
            Console(pool, viewer_from_any_cookie, listen=False, max_streams=-1)
        console = Console(pool, viewer_from_any_cookie, listen=False, max_streams=3,
                          max_streams_per_viewer=2, stream_seconds=0.5, poll_interval=0.2)
        try:
            a1, a2, a3 = (console.handle(stream_request("biz:5")) for _ in range(3))
            assert (a1.status, a2.status, a3.status) == (200, 200, 429)
            assert isinstance(a1.body, EventStream) and isinstance(a2.body, EventStream)
            assert isinstance(a3.body, bytes) and b"Too many live views" in a3.body
            assert ("Retry-After", "30") in a3.headers
            b1, b2 = (console.handle(stream_request("biz:6")) for _ in range(2))
            assert (b1.status, b2.status) == (200, 429)  # the total: 3
            a1.body.close()
            assert console.handle(stream_request("biz:6")).status == 200  # a slot came free
            # A stream that ends (stream_seconds) frees its slot; so does one never iterated.
            frames = list(a2.body)
            assert frames[0].startswith(b"retry:")
            del a1, a2, a3, b1, b2, frames
            gc.collect()
            assert console.streams.open() == 0
            assert console.handle(stream_request("biz:5")).status == 200
        finally:
            console.close()


def stream_status(port: int, head: bytes) -> int:
    """The status of a /stream request (its connection closed once the headers are in)."""
    with socket.create_connection(("127.0.0.1", port), 5) as sock:
        sock.sendall(head)
        return int(read_until(sock, b"\r\n\r\n", 5).split(b" ", 2)[1])


@pytest.mark.parametrize("kind", ["standalone", "flask", "fastapi"])
def test_every_mount_limits_streams_and_frees_a_slot_when_its_client_goes(
    kind: str, dsn: str
) -> None:
    with ConnectionPool(dsn, kwargs={"autocommit": True}, min_size=1, max_size=2) as pool, \
            console_server(kind, pool, poll_interval=0.3, max_streams_per_viewer=2) as (port, prefix):
        head = f"GET {prefix}/stream HTTP/1.1\r\nHost: x\r\nCookie: viewer=op\r\n\r\n".encode()
        first, second = (socket.create_connection(("127.0.0.1", port), 10) for _ in range(2))
        try:
            for sock in (first, second):
                sock.sendall(head)
                assert read_until(sock, b"event: runs", 10).startswith(b"HTTP/1.1 200")
            status, _, body = raw_request(port, head)
            assert status == 429 and b"Too many live views" in body
            first.close()  # a threaded server notices at its next write (a frame every 0.3 s)
            deadline = time.monotonic() + 10
            while (status := stream_status(port, head)) != 200:
                assert status == 429 and time.monotonic() < deadline
                time.sleep(0.2)
        finally:
            first.close()
            second.close()


def read_until(sock: socket.socket, marker: bytes, seconds: float) -> bytes:
    data = b""
    deadline = time.monotonic() + seconds
    while marker not in data:
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        got = sock.recv(65536)
        if not got:
            break
        data += got
    return data


def timed_get(port: int, path: str, cookie: str = "") -> tuple[int, float]:
    started = time.monotonic()
    head = f"GET {path} HTTP/1.1\r\nHost: x\r\n" + (f"Cookie: {cookie}\r\n" if cookie else "")
    status, _, _ = raw_request(port, (head + "\r\n").encode(), timeout=10)
    return status, time.monotonic() - started


def test_fastapi_streams_hold_no_thread_of_the_apps_pool(dsn: str, conn: Conn) -> None:
    """120 open streams of one business viewer on a real uvicorn server: an unrelated sync
    route (Starlette's 40-thread pool) and the operator's page still answer at once; the
    121st stream of that viewer is refused (429), another viewer's is not; a new run reaches
    every stream; closing them frees every slot. Before: each stream held a pool thread, and
    both answers waited for the streams' 15 s waits."""
    from fastapi import FastAPI

    from outbound_heartbeat.contrib.fastapi_console import create_console_router

    api = FastAPI()

    @api.get("/ping")
    def ping() -> dict[str, bool]:  # a sync route: it runs in Starlette's thread pool
        return {"ok": True}

    with ConnectionPool(dsn, kwargs={"autocommit": True}, min_size=1, max_size=4) as pool:
        router = create_console_router(pool, viewer_from_any_cookie, listen=dsn,
                                       poll_interval=0.5, max_streams=150,
                                       max_streams_per_viewer=120)
        api.include_router(router)
        console: Console = router.console  # type: ignore[attr-defined]
        with serve_asgi(api) as port, ExitStack() as sockets:
            assert timed_get(port, f"{PREFIX}/", "viewer=op")[0] == 200  # the monitor runs
            head = f"GET {PREFIX}/stream HTTP/1.1\r\nHost: x\r\nCookie: viewer=biz:5\r\n\r\n"
            streams = []
            for _ in range(120):
                sock = sockets.enter_context(socket.create_connection(("127.0.0.1", port), 10))
                sock.sendall(head.encode())
                streams.append(sock)
            for sock in streams:
                first = read_until(sock, b"retry:", 10)
                assert first.startswith(b"HTTP/1.1 200"), first[:300]
            assert console.streams.open("0:5:0:user-5") == 120

            status, took = timed_get(port, "/ping")
            assert status == 200 and took < 3.0, took
            status, took = timed_get(port, f"{PREFIX}/", "viewer=op")
            assert status == 200 and took < 3.0, took

            status, _, body = raw_request(port, head.encode(), timeout=10)
            assert status == 429 and b"Too many live views" in body
            other = sockets.enter_context(socket.create_connection(("127.0.0.1", port), 10))
            other.sendall(head.replace("biz:5", "biz:6").encode())
            assert read_until(other, b"retry:", 10).startswith(b"HTTP/1.1 200")

            run = service.create_run(conn, 5, [{}])
            marker = f'id=\\"run-{run.id}\\"'.encode()
            for sock in streams:
                assert marker in read_until(sock, marker, 15)
            assert timed_get(port, "/ping")[1] < 3.0

            for sock in [*streams, other]:
                sock.close()
            deadline = time.monotonic() + 10
            while console.streams.open():
                assert time.monotonic() < deadline, console.streams.open()
                time.sleep(0.1)
        console.close()


# -- 7: the token in the address -----------------------------------------------------------------


def test_a_token_in_the_address_injects_no_header(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="outbound_heartbeat.console")
    with pytest.raises(ValueError, match="token must be"):
        token_authorizer("semi;colon-token-0123456789")
    with pytest.raises(ValueError, match="token must be"):
        token_authorizer("short")
    with standalone(dsn, TOKEN, listen=False).start() as server:
        port = server.port
        hostile = [
            "x\r\nSet-Cookie: evil=1",
            f"{TOKEN}\r\nX-Injected: 1",
            f"{TOKEN}; Domain=evil.example; Max-Age=99999",
            f"{TOKEN};Domain=evil.example",
            "a" * 20 + "\nX-Injected: 2",
            "wrong-but-well-formed-0123456789",
        ]
        for value in hostile:
            path = "/runs.html?token=" + urllib.parse.quote(value, safe="")
            status, headers, _ = raw_request(port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            names = [k.lower() for k, _ in headers]
            assert status == 303, (value, headers)
            assert "set-cookie" not in names and "x-injected" not in names, (value, headers)
            assert dict((k.lower(), v) for k, v in headers)["location"] == "/runs.html"

        path = f"/?lang=he&token={TOKEN}"
        status, headers, _ = raw_request(port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert status == 303
        assert [v for k, v in headers if k.lower() == "set-cookie"] == [
            f"ohc_token={TOKEN}; Path=/; HttpOnly; SameSite=Strict"]
        assert ("Location", "/?lang=he") in headers
        # A path that starts with two slashes stays on this server.
        status, headers, _ = raw_request(
            port, f"GET //evil.example/?token={TOKEN} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        location = dict((k.lower(), v) for k, v in headers)["location"]
        assert location.startswith("/") and not location.startswith("//"), location
    # The request lines are logged (debug) without the token.
    assert any("GET /?lang=he&token=<redacted>" in r.getMessage() for r in caplog.records)
    assert not any(TOKEN in r.getMessage() for r in caplog.records)


# -- 8: event-stream framing ---------------------------------------------------------------------

HOSTILE_WORKERS = [
    "adv\revent: x",
    "lf\nevent: y\ndata: z",
    "crlf\r\nevent: w\r\n",
    "cr-cr\r\rdata: gone",
    "event: x",
    "id: 7\nretry: 1",
    "\u2028sep\u0085",
]


def test_a_frame_carries_any_value_whole() -> None:
    from outbound_heartbeat.console.stream import frame
    for value in [*HOSTILE_WORKERS, "<tr>\r\n\r\n</tr>", "", "עברית"]:
        raw = frame("runs", value).decode("ascii")
        events = sse_events(raw + "\n")
        assert events == [("runs", json.dumps(value))], repr(raw)
        assert json.loads(events[0][1]) == value
    with pytest.raises(ValueError, match="event"):
        frame("runs\r\nevent: x", "")


def stream_events(port: int, cookie: str, done: Callable[[list[tuple[str, str]]], bool],
                  seconds: float) -> list[tuple[str, str]]:
    with socket.create_connection(("127.0.0.1", port), timeout=seconds) as sock:
        sock.sendall(f"GET /stream HTTP/1.1\r\nHost: x\r\nCookie: {cookie}\r\n\r\n".encode())
        data = b""
        deadline = time.monotonic() + seconds
        events: list[tuple[str, str]] = []
        while time.monotonic() < deadline:
            sock.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                got = sock.recv(65536)
            except TimeoutError:
                break
            if not got:
                break
            data += got
            events = sse_events(data.partition(b"\r\n\r\n")[2].decode())
            if done(events):
                break
        return events


def test_no_value_cuts_or_renames_an_event(dsn: str, conn: Conn) -> None:
    """Runs claimed by workers whose ids hold CR, LF, CRLF, ``event:`` and ``data:``: the stream,
    parsed as a browser does, has only ``mode`` and ``runs`` events, each data one JSON value,
    and the rows of every run with each id shown as it is (escaped). Before: the CR renamed the
    ``runs`` event and the page never saw another update."""
    runs = []
    for worker in HOSTILE_WORKERS:
        run = service.create_run(conn, 5, [{}])
        assert service.claim_run(conn, worker, run.id) is not None
        runs.append(run.id)
    with ConnectionPool(dsn, kwargs={"autocommit": True}, min_size=1, max_size=2) as pool, \
            console_server("standalone", pool, poll_interval=0.3) as (port, _):
        for cookie in ("viewer=op", "viewer=biz:5"):
            events = stream_events(port, cookie,
                                   lambda ev: sum(name == "runs" for name, _ in ev) >= 2, 10)
            assert {name for name, _ in events} == {"mode", "runs"}, events
            for name, data in events:
                value = json.loads(data)
                if name == "mode":
                    assert value == "poll"
                    continue
                for run_id in runs:
                    assert f'id="run-{run_id}"' in value
                for worker in HOSTILE_WORKERS:
                    assert f'<span class="worker">{html.escape(worker)}</span>' in value
