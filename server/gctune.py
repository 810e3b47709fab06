"""Garbage-collector settings for long-running processes holding thousands of connections.

Full collections over every live session stalled all circles at once for ~300 ms (fan-out
p99 307 ms at 200 circles × 8 members); with the objects alive at start frozen out of the
collector and collections rarer, p99 was 10–14 ms on the same run (`python -m loadtest.fanout`).
Load generators use it too, so their own pauses are not reported as the server's latency.
"""

from __future__ import annotations

import gc


def tune_gc() -> None:
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)
