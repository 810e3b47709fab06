"""The embedded store: circles in a dict in this process, events to local subscribers.

It keeps the same promises as `storage.redis_store.RedisStore` (one test suite runs on both):
compare-and-set saves, a capped log of the last `max_versions` saved versions per circle, and
circles that nobody saved for `idle_seconds` disappear (checked lazily, on access).

Privacy at rest (DESIGN §12): the log keeps what a replay can need and no more. An entry is
dropped once it is `keep_events_ms` old (on the next save, or by a timer when none comes), so
a member's `member_joined` (their pseudonym) is gone soon after they are
(`storage.layout.events_horizon_ms` gives the horizon for a grace period).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from storage.clock import Clock, TimerHandle
from storage.codec import state_version
from storage.layout import IDLE_SECONDS, KEEP_EVENTS_MS, MAX_VERSIONS, replay_needed
from storage.store import (
    CircleExists,
    Ephemeral,
    Lease,
    NoSuchCircle,
    Owner,
    Unsubscribe,
    VersionConflict,
    WakeUp,
)

log = logging.getLogger(__name__)


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(eq=False)
class _Room:
    version: int
    blob: bytes
    touched: int  # ms of the last create or save
    log: deque[tuple[int, tuple[bytes, ...], int]]  # (version, its events, saved at ms), per save
    trim: TimerHandle | None = None  # drops the log's entries once they are too old
    trim_due: int = 0  # when `trim` fires (ms by the store's clock)


@dataclass(eq=False)
class _Subscriber:
    on_wake: WakeUp
    on_ephemeral: Ephemeral


def kept_events(log: Sequence[tuple[int, Sequence[bytes], int]], current: int, version: int
                ) -> list[bytes]:
    """Events after `version` from a log holding one entry per saved version, contiguous up to
    `current`. Raises ReplayGap when versions after `version` are no longer in the log."""
    if not replay_needed(version, current, log[0][0] if log else None):
        return []
    return [e for v, events, _ in log if v > version for e in events]


class MemoryStore:
    def __init__(self, *, idle_seconds: float = IDLE_SECONDS, max_versions: int = MAX_VERSIONS,
                 keep_events_ms: int = KEEP_EVENTS_MS, clock: Callable[[], int] = _wall_ms,
                 timers: Clock | None = None) -> None:
        """`clock` gives the time (epoch ms); `timers` arms the trims of idle logs (by
        default the event loop, `keep_events_ms` after an entry by `clock`'s time)."""
        self._rooms: dict[str, _Room] = {}
        self._subscribers: dict[str, list[_Subscriber]] = {}
        self._idle_ms = int(idle_seconds * 1000)
        self._max_versions = max_versions
        self._keep_ms = keep_events_ms
        self._clock = clock
        self._timers = timers

    def _room(self, circle_id: str, now: int | None = None) -> _Room:
        room = self._rooms.get(circle_id)
        if room is not None and (self._clock() if now is None else now) - room.touched >= self._idle_ms:
            self._drop(circle_id)
            room = None
        if room is None:
            raise NoSuchCircle(circle_id)
        return room

    def _drop(self, circle_id: str) -> _Room | None:
        room = self._rooms.pop(circle_id, None)
        if room is not None:
            if room.trim is not None:
                room.trim.cancel()
            room.log.clear()
        return room

    def _expire_idle(self) -> None:
        """Circles nobody saved for `idle_seconds` are gone: checked on every listing and
        creation too, so one that nobody touches again does not stay for good (issue 17)."""
        now = self._clock()
        for cid in [c for c, r in self._rooms.items() if now - r.touched >= self._idle_ms]:
            self._drop(cid)

    async def create(self, circle_id: str, blob: bytes) -> None:
        version = state_version(blob)
        self._expire_idle()
        try:
            self._room(circle_id)
        except NoSuchCircle:
            self._rooms[circle_id] = _Room(version, blob, self._clock(),
                                           deque(maxlen=self._max_versions))
            return
        raise CircleExists(circle_id)

    async def load(self, circle_id: str) -> bytes:
        return self._room(circle_id).blob

    async def save(self, circle_id: str, expected_version: int, blob: bytes,
                   events: Sequence[bytes], new_version: int, fence: int | None = None) -> None:
        # `fence` needs no check: with one process, its lease is always its own.
        # One step from the check to the wake-up, with no await between: no other save of the
        # circle can come between them (no lock needed).
        now = self._clock()
        room = self._room(circle_id, now)
        if room.version == new_version and room.blob == blob:
            return  # the same save again (a retry): it already happened
        if room.version != expected_version:
            raise VersionConflict(f"{circle_id}: at {room.version}, not {expected_version}")
        kept = tuple(events)
        room.version, room.blob, room.touched = new_version, blob, now
        room.log.append((new_version, kept, now))
        self._trim(room, now)
        self._wake(circle_id, new_version, kept)

    def _trim(self, room: _Room, now: int | None = None) -> None:
        """Drop the entries that are `keep_events_ms` old; come back when the next one is."""
        if now is None:
            now = self._clock()
        log = room.log
        while log and log[0][2] <= now - self._keep_ms:
            log.popleft()
        due = log[0][2] + self._keep_ms if log else None
        if room.trim is not None:
            if due is not None and room.trim_due <= due:
                # Armed for that time or earlier (the oldest entry only ever gets younger):
                # firing early trims what is due then and arms again, so a busy circle moves
                # its timer once per `keep_events_ms`, not on every save.
                return
            room.trim.cancel()
            room.trim = None
        if due is None:
            return
        room.trim_due = due
        if self._timers is not None:
            room.trim = self._timers.call_at(due, lambda: self._trim_due(room))
        else:
            room.trim = asyncio.get_running_loop().call_later(max(due - now, 1) / 1000, self._trim_due, room)

    def _trim_due(self, room: _Room) -> None:
        room.trim = None  # it fired: armed again by `_trim` if anything is left
        self._trim(room)

    # One process holds every lease, always: the same interface as Redis, trivially ours.

    async def acquire(self, circle_id: str, owner_id: str, url: str, ttl_ms: int
                      ) -> Lease | Owner:
        self._room(circle_id)
        return Lease(circle_id, owner_id, 0, taken_over=False)

    async def announce(self, owner_id: str, url: str, ttl_ms: int) -> dict[str, str]:
        return {owner_id: url}  # one process: nobody else to hand circles to

    async def withdraw(self, owner_id: str) -> None:
        pass

    async def ask_handover(self, home_url: str, circle_id: str, to_url: str) -> None:
        pass  # one process: it is every circle's home

    async def handovers(self, home_url: str) -> dict[str, str]:
        return {}

    async def renew(self, leases: Sequence[Lease], ttl_ms: int) -> list[bool]:
        return [True for _ in leases]

    async def release(self, lease: Lease) -> None:
        return None

    async def publish_ephemeral(self, circle_id: str, event: bytes) -> None:
        for sub in list(self._subscribers.get(circle_id, ())):
            self._call(sub.on_ephemeral, circle_id, event)

    async def events_since(self, circle_id: str, version: int) -> list[bytes]:
        room = self._room(circle_id)
        return kept_events(room.log, room.version, version)

    async def delete(self, circle_id: str) -> None:
        if self._drop(circle_id) is not None:
            self._wake(circle_id, -1, None)

    async def circle_ids(self) -> list[str]:
        self._expire_idle()
        return list(self._rooms)

    async def ping(self) -> None:
        return None

    def keeps(self, circle_id: str) -> bool:
        """Whether anything of the circle is kept here (for leak checks, issue 17)."""
        return circle_id in self._rooms or circle_id in self._subscribers

    def subscribe(self, circle_id: str, on_wake: WakeUp, on_ephemeral: Ephemeral) -> Unsubscribe:
        sub = _Subscriber(on_wake, on_ephemeral)
        self._subscribers.setdefault(circle_id, []).append(sub)
        room = self._rooms.get(circle_id)
        # Active at once; the promised catch-up call comes on the next loop turn, like Redis's.
        asyncio.get_running_loop().call_soon(
            self._call_wake, sub, circle_id, room.version if room else -1)

        def unsubscribe() -> None:
            subs = self._subscribers.get(circle_id, [])
            if sub in subs:
                subs.remove(sub)
            if not subs:
                self._subscribers.pop(circle_id, None)

        return unsubscribe

    async def close(self) -> None:
        self._subscribers.clear()
        for room in self._rooms.values():
            if room.trim is not None:
                room.trim.cancel()
                room.trim = None

    def _wake(self, circle_id: str, version: int, events: Sequence[bytes] | None) -> None:
        for sub in list(self._subscribers.get(circle_id, ())):
            self._call(sub.on_wake, circle_id, version, events)

    def _call_wake(self, sub: _Subscriber, circle_id: str, version: int) -> None:
        if sub in self._subscribers.get(circle_id, ()):
            self._call(sub.on_wake, circle_id, version, None)

    @staticmethod
    def _call(callback: Callable[..., None], *args: object) -> None:
        try:
            callback(*args)
        except Exception:  # one broken subscriber must not break a save or the others
            log.exception("store subscriber failed")
