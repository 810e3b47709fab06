"""Races inside one session, driven without a socket (the transport is two queues): events
that land while the session is between a snapshot and what follows it."""

from __future__ import annotations

import asyncio
from typing import Any

import msgpack

from rooms.model import CircleSettings, Invite, Role, RoomState
from signaling import tokens
from signaling.session import Session
from storage.manager import RoomManager
from storage.memory_store import MemoryStore
from tests.fuzz.engine import SECRET, UNLIMITED, NoMedia, QueueTransport, Quiet


async def _joined(manager: RoomManager, token: str, name: str) -> tuple[QueueTransport, dict[str, Any]]:
    transport = QueueTransport()
    session = Session(transport, manager, secret=SECRET, circles=NoMedia(), observer=Quiet(), limits=UNLIMITED)
    asyncio.get_running_loop().create_task(session.run())
    transport.inbox.put_nowait(msgpack.packb({"type": "hello", "token": token, "name": name}))
    await transport.waiting.wait()
    return transport, msgpack.unpackb(transport.out[0])


async def _command(transport: QueueTransport, **frame: Any) -> dict[str, Any]:
    start = len(transport.out)
    transport.waiting.clear()
    transport.inbox.put_nowait(msgpack.packb(frame))
    await transport.waiting.wait()
    (answer,) = [fr for fr in map(msgpack.unpackb, transport.out[start:]) if fr["type"] in ("ack", "error")]
    return answer  # type: ignore[no-any-return]


async def test_a_member_removed_while_their_admission_loads_is_put_out_not_seated() -> None:
    manager = RoomManager(MemoryStore())
    await manager.create(CircleSettings(id="race", title="t", lobby=True),
                         [Invite("mod", Role.MODERATOR), Invite("mem", Role.MEMBER)])
    mod, _ = await _joined(manager, tokens.issue(SECRET, "race", "moderator", "mod", 60), "Pendamping")
    member, lobby = await _joined(manager, tokens.issue(SECRET, "race", "member", "mem", 60), "Melati")
    assert lobby["type"] == "lobby"
    # The admitted member's session loads the state to send `admitted`; the removal is saved
    # while that load waits.
    gate = asyncio.Event()
    loading = asyncio.Event()
    real_load = manager.load

    async def slow_load(circle_id: str) -> RoomState:
        loading.set()
        await gate.wait()
        return await real_load(circle_id)

    manager.load = slow_load  # type: ignore[method-assign]
    assert (await _command(mod, type="admit", member_id=lobby["member_id"], ref=1))["type"] == "ack"
    await loading.wait()
    manager.load = real_load  # type: ignore[method-assign]
    assert (await _command(mod, type="remove", member_id=lobby["member_id"], ref=2))["type"] == "ack"
    gate.set()
    await asyncio.wait_for(member.gone.wait(), 10)  # before the fix: seated, never closed
    assert member.closed_with == 4403
    assert not [fr for fr in map(msgpack.unpackb, member.out) if fr["type"] in ("admitted", "event")]
    await manager.close()
