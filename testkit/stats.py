"""Percentiles, a latency summary and jitter, with nothing but the standard library."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any


def percentile(ordered: Sequence[float], q: float) -> float:
    """The q-th percentile (0–100) of an already sorted sequence, interpolating linearly
    between the two nearest ranks (numpy's default; q=50 is the median); NaN when empty."""
    if not ordered:
        return math.nan
    pos = (len(ordered) - 1) * q / 100.0
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def percentiles(samples: Iterable[float], *qs: float, scale: float = 1.0) -> tuple[float, ...]:
    """Several percentiles of unsorted `samples`, each multiplied by `scale` (1000: seconds
    to milliseconds)."""
    ordered = sorted(samples)
    return tuple(percentile(ordered, q) * scale for q in qs)


def summary(samples: Iterable[float], errors: int = 0) -> dict[str, Any]:
    """count, errors, p50/p95/p99/max/mean of latency samples in milliseconds."""
    ordered = sorted(samples)
    out: dict[str, Any] = {"count": len(ordered), "errors": errors}
    if ordered:
        out.update(p50=round(percentile(ordered, 50), 3), p95=round(percentile(ordered, 95), 3),
                   p99=round(percentile(ordered, 99), 3), max=round(ordered[-1], 3),
                   mean=round(sum(ordered) / len(ordered), 3))
    else:
        out.update(p50=None, p95=None, p99=None, max=None, mean=None)
    return out


def rfc3550_jitter(pairs: Iterable[tuple[int, int]]) -> float:
    """Interarrival jitter (RFC 3550 §6.4.1) in ms from (send_ns, arrival_ns) pairs taken in
    arrival order: J += (|D| - J) / 16 with D the change in transit time."""
    jitter = 0.0
    last: int | None = None
    for sent, arrived in pairs:
        transit = arrived - sent
        if last is not None:
            jitter += (abs(transit - last) - jitter) / 16.0
        last = transit
    return jitter / 1e6
