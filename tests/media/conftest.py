from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from server.media import MediaRelay

from .peers import ClientPeer

CIRCLE = "circle-1"
TONES = {"mod": 330.0, "m1": 440.0, "m2": 550.0, "m3": 660.0}


class Room:
    """A relay plus real client peers on loopback, recording what the relay reports."""

    def __init__(self, *, slots: int = 3, **relay: Any) -> None:
        self.views: dict[str, list[str | None] | None] = {}
        self.slot_calls: list[tuple[str, str, list[str | None]]] = []
        self.levels: list[dict[str, int]] = []
        self.relay = MediaRelay(slots=slots, on_slots=self._on_slots, on_levels=self._on_levels, **relay)
        self.peers: dict[str, ClientPeer] = {}

    def _on_slots(self, circle_id: str, member_id: str, slots: list[str | None]) -> None:
        self.slot_calls.append((circle_id, member_id, slots))
        self.views[member_id] = slots

    def _on_levels(self, circle_id: str, levels: dict[str, int]) -> None:
        assert circle_id == CIRCLE
        self.levels.append(levels)

    async def join(
        self,
        name: str,
        *,
        listen_only: bool = False,
        mic: bool | None = None,
        slots: int = 3,
        circle: str = CIRCLE,
    ) -> ClientPeer:
        peer = ClientPeer(
            name, slots=slots, mic=not listen_only if mic is None else mic, hz=TONES.get(name, 770.0)
        )
        answer = await self.relay.answer(circle, name, await peer.offer(), listen_only=listen_only)
        await peer.accept(answer)
        self.views[name] = self.relay.slots(circle, name)
        self.peers[name] = peer
        return peer

    async def join_all(self) -> dict[str, ClientPeer]:
        """The usual circle: a moderator and three members, all with a microphone."""
        for name in TONES:
            await self.join(name)
        return self.peers

    def others(self, name: str) -> list[ClientPeer]:
        return [p for n, p in self.peers.items() if n != name]

    async def aclose(self) -> None:
        await self.relay.close()
        for peer in self.peers.values():
            await peer.close()


@pytest.fixture
async def room() -> AsyncIterator[Room]:
    room = Room()
    yield room
    await room.aclose()


@pytest.fixture
async def rooms() -> AsyncIterator[list[Room]]:
    """Rooms a test makes (several relays: several processes on one host), closed after it."""
    made: list[Room] = []
    yield made
    for room in made:
        await room.aclose()
