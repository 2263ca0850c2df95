"""The standalone console (``outbound-heartbeat console``): the standard library's threaded HTTP
server, no framework. It binds 127.0.0.1 unless told otherwise and lets in only the holder of
its token: open ``http://127.0.0.1:PORT/?token=...`` once (the token moves into an HttpOnly
cookie and out of the address bar), or send ``Authorization: Bearer ...`` (a Prometheus scrape).
"""

from __future__ import annotations

import hmac
import logging
import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http import cookies as http_cookies
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from .core import Console, Request, Response, Viewer

logger = logging.getLogger("outbound_heartbeat.console")

TOKEN_COOKIE = "ohc_token"
MAX_FORM_BYTES = 64 * 1024

__all__ = ["TOKEN_COOKIE", "ConsoleServer", "HttpRequest", "new_token", "token_authorizer"]


def new_token() -> str:
    return secrets.token_urlsafe(24)


@dataclass
class HttpRequest:
    """What ``authorize`` receives from the standalone server."""

    headers: dict[str, str]
    cookies: dict[str, str]
    query: dict[str, str]
    client: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def token_authorizer(token: str, *, read_only: bool = False) -> Callable[[Any], Viewer | None]:
    """An operator for the holder of ``token`` (cookie or bearer header), else nobody."""
    if len(token) < 16:
        raise ValueError("token must be at least 16 characters")

    def authorize(request: Any) -> Viewer | None:
        if not isinstance(request, HttpRequest):
            return None
        given = request.cookies.get(TOKEN_COOKIE, "")
        bearer = request.headers.get("authorization", "")
        if bearer.lower().startswith("bearer "):
            given = bearer[7:].strip()
        if given and hmac.compare_digest(given.encode(), token.encode()):
            return Viewer(operator=True, read_only=read_only, name="token")
        return None

    return authorize


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("console %s - " + format, self.address_string(), *args)

    def _request(self, method: str) -> tuple[Request, HttpRequest] | None:
        url = urlsplit(self.path)
        query = dict(parse_qsl(url.query, keep_blank_values=True))
        jar = http_cookies.SimpleCookie()
        try:
            jar.load(self.headers.get("Cookie", ""))
        except http_cookies.CookieError:
            jar = http_cookies.SimpleCookie()
        cookies = {k: m.value for k, m in jar.items()}
        form: dict[str, str] = {}
        if method == "POST":
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_FORM_BYTES:
                self._send(Response(413, b"form too large", "text/plain; charset=utf-8"))
                return None
            raw = self.rfile.read(length).decode("utf-8", "replace")
            form = dict(parse_qsl(raw, keep_blank_values=True))
        headers = {k.lower(): v for k, v in self.headers.items()}
        native = HttpRequest(headers, cookies, query, self.client_address[0])
        req = Request(method, url.path, "", query, form, cookies, native)
        return req, native

    def _handle(self, method: str) -> None:
        parsed = self._request(method)
        if parsed is None:
            return
        req, _ = parsed
        token = req.query.get("token")
        if method == "GET" and token is not None:
            # Move the token from the address into a cookie, then show the page without it.
            rest = urlencode([(k, v) for k, v in req.query.items() if k != "token"])
            cookie = f"{TOKEN_COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict"
            location = req.path + (f"?{rest}" if rest else "")
            self._send(
                Response(303, b"", "text/plain", [("Location", location), ("Set-Cookie", cookie)])
            )
            return
        self._send(self.server.console.handle(req))

    def _send(self, response: Response) -> None:
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        for name, value in response.headers:
            self.send_header(name, value)
        if isinstance(response.body, bytes):
            self.send_header("Content-Length", str(len(response.body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(response.body)
            return
        # An event stream: no length, the connection closes at its end.
        self.send_header("Connection", "close")
        self.close_connection = True
        self.end_headers()
        chunks: Iterator[bytes] = response.body
        try:
            for chunk in chunks:
                if self.server.closing.is_set():
                    break
                self.wfile.write(chunk)
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_GET(self) -> None:
        self._handle("GET")

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    def do_POST(self) -> None:
        self._handle("POST")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    console: Console
    closing: threading.Event


class ConsoleServer:
    """Serves a :class:`Console` on ``host:port`` (port 0: any free one) in a thread."""

    def __init__(self, console: Console, host: str = "127.0.0.1", port: int = 0) -> None:
        self.console = console
        self.httpd = _Server((host, port), _Handler)
        self.httpd.console = console
        self.httpd.closing = threading.Event()
        self.thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    @property
    def url(self) -> str:
        host = str(self.httpd.server_address[0])
        return f"http://{host}:{self.port}"

    def start(self) -> ConsoleServer:
        self.console.monitor.start()
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, name="outbound-heartbeat-console-http", daemon=True
        )
        self.thread.start()
        return self

    def serve_forever(self) -> None:
        self.console.monitor.start()
        self.httpd.serve_forever()

    def close(self) -> None:
        self.httpd.closing.set()
        self.console.close()
        self.httpd.shutdown()
        self.httpd.server_close()
        if self.thread is not None:
            self.thread.join(10)

    def __enter__(self) -> ConsoleServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
