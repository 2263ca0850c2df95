"""The operator console over HTTP (no browser): its read-only SQL, the standalone server's token,
authorization, CSRF, escaping, the live stream (LISTEN and polling), --read-dsn, the Flask and
FastAPI mounts and the ``console`` subcommand. The browser tests are in test_console_browser.py."""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from outbound_heartbeat import AccessDenied, InvalidArgument, RunNotFound, service
from outbound_heartbeat.console import Console, ConsoleServer, Viewer, queries, standalone

from ..console_support import sse_events, viewer_from_cookie
from ..helpers import backdate_heartbeat, run_row, snapshot
from ..pgbouncer import PgBouncer

Conn = psycopg.Connection[Any]
TOKEN = "test-token-0123456789"


class Http:
    """A tiny client keeping cookies, like a browser."""

    def __init__(self, base: str, viewer: str | None = None) -> None:
        self.base = urllib.parse.urlsplit(base)
        self.cookies: dict[str, str] = {}
        if viewer:
            self.cookies["viewer"] = viewer

    def request(self, method: str, path: str, form: dict[str, str] | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
        conn = http.client.HTTPConnection(self.base.hostname, self.base.port, timeout=15)
        body = urllib.parse.urlencode(form) if form is not None else None
        all_headers = dict(headers or {})
        if self.cookies:
            all_headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        if body is not None:
            all_headers["Content-Type"] = "application/x-www-form-urlencoded"
        conn.request(method, path, body=body, headers=all_headers)
        response = conn.getresponse()
        text = response.read().decode()
        for name, value in response.getheaders():
            if name.lower() == "set-cookie":
                key, _, rest = value.partition("=")
                self.cookies[key] = rest.split(";", 1)[0]
        conn.close()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, text

    def get(self, path: str, **kw: Any) -> tuple[int, str]:
        status, _, text = self.request("GET", path, **kw)
        return status, text

    def post(self, path: str, form: dict[str, str]) -> tuple[int, str]:
        status, _, text = self.request("POST", path, form)
        return status, text

    def csrf(self, path: str = "/") -> str:
        status, text = self.get(path)
        assert status == 200, text
        match = re.search(r'name="csrf_token" value="([0-9a-f]+)"', text)
        assert match, text
        return match.group(1)


@pytest.fixture
def console_url(dsn: str) -> Iterator[str]:
    with ConnectionPool(dsn, kwargs={"autocommit": True}, min_size=1, max_size=4) as pool:
        console = Console(pool, viewer_from_cookie, listen=dsn, poll_interval=0.5)
        with ConsoleServer(console) as server:
            yield server.url


def test_list_runs_describe_run_and_list_jobs(conn: Conn) -> None:
    a = service.create_run(conn, 1, [{"n": i} for i in range(3)])
    b = service.create_run(conn, 2, [{"n": 1}])
    claim = service.claim_run(conn, "w-1", a.id)
    assert claim is not None
    job = service.next_job(conn, a.id, "w-1", claim.lease_epoch)
    assert job is not None
    service.finish_job(conn, job.id, "w-1", claim.lease_epoch, "completed")
    service.next_job(conn, a.id, "w-1", claim.lease_epoch)
    service.force_cancel(conn, b.id)

    runs = service.execute(conn, queries.list_runs())[0]
    assert [r.id for r in runs] == [a.id, b.id]  # open runs first
    ra, rb = runs
    assert (ra.queued_jobs, ra.in_progress_jobs, ra.completed_jobs, ra.failed_jobs) == (1, 1, 1, 0)
    assert ra.status == "running" and ra.locked_by_worker == "w-1" and ra.ended_by is None
    assert rb.status == "cancelled" and rb.ended_by == "force_cancelled" and rb.failed_jobs == 1
    assert [r.id for r in service.execute(conn, queries.list_runs(2))[0]] == [b.id]
    assert service.execute(conn, queries.list_runs(ended_within=timedelta(0)))[0][0].id == a.id

    backdate_heartbeat(conn, a.id, 60)
    service.get_active_run(conn, 1)
    stopped = service.execute(conn, queries.describe_run(a.id, 1))[0]
    assert stopped.status == "stopped" and stopped.ended_by == "stale_stopped"
    assert stopped.end_reason == "stale_heartbeat" and stopped.ended_worker == "w-1"
    assert stopped.heartbeat_age_at_end is not None
    assert stopped.heartbeat_age_at_end >= timedelta(seconds=59)
    jobs = service.execute(conn, queries.list_jobs(a.id, 1, "failed"))[0]
    assert [j.status for j in jobs] == ["failed"]


def test_console_reads_refuse_bad_input_other_business_and_unknown_runs(conn: Conn) -> None:
    run = service.create_run(conn, 1, [{}])
    before = snapshot(conn)
    with pytest.raises(InvalidArgument, match="max_rows"):
        service.execute(conn, queries.list_runs(max_rows=0))
    with pytest.raises(InvalidArgument, match="ended_within"):
        service.execute(conn, queries.list_runs(ended_within=timedelta(days=-1)))
    with pytest.raises(InvalidArgument, match="status"):
        service.execute(conn, queries.list_jobs(run.id, None, "bogus"))
    with pytest.raises(AccessDenied):
        service.execute(conn, queries.describe_run(run.id, 2))
    with pytest.raises(AccessDenied):
        service.execute(conn, queries.list_jobs(run.id, 2))
    with pytest.raises(RunNotFound):
        service.execute(conn, queries.describe_run(run.id + 1000))
    assert snapshot(conn) == before


def test_standalone_needs_its_token_and_binds_loopback(dsn: str) -> None:
    with standalone(dsn, TOKEN, poll_interval=0.5).start() as server:
        assert server.url.startswith("http://127.0.0.1:")
        anonymous = Http(server.url)
        assert anonymous.get("/")[0] == 401
        assert anonymous.get("/metrics")[0] == 401
        wrong = Http(server.url)
        assert wrong.get("/", headers={"Authorization": "Bearer not-the-token-at-all"})[0] == 401
        bearer = Http(server.url)
        status, text = bearer.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        assert status == 200 and "outbound_heartbeat_runs" in text
        browser = Http(server.url)
        status, headers, _ = browser.request("GET", f"/?token={TOKEN}&lang=he")
        assert status == 303 and headers["location"] == "/?lang=he"  # the token leaves the URL
        status, text = browser.get("/?lang=he")
        assert status == 200 and 'dir="rtl"' in text


def test_a_started_server_entered_as_a_context_serves_once_and_closes_at_once(dsn: str) -> None:
    def serving() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name == "outbound-heartbeat-console-http"}

    before = serving()
    server = standalone(dsn, TOKEN, poll_interval=0.5).start()
    with server.start() as same:  # what `with standalone(...).start() as server:` does
        assert same is server
        mine = serving() - before
        assert len(mine) == 1, mine
        assert Http(server.url).get("/health")[0] == 401  # served (no token: refused)
        started = time.monotonic()
    took = time.monotonic() - started
    assert took < 5, f"close() took {took:.1f} s"
    assert not any(t.is_alive() for t in mine)


