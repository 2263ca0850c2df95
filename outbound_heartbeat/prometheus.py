"""Prometheus text exposition (format 0.0.4) of the samples of ``outbound_heartbeat.metrics()``."""

from __future__ import annotations

import math
from collections.abc import Iterable

from .records import Metric

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return str(int(value)) if value.is_integer() else repr(value)


def render(samples: Iterable[Metric]) -> str:
    """The exposition text: one HELP and TYPE line per metric name, then its samples."""
    lines: list[str] = []
    seen: set[str] = set()
    for m in samples:
        if m.name not in seen:
            seen.add(m.name)
            lines.append(f"# HELP {m.name} {m.help}")
            lines.append(f"# TYPE {m.name} {m.kind}")
        labels = ",".join(f'{k}="{_escape(str(v))}"' for k, v in sorted(m.labels.items()))
        selector = f"{m.name}{{{labels}}}" if labels else m.name
        lines.append(f"{selector} {_number(m.value)}")
    return "\n".join(lines) + "\n"
