"""The console's HTML, rendered on the server. Every value that comes from the database or the
request passes through :func:`h` (html.escape), so a worker id ``<script>`` is shown as text;
the page loads only its own CSS and JS (a Content-Security-Policy forbids anything inline)."""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from html import escape
from importlib import resources
from typing import Any

from ..lease import check_interval
from ..records import AuditEvent, HealthAlert, Job, Metric, ReclaimedRun
from .queries import RunSummary

__all__ = ["LATE_SLACK", "TEXT", "VALUES", "Page", "bar_level", "h", "late_after"]

TEXT: dict[str, dict[str, str]] = {
    "en": {
        "title": "Outbound calls console",
        "runs": "Runs",
        "health": "Health",
        "run": "Run",
        "business": "Business",
        "status": "Status",
        "worker": "Worker",
        "epoch": "Lease epoch",
        "queued": "Queued",
        "in_progress": "In progress",
        "heartbeat": "Heartbeat",
        "reason": "Ended by",
        "actions": "Actions",
        "cancel": "Cancel",
        "force_cancel": "Force-cancel",
        "sweep": "Sweep now",
        "no_runs": "No runs in the last day.",
        "live_listen": "live (LISTEN)",
        "live_poll": "live (polling)",
        "live_starting": "connecting…",
        "read_only": "read-only",
        "operator": "operator",
        "business_user": "business {b}",
        "jobs_by_status": "Jobs by status",
        "timeline": "Events",
        "at": "At (UTC)",
        "event": "Event",
        "detail": "Detail",
        "completed": "Completed",
        "failed": "Failed",
        "job": "Job",
        "error": "Error",
        "updated": "Updated",
        "latest_jobs": "Latest jobs",
        "confirm_force": "Force-cancel run {run} of business {b}? {queued} queued calls will be "
        "failed; {in_progress} in progress is left to telephony.",
        "confirm_cancel_running": "Ask the worker of run {run} (business {b}) to stop? It hangs "
        "up after its current call; its {queued} queued calls will be failed when it stops; "
        "{in_progress} in progress is left to telephony.",
        "confirm_cancel_pending": "Cancel run {run} of business {b} now? Nobody dials it yet: "
        "its {queued} queued calls will be failed.",
        "confirm_ended": "Run {run} has already ended ({status}): nothing will change.",
        "confirm": "Yes, do it",
        "back": "Back",
        "done_force": "Run {run} force-cancelled (was {previous}): {n} calls cancelled.",
        "done_cancel": "Run {run} cancelled (was {previous}): {n} calls cancelled.",
        "done_requested": "Cancellation requested for run {run}: its worker stops after the "
        "current call.",
        "done_already": "Run {run} had already ended ({previous}): 0 calls cancelled.",
        "swept": "Sweep: {n} runs reclaimed.",
        "swept_row": "Run {run} (business {b}, worker {w}): {status}, reason {reason}, {n} "
        "queued calls failed.",
        "alerts": "Alerts",
        "no_alerts": "No alerts: every running run has a fresh heartbeat.",
        "metrics": "Metrics",
        "prometheus": "Prometheus endpoint",
        "unauthorized": "Authentication required.",
        "forbidden": "You may not do this.",
        "csrf": "The form's CSRF token is missing or invalid: reload the page and try again.",
        "not_found": "Not found.",
        "bad_request": "Bad request.",
        "length_required": "The request must state its length (Content-Length).",
        "too_large": "The request is too large.",
        "too_many_streams": "Too many live views are open; this page updates every few seconds"
        " instead. Close other console tabs to get live updates again.",
        "unavailable": "The database did not answer; try again in a moment.",
        "hb_of": "{age} of {limit}",
        "stopped_reason": "{event}: {reason}",
        "age_at_end": "heartbeat {age} old then",
        "cancel_requested_flag": "cancel requested",
        "stale_flag": "stale",
    },
    "he": {
        "title": "מסוף שיחות יוצאות",
        "runs": "תורים",
        "health": "תקינות",
        "run": "תור",
        "business": "עסק",
        "status": "מצב",
        "worker": "עובד",
        "epoch": "גרסת חכירה",
        "queued": "ממתינות",
        "in_progress": "בביצוע",
        "heartbeat": "דופק",
        "reason": "הסתיים בגלל",
        "actions": "פעולות",
        "cancel": "ביטול",
        "force_cancel": "ביטול מיידי",
        "sweep": "ניקוי עכשיו",
        "no_runs": "אין תורים ביממה האחרונה.",
        "live_listen": "חי (LISTEN)",
        "live_poll": "חי (דגימה)",
        "live_starting": "מתחבר…",
        "read_only": "צפייה בלבד",
        "operator": "מפעיל",
        "business_user": "עסק {b}",
        "jobs_by_status": "שיחות לפי מצב",
        "timeline": "אירועים",
        "at": "מתי (UTC)",
        "event": "אירוע",
        "detail": "פרטים",
        "completed": "הושלמו",
        "failed": "נכשלו",
        "job": "שיחה",
        "error": "שגיאה",
        "updated": "עודכן",
        "latest_jobs": "שיחות אחרונות",
        "confirm_force": "לבטל מיידית את תור {run} של עסק {b}? {queued} שיחות ממתינות ייכשלו; "
        "{in_progress} בביצוע יישארו למרכזייה.",
        "confirm_cancel_running": "לבקש מהעובד של תור {run} (עסק {b}) לעצור? הוא ינתק אחרי "
        "השיחה הנוכחית; {queued} שיחות ממתינות ייכשלו; {in_progress} בביצוע יישארו למרכזייה.",
        "confirm_cancel_pending": "לבטל עכשיו את תור {run} של עסק {b}? איש עוד לא מחייג בו: "
        "{queued} שיחות ממתינות ייכשלו.",
        "confirm_ended": "תור {run} כבר הסתיים ({status}): דבר לא ישתנה.",
        "confirm": "כן, לבצע",
        "back": "חזרה",
        "done_force": "תור {run} בוטל מיידית (היה {previous}): {n} שיחות בוטלו.",
        "done_cancel": "תור {run} בוטל (היה {previous}): {n} שיחות בוטלו.",
        "done_requested": "בקשת הביטול לתור {run} נשלחה: העובד ייעצר אחרי השיחה הנוכחית.",
        "done_already": "תור {run} כבר הסתיים ({previous}): 0 שיחות בוטלו.",
        "swept": "ניקוי: {n} תורים נאספו.",
        "swept_row": "תור {run} (עסק {b}, עובד {w}): {status}, סיבה {reason}, {n} שיחות "
        "ממתינות נכשלו.",
        "alerts": "התראות",
        "no_alerts": "אין התראות: לכל תור פעיל יש דופק טרי.",
        "metrics": "מדדים",
        "prometheus": "נקודת Prometheus",
        "unauthorized": "נדרשת הזדהות.",
        "forbidden": "אין הרשאה לפעולה זו.",
        "csrf": "אסימון ה-CSRF של הטופס חסר או שגוי: טענו את הדף מחדש ונסו שוב.",
        "not_found": "לא נמצא.",
        "bad_request": "בקשה לא תקינה.",
        "length_required": "הבקשה חייבת לציין את אורכה (Content-Length).",
        "too_large": "הבקשה גדולה מדי.",
        "too_many_streams": "פתוחות יותר מדי תצוגות חיות; הדף יתעדכן כל כמה שניות במקום זאת."
        " סגרו לשוניות אחרות של המסוף כדי לקבל שוב עדכונים חיים.",
        "unavailable": "מסד הנתונים לא ענה; נסו שוב בעוד רגע.",
        "hb_of": "{age} מתוך {limit}",
        "stopped_reason": "{event}: {reason}",
        "age_at_end": "הדופק היה בן {age}",
        "cancel_requested_flag": "התבקש ביטול",
        "stale_flag": "ללא דופק",
    },
}

