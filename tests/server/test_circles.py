"""One circle's runtime on this process (server.circles), with no socket and no media: the
manager on the memory store, sessions that are only their protocol machine, and a relay that
records what it is told."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import msgpack
import pytest

from rooms import commands as c
from rooms.model import CircleSettings, Invite, Role
from rooms.rules import audible
from server.circles import Circles
from signaling.connection import Connection
from storage.manager import RoomManager
from storage.memory_store import MemoryStore

CIRCLE = "runtime"


@dataclass
class Relay:
    """The relay's surface a runtime uses, recording every call."""

    on_slots: Any
    on_levels: Any
    gates: list[list[str]] = field(default_factory=list)
    closed_members: Counter[str] = field(default_factory=Counter)
    closed_circles: list[str] = field(default_factory=list)

    def set_audible(self, circle_id: str, members: list[str]) -> None:
        self.gates.append(list(members))

    async def answer(self, circle_id: str, member_id: str, sdp: str, *, listen_only: bool) -> str:
        return "v=0 answer"

    def slots(self, circle_id: str, member_id: str) -> list[str | None] | None:
        return [None, None, None]

    def close_member(self, circle_id: str, member_id: str) -> Any:
        self.closed_members[member_id] += 1  # counted when called: the relay detaches at once
        return _done()

    def close_circle(self, circle_id: str) -> Any:
        self.closed_circles.append(circle_id)
        return _done()


async def _done() -> None:
    pass


class Session:
    """What a runtime reaches of a session: its ids, its machine, flush and close."""

    def __init__(self, member_id: str) -> None:
        self.circle_id = CIRCLE
        self.member_id = member_id
        self.conn = Connection(secret="s" * 32)
        self.conn.member_id = member_id
        self.conn.admitted = True
        self.sent: list[dict[str, Any]] = []
        self.closed_with: tuple[int, str] | None = None

    def flush(self) -> None:
        self.sent += [msgpack.unpackb(data) for data in self.conn.data_to_send()]

    def close(self, code: int, reason: str = "") -> None:
        self.closed_with = (code, reason)

    def redirect(self, url: str) -> None:
        self.conn.redirect(url)
        self.flush()
        self.closed_with = self.conn.close_to_send()


@dataclass
class World:
    manager: RoomManager
    circles: Circles
    relay: Relay
    mod: str
    member: str


@pytest.fixture
async def world() -> AsyncIterator[World]:
    manager = RoomManager(MemoryStore())
    await manager.create(CircleSettings(id=CIRCLE, title="t", lobby=False),
                         [Invite("mod", Role.MODERATOR), Invite("mem", Role.MEMBER)])
    for member_id, invite, role in (("m-mod", "mod", Role.MODERATOR), ("m-1", "mem", Role.MEMBER)):
        await manager.execute(CIRCLE, c.Join(member_id, invite, role, member_id, False, f"h-{member_id}"))
    relays: list[Relay] = []

    def make_relay(on_slots: Any, on_levels: Any) -> Any:
        relays.append(Relay(on_slots, on_levels))
        return relays[-1]

    circles = Circles(manager, make_relay)
    yield World(manager, circles, relays[0], "m-mod", "m-1")
    await manager.close()


async def started(world: World, *sessions: Session) -> Any:
    runtime = None
    for session in sessions:
        runtime = world.circles.enter(session)  # type: ignore[arg-type]
    assert runtime is not None
    await asyncio.wait_for(runtime._starting, 5)  # its first load, then it follows the events
    return runtime


async def test_the_gate_follows_the_rules_in_the_step_of_the_event(world: World) -> None:
    await started(world, Session(world.mod))
    state = await world.manager.load(CIRCLE)
    assert world.relay.gates == [audible(state)]
    await world.manager.execute(CIRCLE, c.GiveFloor(world.mod, world.member))
    state, _ = await world.manager.execute(CIRCLE, c.UnmuteSelf(world.member))  # the gate moves with its event
    assert world.relay.gates[-1] == audible(state) and world.member in world.relay.gates[-1]


async def test_a_quiet_leave_closes_the_media_once(world: World) -> None:
    mod, member = Session(world.mod), Session(world.member)
    runtime = await started(world, mod, member)
    await runtime.close_media(world.member)  # the session's step, before the leave is saved
    await world.manager.execute(CIRCLE, c.LeaveQuietly(world.member, False))
    await runtime.leave(member)
    assert world.relay.closed_members[world.member] == 1  # not again on `left`, nor at the end
    removed = Session("m-2")
    await world.manager.execute(CIRCLE, c.Join("m-2", "mem", Role.MEMBER, "Dua", False, "h-2"))
    world.circles.enter(removed)  # type: ignore[arg-type]
    await world.manager.execute(CIRCLE, c.Remove(world.mod, "m-2"))
    await runtime.leave(removed)  # its connection closes (4403) after the event
    assert world.relay.closed_members["m-2"] == 1  # closed by the runtime on `removed`, once


async def test_the_last_session_gone_tears_the_runtime_down(world: World) -> None:
    mod = Session(world.mod)
    runtime = await started(world, mod)
    assert world.circles.keeps(CIRCLE) and world.manager.keeps(CIRCLE)
    await runtime.leave(mod)
    assert not world.circles.keeps(CIRCLE) and world.circles.idle.is_set()
    assert world.relay.closed_circles == [CIRCLE]
    assert runtime._sub is None  # it follows the circle no more


async def test_media_reports_reach_the_member_s_session_and_levels_every_admitted_one(world: World) -> None:
    mod, member = Session(world.mod), Session(world.member)
    await started(world, mod, member)
    world.relay.on_slots(CIRCLE, world.member, [world.mod, None, None])
    assert member.sent == [{"type": "media", "slots": [world.mod, None, None]}] and mod.sent == []
    member.conn.admitted = False  # a lobby member hears no levels
    world.relay.on_levels(CIRCLE, {world.mod: 30})
    assert mod.sent == [{"type": "levels", "levels": {world.mod: 30}}]
    assert len(member.sent) == 1
    world.relay.on_slots("another-circle", world.member, [None])  # nobody of it here
    assert len(member.sent) == 1


async def test_a_lost_lease_closes_the_circle_s_sessions_with_1013(world: World) -> None:
    mod, member = Session(world.mod), Session(world.member)
    await started(world, mod, member)
    world.circles.moved(CIRCLE)
    assert mod.closed_with == member.closed_with == (1013, "the circle moved to another process")
