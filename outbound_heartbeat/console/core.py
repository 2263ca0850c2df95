"""The console without a web framework: a :class:`Request` in, a :class:`Response` out. The Flask
blueprint, the FastAPI router and the standalone server only translate their requests.

Security, in this order on every request but static files: the app's ``authorize(request)``
returns a :class:`Viewer` or None (401: deny by default), before any byte of a request body is
read; a POST body is then refused from its headers when its length is missing or malformed
(411, 400) or over :data:`MAX_FORM_BYTES` (413), and never read past its length; a business
viewer only ever reads and acts with its ``business_id`` (the SQL functions refuse another
business's run, OH403 -> 403); a POST needs a viewer that is not read-only (else 403) and a
CSRF token (else 403) derived with HMAC from the console's secret, a per-browser session cookie
and the viewer. A library error answers the status and text of the one error -> HTTP table
(:mod:`outbound_heartbeat.web.http`), as the Flask and FastAPI endpoints do.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import logging
import os
import secrets
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from importlib import resources
from typing import Any, TypeVar
from urllib.parse import parse_qsl

import psycopg

from .. import calls, prometheus, service
from ..errors import AccessDenied, Error
from ..web import SyncSource, http_error, messages, parse_run_id, sync_connections
from . import queries
from .live import Monitor, Snapshot
from .queries import RunSummary
from .render import LOCALES, Page
from .stream import EventStream, StreamSlots

logger = logging.getLogger("outbound_heartbeat.console")

T = TypeVar("T")

#: Where the Flask blueprint and the FastAPI router mount the console by default.
DEFAULT_CONSOLE_PREFIX = "/outbound-heartbeat"

#: Every console of this process, for a forked child to reset (see Console._forked).
_consoles: weakref.WeakSet[Console] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for console in list(_consoles):
        console._forked()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

SESSION_COOKIE = "ohc_session"
LANG_COOKIE = "ohc_lang"
CSRF_FIELD = "csrf_token"
#: The largest request body the console reads: its forms carry one CSRF token.
MAX_FORM_BYTES = 64 * 1024
HTML = "text/html; charset=utf-8"
STATIC_TYPES = {
    "console.css": "text/css; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
}

#: Sent with every page: nothing inline runs, nothing loads from elsewhere, no framing.
SECURITY_HEADERS = (
    (
        "Content-Security-Policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self';"
        " img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
)


@dataclass(frozen=True)
class Viewer:
    """Who looks at the console: an operator (every business) or one business's user.
    ``read_only`` viewers see no action buttons and their POSTs are refused (403). ``name``
    goes into the console's log lines of the actions."""

    business_id: int | None = None
    operator: bool = False
    read_only: bool = False
    name: str = ""

    def __post_init__(self) -> None:
        if not self.operator and self.business_id is None:
            raise ValueError("Viewer needs business_id, or operator=True")

    @property
    def scope(self) -> int | None:
        """The business_id the SQL functions get: None (no tenant check) for an operator."""
        return None if self.operator else self.business_id

    def label(self) -> str:
        who = "operator" if self.operator else f"business {self.business_id}"
        return f"{self.name or '?'} ({who}{', read-only' if self.read_only else ''})"

    def key(self) -> str:
        return f"{int(self.operator)}:{self.business_id}:{int(self.read_only)}:{self.name}"


Authorize = Callable[[Any], "Viewer | None"]


@dataclass
class Request:
    """A request as the console sees it; ``native`` is the framework's, for ``authorize``."""

    method: str
    path: str
    root: str = ""
    query: Mapping[str, str] = field(default_factory=dict)
    form: Mapping[str, str] = field(default_factory=dict)
    cookies: Mapping[str, str] = field(default_factory=dict)
    native: Any = None


@dataclass
class Response:
    """Status, content type, extra headers and a body: bytes, or an :class:`EventStream` (an
    iterator of chunks; an asyncio server iterates its ``aiter()``)."""

    status: int
    body: bytes | Iterator[bytes]
    content_type: str = HTML
    headers: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Admitted:
    """A request that ``authorize`` let in (:meth:`Console.admit`): who, and what every answer
    to it carries (language, the browser's session, the cookies to set)."""

    viewer: Viewer
    path: str
    locale: str
    session: str
    cookies: tuple[tuple[str, str], ...]


def parse_form(raw: bytes) -> dict[str, str]:
    """A form body (``application/x-www-form-urlencoded``) as read within its length."""
    return dict(parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True))


