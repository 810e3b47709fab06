"""Full collections after media connections closed, at most one every few seconds.

A closed connection leaves reference cycles inside aiortc, aioice and pyOpenSSL (the
peer connection ↔ its transports, senders and receivers; aioice's ``Connection`` ↔
``StunProtocol`` ↔ ``CandidatePair`` and cancelled tasks; pyOpenSSL's ``_VerifyHelper``):
about 110 KB each that only a full collection frees, and `server.gctune` makes full
collections rare on purpose (they stall every circle at once). The relay's own objects
are freed by reference counting (``tests/media/test_freed.py``); for the rest,
`FullCollections` runs ``gc.collect()`` once the interval since the previous one is
over, and only when connections closed since.

Objects frozen at start (``gc.freeze()``) are not visited, but every live connection is:
the pause grows with the live peers (measured with ``python -m server.media.bench``'s
relay child, one speaker and N listen-only peers, 2 CPUs: 101 peers 24-69 ms, 301 peers
136-169 ms, 601 peers 317-419 ms, about 0.6 ms per live peer), and it holds every circle's
audio. So the interval is `INTERVAL` seconds at least, and `PAUSE_FACTOR` times what the
last collection spent on live objects (at most `MAX_INTERVAL`): collections take about
1/`PAUSE_FACTOR` of the loop's time at most (0.5 %; at 600 live peers one ~360 ms pause
every ~72 s), and what waits for one is the connections closed in one interval (~110 KB
each).

``LINGKAR_MEDIA_GC_INTERVAL`` (server.config) overrides `INTERVAL` (seconds; ``off``:
never), for measuring (``python -m loadtest.soak --media-circles K``).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time

from . import metrics

logger = logging.getLogger(__name__)

BATCH = 1.0  # seconds from the close that arms a collection to it, at least
PAUSE_FACTOR = 200  # the interval is at least this many times the last collection's cost of live objects
MAX_INTERVAL = 120.0  # seconds: the interval is never longer
# seconds between two full collections at least (see README "Churn soak")
INTERVAL: float | None = 10.0


class FullCollections:
    """Runs a full collection, when `closed` was called since the previous one, once
    `interval` seconds and `PAUSE_FACTOR` times the previous one's cost of live objects
    (`MAX_INTERVAL` at most) went by since it; ``interval=None``: never."""

    def __init__(self, interval: float | None = INTERVAL) -> None:
        if interval is not None and interval < 0:
            raise ValueError("interval must not be negative")
        self.interval = interval
        self.collections = 0
        self.last_pause = 0.0  # seconds the last collection held the event loop
        self.max_pause = 0.0
        self._live_pause = 0.0  # the part of the last pause spent on live objects (estimated)
        self._last = float("-inf")  # loop time of the last collection
        self._timer: asyncio.TimerHandle | None = None

    def closed(self) -> None:
        """Connections were closed: collect once the interval since the last is over."""
        if self.interval is None or self._timer is not None:
            return
        loop = asyncio.get_running_loop()
        wait = min(MAX_INTERVAL, max(self.interval, self._live_pause * PAUSE_FACTOR))
        # a second at least: the closes of a circle that ends, or of a burst, go together
        delay = max(BATCH, self._last + wait - loop.time())
        self._timer = loop.call_later(delay, self._collect, loop)

    def _collect(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        start = time.perf_counter()
        found = gc.collect()
        pause = time.perf_counter() - start
        # Garbage makes the pause longer too, and garbage grows with the interval: only the
        # share of live objects (frozen ones are not counted, nor visited) sets the next one.
        live = len(gc.get_objects())
        self._live_pause = pause * live / (live + found) if live + found else pause
        self._last = loop.time()
        self.collections += 1
        self.last_pause = pause
        self.max_pause = max(self.max_pause, pause)
        metrics.FULL_COLLECTIONS.observe(pause)
        logger.debug("media: full collection after closed connections: %d objects, %.1f ms", found, pause * 1e3)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