#: Run and job statuses, the events that end a run and their reasons, in words. The page shows
#: the database's own identifiers in English (an operator greps the logs and psql for them);
#: a value missing here is shown as it is.
VALUES: dict[str, dict[str, str]] = {
    "en": {},
    "he": {
        # run statuses
        "pending": "ממתין",
        "running": "פעיל",
        "completed": "הושלם",
        "stopped": "נעצר",
        "cancelled": "בוטל",
        "failed": "נכשל",
        # job statuses (completed, failed and cancelled as above)
        "queued": "בתור",
        "in_progress": "בביצוע",
        # audit events
        "created": "נוצר",
        "claimed": "נתפס בידי עובד",
        "resumed": "חודש",
        "stale_stopped": "נעצר: אין דופק",
        "cancel_requested": "התבקש ביטול",
        "force_cancelled": "בוטל מיידית",
        "cleaned_up": "נוקה",
        "finished": "הסתיים",
        # why a run was stopped (cleanup_stuck_runs, get_active_run)
        "stale_heartbeat": "הדופק פסק",
        "legacy_lock_timeout": "נעילה ישנה פגה",
        "on_startup": "העובד הופעל מחדש",
        "empty": "אין שיחות",
    },
}

LOCALES = tuple(TEXT)

#: Seconds a heartbeat may be late before the bar says a beat was missed, on top of the beat
#: interval: the heartbeat statement's own time and the page's update.
LATE_SLACK = 1.0