def test_closing_the_console_hangs_up_on_a_browser_that_keeps_its_connection(dsn: str) -> None:
    # A browser keeps its connection open for the next request; once the console is closed,
    # the handler's daemon thread must not go on serving it for as long as the browser waits.
    server = standalone(dsn, TOKEN, poll_interval=0.5).start()
    try:
        browser = socket.create_connection(("127.0.0.1", server.port), timeout=15)
        browser.sendall(b"GET /health HTTP/1.1\r\nHost: console\r\nConnection: keep-alive\r\n\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += browser.recv(65536)
        head, _, body = answer.partition(b"\r\n\r\n")
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
        while len(body) < length:
            body += browser.recv(65536)
        assert head.startswith(b"HTTP/1.1 ") and b"connection: close" not in head.lower()  # kept
    finally:
        closing = threading.Thread(target=server.close)
        started = time.monotonic()
        closing.start()
        closing.join(30)
    took = time.monotonic() - started
    assert not closing.is_alive() and took < 5, f"close() took {took:.1f} s"
    with contextlib.suppress(ConnectionResetError):
        assert browser.recv(65536) == b""  # hung up (a timeout, 15 s, if not)
    browser.close()


def _close_in_a_thread(server: ConsoleServer, wait: float) -> tuple[float, bool]:
    """How long ``server.close()`` took, and whether it is still running after ``wait`` s."""
    closing = threading.Thread(target=server.close, daemon=True)
    started = time.monotonic()
    closing.start()
    closing.join(wait)
    return time.monotonic() - started, closing.is_alive()


def test_a_connection_accepted_as_the_console_closes_is_hung_up_too(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A connection accepted by the serving loop just before it stopped: its handler's thread
    # gets to setup() only after close() has hung up on the open connections. That connection
    # was left open, its (daemon) thread serving a closed console for as long as the browser
    # kept it.
    from outbound_heartbeat.console import server as console_server

    server = standalone(dsn, TOKEN, poll_interval=0.5).start()
    hung = threading.Event()
    hang_up = server.httpd.hang_up

    def hang_up_then_tell(*args: Any, **kwargs: Any) -> None:
        hang_up(*args, **kwargs)
        hung.set()

    monkeypatch.setattr(server.httpd, "hang_up", hang_up_then_tell)
    setup = console_server._Handler.setup

    def late_setup(self: Any) -> None:
        hung.wait(15)  # this thread was scheduled late: close() has hung up meanwhile
        setup(self)

    monkeypatch.setattr(console_server._Handler, "setup", late_setup)
    browser = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    try:
        time.sleep(0.3)  # accepted; its handler waits in setup()
        took, running = _close_in_a_thread(server, 10)
        assert not running and took < 5, f"close() took {took:.1f} s (still running: {running})"
        try:
            with contextlib.suppress(ConnectionResetError):
                assert browser.recv(65536) == b""  # hung up
        except TimeoutError:
            pytest.fail("a connection accepted as the console closed is still open after close()")
    finally:
        browser.close()


def test_closing_a_console_that_never_served_returns_at_once(dsn: str) -> None:
    # standalone() binds; close() before start() (an error in between, a `finally:`) waited in
    # httpd.shutdown() for a serving loop that never ran: forever.
    server = standalone(dsn, TOKEN, poll_interval=0.5)
    _took, running = _close_in_a_thread(server, 5)
    assert not running, "close() of a server never started never returns"


def test_start_after_serve_forever_serves_once_and_close_stops_it(dsn: str) -> None:
    server = standalone(dsn, TOKEN, poll_interval=0.5)
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    time.sleep(0.3)
    assert server.start() is server
    assert Http(server.url).get("/health")[0] == 401
    took, running = _close_in_a_thread(server, 10)
    assert not running and took < 5, f"close() took {took:.1f} s"
    serving.join(5)
    # Two loops on one server: shutdown() stopped one, the other kept polling a closed socket.
    assert not serving.is_alive(), "a serving loop outlived close()"
    assert server.thread is None or not server.thread.is_alive()


def test_closing_the_console_answers_the_request_in_flight(dsn: str) -> None:
    # A request whose answer is ready as the console closes (an action that has committed, a
    # page read) still gets it: close() hangs up on connections waiting for their next request,
    # not on one being answered.
    server = standalone(dsn, TOKEN, poll_interval=0.5).start()
    respond = server.console.respond
    answered = threading.Event()

    def respond_as_the_console_closes(req: Any, admitted: Any) -> Any:
        response = respond(req, admitted)
        server.httpd.closing.wait(15)
        assert server.thread is not None
        server.thread.join(15)  # the serving loop has stopped: close() hangs up next
        time.sleep(0.5)
        answered.set()
        return response

    server.console.respond = respond_as_the_console_closes  # type: ignore[method-assign]
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=15)
    conn.request("GET", "/health", headers={"Authorization": f"Bearer {TOKEN}"})
    time.sleep(0.3)
    took, running = _close_in_a_thread(server, 15)
    assert answered.is_set()
    try:
        response = conn.getresponse()
        status, body = response.status, response.read()
    except (http.client.RemoteDisconnected, ConnectionResetError) as exc:
        pytest.fail(f"the request in flight got no answer: {exc!r}")
    finally:
        conn.close()
    assert status == 200 and body.startswith(b"<!DOCTYPE html>")
    assert not running and took < 5, f"close() took {took:.1f} s"


def test_csrf_read_only_and_business_scope_are_enforced(console_url: str, conn: Conn) -> None:
    mine = service.create_run(conn, 5, [{}, {}])
    other = service.create_run(conn, 6, [{}, {}])
    before = snapshot(conn)

    operator = Http(console_url, "op")
    token = operator.csrf()
    assert operator.post(f"/runs/{other.id}/force-cancel", {})[0] == 403  # no token
    assert operator.post(f"/runs/{other.id}/force-cancel", {"csrf_token": "0" * 64})[0] == 403
    stranger = Http(console_url, "op")  # the same viewer in another browser session
    stranger.csrf()
    assert stranger.post(f"/runs/{other.id}/force-cancel", {"csrf_token": token})[0] == 403

    read_only = Http(console_url, "ro")
    page = read_only.get("/")[1]
    assert "<form" not in page and "force-cancel" not in page and str(other.id) in page
    assert read_only.get(f"/runs/{other.id}/force-cancel")[0] == 403
    assert read_only.post(f"/runs/{other.id}/force-cancel", {"csrf_token": "x"})[0] == 403

    business = Http(console_url, "biz:5")
    biz_token = business.csrf(f"/runs/{mine.id}/force-cancel")
    page = business.get("/")[1]
    assert f'id="run-{mine.id}"' in page and f'id="run-{other.id}"' not in page
    assert business.get(f"/runs/{other.id}")[0] == 403
    assert business.get("/health")[0] == 403 and business.get("/metrics")[0] == 403
    assert business.post(f"/runs/{other.id}/force-cancel", {"csrf_token": biz_token})[0] == 403
    assert business.post("/sweep", {"csrf_token": biz_token})[0] == 403
    # The one write: the refused cross-business force-cancel is audited ([SECURITY]).
    denied = conn.execute(
        "SELECT business_id, run_id, detail->>'action' FROM outbound_heartbeat.run_events"
        " WHERE event = 'access_denied'").fetchall()
    assert denied == [(5, other.id, "force_cancel")]
    conn.execute("DELETE FROM outbound_heartbeat.run_events WHERE event = 'access_denied'")
    assert snapshot(conn) == before

    status, text = business.post(f"/runs/{mine.id}/force-cancel", {"csrf_token": biz_token})
    assert status == 200 and "2 calls cancelled" in text
    assert run_row(conn, mine.id)["status"] == "cancelled"
    assert run_row(conn, other.id)["status"] == "pending"


def test_database_text_is_escaped(console_url: str, conn: Conn) -> None:
    run = service.create_run(conn, 5, [{}])
    service.claim_run(conn, '<script>alert("x")</script>', run.id)
    operator = Http(console_url, "op")
    for path in ("/", f"/runs/{run.id}", "/runs.html"):
        text = operator.get(path)[1]
        assert "<script>alert" not in text
        assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in text
    _, headers, _ = operator.request("GET", "/")
    assert "script-src 'self'" in headers["content-security-policy"]


def read_stream(url: str, viewer: str, until: str, seconds: float) -> str:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=seconds)
    conn.request("GET", "/stream", headers={"Cookie": f"viewer={viewer}"})
    response = conn.getresponse()
    assert response.status == 200
    assert response.getheader("Content-Type", "").startswith("text/event-stream")
    seen = ""
    deadline = time.monotonic() + seconds
    # Until ``until`` has come and the event holding it is complete (its blank line).
    while not (until in seen and seen.endswith("\n\n")) and time.monotonic() < deadline:
        line = response.fp.readline().decode()
        if not line:
            break
        seen += line
    conn.close()
    return seen


