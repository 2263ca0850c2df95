"""What the console tests share: the test app's authorize (a cookie says who looks) and a
headless Debian Chromium driven by Selenium (no browser download: the system's binaries)."""

from __future__ import annotations

import re
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from outbound_heartbeat.console import HttpRequest, Viewer

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def viewer_from_cookie(request: Any) -> Viewer | None:
    """The tests' authorize: the cookie ``viewer`` says who looks (op, ro, biz:N)."""
    if not isinstance(request, HttpRequest):
        return None
    raw = request.cookies.get("viewer", "")
    if raw == "op":
        return Viewer(operator=True, name="ops")
    if raw == "ro":
        return Viewer(operator=True, read_only=True, name="auditor")
    if raw.startswith("biz:") and raw[4:].isdigit():
        return Viewer(business_id=int(raw[4:]), name=f"user-{raw[4:]}")
    return None


class Browser:
    """A fresh headless Chromium profile; ``quit()`` removes it."""

    def __init__(self, width: int = 1360, height: int = 760) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.profile = tempfile.mkdtemp(prefix="oh-chromium-")
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in (
            "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", f"--user-data-dir={self.profile}", f"--window-size={width},{height}",
            "--lang=en-US",
        ):
            options.add_argument(flag)
        self.driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        self.driver.set_page_load_timeout(30)

    def quit(self) -> None:
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self.profile, ignore_errors=True)


def viewer_from_any_cookie(request: Any) -> Viewer | None:
    """viewer_from_cookie for every mount: the standalone's, Flask's and Starlette's requests
    all have a ``cookies`` mapping."""
    raw = str(request.cookies.get("viewer", ""))
    if raw == "op":
        return Viewer(operator=True, name="ops")
    if raw.startswith("biz:") and raw[4:].isdigit():
        return Viewer(business_id=int(raw[4:]), name=f"user-{raw[4:]}")
    return None


def sse_events(raw: str) -> list[tuple[str, str]]:
    """The events in an event stream, parsed as the HTML standard says (lines end with CRLF, CR
    or LF; a blank line dispatches; ``event`` names it, ``data`` lines join with LF). An
    incomplete last line or event is left out."""
    lines = re.split(r"\r\n|\r|\n", raw)
    if raw.endswith("\r"):
        lines.pop()  # a CR at the very end may be half of a CRLF still on its way
    lines.pop()  # what follows the last line break: not a complete line yet
    events: list[tuple[str, str]] = []
    name, data = "", []
    for line in lines:
        if line == "":
            if data:
                events.append((name or "message", "\n".join(data)))
            name, data = "", []
            continue
        if line.startswith(":"):
            continue
        key, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if key == "event":
            name = value
        elif key == "data":
            data.append(value)
    return events


def raw_request(port: int, head: bytes, timeout: float = 5.0, body: bytes = b"",
                ) -> tuple[int, list[tuple[str, str]], bytes]:
    """Sends ``head`` (and ``body``, if any) on a fresh socket and reads one response: its
    status, its raw header lines (name, value) in order, and its body (by Content-Length, else
    until the server closes). Raises ``TimeoutError`` when no full answer comes in time."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head)
        if body:
            sock.sendall(body)
        data = b""
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in data:
            sock.settimeout(max(deadline - time.monotonic(), 0.01))
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        head_bytes, _, rest = data.partition(b"\r\n\r\n")
        lines = head_bytes.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = [(k.strip(), v.strip()) for k, _, v in (ln.partition(":") for ln in lines[1:])]
        length = next((int(v) for k, v in headers if k.lower() == "content-length"), None)
        while length is None or len(rest) < length:
            sock.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            rest += chunk
        return status, headers, rest


@contextmanager
def serve_wsgi(app: Any) -> Iterator[int]:
    """A WSGI app on werkzeug's threaded server on 127.0.0.1 (a free port), in a thread."""
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_port
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@contextmanager
def serve_asgi(app: Any) -> Iterator[int]:
    """An ASGI app on a real uvicorn server on 127.0.0.1 (a free port), in a thread."""
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                            lifespan="off", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield int(server.servers[0].sockets[0].getsockname()[1])
    finally:
        server.should_exit = True
        thread.join(15)
