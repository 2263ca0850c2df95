"""The samples of ``outbound_heartbeat.metrics()`` for Prometheus, through ``prometheus_client``.

An app that already serves ``/metrics`` registers a :class:`MetricsCollector` in its own
registry, and our samples appear there, computed by one ``metrics()`` call per scrape:

    from prometheus_client import REGISTRY
    REGISTRY.register(MetricsCollector(pool))

The CLI's ``metrics`` command and the console render the same families with :func:`render`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import psycopg
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric as Family
from psycopg_pool import ConnectionPool

from . import service
from .records import Metric

__all__ = ["CONTENT_TYPE", "MetricsCollector", "families", "render"]

logger = logging.getLogger("outbound_heartbeat.prometheus")

#: The Content-Type of :func:`render`'s text (prometheus_client's text format).
CONTENT_TYPE = CONTENT_TYPE_LATEST

#: 1 when the last scrape could read the database, 0 when it could not.
UP = "outbound_heartbeat_up"


def families(samples: Iterable[Metric]) -> list[Family]:
    """Groups ``metrics()`` rows into prometheus_client metric families, in row order."""
    by_name: dict[str, Family] = {}
    for sample in samples:
        family = by_name.get(sample.name)
        if family is None:
            labels = sorted(sample.labels)
            if sample.kind == "counter":
                family = CounterMetricFamily(sample.name, sample.help, labels=labels)
            else:
                family = GaugeMetricFamily(sample.name, sample.help, labels=labels)
            by_name[sample.name] = family
        values = [str(sample.labels[k]) for k in sorted(sample.labels)]
        family.add_metric(values, sample.value)  # type: ignore[attr-defined]
    return list(by_name.values())


def _up(value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(UP, "1 when outbound_heartbeat.metrics() could be read.", value=value)


Source = ConnectionPool | psycopg.Connection[Any] | str


class MetricsCollector:
    """A ``prometheus_client`` collector reading ``outbound_heartbeat.metrics()`` per scrape.

    ``source`` is a ``ConnectionPool``, a connection (shared safely: each call holds it for
    its statement), or a DSN (a short connection per scrape). A scrape that cannot reach the
    database yields ``outbound_heartbeat_up 0`` and logs a warning instead of failing the
    app's whole ``/metrics``.
    """

    def __init__(self, source: Source) -> None:
        self._connections = _connections(source)

    def collect(self) -> Iterator[Family]:
        try:
            with self._connections() as conn:
                samples = service.metrics(conn)
        except (psycopg.Error, OSError) as exc:
            logger.warning("[METRICS] outbound_heartbeat.metrics() failed: %s", exc)
            yield _up(0)
            return
        yield _up(1)
        yield from families(samples)


def _connections(source: Source) -> Callable[[], AbstractContextManager[Any]]:
    if isinstance(source, str):
        return lambda: psycopg.connect(
            source, autocommit=True, connect_timeout=5, prepare_threshold=None
        )
    if isinstance(source, ConnectionPool):
        return source.connection
    if isinstance(source, psycopg.Connection):
        return lambda: contextlib.nullcontext(source)
    raise TypeError(f"source must be a pool, a connection or a DSN, not {source!r}")


class _Fixed:
    def __init__(self, samples: Iterable[Metric]) -> None:
        self.samples = list(samples)

    def collect(self) -> Iterator[Family]:
        yield from families(self.samples)


def render(samples: Iterable[Metric]) -> str:
    """The text exposition of ``metrics()`` rows (what the CLI prints)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(samples))
    return generate_latest(registry).decode("utf-8")