def stream_rows(raw: str) -> list[str]:
    """The HTML of each ``runs`` event of a raw stream (each event's data is one JSON value)."""
    return [json.loads(data) for name, data in sse_events(raw) if name == "runs"]


def test_stream_pushes_a_new_run_via_listen(console_url: str, conn: Conn) -> None:
    Http(console_url, "op").get("/")  # the monitor has started and found its mode
    first = read_stream(console_url, "op", "event: runs", 10)
    assert ("mode", '"listen"') in sse_events(first)
    run = service.create_run(conn, 5, [{}])
    pushed = read_stream(console_url, "op", f'id=\\"run-{run.id}\\"', 10)
    assert any(f'id="run-{run.id}"' in rows for rows in stream_rows(pushed))
    # A business viewer's stream carries only its own business's rows.
    other = stream_rows(read_stream(console_url, "biz:6", "event: runs", 10))
    assert other and not any(f'id="run-{run.id}"' in rows for rows in other)


def test_through_pgbouncer_the_console_polls(pgbouncer: PgBouncer, dsn: str, conn: Conn) -> None:
    bounced = pgbouncer.dsn_for(dsn)
    with standalone(bounced, TOKEN, poll_interval=0.5).start() as server:
        monitor = server.console.monitor
        monitor.wait(0, 20)
        assert monitor.mode == "poll"
        run = service.create_run(conn, 5, [{}])
        browser = Http(server.url)
        browser.get(f"/?token={TOKEN}")
        deadline = time.monotonic() + 10
        while f'id="run-{run.id}"' not in (text := browser.get("/runs.html")[1]):
            assert time.monotonic() < deadline, text
            time.sleep(0.2)
        assert "live (polling)" in browser.get("/")[1]


