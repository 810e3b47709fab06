"""A seated member offers again, through the real server (DESIGN §7 "Real networks", §12).

A client whose connection failed or whose network changed builds a new RTCPeerConnection
and sends a new `offer` on its socket. The server answers it without touching the room:
seat, floor, queue and mutes stay as they were (the room's version does not move); the old
PeerConnection closes and its ports go back to LINGKAR_MEDIA_PORTS, and the new one carries
audio both ways. Real aiortc peers on loopback, the memory store.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from testkit.ports import free_port_range
from tests.live import join, live_server

from .peers import ClientPeer, wait_until
from .test_through_server import ENOUGH, Member, Room


@pytest.fixture
def media_ports() -> tuple[int, int]:
    return free_port_range(1)  # one shared port on every address, for every member


@pytest.fixture
async def room(media_ports: tuple[int, int]) -> AsyncIterator[Room]:
    async with live_server("memory", media_ports=f"{media_ports[0]}-{media_ports[1]}") as live:
        room = Room(live)
        try:
            yield room
        finally:
            await room.aclose()


def in_range(addresses: list[tuple[str, int]], ports: tuple[int, int]) -> bool:
    return bool(addresses) and all(ports[0] <= port <= ports[1] for _, port in addresses)


async def hears(listener: Member, *sources: Member) -> None:
    base = {s.name: listener.heard(s) for s in sources}
    await wait_until(lambda: all(listener.heard(s) >= base[s.name] + ENOUGH for s in sources))


async def test_a_new_offer_from_a_seated_member_keeps_seat_floor_and_mutes(
    room: Room, media_ports: tuple[int, int]
) -> None:
    await room.create()
    mod = await room.enter("moderator", "Pendamping")
    m1 = await room.enter("member", "Melati")
    m2 = await room.enter("member", "Kenanga")
    await mod.ack("give_floor", member_id=m1.id)
    await m1.ack("unmute_self")
    await m2.ack("raise_hand")  # in the queue, muted
    await m2.view_becomes([mod.id, m1.id, None])
    await hears(m2, mod, m1)
    await hears(mod, m1)
    assert in_range(room.relay.local_addresses(), media_ports)
    before = await room.live.parts.manager.load(room.circle["id"])
    assert before.floor is not None and before.floor.holder == m1.id and before.queue == [m2.id]

    # m1's browser rebuilt its RTCPeerConnection (an ICE failure, a new network) and offers
    # again on the same socket; the new connection is on the same shared port
    old = m1.peer
    again = await room.negotiate(m1.client, "Melati")
    await wait_until(lambda: old.pc.connectionState == "closed")

    after = await room.live.parts.manager.load(room.circle["id"])
    assert after == before  # same version, seat, floor, queue, mutes: the room did not change
    assert room.stats()["peers"] == 3
    assert in_range(room.relay.local_addresses(), media_ports)
    assert again.view() == [mod.id, None, None]
    # audio both ways on the new connection
    await hears(again, mod)
    await hears(mod, again)
    await hears(m2, mod, again)
    assert again.heard(again) == 0

    # a fourth member gets media on that same one port
    late = await join(room.live, room.link("member"), "Anggrek")
    room._clients.append(late)
    peer = ClientPeer("Anggrek")
    room._peers.append(peer)
    answer = await late.command("offer", sdp=await peer.offer())
    assert answer["type"] == "answer", answer
    assert (await late.command("raise_hand"))["type"] == "ack"
    assert room.stats()["peers"] == 4
    assert in_range(room.relay.local_addresses(), media_ports)
    await hears(m2, mod, again)


async def test_the_server_announces_its_media_address_from_the_settings(media_ports: tuple[int, int]) -> None:
    """LINGKAR_MEDIA_ADDRESS through build_app: the answer names only that address (the
    client is never given it, so nothing tries to reach 203.0.113.7)."""
    low, high = media_ports
    async with live_server("memory", media_address="203.0.113.7", media_ports=f"{low}-{high}") as live:
        room = Room(live)
        try:
            await room.create()
            client = await join(live, room.link("member"), "Melati")
            room._clients.append(client)
            peer = ClientPeer("Melati")
            room._peers.append(peer)
            answer = await client.command("offer", sdp=await peer.offer())
            assert answer["type"] == "answer", answer
            lines = [line for line in answer["sdp"].splitlines() if line.startswith(("a=candidate:", "c="))]
            assert lines and all(" 203.0.113.7" in line for line in lines), lines
            ((address, port),) = live.parts.relay.local_addresses()
            assert address == "0.0.0.0" and low <= port <= high
        finally:
            await room.aclose()
