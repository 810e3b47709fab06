"""Prometheus metrics of the server. Labels carry codes and command types only: no names,
no titles, no addresses."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector


class _Frames(Collector):
    """Frames in and out: plain integers bumped on the hot path (a frame to each member of
    a circle for every event), read only when /metrics is scraped."""

    def __init__(self) -> None:
        self.received = 0
        self.sent = 0

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily("lingkar_frames_in", "Frames received from clients", value=self.received)
        yield CounterMetricFamily("lingkar_frames_out", "Frames sent to clients", value=self.sent)


FRAMES = _Frames()
REGISTRY.register(FRAMES)

CONNECTIONS = Gauge("lingkar_connections", "Open WebSocket connections")
CIRCLES = Gauge("lingkar_circles", "Circles with at least one connection in this process")
ERRORS = Counter("lingkar_errors_total", "Error frames sent, by code", ["code"])
CLOSES = Counter("lingkar_closes_total", "Connections closed by the server, by close code", ["code"])
COMMAND_SECONDS = Histogram(
    "lingkar_command_seconds", "Time to apply and save one command", ["command"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
_COMMAND_TIMERS: dict[str, Histogram] = {}


def command_took(name: str, seconds: float) -> None:
    timer = _COMMAND_TIMERS.get(name)
    if timer is None:
        timer = _COMMAND_TIMERS[name] = COMMAND_SECONDS.labels(name)
    timer.observe(seconds)