def test_read_dsn_serves_the_pages_and_actions_go_to_the_primary(dsn: str, conn: Conn) -> None:
    """A read-only second connection stands in for a standby: every page reads through it, and
    the actions (and the stale stop) still succeed, so none of them went through it."""
    read_only = psycopg.conninfo.make_conninfo(
        dsn, application_name="console-read", options="-c default_transaction_read_only=on"
    )
    conn.execute("UPDATE outbound_heartbeat.settings SET stale_after = interval '3 seconds'")
    live = service.create_run(conn, 5, [{}, {}])
    dead = service.create_run(conn, 6, [{}])
    service.claim_run(conn, "w-dead", dead.id)
    backdate_heartbeat(conn, dead.id, 60)
    with standalone(dsn, TOKEN, read_dsn=read_only, poll_interval=0.5).start() as server:
        browser = Http(server.url)
        browser.get(f"/?token={TOKEN}")
        deadline = time.monotonic() + 10
        while run_row(conn, dead.id)["status"] != "stopped":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert "stale_stopped" in browser.get("/")[1]
        assert browser.get(f"/runs/{live.id}")[0] == 200
        assert browser.get("/health")[0] == 200
        status, text = browser.post(f"/runs/{live.id}/force-cancel",
                                    {"csrf_token": browser.csrf(f"/runs/{live.id}/force-cancel")})
        assert status == 200 and "2 calls cancelled" in text
        readers = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'console-read'"
            " AND datname = current_database()"  # other xdist workers share the server
        ).fetchone()
        assert readers is not None and readers[0] >= 1
    assert run_row(conn, live.id)["status"] == "cancelled"


