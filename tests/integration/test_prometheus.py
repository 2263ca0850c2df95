"""Metrics through prometheus_client: our collector in an app's own registry shows the same
samples as outbound_heartbeat.metrics(), one SQL call per scrape, and a database that cannot
be reached is `outbound_heartbeat_up 0`, not a failed /metrics."""

from __future__ import annotations

from typing import Any

import psycopg
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from outbound_heartbeat import service
from outbound_heartbeat.prometheus import MetricsCollector, render

from ..helpers import backdate_heartbeat


def samples_of(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_collector_in_the_apps_registry(conn: psycopg.Connection[Any], dsn: str) -> None:
    run = service.create_run(conn, 5, [{}, {}, {}])
    claim = service.claim_run(conn, "w1", run.id)
    assert claim is not None
    other = service.create_run(conn, 6, [{}])
    service.force_cancel(conn, other.id)
    backdate_heartbeat(conn, run.id, 50)

    registry = CollectorRegistry()  # the app's own, with its own metrics in it
    registry.register(MetricsCollector(dsn))
    scraped = samples_of(generate_latest(registry).decode())
    assert scraped[("outbound_heartbeat_up", ())] == 1
    assert scraped[("outbound_heartbeat_runs", (("status", "running"),))] == 1
    assert scraped[("outbound_heartbeat_runs", (("status", "cancelled"),))] == 1
    assert scraped[("outbound_heartbeat_stale_runs", ())] == 1
    assert scraped[("outbound_heartbeat_open_jobs", (("status", "queued"),))] == 3
    assert scraped[("outbound_heartbeat_events_total", (("event", "force_cancelled"),))] == 1

    # The CLI's rendering is the same families, from the same SQL rows.
    rendered = samples_of(render(service.metrics(conn)))
    scraped.pop(("outbound_heartbeat_up", ()))
    age = ("outbound_heartbeat_oldest_heartbeat_age_seconds", ())
    assert abs(rendered.pop(age) - scraped.pop(age)) < 5  # measured a moment apart
    assert rendered == scraped


def test_collector_on_a_shared_connection_and_a_pool(conn: psycopg.Connection[Any], dsn: str) -> None:
    from psycopg_pool import ConnectionPool

    service.create_run(conn, 7, [{}])
    with ConnectionPool(dsn, min_size=1, max_size=1, kwargs={"autocommit": True}) as pool:
        for source in (conn, pool):
            registry = CollectorRegistry()
            registry.register(MetricsCollector(source))
            scraped = samples_of(generate_latest(registry).decode())
            assert scraped[("outbound_heartbeat_runs", (("status", "pending"),))] == 1


def test_unreachable_database_is_up_0_not_an_error(caplog: Any) -> None:
    registry = CollectorRegistry()
    registry.register(MetricsCollector("host=127.0.0.1 port=1 dbname=x connect_timeout=2"))
    scraped = samples_of(generate_latest(registry).decode())
    assert scraped == {("outbound_heartbeat_up", ()): 0}
    assert any("[METRICS]" in r.getMessage() for r in caplog.records)
