"""The console's rendering rules with no server (outbound_heartbeat.console.render, .stream):
the heartbeat bar's colour, durations and times as the pages print them, HTML escaping, an
audit event in words, one server-sent event frame, the stream slots. The pages themselves,
served from real data: tests/integration/test_console.py, test_console_hardening.py, and in a
browser tests/e2e/test_console_browser.py."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest

from outbound_heartbeat.console import render
from outbound_heartbeat.console.stream import StreamSlots, frame
from outbound_heartbeat.records import AuditEvent

from ..console_support import sse_events

THIRTY = timedelta(seconds=30)


def test_a_beat_is_missed_after_the_default_interval_and_its_slack() -> None:
    assert render.late_after(THIRTY) == 2.0 + render.LATE_SLACK  # interval min(2 s, 10 s)
    assert render.late_after(timedelta(seconds=3)) == 1.0 + render.LATE_SLACK  # stale_after / 3
    assert render.late_after(timedelta(seconds=60 * 60)) == 2.0 + render.LATE_SLACK


@pytest.mark.parametrize(("age", "stale", "level"), [
    (0.0, False, "ok"), (2.99, False, "ok"), (3.0, False, "warn"), (22.49, False, "warn"),
    (22.5, False, "red"), (0.0, True, "red"), (31.0, False, "red"),
])
def test_the_bar_is_ok_then_amber_then_red(age: float, stale: bool, level: str) -> None:
    assert render.bar_level(age, THIRTY, stale) == level


@pytest.mark.parametrize(("value", "text"), [
    (None, "-"), (timedelta(seconds=1.25), "1.2 s"), (timedelta(seconds=119.9), "119.9 s"),
    (timedelta(seconds=120), "2.0 min"), (timedelta(hours=2), "2.0 h"),
])
def test_durations_print_in_the_unit_that_reads(value: timedelta | None, text: str) -> None:
    assert render.seconds(value) == text


def test_times_print_in_utc_whatever_their_zone() -> None:
    at = datetime(2026, 3, 1, 2, 3, 4, 567890, tzinfo=timezone(timedelta(hours=2)))
    assert render.stamp(at) == "2026-03-01 00:03:04.567"
    assert render.when(at) == "2026-03-01 00:03:04"
    assert render.when(None) == "-"


def test_html_escapes_markup_and_quotes() -> None:
    assert render.h('<script>"x" & \'y\'</script>') == (
        "&lt;script&gt;&quot;x&quot; &amp; &#x27;y&#x27;&lt;/script&gt;")
    assert render.h(None) == "" and render.h(5) == "5"


def test_an_event_in_words_where_it_matters_else_its_json() -> None:
    at = datetime(2026, 1, 1, tzinfo=UTC)
    stop = AuditEvent(1, 7, 3, "stale_stopped", None,
                      {"jobs_failed": 2, "reason": "stale_heartbeat", "extra": "שלום"}, at)
    assert render.describe_event(stop, timedelta(seconds=45)) == (
        'heartbeat age at the stop: 45.0 s; jobs failed: 2; reason: stale_heartbeat;'
        ' {"extra": "שלום"}')
    assert render.describe_event(AuditEvent(2, 7, 3, "claimed", "w", {}, at)) == ""
    assert stop.detail["jobs_failed"] == 2  # the event itself is not changed


def test_metric_labels_and_values() -> None:
    assert render.format_labels({"status": "running", "business": 3}) == (
        "business=3, status=running")
    assert render.format_value(3.0) == "3" and render.format_value(0.12345) == "0.123"


def test_a_frame_is_one_ascii_line_of_json_for_any_value() -> None:
    for value in ["\r\n\r\n", "</script>", "\u2028", "עברית", {"a": [1, None]}, ""]:
        raw = frame("runs", value)
        text = raw.decode("ascii")
        assert text.count("\n") == 3 and "\r" not in text
        assert sse_events(text + "\n") == [("runs", json.dumps(value))]
    with pytest.raises(ValueError, match="event"):
        frame("runs\nevent: x", "")


def test_stream_slots_hold_both_limits_and_release_once() -> None:
    slots = StreamSlots(total=2, per_viewer=1)
    release_a = slots.take("a")
    assert callable(release_a)
    assert slots.take("a") == "max_streams_per_viewer"
    release_b = slots.take("b")
    assert callable(release_b)
    assert slots.take("c") == "max_streams"
    release_a()
    release_a()  # idempotent: frees one slot, not two
    assert callable(slots.take("c"))
    assert slots.take("d") == "max_streams"
    with pytest.raises(ValueError, match="max_streams"):
        StreamSlots(total=0, per_viewer=1)
    with pytest.raises(ValueError, match="max_streams_per_viewer"):
        StreamSlots(total=1, per_viewer=True)
