"""The standalone console (``outbound-heartbeat console``): the standard library's threaded HTTP
server, no framework. It binds 127.0.0.1 unless told otherwise and lets in only the holder of
its token: open ``http://127.0.0.1:PORT/?token=...`` once (the token moves into an HttpOnly
cookie and out of the address bar), or send ``Authorization: Bearer ...`` (a Prometheus scrape).

A token is 16 to 256 characters of ``A-Z a-z 0-9 - . _ ~ + / =`` (URL-safe or standard base64,
hex, a UUID): nothing else ever reaches a header. A POST is authorized from its headers before
any byte of its body is read, and its body is refused from its ``Content-Length`` when that is
missing, malformed or over the form limit (the connection is then closed).
"""

from __future__ import annotations

import contextlib
import hmac
import inspect
import logging
import re
import secrets
import socket
import string
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import cookies as http_cookies
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from .core import MAX_FORM_BYTES, Console, Request, Response, Viewer, parse_form
from .stream import EventStream

logger = logging.getLogger("outbound_heartbeat.console")

TOKEN_COOKIE = "ohc_token"
TOKEN_CHARS = frozenset(string.ascii_letters + string.digits + "-._~+/=")
MIN_TOKEN = 16
MAX_TOKEN = 256
TOKEN_RULE = f"{MIN_TOKEN} to {MAX_TOKEN} characters of A-Z a-z 0-9 - . _ ~ + / ="
_TOKEN_IN_URL = re.compile(r"([?&]token=)[^&\s\"]*")

__all__ = [
    "MAX_FORM_BYTES",
    "TOKEN_COOKIE",
    "TOKEN_RULE",
    "ConsoleServer",
    "HttpRequest",
    "new_token",
    "token_authorizer",
    "valid_token",
]


def new_token() -> str:
    return secrets.token_urlsafe(24)


def valid_token(token: object) -> bool:
    """Whether ``token`` has a token's length and alphabet (so it may go into a cookie)."""
    return (
        isinstance(token, str)
        and MIN_TOKEN <= len(token) <= MAX_TOKEN
        and all(c in TOKEN_CHARS for c in token)
    )


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
    if not valid_token(token):
        raise ValueError(f"token must be {TOKEN_RULE}")

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

    def setup(self) -> None:
        super().setup()
        with self.server.open_lock:
            self.server.open.add(self.connection)
            if self.server.hung_up:  # accepted just before close() stopped the loop
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RD)

    def handle_one_request(self) -> None:
        super().handle_one_request()
        if self.server.hung_up:  # answered as the server closes: no next request
            self.close_connection = True

    def finish(self) -> None:
        with self.server.open_lock:
            self.server.open.discard(self.connection)
            self.server.open_changed.notify_all()
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        # The request line may hold ?token=: never log it.
        message = _TOKEN_IN_URL.sub(r"\1<redacted>", format % args)
        logger.debug("console %s - %s", self.address_string(), message)

    def _request(self, method: str) -> Request:
        """The request without its body (a POST's form is read once it is admitted)."""
        url = urlsplit(self.path)
        query = dict(parse_qsl(url.query, keep_blank_values=True))
        jar = http_cookies.SimpleCookie()
        try:
            jar.load(self.headers.get("Cookie", ""))
        except http_cookies.CookieError:
            jar = http_cookies.SimpleCookie()
        cookies = {k: m.value for k, m in jar.items()}
        headers = {k.lower(): v for k, v in self.headers.items()}
        native = HttpRequest(headers, cookies, query, self.client_address[0])
        return Request(method, url.path, "", query, {}, cookies, native)

    def _handle(self, method: str) -> None:
        req = self._request(method)
        if method != "POST" and (
            self.headers.get("Content-Length", "0").strip() not in ("", "0")
            or self.headers.get("Transfer-Encoding")
        ):
            self.close_connection = True  # a body nobody reads: never parse it as a request
        console = self.server.console
        token = req.query.get("token")
        if method == "GET" and token is not None:
            self._move_token(req, token)
            return
        admitted = console.admit(req)
        if isinstance(admitted, Response):
            if method == "POST":
                self._refuse(admitted)
            else:
                self._send(admitted)
            return
        if method == "POST":
            # Every Content-Length header: two of them ("5, 99") are not a number (400).
            lengths = self.headers.get_all("Content-Length") or []
            length = console.form_length(
                req, admitted, ", ".join(lengths) if lengths else None,
                self.headers.get("Transfer-Encoding"),
            )
            if isinstance(length, Response):
                self._refuse(length)
                return
            raw = self.rfile.read(length)
            if len(raw) < length:  # the client went away mid-body
                self.close_connection = True
                return
            req.form = parse_form(raw)
        self._send(console.respond(req, admitted))

    def _move_token(self, req: Request, token: str) -> None:
        """Moves a valid token from the address into a cookie, then shows the page without it.
        Anything that is not this console's token sets no cookie at all (so a link cannot
        plant a cookie, inject a header or log the operator out)."""
        rest = urlencode([(k, v) for k, v in req.query.items() if k != "token"])
        # One leading slash: "//host/..." or "/\\host" would send the browser elsewhere.
        location = "/" + req.path.lstrip("/\\") + (f"?{rest}" if rest else "")
        headers = [("Location", location)]
        accepted = False
        if valid_token(token):
            probe = HttpRequest({}, {TOKEN_COOKIE: token}, {}, self.client_address[0])
            viewer = self.server.console.authorize(probe)
            if inspect.iscoroutine(viewer):  # an async authorize is never a yes here
                viewer.close()
            accepted = isinstance(viewer, Viewer)
        if accepted:
            headers.append(
                ("Set-Cookie", f"{TOKEN_COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict")
            )
        else:
            logger.warning("[SECURITY] console: a wrong token in the address from %s",
                           self.client_address[0])
        self._send(Response(303, b"", "text/plain", headers))

    def _refuse(self, response: Response) -> None:
        """Answers a POST whose body is not read (unauthorized, or its length refused), then
        closes: at most MAX_FORM_BYTES more are drained, for one second, and dropped, so a
        client that sends its body anyway still gets the answer."""
        self.close_connection = True
        response.headers.append(("Connection", "close"))
        self._send(response)
        with contextlib.suppress(OSError, ValueError):
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + 1.0
            left = MAX_FORM_BYTES
            while left > 0 and (wait := deadline - time.monotonic()) > 0:
                self.connection.settimeout(wait)
                chunk = self.connection.recv(min(left, 16384))
                if not chunk:
                    break
                left -= len(chunk)

    def _send(self, response: Response) -> None:
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        for name, value in response.headers:
            self.send_header(name, value)
        body = response.body
        if isinstance(body, bytes):
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
            return
        # An event stream: no length, the connection closes at its end.
        self.send_header("Connection", "close")
        self.close_connection = True
        self.end_headers()
        try:
            for chunk in body:
                if self.server.closing.is_set():
                    break
                self.wfile.write(chunk)
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            if isinstance(body, EventStream):
                body.close()

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

    def __init__(self, address: tuple[str, int]) -> None:
        super().__init__(address, _Handler)
        self.open: set[socket.socket] = set()
        self.open_lock = threading.Lock()
        self.open_changed = threading.Condition(self.open_lock)
        self.hung_up = False

    def hang_up(self, grace: float = 2.0) -> None:
        """Ends every connection still open (a browser keeps its connection for the next
        request; its handler's daemon thread would go on serving a closed console). Reading
        ends first, so a request in flight still gets its answer, for ``grace`` seconds; then
        writing too. A connection whose handler starts later is ended in its setup()."""
        with self.open_lock:
            self.hung_up = True
            for sock in self.open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RD)
            deadline = time.monotonic() + grace
            while self.open and (left := deadline - time.monotonic()) > 0:
                self.open_changed.wait(left)
            for sock in self.open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


