"""Rescue SLOs in metrics(): the detection latency histogram (a run's heartbeat age when it was
stopped as stale) and calls settled by callback and by timeout, counted where the stop or the
settlement is recorded, on a real PostgreSQL, and rendered as Prometheus families."""

from __future__ import annotations

import time
from typing import Any

import psycopg
from prometheus_client.parser import text_string_to_metric_families

from outbound_heartbeat import service
from outbound_heartbeat.prometheus import render
from outbound_heartbeat.records import Claim

from ..helpers import backdate_heartbeat

Conn = psycopg.Connection[Any]

HIST = "outbound_heartbeat_detection_latency_seconds"
BOUNDS = ["15", "30", "45", "60", "90", "120", "300", "600", "1800", "3600", "+Inf"]


def start(conn: Conn, business_id: int, jobs: int = 2) -> Claim:
    run = service.create_run(conn, business_id, [{"n": i} for i in range(jobs)])
    claim = service.claim_run(conn, f"w{business_id}", run.id)
    assert claim is not None
    return claim


def latency(conn: Conn) -> tuple[dict[str, float], float]:
    """The histogram's buckets by upper bound, and its sum, as metrics() returns them."""
    rows = [m for m in service.metrics(conn) if m.name.startswith(HIST)]
    assert {m.kind for m in rows} == {"histogram"}
    buckets = {m.labels["le"]: m.value for m in rows if m.name == HIST + "_bucket"}
    assert list(buckets) == BOUNDS  # every bucket, in order, zeros included
    (total,) = [m.value for m in rows if m.name == HIST + "_sum"]
    return buckets, total


def settled(conn: Conn) -> dict[str, float]:
    return {m.labels["by"]: m.value for m in service.metrics(conn)
            if m.name == "outbound_heartbeat_calls_settled_total"}


def test_a_stale_stop_records_the_heartbeats_age_in_the_histogram(conn: Conn) -> None:
    assert latency(conn) == ({b: 0 for b in BOUNDS}, 0)

    # A dead worker's run found stale by the read path (get_active_run) 100 s after its beat.
    dead = start(conn, 1)
    backdate_heartbeat(conn, dead.run_id, 100)
    assert service.get_active_run(conn, 1) is None
    buckets, total = latency(conn)
    assert buckets == {b: (1 if b in ("120", "300", "600", "1800", "3600", "+Inf") else 0) for b in BOUNDS}
    assert 100 <= total < 110

    # One reclaimed by the sweep 40 s after its beat: the 45 s bucket and up.
    swept = start(conn, 2)
    backdate_heartbeat(conn, swept.run_id, 40)
    assert [r.reason for r in service.cleanup_stuck_runs(conn)] == ["stale_heartbeat"]
    buckets, total = latency(conn)
    assert [buckets[b] for b in BOUNDS] == [0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 2]
    assert 140 <= total < 160

    # Ends that are not a detection add nothing: a force-cancel, a worker's restart, a finish.
    cancelled = start(conn, 3)
    backdate_heartbeat(conn, cancelled.run_id, 500)
    service.force_cancel(conn, cancelled.run_id)
    restarted = start(conn, 4)
    backdate_heartbeat(conn, restarted.run_id, 500)
    assert [r.reason for r in service.cleanup_stuck_runs(conn, True, restarted.worker_id)] == ["on_startup"]
    assert latency(conn) == (buckets, total)

    # Pruning the audit trail takes nothing back: the histogram is a counter.
    conn.execute("UPDATE outbound_heartbeat.settings SET events_retention = '1 second'")
    time.sleep(1.2)
    assert service.prune_events(conn).events_deleted > 0
    assert latency(conn) == (buckets, total)

    # Rendered as one Prometheus histogram: cumulative buckets, _count and _sum.
    (family,) = [f for f in text_string_to_metric_families(render(service.metrics(conn)))
                 if f.name == HIST]
    assert family.type == "histogram"
    samples = {(s.name, float(s.labels["le"]) if "le" in s.labels else None): s.value
               for s in family.samples}
    assert samples[(HIST + "_bucket", 45.0)] == 1
    assert samples[(HIST + "_bucket", float("inf"))] == 2
    assert samples[(HIST + "_count", None)] == 2
    assert abs(samples[(HIST + "_sum", None)] - total) < 1e-6