@pytest.mark.parametrize("kind", ["flask", "fastapi"])
def test_framework_mounts_authorize_and_act(kind: str, dsn: str, conn: Conn) -> None:
    run = service.create_run(conn, 5, [{}, {}, {}])
    with ConnectionPool(dsn, kwargs={"autocommit": True}, min_size=1, max_size=4) as pool:
        if kind == "flask":
            from flask import Flask

            from outbound_heartbeat.contrib.flask_console import create_console_blueprint

            def flask_authorize(request: Any) -> Viewer | None:
                raw = request.headers.get("X-Business-Id")
                return Viewer(business_id=int(raw)) if raw else None

            app = Flask("console-test")
            blueprint = create_console_blueprint(pool, flask_authorize, listen=False)
            app.register_blueprint(blueprint)
            client: Any = app.test_client()
            console = blueprint.console  # type: ignore[attr-defined]
        else:
            from fastapi import FastAPI
            from fastapi.testclient import TestClient

            from outbound_heartbeat.contrib.fastapi_console import create_console_router

            def fastapi_authorize(request: Any) -> Viewer | None:
                raw = request.headers.get("X-Business-Id")
                return Viewer(business_id=int(raw)) if raw else None

            api = FastAPI()
            router = create_console_router(pool, fastapi_authorize, listen=False)
            api.include_router(router)
            client = TestClient(api)
            console = router.console  # type: ignore[attr-defined]
        try:
            assert client.get("/outbound-heartbeat/").status_code == 401
            page = client.get("/outbound-heartbeat/", headers={"X-Business-Id": "5"})
            assert page.status_code == 200 and f'id="run-{run.id}"' in page.text
            assert 'href="/outbound-heartbeat/runs/' in page.text
            assert client.get("/outbound-heartbeat/", headers={"X-Business-Id": "6"}).text.count(
                'id="run-'
            ) == 0
            css = client.get("/outbound-heartbeat/static/console.css")
            assert css.status_code == 200 and ".hb-red" in css.text
            confirm = client.get(f"/outbound-heartbeat/runs/{run.id}/force-cancel",
                                 headers={"X-Business-Id": "5"})
            assert "3 queued calls will be failed; 0 in progress is left to telephony" in confirm.text
            token = re.search(r'name="csrf_token" value="([0-9a-f]+)"', confirm.text)
            assert token is not None
            url = f"/outbound-heartbeat/runs/{run.id}/force-cancel"
            headers = {"X-Business-Id": "5", "Content-Type": "application/x-www-form-urlencoded"}
            body = "data" if kind == "flask" else "content"  # raw form bytes, each client's word
            assert client.post(url, headers=headers, **{body: ""}).status_code == 403
            done = client.post(url, headers=headers, **{body: f"csrf_token={token.group(1)}"})
            assert done.status_code == 200 and "3 calls cancelled" in done.text
            assert run_row(conn, run.id)["status"] == "cancelled"
        finally:
            console.close()


