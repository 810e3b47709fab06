"""The media relay through the real server (DESIGN §7, F7, §4 invariants 2 and 7).

Real aiortc peers on loopback, the real server on both stores, no mocks: every member joins
over the WebSocket, sends `offer {sdp}`, applies the `answer` and follows `media {slots}`.
Each client peer sends a distinct tone whose Opus padding carries its pseudonym, so a
listener counts what reached it per source without decoding (tests/media/peers.py).
The room rules alone decide who is heard; the relay learns it from the room's events.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from aiortc import sdp

from server.media.relay import MediaRelay
from tests.live import Client, Live, join, live_server, token_of

from .peers import SILENCE, ClientPeer, wait_until

ENOUGH = 25  # packets: half a second of audio
SILENCE_FRAMES = 3  # the relay ends a source's sound in a slot with this many silence frames
TONES = {"Pendamping": 330.0, "Melati": 440.0, "Kenanga": 550.0, "Anggrek": 660.0}

Slots = list[str | None]


@pytest.fixture(params=["memory", "redis"])
def store_url(request: pytest.FixtureRequest) -> str:
    if request.param == "memory":
        return "memory"
    return str(request.getfixturevalue("redis_url"))


@dataclass
class Member:
    """One participant: their socket and their browser's peer connection."""

    name: str
    client: Client
    peer: ClientPeer
    offer_sdp: str
    answer_sdp: str

    @property
    def id(self) -> str:
        return self.client.member_id

    def heard(self, other: Member) -> int:
        """Packets of `other` that reached this member, over all slots."""
        return self.peer.received_from(other.name)

    def silence(self) -> int:
        return self.peer.received_from(SILENCE)

    def media_frames(self) -> list[dict[str, Any]]:
        return [fr for fr in self.client.frames if fr.get("type") == "media"]

    def levels_frames(self) -> list[dict[str, Any]]:
        return [fr for fr in self.client.frames if fr.get("type") == "levels"]

    def view(self) -> Slots | None:
        """The slots as the server last announced them."""
        frames = self.media_frames()
        return list(frames[-1]["slots"]) if frames else None

    async def view_becomes(self, slots: Slots) -> None:
        """Wait until the latest `media {slots}` frame says `slots`."""
        await self.client.wait(lambda fr: fr.get("type") == "media" and self.view() == slots
                               and fr is self.media_frames()[-1])

    async def ack(self, type_: str, **fields: Any) -> dict[str, Any]:
        answer = await self.client.command(type_, **fields)
        assert answer["type"] == "ack", answer
        return answer

    async def error(self, type_: str, **fields: Any) -> str:
        answer = await self.client.command(type_, **fields)
        assert answer["type"] == "error", answer
        return str(answer["code"])


async def settled(room: Room, condition: Callable[[dict[str, int]], bool], limit: float = 10.0) -> None:
    """The relay's bookkeeping (its `stats()`) reaches `condition`, awaited through the relay's
    own change notifications (at most `limit` s)."""
    async with asyncio.timeout(limit):
        await room.relay.wait_until(lambda: condition(room.stats()))