class ConsoleServer:
    """Serves a :class:`Console` on ``host:port`` (port 0: any free one) in a thread."""

    def __init__(self, console: Console, host: str = "127.0.0.1", port: int = 0) -> None:
        self.console = console
        self.httpd = _Server((host, port))
        self.httpd.console = console
        self.httpd.closing = threading.Event()
        self.thread: threading.Thread | None = None
        #: start() or serve_forever() has been called: close() must stop a serving loop.
        self._serving = False
        self._serving_lock = threading.Lock()

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    @property
    def url(self) -> str:
        host = str(self.httpd.server_address[0])
        return f"http://{host}:{self.port}"

    def start(self) -> ConsoleServer:
        """Serves in a thread; a server already started is left as it is (``with
        standalone(...).start() as server:`` starts it once: a second serving thread would be
        left blocked in ``accept()`` at close, which then waited 10 s for it)."""
        with self._serving_lock:
            if self._serving:  # by start() or serve_forever(): one loop only
                return self
            self._serving = True
        self.console.monitor.start()
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, name="outbound-heartbeat-console-http", daemon=True
        )
        self.thread.start()
        return self

    def serve_forever(self) -> None:
        with self._serving_lock:
            if self._serving:
                raise RuntimeError("this console server is already serving (start())")
            self._serving = True
        try:
            self.console.monitor.start()
        except BaseException:
            with self._serving_lock:
                self._serving = False  # no loop ran: close() must not wait for one
            raise
        self.httpd.serve_forever()

    def close(self) -> None:
        self.httpd.closing.set()
        self.console.close()
        with self._serving_lock:
            serving = self._serving
            self._serving = True  # a start() after close() serves nothing
        if serving:  # shutdown() waits for a loop: forever when none ever ran
            self.httpd.shutdown()
        self.httpd.hang_up()
        self.httpd.server_close()
        if self.thread is not None:
            self.thread.join(10)

    def __enter__(self) -> ConsoleServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
