"""Python-side checks of every public call's arguments, before anything is sent.

The SQL functions check their arguments too (a DBA with ``psql`` gets the same refusals); these
checks exist because some Python values never reach the SQL checks as themselves: psycopg
would send ``1.5`` as a numeric the server rounds to business 2, ``True`` as a boolean, a
``str`` id as text that fails with a raw cast error, an int past the bigint range as a numeric
that overflows, and a lone surrogate not at all (a raw ``UnicodeEncodeError``). Each check
raises :class:`~outbound_heartbeat.errors.InvalidArgument` naming the argument (``.argument``,
as the server's ``OH400`` does) and nothing is sent.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from .errors import InvalidArgument

__all__ = [
    "MAX_BIGINT",
    "MAX_INTEGER",
    "MAX_INTERVAL",
    "MIN_BIGINT",
    "bigint",
    "boolean",
    "integer",
    "interval",
    "is_blank",
    "json_array",
    "optional_bigint",
    "optional_interval",
    "optional_text",
    "text",
]

#: PostgreSQL's bigint and integer ranges: the one definition every module imports.
MIN_BIGINT = -(2**63)
MAX_BIGINT = 2**63 - 1
MAX_INTEGER = 2**31 - 1
#: The SQL bound ``interval '100 years'``: intervals compare months as 30 days, so 36,000 days.
MAX_INTERVAL = timedelta(days=36_000)

# Invisible characters outside the whitespace and format categories that still show nothing.
_FILLERS = frozenset("\u115f\u1160\u3164\uffa0\u2800")
_BLANK_CATEGORIES = frozenset({"Zs", "Zl", "Zp", "Cc", "Cf"})


def _refuse(name: str, message: str) -> InvalidArgument:
    return InvalidArgument(f"{name} {message}", argument=name)


def integer(name: str, value: Any, minimum: int = MIN_BIGINT, maximum: int = MAX_BIGINT) -> int:
    """An ``int`` (never ``bool``, ``float``, ``Decimal`` or ``str``) within the bounds."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise _refuse(name, f"must be an integer, not {type(value).__name__} {value!r}")
    if not minimum <= value <= maximum:
        raise _refuse(name, f"must be between {minimum} and {maximum}, not {value}")
    return int(value)


def bigint(name: str, value: Any, minimum: int = MIN_BIGINT) -> int:
    """An id or count the SQL takes as ``bigint``."""
    return integer(name, value, minimum, MAX_BIGINT)


def optional_bigint(name: str, value: Any, minimum: int = MIN_BIGINT) -> int | None:
    return None if value is None else bigint(name, value, minimum)


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _refuse(name, f"must be True or False, not {value!r}")
    return value


def is_blank(value: str) -> bool:
    """True when nothing visible is left: Unicode whitespace, format characters (zero-width
    space, BOM, joiners), controls and blank fillers only."""
    return all(
        ch.isspace() or ch in _FILLERS or unicodedata.category(ch) in _BLANK_CATEGORIES
        for ch in value
    )


def text(name: str, value: Any, *, max_length: int | None = None, blank: bool = True) -> str:
    """A ``str`` PostgreSQL can store: valid UTF-8 (no unpaired surrogate), no NUL."""
    if not isinstance(value, str):
        raise _refuse(name, f"must be a string, not {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _refuse(name, "must not contain unpaired surrogates") from None
    if "\x00" in value:
        raise _refuse(name, "must not contain NUL characters")
    if not blank and is_blank(value):
        raise _refuse(name, "must not be empty or blank")
    if max_length is not None and len(value) > max_length:
        raise _refuse(name, f"must be at most {max_length} characters, not {len(value)}")
    return value


def optional_text(name: str, value: Any, **kwargs: Any) -> str | None:
    return None if value is None else text(name, value, **kwargs)


def interval(name: str, value: Any) -> timedelta:
    """A positive ``timedelta`` of at most 100 years, as the SQL bounds thresholds."""
    if not isinstance(value, timedelta):
        raise _refuse(name, f"must be a timedelta, not {type(value).__name__}")
    if not timedelta(0) < value <= MAX_INTERVAL:
        raise _refuse(name, f"must be a positive interval of at most 100 years, not {value}")
    return value


def optional_interval(name: str, value: Any) -> timedelta | None:
    return None if value is None else interval(name, value)


def rows(name: str, value: Any, width: int) -> list[tuple[Any, ...]]:
    """A list or tuple of rows (lists or tuples), each of exactly ``width`` items: the leases
    of a set-based call. The items are checked by the caller, each under its own name."""
    if not isinstance(value, (list, tuple)):
        raise _refuse(name, f"must be a list or tuple of rows, not {type(value).__name__}")
    for i, row in enumerate(value):
        if not isinstance(row, (list, tuple)) or len(row) != width:
            raise _refuse(name, f"must hold rows of {width} items; item {i} is {row!r}")
    return [tuple(row) for row in value]


def json_array(name: str, value: Any) -> list[Any]:
    """A list or tuple of JSON values PostgreSQL's ``jsonb`` accepts."""
    if not isinstance(value, (list, tuple)):
        raise _refuse(name, f"must be a JSON array (list or tuple), not {type(value).__name__}")
    items: Sequence[Any] = value
    try:
        encoded = json.dumps(list(items), allow_nan=False, ensure_ascii=False)
        encoded.encode("utf-8")
    except UnicodeEncodeError:
        raise _refuse(name, "must not contain unpaired surrogates") from None
    except (TypeError, ValueError) as exc:
        raise _refuse(name, f"must hold JSON values only ({exc})") from None
    if "\\u0000" in encoded:
        raise _refuse(name, "must not contain NUL characters")
    return list(items)