class Room:
    """A live server, one circle on it, and its members with their media."""

    def __init__(self, live: Live) -> None:
        self.live = live
        self.circle: dict[str, Any] = {}
        self.members: list[Member] = []
        self._peers: list[ClientPeer] = []
        self._clients: list[Client] = []

    @property
    def relay(self) -> MediaRelay:
        return self.live.parts.relay

    def stats(self) -> dict[str, int]:
        return self.relay.stats()

    async def create(self, **settings: Any) -> None:
        self.circle = await self.live.create_circle(**settings)

    def link(self, role: str) -> str:
        return str(self.circle["links"][role])

    async def enter(self, role: str, name: str, *, listen_only: bool = False,
                    mic: bool | None = None) -> Member:
        """Join over the WebSocket, offer, apply the answer, get the first `media` frame."""
        client = await join(self.live, self.link(role), name, listen_only=listen_only)
        self._clients.append(client)
        return await self.negotiate(client, name, listen_only=listen_only, mic=mic)

    async def negotiate(self, client: Client, name: str, *, listen_only: bool = False,
                        mic: bool | None = None) -> Member:
        peer = ClientPeer(name, mic=not listen_only if mic is None else mic,
                          hz=TONES.get(name, 770.0))
        self._peers.append(peer)
        offer = await peer.offer()
        start = len(client.frames)
        answer = await client.command("offer", sdp=offer)
        assert answer["type"] == "answer", answer
        await peer.accept(answer["sdp"])
        # the first view follows the answer on the same socket (§5, §7)
        await client.wait(lambda fr: fr.get("type") == "media", start=start)
        await wait_until(lambda: peer.pc.connectionState == "connected")
        member = Member(name, client, peer, offer, answer["sdp"])
        self.members.append(member)
        return member

    async def four(self) -> tuple[Member, Member, Member, Member]:
        """The usual circle: a moderator and three members, each with a microphone and a tone."""
        await self.create()
        mod = await self.enter("moderator", "Pendamping")
        m1 = await self.enter("member", "Melati")
        m2 = await self.enter("member", "Kenanga")
        m3 = await self.enter("member", "Anggrek")
        return mod, m1, m2, m3

    async def aclose(self) -> None:
        for peer in self._peers:
            await peer.close()
        for client in self._clients:
            await client.close()


@pytest.fixture
async def room(store_url: str) -> AsyncIterator[Room]:
    async with live_server(store_url) as live:
        room = Room(live)
        try:
            yield room
        finally:
            await room.aclose()


def counts(listeners: list[Member], source: Member) -> dict[str, int]:
    return {m.name: m.heard(source) for m in listeners}


# --- who is heard --------------------------------------------------------------------------


async def test_floor_holder_and_moderator_are_heard_and_nobody_else(room: Room) -> None:
    mod, m1, m2, m3 = await room.four()
    everyone = [mod, m1, m2, m3]
    # members join muted; only the moderator is heard, in every other member's first slot
    for member in (m1, m2, m3):
        await member.view_becomes([mod.id, None, None])
    await mod.view_becomes([None, None, None])

    await mod.ack("give_floor", member_id=m1.id)
    await m2.ack("unmute_self")  # unmuted, but without the floor: still not heard (§4.2)
    await m1.ack("unmute_self")
    for member in (m2, m3):
        await member.view_becomes([mod.id, m1.id, None])
    await m1.view_becomes([mod.id, None, None])
    await mod.view_becomes([m1.id, None, None])

    await wait_until(lambda: all(m.heard(m1) >= ENOUGH for m in (mod, m2, m3))
                     and all(m.heard(mod) >= ENOUGH for m in (m1, m2, m3)))
    assert [m.heard(m2) for m in everyone] == [0, 0, 0, 0]  # the gated member
    assert [m.heard(m3) for m in everyone] == [0, 0, 0, 0]  # muted
    assert m1.heard(m1) == mod.heard(mod) == 0  # nobody hears themself
    assert m2.peer.slot_of(m1.name) == [1] and m2.peer.slot_of(mod.name) == [0]

    # the floor moves to m3 (unmuted beforehand): the slot that carried m1 now carries m3
    await m3.ack("unmute_self")
    await mod.ack("give_floor", member_id=m3.id)
    await m2.view_becomes([mod.id, m3.id, None])
    await m1.view_becomes([mod.id, m3.id, None])
    await mod.view_becomes([m3.id, None, None])
    base = m2.heard(mod)
    await wait_until(lambda: m2.heard(m3) >= ENOUGH and m1.heard(m3) >= ENOUGH
                     and mod.heard(m3) >= ENOUGH)
    assert m2.peer.slot_of(m3.name) == [1]
    # m1 lost the floor but is still unmuted: not forwarded any more (once what was queued
    # before the switch has arrived: a second of the moderator's audio is ample)
    await wait_until(lambda: m2.heard(mod) >= base + 2 * ENOUGH)
    before = counts([mod, m2, m3], m1)
    await wait_until(lambda: m2.heard(mod) >= base + 3 * ENOUGH)
    assert counts([mod, m2, m3], m1) == before
    assert [m.heard(m2) for m in everyone] == [0, 0, 0, 0]

    # the moderator mutes the holder: m3 is no longer forwarded, the moderator still is
    silence = m2.silence()
    await mod.ack("mute", member_id=m3.id)
    await m2.view_becomes([mod.id, None, None])
    await mod.view_becomes([None, None, None])
    # m3's last queued packets are followed by the relay's silence frames in that slot
    await wait_until(lambda: m2.silence() >= silence + SILENCE_FRAMES)
    before = counts([mod, m1, m2], m3)
    base = m2.heard(mod)
    await wait_until(lambda: m2.heard(mod) >= base + ENOUGH and m1.heard(mod) >= base + ENOUGH)
    assert counts([mod, m1, m2], m3) == before


