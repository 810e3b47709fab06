"""The circles this process serves: their sessions, and the media relay's view of them.

For every circle with a connection here, one watcher follows the room's events and tells the
relay who may be heard (`audible`) and whose media to close. Media frames (`media {slots}`,
`levels`) reach the member's session through this registry.

It is also what the process's leases (`storage.homes.Homes`, DESIGN §8) ask about: a circle is
in use while it has a session here; a circle whose lease went to another process has its
sessions closed with 1013 (they reconnect and are redirected there, where the media runs);
and a circle taken over from a process that died has the members that process still showed
as connected put into their grace period, as that process would have on a disconnect.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from rooms import commands as c
from rooms.errors import RoomError
from rooms.events import Name
from rooms.rules import audible
from server import metrics
from server.media.relay import MediaRelay
from signaling import frames as f
from signaling.close import CloseCode
from signaling.session import Session
from storage.homes import Homes
from storage.manager import Busy, RoomManager
from storage.store import StoreError
from storage.subscription import Closed, Item, Resync

log = logging.getLogger("lingkar.local")


@dataclass
class _Circle:
    sessions: dict[str, Session] = field(default_factory=dict)
    watcher: asyncio.Task[None] | None = None


class LocalCircles:
    """Implements the session `Observer`; owns the relay watchers."""

    def __init__(self, manager: RoomManager, relay: MediaRelay) -> None:
        self.manager = manager
        self.relay = relay
        self._circles: dict[str, _Circle] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # relay closes in progress
        self.connections = 0
        self.homes: Homes | None = None  # set by the app once built (it calls back here)
        self.idle = asyncio.Event()  # no session here (drain waits for it)
        self.idle.set()

    # Observer ---------------------------------------------------------------------------

    def joined(self, session: Session) -> None:
        circle = self._circles.get(session.circle_id)
        if circle is None:
            circle = self._circles[session.circle_id] = _Circle()
            circle.watcher = asyncio.create_task(self._watch(session.circle_id))
            metrics.CIRCLES.set(len(self._circles))
        circle.sessions[session.member_id] = session
        self.idle.clear()

    def gone(self, session: Session) -> bool:
        circle = self._circles.get(session.circle_id)
        if circle is None or circle.sessions.get(session.member_id) is not session:
            return False  # a newer connection of the same member took over here
        del circle.sessions[session.member_id]
        if not circle.sessions:
            del self._circles[session.circle_id]
            if circle.watcher is not None:
                circle.watcher.cancel()
            metrics.CIRCLES.set(len(self._circles))
            if not self._circles:
                self.idle.set()
            # Nobody here follows the circle any more: the relay forgets it too (its gate
            # would go stale), unless someone came back in the meantime.
            self._spawn(self._forget(session.circle_id))
        return True

    def frame_in(self) -> None:
        metrics.FRAMES.received += 1

    def frame_out(self) -> None:
        metrics.FRAMES.sent += 1

    def error(self, code: str) -> None:
        metrics.ERRORS.labels(code).inc()

    def closed(self, code: int) -> None:
        metrics.CLOSES.labels(metrics.close_label(code)).inc()

    def command_took(self, seconds: float) -> None:
        metrics.COMMAND_SECONDS.observe(seconds)

    # Leases (DESIGN §8) -----------------------------------------------------------------

    def in_use(self, circle_id: str) -> bool:
        return circle_id in self._circles

    def keeps(self, circle_id: str) -> bool:
        """Whether anything of the circle is kept here (for leak checks, issue 17)."""
        return circle_id in self._circles

    def moved(self, circle_id: str) -> None:
        """Another process holds the circle now: close its sessions here with 1013 (the
        protocol's "try again"), so their clients reconnect with the resume secret and are
        redirected there; the last one closing ends the circle's media here too."""
        circle = self._circles.get(circle_id)
        for session in list(circle.sessions.values()) if circle else []:
            session.close(CloseCode.TRY_AGAIN_LATER, "the circle moved to another process")

    async def take_over(self, circle_id: str) -> None:
        """This process has just taken a free lease: members the previous home still shows
        as connected (it died without saying) start their grace period now, unless their
        session is here. Called before any session of the circle joins here."""
        state = await self.manager.load(circle_id)
        here = self._circles.get(circle_id)
        for m in [*state.members.values(), *state.lobby.values()]:
            if m.connected and (here is None or m.id not in here.sessions):
                try:
                    await self.manager.execute(circle_id, c.Disconnect(m.id, m.session))
                except (RoomError, Busy):
                    pass

    # Media ------------------------------------------------------------------------------

    def on_slots(self, circle_id: str, member_id: str, slots: list[str | None]) -> None:
        session = self._session(circle_id, member_id)
        if session is not None:
            session.send(f.Media(slots=slots))

    def on_levels(self, circle_id: str, levels: dict[str, int]) -> None:
        circle = self._circles.get(circle_id)
        if circle is None:
            return
        frame = f.Levels(levels=levels)
        for session in circle.sessions.values():
            if session.admitted:
                session.send(frame)

    def _session(self, circle_id: str, member_id: str) -> Session | None:
        circle = self._circles.get(circle_id)
        return circle.sessions.get(member_id) if circle else None

    async def _forget(self, circle_id: str) -> None:
        if circle_id not in self._circles:
            await self.relay.close_circle(circle_id)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def sessions(self) -> list[Session]:
        return [s for circle in self._circles.values() for s in circle.sessions.values()]

    async def _watch(self, circle_id: str) -> None:
        """Keep the relay's gate equal to the rules' audible set (invariant 2). Events are
        handed over synchronously as they are delivered (no task switch per event): the gate
        moves in the same step as the event that moves it; closing connections runs on."""
        try:
            state = await self.manager.load(circle_id)
        except StoreError:
            return
        self.relay.set_audible(circle_id, audible(state))
        sub = self.manager.subscribe(circle_id, state.version)
        finished = asyncio.get_running_loop().create_future()

        def on_item(item: Item) -> None:
            if isinstance(item, Closed):
                self._spawn(self.relay.close_circle(circle_id))
                if not finished.done():
                    finished.set_result(None)
            elif isinstance(item, Resync):
                self.relay.set_audible(circle_id, audible(item.state))
            elif item.name is Name.AUDIBLE:
                self.relay.set_audible(circle_id, item.data["members"])
            elif item.name in (Name.LEFT, Name.REMOVED, Name.DECLINED):
                self._spawn(self.relay.close_member(circle_id, item.data["member_id"]))
            elif item.name is Name.ENDED:
                self._spawn(self.relay.close_circle(circle_id))

        try:
            sub.listen(on_item)
            await finished
        finally:
            sub.close()
