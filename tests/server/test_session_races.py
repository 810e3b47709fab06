"""Races inside one session, driven without a socket (the transport is two queues): events
that land while the session is between a snapshot and what follows it."""

from __future__ import annotations

import asyncio
from typing import Any

import msgpack

from rooms.model import CircleSettings, Invite, Role
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


class GatedLoad:
    """A memory store whose next `load`, once `hold` is set, says so (`loading`) and waits
    for `gate`. It wraps the store: the compiled manager and store (server/compiled.py) take
    no method patched onto them."""

    def __init__(self, store: MemoryStore) -> None:
        self.store = store
        self.hold = False
        self.loading = asyncio.Event()
        self.gate = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    async def load(self, circle_id: str) -> bytes:
        if self.hold:
            self.hold = False
            self.loading.set()
            await self.gate.wait()
        return await self.store.load(circle_id)


async def test_a_member_removed_while_their_admission_loads_is_put_out_not_seated() -> None:
    store = GatedLoad(MemoryStore())
    manager = RoomManager(store)  # type: ignore[arg-type]
    await manager.create(CircleSettings(id="race", title="t", lobby=True),
                         [Invite("mod", Role.MODERATOR), Invite("mem", Role.MEMBER)])
    mod, _ = await _joined(manager, tokens.issue(SECRET, "race", "moderator", "mod", 60), "Pendamping")
    member, lobby = await _joined(manager, tokens.issue(SECRET, "race", "member", "mem", 60), "Melati")
    assert lobby["type"] == "lobby"
    # The admitted member's session loads the state to send `admitted`; the removal is saved
    # while that load waits.
    store.hold = True
    assert (await _command(mod, type="admit", member_id=lobby["member_id"], ref=1))["type"] == "ack"
    await store.loading.wait()
    assert (await _command(mod, type="remove", member_id=lobby["member_id"], ref=2))["type"] == "ack"
    store.gate.set()
    await asyncio.wait_for(member.gone.wait(), 10)  # before the fix: seated, never closed
    assert member.closed_with == 4403
    assert not [fr for fr in map(msgpack.unpackb, member.out) if fr["type"] in ("admitted", "event")]
    await manager.close()
