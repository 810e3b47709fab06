"""The circles this process serves: one `CircleRuntime` per circle with a session here.

A runtime is the circle's whole server-side life on this process: its sessions, the relay's
gate (who may be heard, kept equal to the rules' audible set: invariant 2), the server-only
events that move media (a member left, was removed or declined: their media closes; the
circle ended: all of it closes), and the media reports (`media {slots}`, `levels`) to its
members. It is created when the first session of the circle joins here and closed, as one
thing, when the last one goes: nothing of a circle outlives it (tests/server/test_ended_circles).

`Circles` is also what this process's leases (`storage.homes.Homes`, DESIGN §8) ask about:
a circle is in use while it has a runtime here; a circle whose lease went to another process
has its sessions closed with 1013 (they reconnect and are redirected there, where the media
runs); and a circle taken over from a process that died has the members that process still
showed as connected put into their grace period, as that process would have on a disconnect.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from rooms import commands as c
from rooms.errors import RoomError
from rooms.events import Event, Name
from rooms.rules import audible
from server import metrics
from server.media.relay import LevelsCallback, MediaRelay, SlotsCallback
from signaling import frames as f
from signaling.close import CloseCode
from signaling.session import Session
from storage.manager import Busy, RoomManager
from storage.store import StoreError
from storage.subscription import Closed, Item, Resync, Subscription

log = logging.getLogger("lingkar.circles")

# The events that move media; every other event leaves it as it is.
_MEDIA_EVENTS = frozenset({Name.AUDIBLE, Name.LEFT, Name.REMOVED, Name.DECLINED, Name.ENDED})

MakeRelay = Callable[[SlotsCallback, LevelsCallback], MediaRelay]


class CircleRuntime:
    """One circle on this process. `Session`s reach it as their `Here`."""

    def __init__(self, circle_id: str, manager: RoomManager, relay: MediaRelay,
                 spawn: Callable[[Coroutine[Any, Any, None]], object],
                 on_empty: Callable[[CircleRuntime], None]) -> None:
        self.circle_id = circle_id
        self.manager = manager
        self.relay = relay
        self._spawn = spawn
        self._on_empty = on_empty  # the last session here is gone
        self.sessions: dict[str, Session] = {}
        self._sub: Subscription | None = None
        self._starting: asyncio.Task[None] | None = None
        self._media_closed: set[str] = set()  # members whose media is closed already
        self.closed = False

    def start(self) -> None:
        self._starting = asyncio.get_running_loop().create_task(self._follow())

    async def _follow(self) -> None:
        """Keep the relay's gate equal to the rules' audible set. Events are handed over
        synchronously as they are delivered (no task switch per event): the gate moves in
        the same step as the event that moves it; closing connections runs on."""
        try:
            state = await self.manager.load(self.circle_id)
        except StoreError:
            return
        if self.closed:
            return
        self.relay.set_audible(self.circle_id, audible(state))
        self._sub = self.manager.subscribe(self.circle_id, state.version)
        self._sub.listen(self._on_item)

    def _on_item(self, item: Item) -> None:
        if type(item) is Event and item.name not in _MEDIA_EVENTS:
            return  # the common case (a hand raised, a mute): nothing for the media
        circle_id = self.circle_id
        if isinstance(item, Closed):
            self._spawn(self.relay.close_circle(circle_id))
        elif isinstance(item, Resync):
            self.relay.set_audible(circle_id, audible(item.state))
        elif item.name is Name.AUDIBLE:
            self.relay.set_audible(circle_id, item.data["members"])
        elif item.name in (Name.LEFT, Name.REMOVED, Name.DECLINED):
            self._spawn(self.close_media(item.data["member_id"]))
        elif item.name is Name.ENDED:
            self._spawn(self.relay.close_circle(circle_id))

    # --- what a session asks of its circle (`signaling.session.Here`) ----------------------

    def add(self, session: Session) -> None:
        self.sessions[session.member_id] = session

    async def answer(self, member_id: str, offer_sdp: str, *, listen_only: bool) -> str:
        self._media_closed.discard(member_id)
        return await self.relay.answer(self.circle_id, member_id, offer_sdp, listen_only=listen_only)

    def slots(self, member_id: str) -> list[str | None] | None:
        return self.relay.slots(self.circle_id, member_id)

    def close_media(self, member_id: str) -> Coroutine[Any, Any, None]:
        """Out of the media at once, once: a quiet leave closes it in its own step (F8),
        before the leave is saved; its `left` event, and the session's end, then find it
        closed."""
        if member_id in self._media_closed:
            return _nothing()
        self._media_closed.add(member_id)
        return self.relay.close_member(self.circle_id, member_id)

    def leave(self, session: Session) -> Coroutine[Any, Any, None]:
        """The session is over. Its media closes unless a newer session of the same member
        took over here (the relay replaces the PeerConnection on that one's offer)."""
        if self.sessions.get(session.member_id) is not session:
            return _nothing()
        del self.sessions[session.member_id]
        closing = self.close_media(session.member_id)
        self._media_closed.discard(session.member_id)
        if not self.sessions:
            self._on_empty(self)
        return closing

    # --- media reports, from the relay ---------------------------------------------------------

    def media(self, member_id: str, slots: list[str | None]) -> None:
        session = self.sessions.get(member_id)
        if session is not None:
            session.conn.media(slots)
            session.flush()

    def levels(self, levels: dict[str, int]) -> None:
        data = f.encode_server_frame(f.Levels(levels=levels))  # once for the whole circle
        for session in self.sessions.values():
            session.conn.levels(data)
            session.flush()

    # --- the circle as a whole ------------------------------------------------------------

    def close_sessions(self, code: int, reason: str) -> None:
        for session in list(self.sessions.values()):
            session.close(code, reason)

    def redirect_sessions(self, url: str) -> None:
        """Send every member here to `url` (`redirect`, then 4300): the circle's new home."""
        for session in list(self.sessions.values()):
            session.redirect(url)

    def close(self) -> Coroutine[Any, Any, None]:
        """Nobody here follows the circle any more: stop following it, and the relay forgets
        it (its gate would go stale)."""
        self.closed = True
        if self._starting is not None:
            self._starting.cancel()
        if self._sub is not None:
            self._sub.close()
            self._sub = None
        return self.relay.close_circle(self.circle_id)


async def _nothing() -> None:
    pass


class Circles:
    """The runtimes of this process, by circle; the sessions' `Circles`, the leases' hooks,
    and the relay's listener. It builds the relay (`make_relay`), so that the relay reports to
    an object that exists."""

    def __init__(self, manager: RoomManager, make_relay: MakeRelay) -> None:
        self.manager = manager
        self.relay = make_relay(self._on_slots, self._on_levels)
        self._runtimes: dict[str, CircleRuntime] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # relay closes in progress
        self.idle = asyncio.Event()  # no session here (drain waits for it)
        self.idle.set()

    def enter(self, session: Session) -> CircleRuntime:
        runtime = self._runtimes.get(session.circle_id)
        if runtime is None:
            runtime = self._runtimes[session.circle_id] = CircleRuntime(
                session.circle_id, self.manager, self.relay, self._spawn, self._emptied)
            runtime.start()
            metrics.CIRCLES.set(len(self._runtimes))
        runtime.add(session)
        self.idle.clear()
        return runtime

    def _emptied(self, runtime: CircleRuntime) -> None:
        if runtime.sessions or self._runtimes.get(runtime.circle_id) is not runtime:
            return
        del self._runtimes[runtime.circle_id]
        metrics.CIRCLES.set(len(self._runtimes))
        if not self._runtimes:
            self.idle.set()
        self._spawn(runtime.close())

    def runtime(self, circle_id: str) -> CircleRuntime | None:
        return self._runtimes.get(circle_id)

    def runtimes(self) -> list[CircleRuntime]:
        return list(self._runtimes.values())

    def sessions(self) -> list[Session]:
        return [s for runtime in self._runtimes.values() for s in runtime.sessions.values()]

    def keeps(self, circle_id: str) -> bool:
        """Whether anything of the circle is kept here (for leak checks, issue 17)."""
        return circle_id in self._runtimes

    # --- leases (DESIGN §8) ---------------------------------------------------------------------

    def in_use(self, circle_id: str) -> bool:
        return circle_id in self._runtimes

    def hand_over(self, circle_id: str, url: str) -> None:
        """The circle's lease was given up to the process at `url`, where the proxy sends its
        hellos: its members here are sent there (`redirect`, 4300)."""
        runtime = self._runtimes.get(circle_id)
        if runtime is not None:
            runtime.redirect_sessions(url + "/ws")

    def moved(self, circle_id: str) -> None:
        """Another process holds the circle now: close its sessions here with 1013 (the
        protocol's "try again"), so their clients reconnect with the resume secret and are
        redirected there; the last one closing ends the circle's media here too."""
        runtime = self._runtimes.get(circle_id)
        if runtime is not None:
            runtime.close_sessions(CloseCode.TRY_AGAIN_LATER, "the circle moved to another process")

    async def take_over(self, circle_id: str) -> None:
        """This process has just taken a free lease: members the previous home still shows
        as connected (it died without saying) start their grace period now, unless their
        session is here. Called before any session of the circle joins here."""
        state = await self.manager.load(circle_id)
        runtime = self._runtimes.get(circle_id)
        for m in [*state.members.values(), *state.lobby.values()]:
            if m.connected and (runtime is None or m.id not in runtime.sessions):
                try:
                    await self.manager.execute(circle_id, c.Disconnect(m.id, m.session))
                except (RoomError, Busy):
                    pass

    # --- the relay's reports ---------------------------------------------------------------------

    def _on_slots(self, circle_id: str, member_id: str, slots: list[str | None]) -> None:
        runtime = self._runtimes.get(circle_id)
        if runtime is not None:
            runtime.media(member_id, slots)

    def _on_levels(self, circle_id: str, levels: dict[str, int]) -> None:
        runtime = self._runtimes.get(circle_id)
        if runtime is not None:
            runtime.levels(levels)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