async def test_modified_client_muted_by_the_moderator_gains_nothing(room: Room) -> None:
    await room.create()
    mod = await room.enter("moderator", "Pendamping")
    sender = await room.enter("member", "Melati")
    # a listener without a microphone, so the only gated packets are the sender's
    ear = await room.enter("member", "Kenanga", listen_only=True)
    await mod.ack("give_floor", member_id=sender.id)
    await sender.ack("unmute_self")
    await ear.view_becomes([mod.id, sender.id, None])
    await wait_until(lambda: ear.heard(sender) >= ENOUGH and mod.heard(sender) >= ENOUGH)

    silence = ear.silence()
    await mod.ack("mute", member_id=sender.id)
    await ear.view_becomes([mod.id, None, None])
    await wait_until(lambda: ear.silence() >= silence + SILENCE_FRAMES)
    before = counts([mod, ear], sender)
    dropped = room.stats()["packets_dropped_gated"]
    assert sender.peer.track is not None
    sent = sender.peer.track.sent

    # the client ignores the mute and keeps sending: its packets reach the server ...
    await wait_until(lambda: room.stats()["packets_dropped_gated"] >= dropped + 2 * ENOUGH)
    assert sender.peer.track.sent >= sent + 2 * ENOUGH
    # ... and none of them reach anyone
    assert counts([mod, ear], sender) == before
    assert ear.heard(mod) > 0


async def test_listen_only_members_have_no_upstream_even_when_forcing_a_mic(room: Room) -> None:
    await room.create()
    mod = await room.enter("moderator", "Pendamping")
    m1 = await room.enter("member", "Melati")
    assert room.stats()["speakers"] == 2
    quiet = await room.enter("member", "Kenanga", listen_only=True)
    sneaky = await room.enter("member", "Anggrek", listen_only=True, mic=True)  # modified client

    # the listen-only offer has no microphone m-line: every m-line only receives
    offer = sdp.SessionDescription.parse(quiet.offer_sdp)
    assert [m.direction for m in offer.media] == ["recvonly"] * 3
    # the modified client offered one anyway; the server made it inactive
    assert sdp.SessionDescription.parse(sneaky.offer_sdp).media[0].direction == "sendrecv"
    assert sdp.SessionDescription.parse(sneaky.answer_sdp).media[0].direction == "inactive"
    stats = room.stats()
    assert (stats["peers"], stats["listeners"], stats["speakers"]) == (4, 4, 2)
    assert await sneaky.error("unmute_self") == "not_allowed"
    await mod.ack("give_floor", member_id=m1.id)
    await m1.ack("unmute_self")
    await sneaky.view_becomes([mod.id, m1.id, None])

    await sneaky.peer.force_mic()
    assert sneaky.peer.track is not None
    sent = sneaky.peer.track.sent
    await wait_until(lambda: sneaky.peer.track is not None and sneaky.peer.track.sent >= sent + 2 * ENOUGH
                     and all(m.heard(m1) >= 2 * ENOUGH for m in (mod, quiet, sneaky)))
    assert [m.heard(sneaky) for m in (mod, m1, quiet)] == [0, 0, 0]
    assert [m.heard(quiet) for m in (mod, m1, sneaky)] == [0, 0, 0]
    assert room.stats()["speakers"] == 2
    # a listen-only member is never put in anyone's slot
    assert all(sneaky.id not in (m.view() or []) for m in (mod, m1, quiet))


