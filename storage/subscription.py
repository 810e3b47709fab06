"""Event subscriptions: each subscriber sees a circle's events once each, in version order.

One `CircleHub` per circle and process holds the one store subscription of that circle and
feeds every local `Subscription`. A wake-up from the store usually carries its events; when it
does not (right after subscribing, after a Redis reconnect) or when a version is missing, the
hub fetches them with `events_since`. A subscriber too far behind gets `Resync(state)` (send a
snapshot), and everyone gets `Closed()` when the circle is deleted.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from rooms.events import Event
from rooms.model import RoomState
from storage.codec import CorruptState, decode_event
from storage.store import NoSuchCircle, ReplayGap, Store, StoreError

log = logging.getLogger(__name__)

RETRY_SECONDS = 1.0  # after a failed fetch, try again this soon even without a wake-up


@dataclass(frozen=True, slots=True)
class Resync:
    """Events were lost to the subscriber: here is the whole state instead."""

    state: RoomState


@dataclass(frozen=True, slots=True)
class Closed:
    """The circle is gone. Nothing follows."""


Item = Event | Resync | Closed


def _same(saved: Sequence[bytes], carried: Sequence[bytes]) -> bool:
    """The wake-up carries exactly the bytes that were saved (the very objects, on the
    memory store)."""
    if len(saved) != len(carried):
        return False
    for a, b in zip(saved, carried, strict=False):  # of one length
        if a is not b and a != b:
            return False
    return True


def _unsubscribed() -> None:
    """What a hub calls to unsubscribe once it has."""


class Subscription:
    """Events of one circle after `from_version`, handed to the listener given to `listen`.
    Ephemeral events (private notes) come as they arrive, carrying the version current then."""

    def __init__(self, hub: CircleHub, from_version: int) -> None:
        self.last = from_version  # every durable event up to here was delivered
        self._hub = hub
        self._held: list[Item] = []  # delivered before `listen`
        self._listener: Callable[[Item], None] | None = None
        self._done = False

    def listen(self, listener: Callable[[Item], None]) -> None:
        """Have items handed to `listener` as they are delivered, synchronously: the hot
        fan-out path costs no task switch per subscriber. The listener must not block;
        anything delivered before this call is handed over first."""
        held, self._held = self._held, []
        for item in held:
            listener(item)
        self._listener = listener

    def encoder(self, make: Callable[[Event], bytes]) -> Callable[[Event], bytes]:
        """``make`` as the session encodes with it: ``make(event)`` made once for all of this
        process's subscribers of the circle that `event` is handed to in one delivery (a
        frame encoded once, not once per member), and forgotten when that delivery ends:
        nothing of it outlives the step. An ephemeral event (a private note) is made for
        each caller, never kept. It holds the hub, not this subscription."""
        hub = self._hub

        def once(event: Event) -> bytes:
            made = hub._made
            if made is not None and made[0] is event:
                return made[1]
            data = make(event)
            if hub._delivering and not event.ephemeral:
                hub._made = (event, data)
            return data

        return once

    async def ready(self) -> None:
        """Wait until the circle's store subscription is live: ephemeral events published
        from then on reach this subscriber (durable ones are never missed anyway)."""
        await self._hub.live.wait()

    def close(self) -> None:
        if not self._done:
            self._done = True
            self._hub.remove(self)
        # The listener is usually a bound method of the subscriber, which holds this
        # subscription: a cycle that only a full collection would free, taking the whole
        # connection with it (issue 17). Nothing is handed over once closed anyway.
        self._listener = None
        self._held = []

    def push(self, item: Item) -> None:
        if self._done:
            return
        if self._listener is None:
            self._held.append(item)
            return
        try:
            self._listener(item)
        except Exception:
            log.exception("event listener failed")


class CircleHub:
    """The one store subscription of a circle in this process, and its local subscribers.

    `on_version(v)` is told about every version seen (-1: deleted), so the manager can re-arm
    the circle's timer; `load` gives the state for a `Resync`; `on_gone(hub)` once the circle
    is deleted, `on_empty(hub)` when its last subscriber leaves (the hub itself is passed, so
    that the callbacks need not hold it)."""

    def __init__(self, store: Store, circle_id: str, *, load: Callable[[], Awaitable[RoomState]],
                 on_version: Callable[[int], None], on_gone: Callable[[CircleHub], None],
                 on_empty: Callable[[CircleHub], None] = lambda hub: None) -> None:
        self.circle_id = circle_id
        self._store = store
        self._load = load
        self._on_version = on_version
        self._on_gone = on_gone
        self._on_empty = on_empty
        self._subs: list[Subscription] = []
        self._carried: dict[int, list[Event]] = {}  # version -> events, from wake-ups
        # version -> (encoded, events): what this process is saving, so that its own wake-up
        # hands subscribers these very events instead of decoding their bytes again
        self._saving: dict[int, tuple[Sequence[bytes], list[Event]]] = {}
        self._delivering = False  # handing events to subscribers now (see `Subscription.encoder`)
        self._made: tuple[Event, bytes] | None = None  # what `once` made for this delivery
        self._latest = -1
        self._stale = False  # a wake-up without events: fetch instead of trusting `_carried`
        self._deleted = False
        self._dirty = asyncio.Event()
        self._pumping = False  # the pump is delivering (it may be waiting for the store)
        self._closed = False
        self.live = asyncio.Event()  # the store has called back once: the subscription is on
        self._pump = asyncio.get_running_loop().create_task(self._run())
        self._unsubscribe = store.subscribe(circle_id, self._on_wake, self._on_ephemeral)

    def add(self, from_version: int) -> Subscription:
        sub = Subscription(self, from_version)
        self._subs.append(sub)
        self._stale = True
        self._dirty.set()
        return sub

    def remove(self, sub: Subscription) -> None:
        if sub in self._subs:
            self._subs.remove(sub)
            if not self._subs and not self._deleted and not self._closed:
                self._on_empty(self)

    def saving(self, version: int, encoded: Sequence[bytes], events: list[Event]) -> None:
        """This process is saving `events` (encoded as `encoded`) at `version`: a wake-up for
        that version carrying the same bytes hands subscribers these objects, not a decoding
        of the bytes (the same events: the encoding is exact). Kept until that wake-up, or
        until a few later saves have passed it (a save that lost the race has none)."""
        if not self._subs:
            return
        saving = self._saving
        if len(saving) >= 4:
            for v in [v for v in saving if v < version]:
                del saving[v]
        saving[version] = (encoded, events)

    @property
    def followed(self) -> bool:
        """Someone here subscribes to the circle."""
        return bool(self._subs)

    def stop(self) -> None:
        """Unsubscribe from the store and stop the pump, now (`close` also waits for it)."""
        self._closed = True
        self._drop_store_subscription()
        self._dirty.set()  # the pump stops even if the cancel below is swallowed (see _run)
        self._pump.cancel()

    async def close(self) -> None:
        self.stop()
        await asyncio.gather(self._pump, return_exceptions=True)
        for sub in list(self._subs):
            sub.close()

    def _drop_store_subscription(self) -> None:
        """Unsubscribe, once, and let go of the store's callable: it holds the store's record
        of this subscription, which holds this hub's methods, a cycle that would keep the hub
        (and its last events) until a full collection (issue 17)."""
        unsubscribe, self._unsubscribe = self._unsubscribe, _unsubscribed
        unsubscribe()

    # ---- from the store ----------------------------------------------------------------

    def _on_wake(self, circle_id: str, version: int, events: Sequence[bytes] | None) -> None:
        self.live.set()
        if version < 0:
            self._deleted = True
        else:
            self._latest = max(self._latest, version)
            if events is None:
                self._stale = True
            elif self._subs:
                mine = self._saving.pop(version, None)
                if mine is not None and _same(mine[0], events):
                    self._carried[version] = mine[1]
                else:
                    try:
                        self._carried[version] = [decode_event(e) for e in events]
                    except CorruptState:
                        self._stale = True  # fetch instead
        if self._saving:  # a save that was refused, or a wake-up without its events
            for v in [v for v in self._saving if v <= version]:
                del self._saving[v]
        self._on_version(version)
        if not self._deliver_now(version):
            self._dirty.set()

    def _deliver_now(self, version: int) -> bool:
        """The common case, handled in the caller's step (the save that made `version`, on
        this process): every subscriber is at the version before, the wake-up carried the
        events, and the pump has nothing pending. Anything else is the pump's."""
        if (self._pumping or self._dirty.is_set() or self._stale or self._deleted
                or version != self._latest):
            return False
        events = self._carried.get(version)
        if events is None:
            return False
        subs = list(self._subs)
        before = version - 1
        for s in subs:
            if s.last != before:
                return False
        self._delivering = True
        try:
            if len(events) == 1:  # the common case: one event, handed to each listener in turn
                event = events[0]
                for s in subs:
                    listener = s._listener
                    if listener is None or s._done:
                        s.push(event)  # held until `listen`, or dropped once closed
                    else:
                        try:
                            listener(event)
                        except Exception:
                            log.exception("event listener failed")
                    s.last = version
            else:
                for s in subs:
                    for e in events:
                        s.push(e)
                    s.last = version
        finally:
            self._delivering, self._made = False, None
        del self._carried[version]
        return True

    def _on_ephemeral(self, circle_id: str, blob: bytes) -> None:
        try:
            event = decode_event(blob)
        except CorruptState:
            log.warning("unreadable ephemeral event on circle")
            return
        for sub in list(self._subs):
            sub.push(event)

    # ---- delivery ----------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        # Stops on `_closed`, not only on cancellation: on Python 3.11 a cancel that lands
        # as a Redis call completes can be swallowed (asyncio.wait_for inside redis-py).
        while not self._closed:
            await self._dirty.wait()
            if self._closed:
                return
            self._dirty.clear()
            self._pumping = True
            try:
                await self._deliver()
            except StoreError as exc:  # unavailable or corrupt: try again soon
                log.warning("event delivery failed: %s", type(exc).__name__)
                loop.call_later(RETRY_SECONDS, self._dirty.set)
            except Exception:
                log.exception("event delivery failed")
                loop.call_later(RETRY_SECONDS, self._dirty.set)
            finally:
                self._pumping = False
            if self._deleted and not self._dirty.is_set():
                for sub in list(self._subs):
                    sub.push(Closed())
                    sub.close()
                self._drop_store_subscription()
                self._on_gone(self)
                return

    def _from_carried(self, last: int) -> list[Event] | None:
        """Events after `last` if wake-ups carried every version since, else None."""
        if any(v not in self._carried for v in range(last + 1, self._latest + 1)):
            return None
        return [e for v in range(last + 1, self._latest + 1) for e in self._carried[v]]

    async def _deliver(self) -> None:
        stale, self._stale = self._stale, False
        for last in sorted({s.last for s in self._subs}):
            group = [s for s in self._subs if s.last == last]
            known = self._latest  # every version up to here is saved, so a fetch sees it
            events = self._from_carried(last)
            if events is None or (stale and not self._deleted):
                try:
                    blobs = await self._store.events_since(self.circle_id, last)
                except ReplayGap:
                    state = await self._load()
                    for s in group:
                        s.push(Resync(state))
                        s.last = max(s.last, state.version)
                    continue
                except NoSuchCircle:
                    self._deleted = True
                    return
                events = [decode_event(b) for b in blobs]
            top = max([last, known, *(e.version for e in events)])
            self._delivering = True
            try:
                for s in group:
                    for e in events:
                        if e.version > s.last:
                            s.push(e)
                    s.last = max(s.last, top)
            finally:
                self._delivering, self._made = False, None
        floor = min((s.last for s in self._subs), default=self._latest)
        for v in [v for v in self._carried if v <= floor]:
            del self._carried[v]
