"""The Python-side argument checks (outbound_heartbeat.arguments) with no server: each refusal
is an InvalidArgument naming the argument, for the values psycopg would otherwise send as
something else (1.5 rounded, True as a boolean, an id as text, an int past bigint, a lone
surrogate). That the public calls run them before anything is sent, and that the SQL refuses
the same values from psql: tests/integration/test_arguments.py, test_bad_input.py."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest

from outbound_heartbeat import InvalidArgument
from outbound_heartbeat import arguments as check


def refused(call: Any, *args: Any, **kwargs: Any) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as exc:
        call(*args, **kwargs)
    return exc.value


@pytest.mark.parametrize("value", [True, False, 1.0, 1.5, Decimal(1), "1", None, [1]])
def test_an_integer_is_an_int_and_nothing_else(value: Any) -> None:
    exc = refused(check.integer, "run_id", value)
    assert exc.argument == "run_id" and exc.message.startswith("run_id must be an integer")


def test_integer_bounds_are_inclusive_and_named() -> None:
    assert check.bigint("run_id", check.MAX_BIGINT) == check.MAX_BIGINT
    assert check.bigint("run_id", check.MIN_BIGINT) == check.MIN_BIGINT
    exc = refused(check.bigint, "run_id", check.MAX_BIGINT + 1)
    assert str(check.MAX_BIGINT) in exc.message and exc.argument == "run_id"
    assert check.integer("limit", 1, minimum=1, maximum=10) == 1
    assert refused(check.integer, "limit", 11, minimum=1, maximum=10).argument == "limit"
    assert refused(check.bigint, "business_id", 0, minimum=1).argument == "business_id"
    assert check.optional_bigint("business_id", None) is None


def test_a_boolean_is_true_or_false() -> None:
    assert check.boolean("share", True) is True
    for value in (1, 0, "true", None):
        assert refused(check.boolean, "share", value).argument == "share"


@pytest.mark.parametrize("value", ["", " ", "\t\n", "\u200b", "\ufeff", "\u3164", "\u2800",
                                   "\u00a0\u2003", "\u200d\u200c"])
def test_blank_means_nothing_visible(value: str) -> None:
    assert check.is_blank(value)
    assert refused(check.text, "worker_id", value, blank=False).message.endswith(
        "must not be empty or blank")


@pytest.mark.parametrize("value", ["w", " w ", "עברית", "\u200bw", "😀"])
def test_visible_text_is_not_blank(value: str) -> None:
    assert not check.is_blank(value)
    assert check.text("worker_id", value, blank=False) == value


def test_text_postgresql_cannot_store_is_refused() -> None:
    assert "unpaired surrogates" in refused(check.text, "reason", "a\ud800b").message
    assert "NUL" in refused(check.text, "reason", "a\x00b").message
    assert "string" in refused(check.text, "reason", b"bytes").message
    assert refused(check.text, "reason", "x" * 11, max_length=10).message.endswith("not 11")
    assert check.text("reason", "x" * 10, max_length=10) == "x" * 10
    assert check.optional_text("reason", None) is None


def test_an_interval_is_positive_and_at_most_100_years() -> None:
    assert check.interval("stale_after", check.MAX_INTERVAL) == timedelta(days=36_000)
    assert check.interval("stale_after", timedelta(microseconds=1)) == timedelta(microseconds=1)
    for value in (timedelta(0), timedelta(seconds=-1), check.MAX_INTERVAL + timedelta(microseconds=1)):
        assert refused(check.interval, "stale_after", value).argument == "stale_after"
    assert "timedelta" in refused(check.interval, "stale_after", 30).message
    assert check.optional_interval("stale_after", None) is None


def test_rows_are_lists_or_tuples_of_one_width() -> None:
    assert check.rows("leases", [(1, "w", 2), [3, "w", 4]], 3) == [(1, "w", 2), (3, "w", 4)]
    assert check.rows("leases", (), 3) == []
    assert "item 1" in refused(check.rows, "leases", [(1, "w", 2), (3, "w")], 3).message
    assert refused(check.rows, "leases", "abc", 3).argument == "leases"
    assert refused(check.rows, "leases", [{1, 2, 3}], 3).argument == "leases"


def test_a_json_array_holds_json_values_postgresql_accepts() -> None:
    assert check.json_array("jobs", ({"n": 1}, [None, True, 1.5, "ש"])) == [
        {"n": 1}, [None, True, 1.5, "ש"]]
    assert "JSON array" in refused(check.json_array, "jobs", {"n": 1}).message
    assert "JSON values" in refused(check.json_array, "jobs", [float("nan")]).message
    assert "JSON values" in refused(check.json_array, "jobs", [object()]).message
    assert "unpaired surrogates" in refused(check.json_array, "jobs", ["\udc00"]).message
    assert "NUL" in refused(check.json_array, "jobs", [{"k": "a\x00"}]).message