def test_console_subcommand_prints_a_generated_token_and_serves(dsn: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "outbound_heartbeat", "console", "--dsn", dsn, "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.match(r"outbound_heartbeat console on (http://127\.0\.0\.1:\d+)/\?token=(\S+)", line)
        assert match, (line, proc.stderr.read() if proc.poll() is not None and proc.stderr else "")
        url, token = match.groups()
        assert len(token) >= 16
        assert Http(url).get("/")[0] == 401
        browser = Http(url)
        browser.get(f"/?token={token}")
        assert browser.get("/")[0] == 200
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize("given", ["env", "flag"])
def test_console_subcommand_never_prints_a_token_it_was_given(given: str, dsn: str) -> None:
    """A token from $OUTBOUND_HEARTBEAT_CONSOLE_TOKEN or --token is never printed (stdout is
    often a log): the first line names where it came from, and the console takes it."""
    import os

    token = "given-token-" + "a1b2c3d4e5f6a7b8"
    env = {**os.environ, "OUTBOUND_HEARTBEAT_CONSOLE_TOKEN": token}
    args = [sys.executable, "-m", "outbound_heartbeat", "console", "--dsn", dsn, "--port", "0"]
    if given == "flag":
        env.pop("OUTBOUND_HEARTBEAT_CONSOLE_TOKEN")
        args += ["--token", token]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        source = "$OUTBOUND_HEARTBEAT_CONSOLE_TOKEN" if given == "env" else "--token"
        match = re.match(r"outbound_heartbeat console on (http://127\.0\.0\.1:\d+)/ \(token from "
                         + re.escape(source) + r": open \S+/\?token=<the token> once\)$", line)
        assert match, (line, proc.stderr.read() if proc.poll() is not None and proc.stderr else "")
        url = match.group(1)
        assert Http(url).get("/")[0] == 401
        browser = Http(url)
        browser.get(f"/?token={token}")
        assert browser.get("/")[0] == 200
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=10)
    assert token not in line + out + err


def test_console_subcommand_refuses_a_token_that_could_not_be_a_cookie(dsn: str) -> None:
    import os

    env = {**os.environ, "OUTBOUND_HEARTBEAT_CONSOLE_TOKEN": "has;semicolon-0123456789"}
    done = subprocess.run(
        [sys.executable, "-m", "outbound_heartbeat", "console", "--dsn", dsn, "--port", "0"],
        capture_output=True, text=True, env=env, timeout=30)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "outbound-heartbeat console: error: $OUTBOUND_HEARTBEAT_CONSOLE_TOKEN must be 16 to 256"
        " characters of A-Z a-z 0-9 - . _ ~ + / ="]
    assert "semicolon" not in done.stdout + done.stderr