class Console:
    """The operator console over one database (``connection``: a pool, a connection or a
    factory, used for the actions) and optionally a ``read`` source (a standby) for the pages.

    ``listen``: a DSN for the dedicated LISTEN connection (default: the pool's own conninfo;
    ``False`` to poll). ``secret`` keys the CSRF tokens (random per process when not given; pass
    one when several processes serve the console)."""

    def __init__(
        self,
        connection: SyncSource,
        authorize: Authorize,
        *,
        read: SyncSource | None = None,
        locale: str = "en",
        secret: bytes | None = None,
        listen: str | bool | None = None,
        poll_interval: float = 1.0,
        stop_stale: bool = True,
        ended_within: timedelta = timedelta(days=1),
        max_runs: int = 200,
        stream_seconds: float = 300.0,
        max_streams: int = 100,
        max_streams_per_viewer: int = 8,
        stream_readers: int = 4,
    ) -> None:
        if locale not in LOCALES:
            raise ValueError(f"locale must be one of {list(LOCALES)}, not {locale!r}")
        if poll_interval <= 0:
            raise ValueError(f"poll_interval must be positive, not {poll_interval!r}")
        self.write = sync_connections(connection)
        self.read = sync_connections(read) if read is not None else self.write
        self.authorize = authorize
        self.locale = locale
        self.secret = secret or secrets.token_bytes(32)
        self.stream_seconds = stream_seconds
        self.streams = StreamSlots(max_streams, max_streams_per_viewer)
        if isinstance(stream_readers, bool) or not isinstance(stream_readers, int) \
                or stream_readers < 1:
            raise ValueError(f"stream_readers must be a positive integer, not {stream_readers!r}")
        self.stream_readers = stream_readers
        self._reader: ThreadPoolExecutor | None = None
        self._reader_lock = threading.Lock()
        # A business's rows as last read for its streams: (monitor version, runs).
        self._business_rows: dict[int, tuple[int, list[RunSummary]]] = {}
        self._business_locks: dict[int, threading.Lock] = {}
        listen_dsn: str | None
        if listen is False:
            listen_dsn = None
        elif isinstance(listen, str):
            listen_dsn = listen
        else:
            listen_dsn = getattr(connection, "conninfo", None) or None
        self.monitor = Monitor(
            read=self.read,
            write=self.write,
            listen_dsn=listen_dsn,
            poll_interval=poll_interval,
            stop_stale=stop_stale,
            ended_within=ended_within,
            max_runs=max_runs,
        )
        _consoles.add(self)

    def _forked(self) -> None:
        """In a forked child (a server that forks its workers after loading the app): the
        parent's threads (the monitor's, the stream readers') did not survive the fork and its
        open streams are not the child's; the child starts its own on first use."""
        self.monitor.forked()
        self.streams.forked()
        self._reader = None
        self._reader_lock = threading.Lock()
        self._business_rows = {}
        self._business_locks = {}

    def close(self) -> None:
        self.monitor.close()
        with self._reader_lock:
            reader, self._reader = self._reader, None
        if reader is not None:
            reader.shutdown(wait=False, cancel_futures=True)

    def reader(self) -> ThreadPoolExecutor:
        """The console's own small pool where asyncio streams read a business's rows (never the
        app's shared thread pool)."""
        with self._reader_lock:
            if self._reader is None:
                self._reader = ThreadPoolExecutor(
                    self.stream_readers, thread_name_prefix="outbound-heartbeat-console-stream"
                )
            return self._reader

    # -- plumbing ------------------------------------------------------------------------------

    def _query(self, call: calls.Call[T], *, write: bool = False) -> T:
        with (self.write if write else self.read)() as conn:
            return service.execute(conn, call)[0]

    def csrf_token(self, session: str, viewer: Viewer) -> str:
        message = f"{session}|{viewer.key()}".encode()
        return hmac.new(self.secret, message, hashlib.sha256).hexdigest()

    def _page(self, req: Request, viewer: Viewer, session: str, locale: str) -> Page:
        who_key = "operator" if viewer.operator else "business_user"
        from .render import TEXT

        who = TEXT[locale][who_key].format(b=viewer.business_id)
        if viewer.read_only:
            who += " · " + TEXT[locale]["read_only"]
        return Page(
            root=req.root,
            locale=locale,
            can_act=not viewer.read_only,
            operator=viewer.operator,
            who=who,
            csrf=self.csrf_token(session, viewer),
            mode=self.monitor.mode,
        )

    def _html(self, status: int, text: str, cookies: list[tuple[str, str]]) -> Response:
        return Response(status, text.encode(), HTML, [*SECURITY_HEADERS, *cookies])

    # -- entry point -------------------------------------------------------------------------

    def handle(self, req: Request) -> Response:
        """Answers a request whose form (if any) is already read: :meth:`admit`, then
        :meth:`respond`. Adapters that read the body themselves call those two apart, with
        :meth:`form_length` in between, so nothing is read before ``authorize`` has said yes."""
        admitted = self.admit(req)
        if isinstance(admitted, Response):
            return admitted
        return self.respond(req, admitted)

    def admit(self, req: Request) -> Admitted | Response:
        """Runs ``authorize``: the admitted viewer, or the final answer (401, or a static file,
        which needs no viewer). Reads nothing of the request's body."""
        path = "/" + req.path.strip("/")
        if path.startswith("/static/"):
            return self._static(path.removeprefix("/static/"))
        cookies: list[tuple[str, str]] = []
        locale = req.cookies.get(LANG_COOKIE, self.locale)
        if req.query.get("lang") in LOCALES:
            locale = req.query["lang"]
            cookies.append(("Set-Cookie", self._cookie(req, LANG_COOKIE, locale)))
        if locale not in LOCALES:
            locale = self.locale
        session = req.cookies.get(SESSION_COOKIE, "")
        if len(session) != 64 or not all(c in "0123456789abcdef" for c in session):
            session = secrets.token_hex(32)
            cookies.append(("Set-Cookie", self._cookie(req, SESSION_COOKIE, session)))

        viewer = self.authorize(req.native)
        if viewer is not None and not isinstance(viewer, Viewer):
            # An ``async def`` authorize hands back a coroutine: never mistake it for a yes.
            logger.error("[SECURITY] console: authorize returned %r, not a Viewer: denied", viewer)
            if inspect.iscoroutine(viewer):
                viewer.close()
            viewer = None
        if viewer is None:
            page = Page(req.root, locale, False, False, "", "", self.monitor.mode, stream=False)
            return self._html(401, page.message_page("unauthorized", 401), cookies)
        return Admitted(viewer, path, locale, session, tuple(cookies))

    def form_length(
        self,
        req: Request,
        admitted: Admitted,
        content_length: str | None,
        transfer_encoding: str | None = None,
    ) -> int | Response:
        """How many bytes of an admitted POST's body to read, judged from its headers alone: the
        ``Content-Length`` (plain digits, at most :data:`MAX_FORM_BYTES`), or the refusal: 411
        without one (or with a ``Transfer-Encoding``), 400 when it is not a number, 413 over the
        limit. The caller reads exactly that many bytes, never more."""
        page = self._page(req, admitted.viewer, admitted.session, admitted.locale)
        cookies = list(admitted.cookies)
        raw = (content_length or "").strip()
        if transfer_encoding and transfer_encoding.strip().lower() != "identity":
            return self._html(411, page.message_page("length_required", 411), cookies)
        if not raw:
            return self._html(411, page.message_page("length_required", 411), cookies)
        if not (raw.isascii() and raw.isdigit()):
            return self._html(400, page.message_page("bad_request", 400), cookies)
        if len(raw) > 12 or int(raw) > MAX_FORM_BYTES:
            return self._html(413, page.message_page("too_large", 413), cookies)
        return int(raw)

    def respond(self, req: Request, admitted: Admitted) -> Response:
        """The answer to an admitted request (its form read, when a POST)."""
        viewer, path, cookies = admitted.viewer, admitted.path, list(admitted.cookies)
        page = self._page(req, viewer, admitted.session, admitted.locale)
        session = admitted.session
        try:
            if req.method == "POST":
                return self._post(req, path, viewer, session, page, cookies)
            if req.method not in ("GET", "HEAD"):
                return self._html(405, page.message_page("bad_request", 405), cookies)
            return self._get(req, path, viewer, page, cookies)
        except Error as exc:
            # The library's errors answer as the web adapters do: one table, the same texts.
            answer = http_error(exc)
            if isinstance(exc, AccessDenied):
                logger.warning(
                    "[SECURITY] console: %s refused %s %s", viewer.label(), req.method, path)
            elif answer.status >= 500:
                logger.error("[CONSOLE] %s %s failed: %s", req.method, path, exc)
            text = messages(admitted.locale)[answer.text]
            return self._html(answer.status, page.text_page(text, answer.status), cookies)
        except psycopg.Error as exc:
            # Any other database failure (server down, a pool timeout): one line, no trace.
            logger.error("[CONSOLE] %s %s failed: %s", req.method, path, exc)
            return self._html(503, page.message_page("unavailable", 503), cookies)

    def _cookie(self, req: Request, name: str, value: str) -> str:
        return f"{name}={value}; Path={req.root or '/'}; HttpOnly; SameSite=Strict"

    def _static(self, name: str) -> Response:
        if name not in STATIC_TYPES:
            return Response(404, b"not found", "text/plain; charset=utf-8")
        data = resources.files(__package__).joinpath("static").joinpath(name).read_bytes()
        return Response(200, data, STATIC_TYPES[name], [("Cache-Control", "max-age=300")])

    # -- GET ---------------------------------------------------------------------------------

    def _get(
        self, req: Request, path: str, viewer: Viewer, page: Page, cookies: list[tuple[str, str]]
    ) -> Response:
        parts = path.strip("/").split("/") if path != "/" else []
        if not parts:
            return self._html(200, page.runs_page(self._visible(viewer)), cookies)
        if parts == ["runs.html"]:
            return self._html(200, page.runs_rows(self._visible(viewer)), cookies)
        if parts == ["stream"]:
            return self._stream(req, viewer, page, cookies)
        if parts in (["health"], ["metrics"]) and not viewer.operator:
            return self._html(403, page.message_page("forbidden", 403), cookies)
        if parts == ["health"]:
            alerts = self._query(calls.health_check())
            samples = self._query(calls.metrics())
            return self._html(200, page.health_page(alerts, samples), cookies)
        if parts == ["metrics"]:
            samples = self._query(calls.metrics())
            text = prometheus.render(samples)
            return Response(200, text.encode(), prometheus.CONTENT_TYPE, list(SECURITY_HEADERS))
        if len(parts) >= 2 and parts[0] == "runs":
            run_id = parse_run_id(parts[1])
            if run_id is None:
                return self._html(404, page.message_page("not_found", 404), cookies)
            if len(parts) == 2:
                run, events, jobs = self._run(run_id, viewer)
                return self._html(200, page.run_page(run, events, jobs), cookies)
            if parts[2:] == ["fragment"]:
                run, events, jobs = self._run(run_id, viewer)
                return self._html(200, page.run_fragment(run, events, jobs), cookies)
            if parts[2:] in (["cancel"], ["force-cancel"]):
                if viewer.read_only:
                    return self._html(403, page.message_page("forbidden", 403), cookies)
                # What will happen is read on the primary: a standby may lag behind.
                run = self._query(queries.describe_run(run_id, viewer.scope), write=True)
                return self._html(200, page.confirm_page(run, parts[2] == "force-cancel"), cookies)
        return self._html(404, page.message_page("not_found", 404), cookies)

    def _visible(self, viewer: Viewer) -> list[RunSummary]:
        """The runs this viewer may see, read now (the business filter is the SQL's)."""
        monitor = self.monitor
        monitor.start()
        return self._query(queries.list_runs(viewer.scope, monitor.ended_within, monitor.max_runs))

    @staticmethod
    def _filter(snap: Snapshot, viewer: Viewer) -> list[RunSummary]:
        if viewer.operator:
            return list(snap.runs)
        return [r for r in snap.runs if r.business_id == viewer.business_id]

    def _run(self, run_id: int, viewer: Viewer) -> tuple[RunSummary, list[Any], list[Any]]:
        run = self._query(queries.describe_run(run_id, viewer.scope))
        events = self._query(calls.list_events(run_id, viewer.scope, 200))
        jobs = self._query(queries.list_jobs(run_id, viewer.scope, None, 50))
        return run, events, jobs

    def _business_runs(self, business_id: int, viewer: Viewer, version: int) -> list[RunSummary]:
        """A business's rows at least as new as monitor ``version``: one read per business and
        version, whatever the number of its open streams."""
        with self._reader_lock:
            lock = self._business_locks.setdefault(business_id, threading.Lock())
        with lock:
            cached = self._business_rows.get(business_id)
            if cached is not None and cached[0] >= version:
                return cached[1]
            runs = self._visible(viewer)
            self._business_rows[business_id] = (version, runs)
            return runs

    def _stream(
        self, req: Request, viewer: Viewer, page: Page, cookies: list[tuple[str, str]]
    ) -> Response:
        """Server-sent events: the rows of the runs table after every change, and the live mode.
        The stream ends after ``stream_seconds`` (the browser reconnects and is authorized
        again). At most ``max_streams`` are open, ``max_streams_per_viewer`` per viewer: beyond,
        429 (the page then polls)."""
        headers = [*SECURITY_HEADERS, ("X-Accel-Buffering", "no")]
        if req.method == "HEAD":
            return Response(200, b"", "text/event-stream; charset=utf-8", headers)
        release = self.streams.take(viewer.key())
        if isinstance(release, str):
            logger.warning(
                "[CONSOLE] %s refused an event stream: %s reached (%s open, %s of them its own)",
                viewer.label(), release, self.streams.open(), self.streams.open(viewer.key()),
            )
            return self._html(
                429,
                page.message_page("too_many_streams", 429),
                [*cookies, ("Retry-After", "30")],
            )

        def rows(snap: Snapshot) -> str | None:
            # An operator's rows are the snapshot; a business's are read with its id, so none
            # is missing when the snapshot's max_runs cut off older runs of its own.
            try:
                if viewer.operator or viewer.business_id is None:
                    runs = self._filter(snap, viewer)
                else:
                    runs = self._business_runs(viewer.business_id, viewer, snap.version)
            except (psycopg.Error, Error) as exc:
                logger.warning("[CONSOLE] reading %s's runs failed: %s", viewer.label(), exc)
                return None
            return page.runs_rows(runs)

        stream = EventStream(self.monitor, rows, self.reader, self.stream_seconds, release)
        return Response(200, stream, "text/event-stream; charset=utf-8", headers)

    # -- POST --------------------------------------------------------------------------------

    def _post(
        self,
        req: Request,
        path: str,
        viewer: Viewer,
        session: str,
        page: Page,
        cookies: list[tuple[str, str]],
    ) -> Response:
        if viewer.read_only:
            logger.warning("[SECURITY] console: read-only %s refused POST %s", viewer.label(), path)
            return self._html(403, page.message_page("forbidden", 403), cookies)
        token = req.form.get(CSRF_FIELD, "")
        if not session or not hmac.compare_digest(token, self.csrf_token(session, viewer)):
            logger.warning("[SECURITY] console: bad CSRF token from %s on %s", viewer.label(), path)
            return self._html(403, page.message_page("csrf", 403), cookies)
        parts = path.strip("/").split("/")
        t = page.t
        if parts == ["sweep"]:
            if not viewer.operator:
                return self._html(403, page.message_page("forbidden", 403), cookies)
            reclaimed = self._query(calls.cleanup_stuck_runs(), write=True)
            logger.warning("[CONSOLE] %s swept: %s runs reclaimed", viewer.label(), len(reclaimed))
            self.monitor.wake()
            return self._html(
                200, page.result_page(t["sweep"], page.sweep_lines(reclaimed), "/"), cookies
            )
        if len(parts) == 3 and parts[0] == "runs" and parts[2] in ("cancel", "force-cancel"):
            run_id = parse_run_id(parts[1])
            if run_id is None:
                return self._html(404, page.message_page("not_found", 404), cookies)
            force = parts[2] == "force-cancel"
            call = (calls.force_cancel if force else calls.request_cancel)(run_id, viewer.scope)
            result = self._query(call, write=True)
            logger.warning(
                "[CONSOLE] %s %s run %s (business %s): %s -> %s, %s jobs cancelled",
                viewer.label(),
                parts[2],
                run_id,
                result.business_id,
                result.previous_status,
                result.status,
                result.jobs_cancelled,
            )
            self.monitor.wake()
            values = {"run": run_id, "previous": page.word(result.previous_status),
                      "n": result.jobs_cancelled}
            if result.previous_status not in ("pending", "running"):
                key = "done_already"
            elif result.status == "cancelled":
                key = "done_force" if force else "done_cancel"
            else:
                key = "done_requested"
            title = t["force_cancel" if force else "cancel"]
            return self._html(
                200, page.result_page(title, [t[key].format(**values)], f"/runs/{run_id}"), cookies
            )
        return self._html(404, page.message_page("not_found", 404), cookies)


__all__ = [
    "DEFAULT_CONSOLE_PREFIX",
    "MAX_FORM_BYTES",
    "Admitted",
    "Authorize",
    "Console",
    "Request",
    "Response",
    "Viewer",
    "parse_form",
]
