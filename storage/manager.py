"""The room manager: load a circle, apply a command with the rules, save with compare-and-set,
publish what happened, and keep each circle's timer armed.

Several managers (processes) may share one store: a save that loses the race reloads and
applies the command again, so every accepted command lands exactly once on the latest state.
Refusals and no-ops are always decided on a freshly loaded state, never on the cache.

A process keeps a circle (its event hub, its store subscription, its timer, the cached state)
only while someone here subscribes to it or something in it falls due: a circle everyone
left without ending it is forgotten then, not kept until the process stops (issue 17). The
process that saves a deadline arms its own timer, so every deadline has one.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from rooms import rules
from rooms.commands import Command, Tick
from rooms.errors import RoomError
from rooms.events import Event
from rooms.model import CircleSettings, Invite, RoomState
from storage.clock import Clock, RealClock, TimerHandle
from storage.codec import CorruptState, Packed, decode_state, encode_event, encode_state
from storage.locks import KeyedLock
from storage.store import NoSuchCircle, Store, StoreError, StoreUnavailable, VersionConflict
from storage.subscription import CircleHub, Subscription

log = logging.getLogger(__name__)

MAX_TRIES = 50  # compare-and-set attempts before giving up with `Busy`
TICK_RETRY_MS = 1000  # a tick that could not run (store down, busy) is tried again this soon


class Busy(Exception):
    """Too many writers raced on one circle; nothing changed. Signaling answers `error
    conflict` and the client may try again."""


@dataclass(eq=False)
class _Known:
    """A circle this process works with: its event hub and its timer."""

    hub: CircleHub
    timer: TimerHandle | None = None
    timer_at: int | None = None
    packed: Packed = field(default_factory=Packed)  # what its saves need not pack again


class RoomManager:
    def __init__(self, store: Store, *, clock: Clock | None = None,
                 max_tries: int = MAX_TRIES) -> None:
        self._store = store
        self._clock: Clock = clock or RealClock()
        self._max_tries = max_tries
        self._cache: dict[str, RoomState] = {}  # last state seen per circle (may be stale)
        self._locks = KeyedLock()  # one writer per circle in this process
        self._known: dict[str, _Known] = {}
        self._refreshing: set[str] = set()
        self._saving: dict[str, int] = {}  # circle -> version this process is saving now
        self._tasks: set[asyncio.Task[None]] = set()
        self._on_deleted: list[Callable[[str], None]] = []
        self._closed = False

    def when_deleted(self, callback: Callable[[str], None]) -> None:
        """Have `callback(circle_id)` called (perhaps twice) once this process learns that a
        circle was deleted: it ended here, or its hub heard so. Whatever keeps something
        per circle lets go of it then, not at some later sweep (issue 17)."""
        self._on_deleted.append(callback)

    def keeps(self, circle_id: str) -> bool:
        """Whether anything of the circle is kept here (for leak checks, issue 17)."""
        return (circle_id in self._cache or circle_id in self._locks or circle_id in self._known
                or circle_id in self._refreshing or circle_id in self._saving)

    def _deleted(self, circle_id: str) -> None:
        for callback in self._on_deleted:
            try:
                callback(circle_id)
            except Exception:
                log.exception("a deletion callback failed")

    # ---- reading -----------------------------------------------------------------------

    async def create(self, circle: CircleSettings, invites: Sequence[Invite]) -> RoomState:
        """Store a new circle (version 0) with its first invites. Raises CircleExists."""
        state = RoomState.new(circle)
        state.invites = {i.id: i for i in invites}
        await self._store.create(circle.id, encode_state(state))
        self._cache[circle.id] = state
        self._know(circle.id, state)
        return state

    async def load(self, circle_id: str) -> RoomState:
        """The circle's current state, from the store. Raises NoSuchCircle."""
        try:
            state = decode_state(await self._store.load(circle_id))
        except NoSuchCircle:
            self._cache.pop(circle_id, None)
            raise
        if circle_id in self._known:  # the cache is for the circles kept here (see `_know`)
            cached = self._cache.get(circle_id)
            if cached is None or cached.version <= state.version:
                self._cache[circle_id] = state
        return state

    async def circles(self) -> list[RoomState]:
        """Every live circle's state (circles that vanish meanwhile are left out)."""
        ids = await self._store.circle_ids()
        found = await asyncio.gather(*(self._load_or_none(cid) for cid in ids))
        return [s for s in found if s is not None]

    async def _load_or_none(self, circle_id: str) -> RoomState | None:
        try:
            return await self.load(circle_id)
        except NoSuchCircle:
            return None
        except CorruptState:
            log.error("a circle's stored state is unreadable; left as it is")
            return None

    async def ping(self) -> None:
        """Raise StoreUnavailable when the store cannot be reached."""
        await self._store.ping()

    # ---- writing -----------------------------------------------------------------------

    async def execute(self, circle_id: str, command: Command, *, fence: int | None = None
                      ) -> tuple[RoomState, list[Event]]:
        """Apply `command` and save the result. Returns the new state and every event, the
        ephemeral ones already published. Raises RoomError (nothing changed), NoSuchCircle,
        Busy, StoreUnavailable (the outcome of a save cut off mid-way is unknown; resume and
        the version tell). With `fence` (this process's lease token, DESIGN §8) the save is
        refused with StaleOwner once another process has taken the circle."""
        gate = self._locks.take(circle_id)  # free (the common case): held without awaiting
        if gate is None:
            async with self._locks(circle_id):
                return await self._execute(circle_id, command, fence)
        try:
            return await self._execute(circle_id, command, fence)
        finally:
            gate.give_back()

    async def _execute(self, circle_id: str, command: Command, fence: int | None = None
                       ) -> tuple[RoomState, list[Event]]:
        state = self._cache.get(circle_id)
        fresh = state is None
        if state is None:
            state = await self.load(circle_id)
        for attempt in range(self._max_tries):
            try:
                new, events = rules.apply(state, command, self._clock.now())
            except RoomError:
                if fresh:
                    raise
                state, fresh = await self.load(circle_id), True
                continue
            if new.version == state.version:  # nothing to save
                if not fresh:
                    state, fresh = await self.load(circle_id), True
                    continue
                await self._publish_ephemeral(circle_id, events)
                self._know(circle_id, state)
                return state, events
            kept = [e for e in events if not e.ephemeral]
            durable = [encode_event(e) for e in kept]
            self._saving[circle_id] = new.version  # its own wake-up needs no reload
            known = self._known.get(circle_id)
            if known is not None:  # its subscribers get these events, not their bytes decoded
                known.hub.saving(new.version, durable, kept)
            try:
                blob = encode_state(new, known.packed if known is not None else None)
                await self._store.save(circle_id, state.version, blob, durable, new.version, fence)
            except VersionConflict:
                self._saving.pop(circle_id, None)
                if attempt:  # spread the writers that keep colliding
                    await asyncio.sleep(random.uniform(0, 0.0005 * min(attempt, 20)))
                state, fresh = await self.load(circle_id), True
                continue
            except StoreError:
                self._saving.pop(circle_id, None)  # refused (stale owner) or unknown
                self._cache.pop(circle_id, None)  # the outcome is unknown: reload next time
                raise
            self._cache[circle_id] = new
            if len(kept) != len(events):
                await self._publish_ephemeral(circle_id, events)
            if new.ended:
                await self._delete_ended(circle_id)
            else:
                self._know(circle_id, new)
            return new, events
        raise Busy(f"{circle_id}: {self._max_tries} writers in a row saved first")

    async def _publish_ephemeral(self, circle_id: str, events: list[Event]) -> None:
        for e in events:
            if e.ephemeral:
                await self._store.publish_ephemeral(circle_id, encode_event(e))

    async def _delete_ended(self, circle_id: str) -> None:
        # Subscribers got the final events with the save's wake-up; now the deletion.
        try:
            await self._store.delete(circle_id)
        except StoreUnavailable:
            # The saved state says ended (every command is refused); the idle TTL removes it.
            log.warning("an ended circle could not be deleted now; it will expire")
            deleted = False
        else:
            deleted = True
        self._cache.pop(circle_id, None)
        self._saving.pop(circle_id, None)
        self._disarm(circle_id)
        if deleted:
            self._deleted(circle_id)

    # ---- subscriptions -----------------------------------------------------------------

    def subscribe(self, circle_id: str, from_version: int) -> Subscription:
        """Events of the circle after `from_version`, each once, in version order; a
        `Resync(state)` when some are no longer kept; `Closed()` when the circle is deleted."""
        return self._hub(circle_id).hub.add(from_version)

    # ---- timers ------------------------------------------------------------------------

    def _hub(self, circle_id: str) -> _Known:
        known = self._known.get(circle_id)
        if known is None:
            hub = CircleHub(self._store, circle_id, load=lambda: self.load(circle_id),
                            on_version=lambda v: self._on_version(circle_id, v),
                            on_gone=self._gone, on_empty=self._unfollowed)
            known = self._known[circle_id] = _Known(hub)
        return known

    def _know(self, circle_id: str, state: RoomState) -> None:
        """Keep the circle's timer at the state's next deadline (with a hub, to hear of other
        processes' saves); a circle with no deadline and no subscriber here is not kept."""
        if self._closed:
            return
        due = rules.next_deadline(state)
        known = self._known.get(circle_id)
        if known is None:
            if due is None:
                self._forget(circle_id)
                return
            known = self._hub(circle_id)
        if not (due == known.timer_at and (due is None or known.timer is not None)):
            if known.timer is not None:
                known.timer.cancel()
            known.timer, known.timer_at = None, due
            if due is not None:
                known.timer = self._clock.call_at(due, lambda: self._spawn_tick(circle_id))
        if due is None and not known.hub.followed:
            self._forget(circle_id)

    def _unfollowed(self, hub: CircleHub) -> None:
        """The hub's last subscriber left: the circle goes too, unless a timer is armed."""
        known = self._known.get(hub.circle_id)
        if known is not None and known.hub is hub and known.timer is None:
            self._forget(hub.circle_id)

    def _forget(self, circle_id: str) -> None:
        """Nothing of a circle nobody here follows and nothing is due in is kept here."""
        known = self._known.pop(circle_id, None)
        self._cache.pop(circle_id, None)
        self._saving.pop(circle_id, None)
        if known is not None:
            if known.timer is not None:
                known.timer.cancel()
            known.hub.stop()  # nobody subscribes: nothing to close

    def _disarm(self, circle_id: str) -> None:
        known = self._known.get(circle_id)
        if known is not None and known.timer is not None:
            known.timer.cancel()
            known.timer, known.timer_at = None, None
        if known is not None and not known.hub.followed:
            self._forget(circle_id)

    def _spawn_tick(self, circle_id: str) -> asyncio.Task[None]:
        known = self._known.get(circle_id)
        if known is not None:
            known.timer, known.timer_at = None, None
        return self._spawn(self._tick(circle_id))

    async def _tick(self, circle_id: str) -> None:
        try:
            await self.execute(circle_id, Tick())
        except (NoSuchCircle, RoomError):
            self._disarm(circle_id)  # gone or ended: nothing more is due
        except (StoreError, CorruptState, Busy) as exc:
            log.warning("tick failed (%s); trying again", type(exc).__name__)
            if not self._closed:
                # Kept for the retry, even if its last subscriber left while the tick ran.
                known = self._hub(circle_id)
                retry_at = self._clock.now() + TICK_RETRY_MS
                known.timer = self._clock.call_at(retry_at, lambda: self._spawn_tick(circle_id))
                known.timer_at = retry_at

    def _on_version(self, circle_id: str, version: int) -> None:
        """A wake-up: if another process moved the circle on, reload it and re-arm."""
        if version < 0:
            self._cache.pop(circle_id, None)
            self._disarm(circle_id)
            self._deleted(circle_id)
            return
        cached = self._cache.get(circle_id)
        if cached is not None and cached.version >= version:
            return
        if self._saving.get(circle_id) == version:
            return  # our own save: `_execute` re-arms the timer with the state it saved
        if circle_id not in self._refreshing:
            self._refreshing.add(circle_id)
            self._spawn(self._refresh(circle_id))

    async def _refresh(self, circle_id: str) -> None:
        try:
            state = await self.load(circle_id)
        except NoSuchCircle:
            self._disarm(circle_id)
            return
        except (StoreError, CorruptState):
            return  # the next wake-up (after a reconnect there always is one) tries again
        finally:
            self._refreshing.discard(circle_id)
        self._know(circle_id, state)

    def _gone(self, hub: CircleHub) -> None:
        """The hub heard that its circle was deleted (it has closed its subscribers)."""
        circle_id = hub.circle_id
        known = self._known.get(circle_id)
        if known is not None and known.hub is hub:  # not a newer hub of the same id
            del self._known[circle_id]
            if known.timer is not None:
                known.timer.cancel()
            self._saving.pop(circle_id, None)
            self._cache.pop(circle_id, None)
        self._deleted(circle_id)

    # ---- lifecycle ---------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self) -> None:
        """Cancel every timer and task, and drop this process's store subscriptions. The
        store itself stays open (its owner closes it)."""
        self._closed = True
        known, self._known = list(self._known.values()), {}
        for k in known:
            if k.timer is not None:
                k.timer.cancel()
        await asyncio.gather(*(k.hub.close() for k in known), return_exceptions=True)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
