"""Prometheus metrics of the server. Labels carry codes and command types only: no names,
no titles, no addresses."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

CONNECTIONS = Gauge("lingkar_connections", "Open WebSocket connections")
CIRCLES = Gauge("lingkar_circles", "Circles with at least one connection in this process")
FRAMES_IN = Counter("lingkar_frames_in_total", "Frames received from clients")
FRAMES_OUT = Counter("lingkar_frames_out_total", "Frames sent to clients")
ERRORS = Counter("lingkar_errors_total", "Error frames sent, by code", ["code"])
CLOSES = Counter("lingkar_closes_total", "Connections closed by the server, by close code", ["code"])
COMMAND_SECONDS = Histogram(
    "lingkar_command_seconds", "Time to apply and save one command", ["command"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
