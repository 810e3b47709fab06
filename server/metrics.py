"""Prometheus metrics of the server (behind the organizer key, DESIGN §10). Labels carry codes
only: no names, no titles, no addresses, and nothing that tells a quiet leave, a private note or
a removal apart from other commands — on a small deployment a series that moves when one
happens would say so to whoever watches it."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client import REGISTRY, Counter, Gauge, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString


class _Frames(Collector):
    """Frames in and out: plain integers bumped on the hot path (a frame to each member of
    a circle for every event), read only when /metrics is scraped."""

    def __init__(self) -> None:
        self.received = 0
        self.sent = 0

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily("lingkar_frames_in", "Frames received from clients", value=self.received)
        yield CounterMetricFamily("lingkar_frames_out", "Frames sent to clients", value=self.sent)


# A `_created` series per label value would time the first of each kind of event.
disable_created_metrics()

FRAMES = _Frames()
REGISTRY.register(FRAMES)

CONNECTIONS = Gauge("lingkar_connections", "Open WebSocket connections")
WRITE_PATH = Gauge("lingkar_ws_write_path",
                   "1 for the way WebSocket frames leave: direct (into uvicorn's protocol) or asgi", ["path"])
CIRCLES = Gauge("lingkar_circles", "Circles with at least one connection in this process")
ERRORS = Counter("lingkar_errors_total", "Error frames sent, by code", ["code"])
CLOSES = Counter("lingkar_closes_total",
                 "Connections closed by the server, by close code; a member's stay ending, for "
                 "whatever reason, is 'over'", ["code"])
# Codes that end a member's stay, counted together: 4403 alone would count removals.
_STAY_OVER = frozenset({4000, 4001, 4403})


class _CommandSeconds(Collector):
    """`lingkar_command_seconds`, a histogram observed once per command: plain counters
    bumped on the hot path (no lock, no per-bucket object), read only when scraped."""

    BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

    def __init__(self) -> None:
        self.counts = [0] * (len(self.BUCKETS) + 1)  # the last one: above every bound
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.BUCKETS, seconds)] += 1  # le: seconds ≤ bound
        self.sum += seconds

    def collect(self) -> Iterator[HistogramMetricFamily]:
        cumulative, total = [], 0
        for bound, count in zip((*map(floatToGoString, self.BUCKETS), "+Inf"), self.counts, strict=True):
            total += count
            cumulative.append((bound, total))
        yield HistogramMetricFamily("lingkar_command_seconds",
                                    "Time to apply and save one command, whichever it is",
                                    buckets=cumulative, sum_value=self.sum)


COMMAND_SECONDS = _CommandSeconds()
REGISTRY.register(COMMAND_SECONDS)


def close_label(code: int) -> str:
    return "over" if code in _STAY_OVER else str(code)


class SessionMetrics:
    """The sessions' `Observer`: counts only."""

    def frame_in(self) -> None:
        FRAMES.received += 1

    def frame_out(self) -> None:
        FRAMES.sent += 1

    def error(self, code: str) -> None:
        ERRORS.labels(code).inc()

    def closed(self, code: int) -> None:
        CLOSES.labels(close_label(code)).inc()

    def command_took(self, seconds: float) -> None:
        COMMAND_SECONDS.observe(seconds)
