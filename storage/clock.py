"""Time for the room manager: what time it is, and calling something back at a given time.

The rules never read a clock; the manager asks a `Clock`. `RealClock` uses the running event
loop; `FakeClock` lets tests step time by hand (`await clock.advance(ms)`) instead of sleeping.
Times are integers in epoch milliseconds, as everywhere in `rooms/`.
"""

from __future__ import annotations

import asyncio
import heapq
import inspect
import itertools
import time
from collections.abc import Callable
from typing import Protocol


class TimerHandle(Protocol):
    def cancel(self) -> None: ...


# A timer callback may return an awaitable (e.g. the task of a `Tick`); `FakeClock.advance`
# awaits it so a test sees the tick's effects as soon as `advance` returns.
TimerCallback = Callable[[], object]


class Clock(Protocol):
    def now(self) -> int:
        """Epoch milliseconds."""

    def call_at(self, when_ms: int, callback: TimerCallback) -> TimerHandle:
        """Call `callback` once at `when_ms` (at once if that is past)."""


class RealClock:
    def now(self) -> int:
        return time.time_ns() // 1_000_000

    def call_at(self, when_ms: int, callback: TimerCallback) -> TimerHandle:
        delay = max(0.0, (when_ms - self.now()) / 1000)
        return asyncio.get_running_loop().call_later(delay, callback)


class _FakeTimer:
    __slots__ = ("when", "seq", "callback", "cancelled")

    def __init__(self, when: int, seq: int, callback: TimerCallback) -> None:
        self.when = when
        self.seq = seq
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def __lt__(self, other: _FakeTimer) -> bool:
        return (self.when, self.seq) < (other.when, other.seq)


class FakeClock:
    """A clock that moves only when told to. Timers run in time order, ties in arming order."""

    def __init__(self, start_ms: int = 1_700_000_000_000) -> None:
        self._now = start_ms
        self._timers: list[_FakeTimer] = []
        self._seq = itertools.count()
        self._armed: list[asyncio.Future[None]] = []  # `wait_armed` callers

    def now(self) -> int:
        return self._now

    def call_at(self, when_ms: int, callback: TimerCallback) -> TimerHandle:
        timer = _FakeTimer(when_ms, next(self._seq), callback)
        heapq.heappush(self._timers, timer)
        waiters, self._armed = self._armed, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        return timer

    async def wait_armed(self, when_ms: int, count: int = 1) -> None:
        """Return once `count` live timers are armed for `when_ms` (awaiting each arming)."""
        loop = asyncio.get_running_loop()
        while sum(1 for t in self._timers if t.when == when_ms and not t.cancelled) < count:
            waiter = loop.create_future()
            self._armed.append(waiter)
            await waiter

    @property
    def pending(self) -> int:
        return sum(1 for t in self._timers if not t.cancelled)

    async def advance(self, ms: int) -> None:
        """Move time forward by `ms`, running every timer that falls due (including timers
        armed by those callbacks) and awaiting whatever they return."""
        target = self._now + ms
        while self._timers and self._timers[0].when <= target:
            timer = heapq.heappop(self._timers)
            if timer.cancelled:
                continue
            self._now = max(self._now, timer.when)
            result = timer.callback()
            if inspect.isawaitable(result):
                await result
        self._now = target