def late_after(stale_after: timedelta) -> float:
    """The heartbeat age (seconds) from which a beat is missed: a lease's default beat interval
    (``lease.check_interval``: min(2 s, stale_after / 3)) plus max(LATE_SLACK, half of it)."""
    interval = check_interval(None, stale_after)
    return interval + max(LATE_SLACK, interval / 2)


def bar_level(age: float, stale_after: timedelta, stale: bool) -> str:
    """``ok`` while the worker beats, ``warn`` (amber) once a beat is missed, ``red`` from three
    quarters of stale_after or when the database already calls the run stale. The page's
    script applies the same rule between updates (static/console.js, ``data-late``)."""
    limit = stale_after.total_seconds()
    if stale or age >= 0.75 * limit:
        return "red"
    return "warn" if age >= late_after(stale_after) else "ok"


@functools.cache
def static_url(name: str) -> str:
    """``/static/NAME?v=<its hash>``: a browser never runs a cached script of another version
    against this server's pages (the files are cached 5 minutes)."""
    data = resources.files(__package__).joinpath("static").joinpath(name).read_bytes()
    return f"/static/{name}?v={hashlib.sha256(data).hexdigest()[:12]}"


def h(value: object) -> str:
    """Text for HTML (element content and quoted attributes): None is an empty string."""
    return "" if value is None else escape(str(value), quote=True)