async def test_lobby_members_cannot_negotiate_media_and_get_no_media_frames(room: Room) -> None:
    await room.create(lobby=True)
    mod = await room.enter("moderator", "Pendamping")
    waiting = await join(room.live, room.link("member"), "Kenanga", expect="lobby")
    room._clients.append(waiting)
    peer = ClientPeer("Kenanga", hz=550.0)
    room._peers.append(peer)
    answer = await waiting.command("offer", sdp=await peer.offer())
    assert answer["type"] == "error" and answer["code"] == "forbidden", answer
    assert room.stats()["peers"] == 1

    # the moderator speaks; a seated listener hears it and sees levels, the lobby sees nothing
    await mod.ack("admit", member_id=waiting.member_id)
    await waiting.wait(lambda fr: fr.get("type") == "admitted")
    seated = await room.negotiate(waiting, "Kenanga")  # admitted: now the offer is answered
    await wait_until(lambda: seated.heard(mod) >= ENOUGH and seated.levels_frames() != [])
    assert room.stats()["peers"] == 2

    other = await join(room.live, room.link("member"), "Anggrek", expect="lobby")
    room._clients.append(other)
    # while it waits, the speaking indicator goes off and on again and slots change
    start = len(seated.client.frames)
    await mod.ack("mute_self")
    await seated.view_becomes([None, None, None])
    await seated.client.wait(lambda fr: fr.get("type") == "levels" and fr["levels"][mod.id] == 127,
                             start=start)
    start = len(seated.client.frames)
    await mod.ack("unmute_self")
    await seated.view_becomes([mod.id, None, None])
    await seated.client.wait(lambda fr: fr.get("type") == "levels" and fr["levels"][mod.id] == 30,
                             start=start)
    base = seated.heard(mod)
    await wait_until(lambda: seated.heard(mod) >= base + ENOUGH)
    assert [fr["type"] for fr in other.frames] == ["lobby"]


async def test_an_offer_with_40_m_lines_is_refused_and_the_connection_stays_open(room: Room) -> None:
    """Issue 16: the relay refuses it before any aiortc work; the member gets `bad_frame`
    saying why, and carries on (the refused offer made no PeerConnection)."""
    await room.create()
    client = await join(room.live, room.link("member"), "Melati")
    room._clients.append(client)
    hostile = ClientPeer("Melati", slots=39)  # a microphone and 39 slots
    room._peers.append(hostile)

    answer = await client.command("offer", sdp=await hostile.offer())

    assert answer["type"] == "error" and answer["code"] == "bad_frame", answer
    assert answer["message"] == "offer refused: too many m-lines: 40, at most 4 (a microphone and 3 slots)"
    assert room.stats()["peers"] == 0
    assert (await client.command("raise_hand"))["type"] == "ack"


# --- closing -------------------------------------------------------------------------------


