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
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
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


def _histograms(samples: list[Metric]) -> dict[str, HistogramMetricFamily]:
    """One family per histogram of ``samples``: its ``_bucket`` rows (label ``le``, cumulative,
    ``+Inf`` the count) and its ``_sum`` row, for histograms without other labels."""
    buckets: dict[str, list[tuple[str, float]]] = {}
    sums: dict[str, float] = {}
    helps: dict[str, str] = {}
    for sample in samples:
        if sample.kind != "histogram":
            continue
        if sample.name.endswith("_bucket"):
            base = sample.name.removesuffix("_bucket")
            buckets.setdefault(base, []).append((str(sample.labels["le"]), sample.value))
        else:
            base = sample.name.removesuffix("_sum")
            sums[base] = sample.value
        helps.setdefault(base, sample.help)
    return {
        base: HistogramMetricFamily(base, helps[base], buckets=buckets.get(base, []),
                                    sum_value=sums.get(base, 0.0))
        for base in helps
    }


def families(samples: Iterable[Metric]) -> list[Family]:
    """Groups ``metrics()`` rows into prometheus_client metric families, in row order."""
    rows = list(samples)
    histograms = _histograms(rows)
    by_name: dict[str, Family] = {}
    for sample in rows:
        if sample.kind == "histogram":
            base = sample.name.removesuffix("_bucket").removesuffix("_sum")
            by_name.setdefault(base, histograms[base])
            continue
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
