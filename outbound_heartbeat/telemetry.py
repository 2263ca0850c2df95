"""OpenTelemetry spans (optional extra ``otel``): one span around each call that claims,
releases, cancels, sweeps or reads the active run (where stale runs are stopped), one span for
a transition another call caused (a stale stop found by a heartbeat), and one for a lease the
worker lost. The audit events a call caused become span events and, for a single event, span
attributes (``outbound_heartbeat.event``, ``.run_id``, ``.business_id``, ``.worker_id``,
``.detail.<key>``).

Without ``opentelemetry-api`` installed, or without a tracer provider configured by the app,
every function here is a no-op: the library never configures OpenTelemetry itself.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from typing import Any

from .records import Event

__all__ = ["SPANNED_CALLS", "call_span", "lease_lost", "record_events"]

try:
    from opentelemetry import trace
    from opentelemetry.trace import SpanKind, Status, StatusCode
except ImportError:  # the extra is not installed
    trace = None  # type: ignore[assignment]

TRACER = "outbound_heartbeat"
PREFIX = "outbound_heartbeat."

#: Calls that get a span of their own (the frequent worker calls only when they transition).
SPANNED_CALLS = frozenset(
    {"claim_run", "finish_run", "force_cancel", "request_cancel", "cleanup_stuck_runs",
     "get_active_run"}
)


def _tracer() -> Any:
    from . import __version__

    return trace.get_tracer(TRACER, __version__)


def _event_attributes(event: Event) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        PREFIX + "event": event.event,
        PREFIX + "run_id": event.run_id,
        PREFIX + "business_id": event.business_id,
    }
    if event.worker_id is not None:
        attributes[PREFIX + "worker_id"] = event.worker_id
    for key, value in event.detail.items():
        if isinstance(value, bool | int | float | str):
            attributes[f"{PREFIX}detail.{key}"] = value
        elif value is not None:
            attributes[f"{PREFIX}detail.{key}"] = json.dumps(value, sort_keys=True)
    return attributes


class CallSpan:
    """The span of one call (or nothing when tracing is off)."""

    def __init__(self, name: str, span: Any) -> None:
        self.name = name
        self.span = span

    def events(self, events: Sequence[Event]) -> None:
        """Attaches the audit events the call caused; a non-spanned call that caused
        transitions gets a short span of its own for them."""
        if trace is None or not events:
            return
        if self.span is None:
            record_events(self.name, events)
            return
        _annotate(self.span, events)


def _annotate(span: Any, events: Sequence[Event]) -> None:
    for event in events:
        span.add_event(event.event, _event_attributes(event))
    if len(events) == 1:
        span.set_attributes(_event_attributes(events[0]))
    else:
        span.set_attribute(PREFIX + "events", len(events))


@contextlib.contextmanager
def call_span(name: str) -> Iterator[CallSpan]:
    """Around one API call: a span ``outbound_heartbeat.<name>`` when it is a spanned call."""
    if trace is None or name not in SPANNED_CALLS:
        yield CallSpan(name, None)
        return
    with _tracer().start_as_current_span(
        PREFIX + name, kind=SpanKind.CLIENT, attributes={"db.system": "postgresql"}
    ) as span:
        yield CallSpan(name, span)


def record_events(call: str, events: Sequence[Event]) -> None:
    """A span for transitions a frequent call caused (a heartbeat that found its run stale)."""
    if trace is None or not events:
        return
    with _tracer().start_as_current_span(
        PREFIX + events[0].event, attributes={PREFIX + "call": call}
    ) as span:
        _annotate(span, events)


def lease_lost(run_id: int, lease_epoch: int, worker_id: str, reason: str) -> None:
    """A span marking the moment a worker learned its lease is lost."""
    if trace is None:
        return
    with _tracer().start_as_current_span(
        PREFIX + "lease_lost",
        attributes={
            PREFIX + "run_id": run_id,
            PREFIX + "lease_epoch": lease_epoch,
            PREFIX + "worker_id": worker_id,
            PREFIX + "reason": reason,
        },
    ) as span:
        span.set_status(Status(StatusCode.ERROR, reason))