def seconds(value: timedelta | None) -> str:
    if value is None:
        return "-"
    s = value.total_seconds()
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def stamp(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def when(value: datetime | None) -> str:
    return "-" if value is None else value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


@dataclass(frozen=True)
class Page:
    """What every page of one request shares: where the console is mounted, the language, who
    looks, and the CSRF token for its forms."""

    root: str
    locale: str
    can_act: bool
    operator: bool
    who: str
    csrf: str
    mode: str
    stream: bool = True

    @property
    def t(self) -> Mapping[str, str]:
        return TEXT[self.locale]

    def word(self, value: str | None) -> str:
        """A status, event or reason of the database in the page's language."""
        return "-" if value is None else VALUES[self.locale].get(value, value)

    def status(self, value: str, element_id: str = "") -> str:
        """A status badge: the class keeps the database's value, the text is translated."""
        ident = f' id="{h(element_id)}"' if element_id else ""
        return (f'<span{ident} class="status st-{h(value)}" data-value="{h(value)}">'
                f"{h(self.word(value))}</span>")

    def url(self, path: str) -> str:
        return h(self.root + path)

    # -- layout ------------------------------------------------------------------------------

    def document(self, title: str, body: str, *, fragment_url: str | None = None) -> str:
        t = self.t
        direction = "rtl" if self.locale == "he" else "ltr"
        other = "en" if self.locale == "he" else "he"
        other_label = "English" if other == "en" else "עברית"
        live = t.get(f"live_{self.mode}", t["live_starting"])
        nav = f'<a href="{self.url("/")}">{h(t["runs"])}</a>'
        if self.operator:
            nav += f' <a href="{self.url("/health")}">{h(t["health"])}</a>'
        data = f' data-root="{h(self.root)}" data-stream="{1 if self.stream else 0}"'
        if fragment_url:
            data += f' data-fragment="{h(fragment_url)}"'
        return (
            "<!DOCTYPE html>\n"
            f'<html lang="{h(self.locale)}" dir="{direction}">\n<head>\n<meta charset="utf-8">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{h(title)} · {h(t['title'])}</title>\n"
            f'<link rel="stylesheet" href="{self.url(static_url("console.css"))}">\n'
            f'<script src="{self.url(static_url("console.js"))}" defer></script>\n'
            f"</head>\n<body{data}>\n<header>\n<strong>{h(t['title'])}</strong>\n"
            f"<nav>{nav}</nav>\n"
            f'<span class="who">{h(self.who)}</span>\n'
            f'<span id="live" class="live live-{h(self.mode)}" data-listen="{h(t["live_listen"])}"'
            f' data-poll="{h(t["live_poll"])}">{h(live)}</span>\n'
            f'<a class="lang" href="?lang={other}" lang="{other}">{other_label}</a>\n'
            f"</header>\n<main>\n{body}\n</main>\n</body>\n</html>\n"
        )

    def form(self, action: str, label: str, css: str = "", fields: str = "") -> str:
        return (
            f'<form method="post" action="{self.url(action)}" class="inline">'
            f'<input type="hidden" name="csrf_token" value="{h(self.csrf)}">{fields}'
            f'<button type="submit" class="{h(css)}">{h(label)}</button></form>'
        )

    # -- runs list -----------------------------------------------------------------------------

    def runs_page(self, runs: Sequence[RunSummary]) -> str:
        t = self.t
        head = "".join(
            f"<th>{h(t[k])}</th>"
            for k in (
                "run",
                "business",
                "status",
                "worker",
                "epoch",
                "queued",
                "in_progress",
                "completed",
                "failed",
                "heartbeat",
                "reason",
            )
        )
        if self.can_act:
            head += f"<th>{h(t['actions'])}</th>"
        sweep = self.form("/sweep", t["sweep"], "sweep") if self.can_act and self.operator else ""
        return self.document(
            t["runs"],
            f'<div class="bar-line"><h1>{h(t["runs"])}</h1>{sweep}</div>\n'
            f'<table id="runs"><thead><tr>{head}</tr></thead>\n'
            f'<tbody id="runs-body">{self.runs_rows(runs)}</tbody></table>',
        )

    def runs_rows(self, runs: Sequence[RunSummary]) -> str:
        t = self.t
        if not runs:
            cols = 12 if self.can_act else 11
            return f'<tr class="empty"><td colspan="{cols}">{h(t["no_runs"])}</td></tr>'
        return "\n".join(self.run_row(r) for r in runs)

    def heartbeat_bar(self, r: RunSummary) -> str:
        limit = r.stale_after.total_seconds()
        if r.status == "running" and r.heartbeat_age is not None:
            age = r.heartbeat_age.total_seconds()
            level = bar_level(age, r.stale_after, r.stale)
            before, _, after = self.t["hb_of"].partition("{age}")
            text = (
                f'{h(before)}<span class="hb-age">{age:.1f}</span> s'
                f"{h(after.format(limit=seconds(r.stale_after)))}"
            )
            return (
                f'<div class="hb hb-{level}" data-age="{age:.3f}" data-limit="{limit:.3f}"'
                f' data-late="{late_after(r.stale_after):.3f}">'
                f'<div class="hb-fill"></div></div><span class="hb-text">{text}</span>'
            )
        if r.heartbeat_age_at_end is not None:
            text = self.t["age_at_end"].format(age=seconds(r.heartbeat_age_at_end))
            return f'<span class="hb-text">{h(text)}</span>'
        return "-"

    def ended(self, r: RunSummary) -> str:
        if r.open:
            flags = []
            if r.stale:
                flags.append(self.t["stale_flag"])
            if r.cancel_requested_at is not None:
                flags.append(self.t["cancel_requested_flag"])
            return h(", ".join(flags))
        if r.ended_by is None:
            return "-"
        text = self.t["stopped_reason"].format(event=self.word(r.ended_by),
                                               reason=self.word(r.end_reason))
        return f'<span class="reason">{h(text)}</span>'

    def run_row(self, r: RunSummary) -> str:
        link = f'<a href="{self.url(f"/runs/{r.id}")}">{r.id}</a>'
        cells = [
            link,
            h(r.business_id),
            self.status(r.status),
            f'<span class="worker">{h(r.locked_by_worker or r.ended_worker or "-")}</span>',
            h(r.lease_epoch),
            h(r.queued_jobs),
            h(r.in_progress_jobs),
            h(r.completed_jobs),
            h(r.failed_jobs),
            self.heartbeat_bar(r),
            self.ended(r),
        ]
        if self.can_act:
            cells.append(self.action_links(r))
        tds = "".join(f"<td>{c}</td>" for c in cells)
        return (
            f'<tr id="run-{r.id}" data-run="{r.id}" data-status="{h(r.status)}"'
            f' data-stale="{str(r.stale).lower()}">{tds}</tr>'
        )

    def action_links(self, r: RunSummary) -> str:
        if not r.open:
            return ""
        t = self.t
        return (
            f'<a class="button cancel" href="{self.url(f"/runs/{r.id}/cancel")}">'
            f'{h(t["cancel"])}</a> '
            f'<a class="button force" href="{self.url(f"/runs/{r.id}/force-cancel")}">'
            f"{h(t['force_cancel'])}</a>"
        )

    # -- one run --------------------------------------------------------------------------

    def run_page(self, r: RunSummary, events: Sequence[AuditEvent], jobs: Sequence[Job]) -> str:
        t = self.t
        return self.document(
            f"{t['run']} {r.id}",
            f'<h1>{h(t["run"])} {r.id}</h1>\n'
            f'<div id="run-live">{self.run_fragment(r, events, jobs)}</div>',
            fragment_url=f"{self.root}/runs/{r.id}/fragment",
        )

    def run_fragment(self, r: RunSummary, events: Sequence[AuditEvent], jobs: Sequence[Job]) -> str:
        t = self.t
        facts = [
            (t["business"], h(r.business_id)),
            (t["status"], self.status(r.status, "run-status")),
            (
                t["worker"],
                f'<span class="worker">{h(r.locked_by_worker or r.ended_worker or "-")}</span>',
            ),
            (t["epoch"], h(r.lease_epoch)),
            (t["heartbeat"], self.heartbeat_bar(r)),
            (t["reason"], self.ended(r)),
        ]
        dl = "".join(f"<dt>{h(k)}</dt><dd>{v}</dd>" for k, v in facts)
        counts = "".join(
            f'<li class="count-{k}"><span>{h(t[k])}</span> <b>{n}</b></li>'
            for k, n in (
                ("queued", r.queued_jobs),
                ("in_progress", r.in_progress_jobs),
                ("completed", r.completed_jobs),
                ("failed", r.failed_jobs),
            )
        )
        actions = f'<p class="actions">{self.action_links(r)}</p>' if self.can_act else ""
        return (
            f'<dl class="facts">{dl}</dl>{actions}\n<h2>{h(t["jobs_by_status"])}</h2>'
            f'<ul class="counts">{counts}</ul>\n'
            f"<h2>{h(t['timeline'])}</h2>{self.timeline(events, r)}\n"
            f"<h2>{h(t['latest_jobs'])}</h2>{self.jobs_table(jobs)}"
        )

    def timeline(self, events: Sequence[AuditEvent], r: RunSummary) -> str:
        t = self.t
        # The heartbeat's age when the run was ended is the run's, not the event's detail.
        last_end = max((e.id for e in events if e.event == r.ended_by), default=None)
        age_at_end = r.heartbeat_age_at_end
        rows = "".join(
            f'<tr class="ev ev-{h(e.event)}"><td>{h(stamp(e.created_at))}</td>'
            f'<td class="event" data-value="{h(e.event)}">{h(self.word(e.event))}</td>'
            f'<td class="worker">{h(e.worker_id or "-")}</td>'
            f"<td>{h(describe_event(e, age_at_end if e.id == last_end else None))}</td></tr>"
            for e in sorted(events, key=lambda e: e.id)
        )
        head = "".join(f"<th>{h(t[k])}</th>" for k in ("at", "event", "worker", "detail"))
        return f'<table id="timeline"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'

    def jobs_table(self, jobs: Sequence[Job]) -> str:
        t = self.t
        head = "".join(f"<th>{h(t[k])}</th>" for k in ("job", "status", "error", "updated"))
        rows = "".join(
            f'<tr><td>{j.id}</td>'
            f"<td>{self.status(j.status)}</td>"
            f"<td>{h(j.error_message or '')}</td><td>{h(when(j.updated_at))}</td></tr>"
            for j in jobs
        )
        return f'<table id="jobs"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'

    # -- actions ----------------------------------------------------------------------------

    def confirm_page(self, r: RunSummary, force: bool) -> str:
        t = self.t
        values = {
            "run": r.id,
            "b": r.business_id,
            "queued": r.queued_jobs,
            "in_progress": r.in_progress_jobs,
            "status": self.word(r.status),
        }
        if not r.open:
            key = "confirm_ended"
        elif force:
            key = "confirm_force"
        else:
            key = "confirm_cancel_pending" if r.status == "pending" else "confirm_cancel_running"
        action = "force-cancel" if force else "cancel"
        label = t["force_cancel" if force else "cancel"]
        body = (
            f"<h1>{h(label)}: {h(t['run'])} {r.id}</h1>\n"
            f'<p id="confirm-text" class="confirm">{h(t[key].format(**values))}</p>\n'
            + (
                self.form(f"/runs/{r.id}/{action}", t["confirm"], "danger confirm")
                if r.open
                else ""
            )
            + f' <a href="{self.url(f"/runs/{r.id}")}">{h(t["back"])}</a>'
        )
        return self.document(label, body)

    def result_page(self, title: str, lines: Iterable[str], back: str) -> str:
        items = "".join(f"<li>{h(line)}</li>" for line in lines)
        return self.document(
            title,
            f'<h1>{h(title)}</h1>\n<ul id="result">{items}</ul>\n'
            f'<p><a href="{self.url(back)}">{h(self.t["back"])}</a></p>',
        )

    def sweep_lines(self, reclaimed: Sequence[ReclaimedRun]) -> list[str]:
        t = self.t
        return [t["swept"].format(n=len(reclaimed))] + [
            t["swept_row"].format(
                run=r.run_id,
                b=r.business_id,
                w=r.worker_id or "-",
                status=self.word(r.status),
                reason=self.word(r.reason),
                n=r.jobs_failed,
            )
            for r in reclaimed
        ]

    # -- health -------------------------------------------------------------------------------

    def health_page(self, alerts: Sequence[HealthAlert], samples: Sequence[Metric]) -> str:
        t = self.t
        if alerts:
            items = "".join(
                f'<li class="alert sev-{h(a.severity)}"><b>{h(a.severity)}</b> {h(a.check_name)}'
                f"{'' if a.run_id is None else ' ' + self.run_link(a.run_id)}: {h(a.detail)}</li>"
                for a in alerts
            )
            alerts_html = f'<ul id="alerts">{items}</ul>'
        else:
            alerts_html = f'<p id="alerts" class="ok">{h(t["no_alerts"])}</p>'
        rows = "".join(
            f"<tr><td>{h(m.name)}</td><td>{h(format_labels(m.labels))}</td>"
            f'<td class="num">{h(format_value(m.value))}</td></tr>'
            for m in samples
        )
        sweep = self.form("/sweep", t["sweep"], "sweep") if self.can_act else ""
        return self.document(
            t["health"],
            f'<div class="bar-line"><h1>{h(t["health"])}</h1>{sweep}</div>\n'
            f"<h2>{h(t['alerts'])}</h2>{alerts_html}\n"
            f'<h2>{h(t["metrics"])}</h2><p><a id="prometheus" href="{self.url("/metrics")}">'
            f'{h(t["prometheus"])}</a></p>\n<table id="metrics"><tbody>{rows}</tbody></table>',
        )

    def run_link(self, run_id: int) -> str:
        return f'<a href="{self.url(f"/runs/{run_id}")}">{run_id}</a>'

    def message_page(self, key: str, status: int) -> str:
        return self.text_page(self.t[key], status)

    def text_page(self, text: str, status: int) -> str:
        """An error page with this text (a library error's is the web core's, in the locale)."""
        return self.document(str(status), f'<p id="message" class="error">{h(text)}</p>')


def describe_event(e: AuditEvent, age_at_end: timedelta | None = None) -> str:
    """The detail of an event in words where it matters (the age of the heartbeat at a stale
    stop, jobs cancelled), else its JSON."""
    d = dict(e.detail)
    parts: list[str] = []
    if age_at_end is not None:
        parts.append(f"heartbeat age at the stop: {seconds(age_at_end)}")
    if "jobs_failed" in d:
        parts.append(f"jobs failed: {d.pop('jobs_failed')}")
    if "reason" in d:
        parts.append(f"reason: {d.pop('reason')}")
    if "heartbeat_age" in d:
        parts.append(f"heartbeat age: {d.pop('heartbeat_age')}")
    rest = json.dumps(d, sort_keys=True, ensure_ascii=False) if d else ""
    return "; ".join([*parts, rest] if rest else parts)


def format_labels(labels: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(labels.items()))


def format_value(value: float) -> str:
    return str(int(value)) if value.is_integer() else f"{value:.3f}"