@pytest.mark.slow  # the demo: two real worker processes, one SIGKILLed, and its real waits
def test_demo_serves_the_console_while_it_runs() -> None:
    script = Path(sys.executable).parent / "outbound-heartbeat"
    proc = subprocess.Popen([str(script), "demo", "--pause", "3s"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        seen = ""
        while not (match := re.search(r"console: open (http://127\.0\.0\.1:\d+)/\?token=(\S+)", seen)):
            line = proc.stdout.readline()
            assert line, seen
            seen += line
        url, token = match.groups()
        while "waiting 3 s before the kill" not in seen:
            line = proc.stdout.readline()
            assert line, seen
            seen += line
        browser = Http(url)
        browser.get(f"/?token={token}")
        status, text = browser.get("/")
        assert status == 200 and text.count('data-status="running"') == 2, text
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, seen + out + err
        assert "force-cancel again: 0 jobs cancelled" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_health_page_metrics_and_sweep_now(dsn: str, conn: Conn) -> None:
    run = service.create_run(conn, 5, [{}, {}, {}])
    service.claim_run(conn, "w-gone", run.id)
    backdate_heartbeat(conn, run.id, 300)
    with ConnectionPool(dsn, kwargs={"autocommit": True}, min_size=1, max_size=4) as pool:
        # stop_stale=False: the console only shows the dead run, so the sweep has work to do.
        console = Console(pool, viewer_from_cookie, listen=False, stop_stale=False)
        with ConsoleServer(console) as server:
            operator = Http(server.url, "op")
            status, text = operator.get("/health")
            assert status == 200
            assert re.search(rf'<b>critical</b> stale_heartbeat <a href="/runs/{run.id}">', text)
            assert 'id="prometheus" href="/metrics"' in text
            status, text = operator.get("/metrics")
            assert status == 200 and "outbound_heartbeat_stale_runs 1" in text
            status, text = operator.post("/sweep", {"csrf_token": operator.csrf("/health")})
            assert status == 200 and "Sweep: 1 runs reclaimed." in text
            assert f"Run {run.id} (business 5, worker w-gone): stopped, reason stale_heartbeat, 3" in text
            assert run_row(conn, run.id)["status"] == "stopped"
            assert "No alerts" in operator.get("/health")[1]


def test_authorize_that_is_not_a_viewer_denies(dsn: str, conn: Conn) -> None:
    run = service.create_run(conn, 5, [{}, {}])

    async def async_authorize(request: Any) -> Viewer:  # a mistake: the core calls it plainly
        return Viewer(operator=True)

    with ConnectionPool(dsn, kwargs={"autocommit": True}, min_size=1, max_size=2) as pool:
        for authorize in (async_authorize, lambda request: "yes", lambda request: None):
            console = Console(pool, authorize, listen=False)  # type: ignore[arg-type]
            with ConsoleServer(console) as server:
                client = Http(server.url)
                assert client.get("/")[0] == 401
                assert client.get(f"/runs/{run.id}")[0] == 401
                assert client.post(f"/runs/{run.id}/force-cancel", {"csrf_token": "x"})[0] == 401
    assert run_row(conn, run.id)["status"] == "pending"


def test_hebrew_confirmation_and_result(console_url: str, conn: Conn) -> None:
    run = service.create_run(conn, 5, [{}, {}, {}])
    operator = Http(console_url, "op")
    status, text = operator.get(f"/runs/{run.id}/force-cancel?lang=he")
    assert status == 200 and 'dir="rtl"' in text
    assert f"לבטל מיידית את תור {run.id} של עסק 5? 3 שיחות ממתינות ייכשלו; 0 בביצוע" in text
    token = re.search(r'name="csrf_token" value="([0-9a-f]+)"', text)
    assert token is not None
    status, text = operator.post(f"/runs/{run.id}/force-cancel", {"csrf_token": token.group(1)})
    assert status == 200 and f"תור {run.id} בוטל מיידית (היה ממתין): 3 שיחות בוטלו." in text


def test_database_down_is_a_503_page(pg_server: Any, template_name: str) -> None:
    """The console's database goes away (its database is dropped under it): the page says so."""
    scratch = pg_server.create_database(template=template_name)
    with ConnectionPool(scratch, kwargs={"autocommit": True}, min_size=0, max_size=2,
                        timeout=3) as pool:
        console = Console(pool, viewer_from_cookie, listen=False, poll_interval=0.5)
        with ConsoleServer(console) as server:
            operator = Http(server.url, "op")
            assert operator.get("/")[0] == 200
            pg_server.drop_database(str(psycopg.conninfo.conninfo_to_dict(scratch)["dbname"]))
            status, text = operator.get("/")
            assert status == 503 and "The database did not answer" in text


@pytest.mark.slow  # a second server: a hot standby streaming from a private primary
def test_read_dsn_on_a_real_hot_standby() -> None:
    """--read-dsn pointed at a streaming standby (tests/helpers.primary_and_standby): the pages
    show the primary's state as replayed there, the stale stop and the actions go to the
    primary, and the standby's run list catches up with them."""
    from ..helpers import primary_and_standby, wait_replayed

    with primary_and_standby() as (_primary, dsn, _standby, standby_dsn), \
            psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE outbound_heartbeat.settings SET stale_after = interval '3 seconds',"
                     " restart_grace = interval '0'")
        live = service.create_run(conn, 5, [{}, {}])
        dead = service.create_run(conn, 6, [{}])
        service.claim_run(conn, "w-dead", dead.id)
        backdate_heartbeat(conn, dead.id, 60)
        wait_replayed(dsn, standby_dsn)
        with standalone(dsn, TOKEN, read_dsn=standby_dsn, poll_interval=0.5).start() as server:
            browser = Http(server.url)
            assert browser.get(f"/?token={TOKEN}")[0] in (200, 303)  # the token moves to a cookie
            deadline = time.monotonic() + 15
            while run_row(conn, dead.id)["status"] != "stopped":  # stopped on the primary
                assert time.monotonic() < deadline
                time.sleep(0.2)
            status, text = browser.post(
                f"/runs/{live.id}/force-cancel",
                {"csrf_token": browser.csrf(f"/runs/{live.id}/force-cancel")})
            assert status == 200 and "2 calls cancelled" in text
            wait_replayed(dsn, standby_dsn)
            deadline = time.monotonic() + 15
            while "stale_stopped" not in (page := browser.get("/")[1]):
                assert time.monotonic() < deadline, page[-2000:]
                time.sleep(0.3)
            with psycopg.connect(standby_dsn, autocommit=True) as replica:
                readers = replica.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
                    " AND pid <> pg_backend_pid()").fetchone()
            assert readers is not None and readers[0] >= 1  # the console reads from the standby
        assert run_row(conn, live.id)["status"] == "cancelled"


