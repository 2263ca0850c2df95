"""The console without a web framework: a :class:`Request` in, a :class:`Response` out. The Flask
blueprint, the FastAPI router and the standalone server only translate their requests.

Security, in this order on every request but static files: the app's ``authorize(request)``
returns a :class:`Viewer` or None (401: deny by default); a business viewer only ever reads and
acts with its ``business_id`` (the SQL functions refuse another business's run, OH403 -> 403);
a POST needs a viewer that is not read-only (else 403) and a CSRF token (else 403) derived with
HMAC from the console's secret, a per-browser session cookie and the viewer.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import logging
import secrets
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from importlib import resources
from typing import Any, TypeVar

import psycopg

from .. import calls, prometheus, service
from ..contrib.web import SyncSource, parse_run_id, sync_connections
from ..errors import AccessDenied, Error, InvalidArgument, RunLocked, RunNotFound
from . import queries
from .live import Monitor, Snapshot
from .queries import RunSummary
from .render import LOCALES, Page

logger = logging.getLogger("outbound_heartbeat.console")

T = TypeVar("T")

SESSION_COOKIE = "ohc_session"
LANG_COOKIE = "ohc_lang"
CSRF_FIELD = "csrf_token"
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
    """Status, content type, extra headers and a body (bytes, or chunks for an event stream)."""

    status: int
    body: bytes | Iterator[bytes]
    content_type: str = HTML
    headers: list[tuple[str, str]] = field(default_factory=list)


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

    def close(self) -> None:
        self.monitor.close()

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
        page = self._page(req, viewer, session, locale)

        try:
            if req.method == "POST":
                return self._post(req, path, viewer, session, page, cookies)
            if req.method not in ("GET", "HEAD"):
                return self._html(405, page.message_page("bad_request", 405), cookies)
            return self._get(req, path, viewer, page, cookies)
        except AccessDenied:
            logger.warning("[SECURITY] console: %s refused %s %s", viewer.label(), req.method, path)
            return self._html(403, page.message_page("forbidden", 403), cookies)
        except RunNotFound:
            return self._html(404, page.message_page("not_found", 404), cookies)
        except RunLocked:
            return self._html(423, page.message_page("locked", 423), cookies)
        except InvalidArgument:
            return self._html(400, page.message_page("bad_request", 400), cookies)
        except (psycopg.Error, Error) as exc:
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
            return self._stream(viewer, page)
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
            run_id = _run_id(parts[1])
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

    def _stream(self, viewer: Viewer, page: Page) -> Response:
        """Server-sent events: the rows of the runs table after every change, and the live mode.
        The stream ends after ``stream_seconds`` (the browser reconnects and is authorized
        again)."""
        monitor = self.monitor
        end = time.monotonic() + self.stream_seconds

        def events() -> Iterator[bytes]:
            yield b"retry: 1000\n\n"
            version = 0  # the monitor's first read is version 1: wait for it
            while time.monotonic() < end:
                snap = monitor.wait(version, 15.0)
                if snap.version == version:
                    yield b": keep-alive\n\n"
                    continue
                version = snap.version
                # An operator's rows are the snapshot; a business's are read with its id, so
                # none is missing when the snapshot's max_runs cut off older runs of its own.
                try:
                    runs = self._filter(snap, viewer) if viewer.operator else self._visible(viewer)
                except (psycopg.Error, Error) as exc:
                    logger.warning("[CONSOLE] reading %s's runs failed: %s", viewer.label(), exc)
                    continue
                rows = page.runs_rows(runs)
                data = "".join(f"data: {line}\n" for line in rows.split("\n"))
                yield f"event: mode\ndata: {snap.mode}\n\nevent: runs\n{data}\n".encode()

        headers = [*SECURITY_HEADERS, ("X-Accel-Buffering", "no")]
        return Response(200, events(), "text/event-stream; charset=utf-8", headers)

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
            run_id = _run_id(parts[1])
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
            values = {"run": run_id, "previous": result.previous_status, "n": result.jobs_cancelled}
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


def _run_id(raw: str) -> int | None:
    return parse_run_id(raw)


__all__ = ["Authorize", "Console", "Request", "Response", "Viewer"]
