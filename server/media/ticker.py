"""One timer for many periodic jobs of the relay (ICE consent checks, sender reports).

A job per member on its own ``loop.call_later`` wakes the event loop once per member per
period: at 100 listen-only members, ICE consent (every ~5 s) and sender reports (every ~5 s)
were 40 wake-ups a second with nothing else to do. A `Ticker` wakes at most once per
`granularity()` seconds and runs every job whose time has come, so a job runs up to one
granularity late (a fifth of its period, as the callers set it: RFC 7675's consent and
RFC 3550's report intervals are randomised over a wider window than that anyway).

The jobs due at one wake-up run `SLICE` at a time, one slice per turn of the event loop:
at 100 listeners a wake-up finds about twenty consent checks due, and run back to back
they held a speaker's packet (and every copy of it) for a millisecond or two, about once a
second: the relay's latency tail. Between slices the loop reads what arrived.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable

logger = logging.getLogger(__name__)

SLICE = 8  # jobs per turn of the event loop (a consent check or a peer's reports: ~50-100 µs each)


class Ticker:
    """Runs ``job()`` once at, or up to `granularity()` seconds after, the loop time given
    to `at`; a job may call `at` again from inside itself."""

    def __init__(self, granularity: Callable[[], float]) -> None:
        self._granularity = granularity
        self._due: dict[Callable[[], None], float] = {}
        self._handle: asyncio.TimerHandle | None = None
        self._when = 0.0  # loop time the handle fires at
        self._running = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: deque[Callable[[], None]] = deque()  # due at the last wake-up, not run yet
        self._now = 0.0  # that wake-up's loop time
        self.wakeups = 0

    def at(self, when: float, job: Callable[[], None]) -> None:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a new event loop (tests run one each): the old one's jobs died with it
            self._loop, self._due, self._handle, self._pending = loop, {}, None, deque()
        self._due[job] = when
        if not self._running:
            self._arm(loop, max(when, loop.time() + self._granularity()))

    def cancel(self, job: Callable[[], None]) -> None:
        self._due.pop(job, None)
        if not self._due and self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def __contains__(self, job: object) -> bool:
        return job in self._due

    def __len__(self) -> int:
        return len(self._due)

    def _arm(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if self._handle is not None:
            if self._when <= when:
                return
            self._handle.cancel()
        self._when = when
        self._handle = loop.call_at(when, self._run)

    def _run(self) -> None:
        self._handle = None
        self.wakeups += 1
        loop = asyncio.get_running_loop()
        self._now = now = loop.time()
        had = bool(self._pending)
        self._pending.extend(job for job, when in self._due.items() if when <= now)
        if not had:  # else a slice is already on its way
            self._slice()

    def _slice(self) -> None:
        """Run up to `SLICE` of the jobs due at the last wake-up (skipping any cancelled or
        moved since); the rest on the next turn of the loop."""
        loop = asyncio.get_running_loop()
        pending, due = self._pending, self._due
        ran = 0
        self._running = True
        try:
            while pending and ran < SLICE:
                job = pending.popleft()
                when = due.get(job)
                if when is None or when > self._now:
                    continue
                del due[job]
                ran += 1
                try:
                    job()
                except Exception:
                    logger.exception("media: a periodic job failed")
        finally:
            self._running = False
        if pending:
            loop.call_soon(self._slice)
        elif due:
            self._arm(loop, max(min(due.values()), loop.time() + self._granularity()))