def row_html(page: str, run_id: int) -> str:
    match = re.search(rf'<tr id="run-{run_id}"[^>]*>(.*?)</tr>', page, re.DOTALL)
    assert match, page
    return match.group(1)


def bar_class(page: str, run_id: int) -> str:
    match = re.search(r'<div class="hb (hb-\w+)"', row_html(page, run_id))
    assert match, row_html(page, run_id)
    return match.group(1)


def test_a_missed_heartbeat_shows_at_once(console_url: str, conn: Conn) -> None:
    # stale_after is 30 s and a lease beats every 2 s: a heartbeat 4 s old has missed a beat
    # (its worker may be dead) long before half of stale_after.
    runs = {}
    for business, age in ((1, 0.0), (2, 4.0), (3, 12.0), (4, 25.0)):
        run = service.create_run(conn, business, [{}])
        assert service.claim_run(conn, f"w{business}", run.id) is not None
        backdate_heartbeat(conn, run.id, age)
        runs[age] = run.id
    page = Http(console_url, "op").get("/")[1]
    assert bar_class(page, runs[0.0]) == "hb-ok"
    assert bar_class(page, runs[4.0]) == "hb-warn"
    assert bar_class(page, runs[12.0]) == "hb-warn"
    assert bar_class(page, runs[25.0]) == "hb-red"  # three quarters of stale_after
    # The page's script advances the bars with the same threshold (2 s interval + 1 s slack).
    assert 'data-late="3.000"' in row_html(page, runs[0.0])
    script = Http(console_url, "op").get("/static/console.js")[1]
    assert 'getAttribute("data-late")' in script


def test_runs_table_counts_completed_and_failed_apart(console_url: str, conn: Conn) -> None:
    run = service.create_run(conn, 1, [{"n": i} for i in range(6)])
    claim = service.claim_run(conn, "w1", run.id)
    assert claim is not None
    for outcome in ("completed", "completed", "failed"):
        job = service.next_job(conn, run.id, "w1", claim.lease_epoch)
        assert job is not None
        service.finish_job(conn, job.id, "w1", claim.lease_epoch, outcome)
    page = Http(console_url, "op").get("/")[1]
    head = re.findall(r"<th>([^<]*)</th>", page.split("</thead>")[0])
    assert head[5:9] == ["Queued", "In progress", "Completed", "Failed"] and "Done" not in head
    cells = re.findall(r"<td>(.*?)</td>", row_html(page, run.id), re.DOTALL)
    assert cells[5:9] == ["3", "0", "2", "1"]


def test_hebrew_translates_statuses_and_stop_reasons(console_url: str, conn: Conn) -> None:
    live = service.create_run(conn, 1, [{}, {}])
    assert service.claim_run(conn, "w1", live.id) is not None
    dead = service.create_run(conn, 2, [{}, {}])
    assert service.claim_run(conn, "w2", dead.id) is not None
    backdate_heartbeat(conn, dead.id, 60)
    assert service.get_active_run(conn, 2) is None  # stopped: stale_stopped, stale_heartbeat
    operator = Http(console_url, "op")
    page = operator.get("/?lang=he")[1]
    assert '<span class="status st-running" data-value="running">פעיל</span>' in row_html(page, live.id)
    dead_row = row_html(page, dead.id)
    assert '<span class="status st-stopped" data-value="stopped">נעצר</span>' in dead_row
    assert '<span class="reason">נעצר: אין דופק: הדופק פסק</span>' in dead_row
    run_page = operator.get(f"/runs/{dead.id}")[1]  # the language is kept (cookie)
    assert 'id="run-status" class="status st-stopped" data-value="stopped">נעצר<' in run_page
    assert '>בתור<' not in run_page and run_page.count(">נכשל<") == 2  # its two jobs failed
    assert 'data-value="stale_stopped">נעצר: אין דופק</td>' in run_page  # the timeline
    # English keeps the database's identifiers, which operators grep for.
    page = operator.get("/?lang=en")[1]
    assert '<span class="reason">stale_stopped: stale_heartbeat</span>' in row_html(page, dead.id)
