"""The HTTP core every web surface shares (the Flask/FastAPI endpoints and the console): run ids
from URL segments, the reply texts in Hebrew and English, and the one error -> HTTP table.

The table is :data:`outbound_heartbeat.errors.BY_SQLSTATE` (each exception class carries its
HTTP status) with the key of each error's text added here; nothing else maps an error to a
status. No web framework is imported here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from ..arguments import MAX_BIGINT
from ..errors import BY_SQLSTATE, Error

__all__ = [
    "ERRORS",
    "MESSAGES",
    "HttpError",
    "Reply",
    "error_reply",
    "http_error",
    "messages",
    "parse_run_id",
    "reply_for_error",
]

MESSAGES: dict[str, dict[str, str]] = {
    "he": {
        "force_cancelled": "התור בוטל מיידית ({n} שיחות בוטלו)",
        "cancelled": "התור בוטל ({n} שיחות בוטלו)",
        "cancel_requested": "בקשת הביטול נשלחה; התור ייעצר אחרי השיחה הנוכחית",
        "already_ended": "התור כבר הסתיים",
        "no_active": "אין תור פעיל",
        "no_access": "אין גישה לתור זה",
        "not_found": "התור לא נמצא",
        "bad_id": "מזהה תור לא תקין",
        "bad_request": "בקשה לא תקינה",
        "unauthorized": "נדרשת הזדהות",
        "lease_lost": "התור כבר אינו פעיל",
        "locked": "התור תפוס כרגע, נסו שוב בעוד רגע",
        "read_only": "השרת במצב קריאה בלבד (שרת גיבוי); נסו שוב בעוד רגע",
        "unavailable": "התור אינו זמין כרגע בשל הגדרת מסד הנתונים; פנו למנהל המערכת",
    },
    "en": {
        "force_cancelled": "Queue cancelled immediately ({n} calls cancelled)",
        "cancelled": "Queue cancelled ({n} calls cancelled)",
        "cancel_requested": "Cancellation requested; the queue stops after the current call",
        "already_ended": "The queue has already ended",
        "no_active": "No active queue",
        "no_access": "You have no access to this queue",
        "not_found": "Queue not found",
        "bad_id": "Invalid queue id",
        "bad_request": "Invalid request",
        "unauthorized": "Authentication required",
        "lease_lost": "The queue is no longer active",
        "locked": "The queue is busy right now; try again in a moment",
        "read_only": "The database is read-only right now (a standby); try again in a moment",
        "unavailable": "The queue is unavailable (database setup problem); tell an administrator",
    },
}

#: The key in :data:`MESSAGES` of each error's text, by SQLSTATE: the one thing the web adds to
#: the error table. A SQLSTATE missing here fails at import, not in a request.
_TEXT_BY_SQLSTATE = {
    "OH400": "bad_request",
    "OH403": "no_access",
    "OH404": "not_found",
    "OH409": "lease_lost",
    "OH423": "locked",
    "OH428": "unavailable",
    "OH503": "read_only",
    "OHS01": "unavailable",
}


@dataclass(frozen=True)
class HttpError:
    """How the web answers an error: its HTTP status and the key of its text."""

    status: int
    text: str


#: SQLSTATE -> :class:`HttpError`, derived from :data:`outbound_heartbeat.errors.BY_SQLSTATE`.
ERRORS: Mapping[str, HttpError] = MappingProxyType({
    sqlstate: HttpError(cls.http_status, _TEXT_BY_SQLSTATE[sqlstate])
    for sqlstate, cls in BY_SQLSTATE.items()
})


def http_error(exc: Error) -> HttpError:
    """The HTTP status and text key of a library error (the adapters' and the console's)."""
    return ERRORS[exc.sqlstate]


def messages(locale: str) -> Mapping[str, str]:
    """The message catalogue of ``locale`` (``he`` or ``en``); ValueError names the argument."""
    try:
        return MESSAGES[locale]
    except KeyError:
        raise ValueError(f"locale must be one of {sorted(MESSAGES)}, not {locale!r}") from None


@dataclass(frozen=True)
class Reply:
    """An HTTP status and its JSON body."""

    status: int
    body: dict[str, Any]


def error_reply(status: int, key: str, text: Mapping[str, str], code: str | None = None) -> Reply:
    return Reply(status, {"error": text[key], "code": code or key})


def reply_for_error(exc: Error, text: Mapping[str, str]) -> Reply:
    """The error's status from the one table, its text in the locale, its SQLSTATE as code."""
    answer = http_error(exc)
    return error_reply(answer.status, answer.text, text, exc.sqlstate)


def parse_run_id(raw: str) -> int | None:
    """A run id from a URL segment: a positive bigint in plain decimal digits, else None."""
    if not raw.isascii() or not raw.isdigit() or len(raw) > 19:
        return None
    value = int(raw)
    return value if 0 < value <= MAX_BIGINT else None