def test_calls_settled_by_callback_and_by_timeout(conn: Conn) -> None:
    assert settled(conn) == {"callback": 0, "provider": 0, "timeout": 0}
    claim = start(conn, 1, jobs=3)
    calls = [service.next_job(conn, claim.run_id, claim.worker_id, claim.lease_epoch) for _ in range(3)]
    keys = [c.call_key for c in calls if c is not None and c.call_key is not None]
    assert len(keys) == 3
    # One settled while its worker lives, then the worker dies with two calls in flight.
    assert service.resolve_call(conn, keys[0], "completed").answer == "resolved"
    backdate_heartbeat(conn, claim.run_id, 60)
    assert service.get_active_run(conn, 1) is None
    assert settled(conn) == {"callback": 1, "provider": 0, "timeout": 0}
    # The orphan's callback arrives, twice: one settlement.
    assert service.resolve_call(conn, keys[1], "failed", "busy").answer == "resolved"
    assert service.resolve_call(conn, keys[1], "failed", "busy").answer != "resolved"
    assert settled(conn) == {"callback": 2, "provider": 0, "timeout": 0}
    # The other never gets one: failed by the sweep past call_orphan_timeout.
    conn.execute("UPDATE outbound_call_jobs SET orphaned_at = now() - interval '2 hours'"
                 " WHERE status = 'in_progress'")
    service.cleanup_stuck_runs(conn)
    assert settled(conn) == {"callback": 2, "provider": 0, "timeout": 1}
    rendered = {(s.name, s.labels.get("by")): s.value
                for f in text_string_to_metric_families(render(service.metrics(conn)))
                for s in f.samples if s.name == "outbound_heartbeat_calls_settled_total"}
    assert rendered == {("outbound_heartbeat_calls_settled_total", "callback"): 2,
                        ("outbound_heartbeat_calls_settled_total", "provider"): 0,
                        ("outbound_heartbeat_calls_settled_total", "timeout"): 1}


def test_calls_settled_by_the_provider_are_counted_apart(conn: Conn) -> None:
    claim = start(conn, 1, jobs=3)
    calls = [service.next_job(conn, claim.run_id, claim.worker_id, claim.lease_epoch) for _ in range(3)]
    keys = [c.call_key for c in calls if c is not None and c.call_key is not None]
    assert service.resolve_call(conn, keys[0], "completed", source="provider").answer == "resolved"
    assert service.resolve_call(conn, keys[1], "failed", None, 1, "provider").answer == "resolved"
    assert service.resolve_call(conn, keys[2], "completed").answer == "resolved"
    # A late report changes no count: settled once.
    assert service.resolve_call(conn, keys[0], "failed", source="provider").answer == "already_resolved"
    # The worker's own finish is the job's ordinary end: not a call settled from outside.
    claim2 = start(conn, 2, jobs=1)
    job = service.next_job(conn, claim2.run_id, claim2.worker_id, claim2.lease_epoch)
    assert job is not None
    service.finish_job(conn, job.id, claim2.worker_id, claim2.lease_epoch, "completed")
    assert settled(conn) == {"callback": 1, "provider": 2, "timeout": 0}


def test_the_settings_the_alerts_compare_with_are_gauges(conn: Conn) -> None:
    def gauges() -> dict[str, tuple[str, float]]:
        return {m.name: (m.kind, m.value) for m in service.metrics(conn)
                if m.name in ("outbound_heartbeat_stale_after_seconds",
                              "outbound_heartbeat_call_orphan_timeout_seconds")}

    assert gauges() == {"outbound_heartbeat_stale_after_seconds": ("gauge", 30.0),
                        "outbound_heartbeat_call_orphan_timeout_seconds": ("gauge", 3600.0)}
    conn.execute("UPDATE outbound_heartbeat.settings SET stale_after = '45 seconds',"
                 " call_orphan_timeout = '2 hours 30 minutes'")
    assert gauges() == {"outbound_heartbeat_stale_after_seconds": ("gauge", 45.0),
                        "outbound_heartbeat_call_orphan_timeout_seconds": ("gauge", 9000.0)}
    rendered = render(service.metrics(conn))
    assert "outbound_heartbeat_stale_after_seconds 45.0" in rendered
    assert "# TYPE outbound_heartbeat_call_orphan_timeout_seconds gauge" in rendered