async def test_leave_removal_and_end_close_the_peer_connections(room: Room) -> None:
    mod, m1, m2, m3 = await room.four()
    assert room.stats()["peers"] == 4
    await mod.ack("give_floor", member_id=m1.id)
    await m1.ack("unmute_self")
    await wait_until(lambda: m2.heard(m1) >= ENOUGH)

    # quiet leave: the media goes in the same step as the leave (F8)
    await m1.ack("leave_quietly", need_support=False)
    assert room.stats()["peers"] == 3
    assert await m1.client.closed() == 4001
    await wait_until(lambda: m1.peer.pc.connectionState == "closed")
    await m2.view_becomes([mod.id, None, None])

    await mod.ack("remove", member_id=m2.id)
    assert await m2.client.closed() == 4403
    await wait_until(lambda: m2.peer.pc.connectionState == "closed")
    await settled(room, lambda st: st["peers"] == 2)
    stats = room.stats()
    assert (stats["listeners"], stats["speakers"]) == (2, 2)

    await mod.ack("end")
    assert await m3.client.closed() == 4000
    assert await mod.client.closed() == 4000
    # the relay's PeerConnections really closed (DTLS close_notify reached the clients)
    await wait_until(lambda: all(m.peer.pc.connectionState == "closed" for m in (mod, m3)))
    await settled(room, lambda st: st["peers"] == 0 and st["circles"] == 0)
    stats = room.stats()
    assert {k: stats[k] for k in ("peers", "circles", "speakers", "listeners", "routes",
                                  "level_timers", "tasks")} == dict.fromkeys(
        ("peers", "circles", "speakers", "listeners", "routes", "level_timers", "tasks"), 0)


async def test_last_member_leaving_leaves_nothing_in_the_relay(room: Room) -> None:
    await room.create()
    mod = await room.enter("moderator", "Pendamping")
    m1 = await room.enter("member", "Melati")
    await wait_until(lambda: m1.heard(mod) >= ENOUGH)
    await m1.ack("leave")
    await mod.ack("leave")
    assert await mod.client.closed() == 4001
    await settled(room, lambda st: st["peers"] == 0)
    await settled(room, lambda st: st["circles"] == 0 and st["tasks"] == 0)


async def test_a_resumed_connection_keeps_its_media_when_the_replaced_one_closes(room: Room) -> None:
    await room.create()
    mod = await room.enter("moderator", "Pendamping")
    old = await room.enter("member", "Melati")
    await wait_until(lambda: old.heard(mod) >= ENOUGH)

    # the client resumes on a new socket (a phone between networks) while the old one is open
    fresh = await Client.connect(room.live)
    room._clients.append(fresh)
    await fresh.send({"type": "hello", "token": token_of(room.link("member")), "name": "Melati",
                      "listen_only": False, "resume": old.client.resume})
    welcome = await fresh.wait(lambda fr: fr.get("type") == "welcome")
    fresh.member_id = welcome["member_id"]
    assert fresh.member_id == old.id
    new = await room.negotiate(fresh, "Melati")
    await wait_until(lambda: new.heard(mod) >= ENOUGH)
    assert room.stats()["peers"] == 2

    # the replaced socket is closed; the new connection's media stays
    assert await old.client.closed() == 4001
    base = new.heard(mod)
    await wait_until(lambda: new.heard(mod) >= base + 2 * ENOUGH)
    assert new.peer.pc.connectionState == "connected"
    assert room.stats()["peers"] == 2


# --- speaking indicators -------------------------------------------------------------------


async def test_levels_show_the_holder_speaking_at_a_bounded_rate(room: Room) -> None:
    await room.create()
    mod = await room.enter("moderator", "Pendamping")
    m1 = await room.enter("member", "Melati")
    m2 = await room.enter("member", "Kenanga")
    await mod.ack("give_floor", member_id=m1.id)
    await m1.ack("unmute_self")

    def speaking(member: Member) -> bool:
        return any(fr["levels"].get(m1.id, 127) < 127 for fr in member.levels_frames())

    await wait_until(lambda: all(speaking(m) for m in (mod, m2)) and m2.heard(m1) >= 4 * ENOUGH)
    for member in (mod, m1, m2):
        frames = member.levels_frames()
        assert frames and frames[-1]["levels"] == {m1.id: 30, mod.id: 30}  # the clients send 30
        # a few a second per circle, not one per packet
        assert len(frames) * 5 <= m2.heard(m1) + m2.heard(mod)
    # a gated member never shows as speaking
    assert all(m2.id not in fr["levels"] for fr in m2.levels_frames())

    # muted: the indicator switches off
    await mod.ack("mute", member_id=m1.id)
    await m2.client.wait(lambda fr: fr.get("type") == "levels" and fr["levels"].get(m1.id) == 127)
