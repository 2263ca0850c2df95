"""OpenTelemetry spans, read back with the SDK's in-memory exporter: claim, release,
force-cancel, cleanup and a stale stop get spans carrying the audit event; a stale stop found
by a heartbeat and a lost lease get spans of their own; a refused call's span is an error."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from outbound_heartbeat import AccessDenied, service
from outbound_heartbeat.lease_state import LeaseState

from ..helpers import backdate_heartbeat

_EXPORTER = InMemorySpanExporter()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    # The global provider can be set once per process; every test clears what it exported.
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        trace.set_tracer_provider(provider)
    _EXPORTER.clear()
    yield _EXPORTER
    _EXPORTER.clear()


def named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def test_transitions_carry_their_audit_event(
    conn: psycopg.Connection[Any], spans: InMemorySpanExporter
) -> None:
    run = service.create_run(conn, 42, [{}, {}, {}])
    claim = service.claim_run(conn, "w1", run.id)
    assert claim is not None
    (claimed,) = named(spans, "outbound_heartbeat.claim_run")
    assert claimed.attributes is not None
    assert claimed.attributes["outbound_heartbeat.event"] == "claimed"
    assert claimed.attributes["outbound_heartbeat.run_id"] == run.id
    assert claimed.attributes["outbound_heartbeat.detail.lease_epoch"] == claim.lease_epoch

    service.force_cancel(conn, run.id, business_id=42)
    (cancel,) = named(spans, "outbound_heartbeat.force_cancel")
    assert cancel.attributes is not None
    assert cancel.attributes["outbound_heartbeat.event"] == "force_cancelled"
    assert cancel.attributes["outbound_heartbeat.detail.jobs_failed"] == 3
    assert [e.name for e in cancel.events] == ["force_cancelled"]

    # Heartbeats and job calls are too frequent for a span each: none was made.
    service.heartbeat(conn, run.id, "w1", claim.lease_epoch)
    assert named(spans, "outbound_heartbeat.heartbeat") == []


def test_stale_stop_by_a_reader_and_by_a_heartbeat(
    conn: psycopg.Connection[Any], spans: InMemorySpanExporter
) -> None:
    first = service.create_run(conn, 1, [{}])
    a = service.claim_run(conn, "w1", first.id)
    second = service.create_run(conn, 2, [{}])
    b = service.claim_run(conn, "w2", second.id)
    assert a is not None and b is not None
    backdate_heartbeat(conn, first.id, 100)
    backdate_heartbeat(conn, second.id, 100)

    assert service.get_active_run(conn, 1) is None
    (read,) = named(spans, "outbound_heartbeat.get_active_run")
    assert read.attributes is not None and read.attributes["outbound_heartbeat.event"] == "stale_stopped"

    assert service.heartbeat(conn, second.id, "w2", b.lease_epoch) == "lost"
    (found,) = named(spans, "outbound_heartbeat.stale_stopped")  # a span of its own
    assert found.attributes is not None
    assert found.attributes["outbound_heartbeat.call"] == "heartbeat"
    assert found.attributes["outbound_heartbeat.run_id"] == second.id


def test_cleanup_span_lists_every_reclaimed_run(
    conn: psycopg.Connection[Any], spans: InMemorySpanExporter
) -> None:
    ids = []
    for business in (1, 2):
        run = service.create_run(conn, business, [{}])
        assert service.claim_run(conn, f"w{business}", run.id) is not None
        backdate_heartbeat(conn, run.id, 100)
        ids.append(run.id)
    service.cleanup_stuck_runs(conn)
    (sweep,) = named(spans, "outbound_heartbeat.cleanup_stuck_runs")
    assert sweep.attributes is not None and sweep.attributes["outbound_heartbeat.events"] == 2
    assert sorted(e.attributes["outbound_heartbeat.run_id"] for e in sweep.events if e.attributes) == ids


def test_refused_call_is_an_error_span(
    conn: psycopg.Connection[Any], spans: InMemorySpanExporter
) -> None:
    run = service.create_run(conn, 43, [{}])
    with pytest.raises(AccessDenied):
        service.force_cancel(conn, run.id, business_id=42)
    (span,) = named(spans, "outbound_heartbeat.force_cancel")
    assert span.status.status_code == StatusCode.ERROR


def test_lost_lease_span(conn: psycopg.Connection[Any], spans: InMemorySpanExporter) -> None:
    run = service.create_run(conn, 9, [{}])
    claim = service.claim_run(conn, "w9", run.id)
    assert claim is not None
    state = LeaseState(claim, interval=1.0, stall_after=60.0)
    state.mark_lost("the database answered 'lost'")
    state.mark_lost("again")  # learned once
    (lost,) = named(spans, "outbound_heartbeat.lease_lost")
    assert lost.attributes is not None and lost.attributes["outbound_heartbeat.run_id"] == run.id
    assert lost.status.status_code == StatusCode.ERROR
