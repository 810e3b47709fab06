"""The relay with real aiortc peers on loopback: who hears whom (DESIGN §7, F7, §4.2/§4.7)."""

from __future__ import annotations

import asyncio
import os

import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, sdp
from prometheus_client import REGISTRY

from server.media import MediaRelay, OfferError, OfferProblem
from server.media.slot import SILENCE_FRAMES

from .conftest import CIRCLE, Room
from .peers import SILENCE, ClientPeer, wait_until

ENOUGH = 25  # packets: half a second of audio


def heard(room: Room, listener: str, source: str) -> int:
    return room.peers[listener].received_from(source)


async def test_audible_member_reaches_every_other_member_in_the_slot_announced(room: Room) -> None:
    await room.join_all()
    room.relay.set_audible(CIRCLE, ["m1"])

    for name in ("mod", "m2", "m3"):
        assert room.views[name] == ["m1", None, None]
    await wait_until(lambda: all(heard(room, n, "m1") >= ENOUGH for n in ("mod", "m2", "m3")))
    for name in ("mod", "m2", "m3"):
        assert room.peers[name].slot_of("m1") == [0]
    assert room.peers["m1"].received_from("m1") == 0


async def test_member_not_audible_is_not_forwarded_to_anyone(room: Room) -> None:
    await room.join_all()
    room.relay.set_audible(CIRCLE, ["m1"])

    # m2, m3 and the moderator send all along; wait until many of their packets were dropped.
    await wait_until(
        lambda: (
            room.relay.packets_dropped_gated >= 3 * ENOUGH
            and all(heard(room, n, "m1") >= ENOUGH for n in ("mod", "m2", "m3"))
        )
    )
    for listener in room.peers:
        for source in ("mod", "m2", "m3"):
            assert heard(room, listener, source) == 0, (listener, source)


async def test_member_never_receives_their_own_audio(room: Room) -> None:
    await room.join_all()
    room.relay.set_audible(CIRCLE, ["mod", "m1"])

    assert room.views["mod"] == ["m1", None, None]
    assert room.views["m1"] == ["mod", None, None]
    assert room.views["m2"] == ["mod", "m1", None]
    await wait_until(lambda: heard(room, "mod", "m1") >= ENOUGH and heard(room, "m1", "mod") >= ENOUGH)
    await wait_until(lambda: heard(room, "m2", "mod") >= ENOUGH and heard(room, "m2", "m1") >= ENOUGH)
    assert heard(room, "mod", "mod") == 0
    assert heard(room, "m1", "m1") == 0


async def test_changing_the_audible_set_moves_the_slot_and_keeps_timestamps_continuous(
    room: Room,
) -> None:
    await room.join_all()
    listener = room.peers["m3"]
    listener.arrivals = []
    room.relay.set_audible(CIRCLE, ["m1"])
    await wait_until(lambda: listener.received_from("m1") >= ENOUGH)

    room.slot_calls.clear()
    room.relay.set_audible(CIRCLE, ["m2"])

    assert room.views["m3"] == ["m2", None, None]
    assert room.views["m1"] == ["m2", None, None]
    assert room.views["m2"] == [None, None, None]
    # every member's view changed, so each was told once
    assert sorted(member for _, member, _ in room.slot_calls) == ["m1", "m2", "m3", "mod"]
    await wait_until(lambda: listener.received_from("m2") >= ENOUGH)

    slot0 = [a for a in listener.arrivals if a.slot == 0]
    sources = [a.source for a in slot0]
    first_m2 = sources.index("m2")
    assert set(sources[:first_m2]) <= {"m1", SILENCE} and SILENCE in sources[:first_m2]
    assert "m1" not in sources[first_m2:]
    # one RTP stream throughout, timestamps moving forward across the switch
    assert len({a.ssrc for a in slot0}) == 1
    before, after = slot0[first_m2 - 1], slot0[first_m2]
    step = (after.timestamp - before.timestamp) % (1 << 32)
    assert 0 < step < 48000 * 10


async def test_muting_stops_forwarding_and_ends_with_silence(room: Room) -> None:
    await room.join_all()
    listeners = [room.peers[n] for n in ("mod", "m2", "m3")]
    for peer in listeners:
        peer.arrivals = []
    room.relay.set_audible(CIRCLE, ["m1"])
    await wait_until(lambda: all(p.received_from("m1") >= ENOUGH for p in listeners))

    room.relay.set_audible(CIRCLE, [])  # m1 muted: the gate drops its packets from now on
    assert room.views["m2"] == [None, None, None]
    forwarded = room.relay.packets_forwarded
    dropped = room.relay.packets_dropped_gated

    # Packets forwarded just before the mute may still be on their way; each slot's
    # silence frames were sent after them on the same stream, so they arrive after them.
    await wait_until(
        lambda: (
            room.relay.packets_dropped_gated >= dropped + 4 * ENOUGH
            and all(p.counts[0][SILENCE] >= SILENCE_FRAMES for p in listeners)
        )
    )
    assert room.relay.packets_forwarded == forwarded  # nothing forwarded since the mute
    for peer in listeners:
        assert peer.arrivals is not None
        assert {a.slot for a in peer.arrivals} == {0}
        sources = [a.source for a in peer.arrivals]
        muted_at = sources.index(SILENCE)
        # m1 until the mute, then its sound ended by the silence frames, then nothing of m1
        assert set(sources[:muted_at]) == {"m1"}, peer.name
        assert sources[muted_at:] == [SILENCE] * SILENCE_FRAMES, peer.name


async def test_modified_client_sending_while_not_audible_gains_nothing(room: Room) -> None:
    await room.join_all()
    room.relay.set_audible(CIRCLE, ["mod"])  # m3 keeps its microphone open regardless
    forwarded = room.relay.packets_forwarded

    await wait_until(
        lambda: (
            room.peers["m3"].track is not None
            and room.peers["m3"].track.sent >= 2 * ENOUGH
            and room.relay.packets_dropped_gated >= 3 * 2 * ENOUGH
            and room.levels != []
        )
    )
    assert all(heard(room, n, "m3") == 0 for n in room.peers)
    # what was forwarded is the moderator's, to the three others (once those in flight arrived)
    await wait_until(
        lambda: room.relay.packets_forwarded - forwarded == sum(heard(room, n, "mod") for n in room.peers)
    )
    assert all(heard(room, n, "m3") == 0 for n in room.peers)
    # and m3 does not even show as speaking
    assert all("m3" not in levels for levels in room.levels)


async def test_listen_only_member_has_no_upstream_even_if_their_client_sends(room: Room) -> None:
    await room.join_all()
    sneaky = await room.join("m4", listen_only=True, mic=True)  # a modified listen-only client
    await room.join("m5", listen_only=True)  # offers no microphone at all
    answer = sdp.SessionDescription.parse(sneaky.pc.remoteDescription.sdp)
    assert answer.media[0].direction == "inactive"

    await sneaky.force_mic()
    room.relay.set_audible(CIRCLE, ["m4", "m5", "m1"])  # even if the rules said they may be heard

    assert room.views["m2"] == ["m1", None, None]
    await wait_until(
        lambda: (
            sneaky.track is not None
            and sneaky.track.sent >= 2 * ENOUGH
            and heard(room, "m5", "m1") >= 2 * ENOUGH
            and heard(room, "m4", "m1") >= 2 * ENOUGH
        )
    )
    assert all(heard(room, n, "m4") == 0 for n in room.peers)
    assert room.relay.stats()["speakers"] == 4
    # m4 is audible by the list yet nothing of it reached the tap: every packet that got
    # through the gate is m1's and went to exactly the five others.
    stats = room.relay.stats()
    assert stats["packets_in"] - stats["packets_dropped_gated"] == stats["packets_forwarded"] / 5


async def test_slots_filled_up_to_what_the_client_offered(room: Room) -> None:
    await room.join_all()
    small = await room.join("m4", slots=1)
    # listening only, it may offer a slot more than S (a microphone's m-line, at most 1 + S)
    large = await room.join("m5", slots=4, listen_only=True)
    answer = sdp.SessionDescription.parse(large.pc.remoteDescription.sdp)
    assert [m.direction for m in answer.media] == ["sendonly"] * 3 + ["inactive"]

    room.relay.set_audible(CIRCLE, ["mod", "m1", "m2", "m3"])  # priority order

    assert room.views["m4"] == ["mod"]
    assert room.views["m5"] == ["mod", "m1", "m2"]  # S slots filled, the rest inactive
    assert room.views["mod"] == ["m1", "m2", "m3"]
    await wait_until(lambda: small.received_from("mod") >= ENOUGH and large.received_from("m2") >= ENOUGH)
    assert small.received_from("m1") == small.received_from("m2") == 0
    assert large.received_from("m3") == 0


async def test_slots_stay_put_for_members_still_heard(room: Room) -> None:
    await room.join_all()
    room.relay.set_audible(CIRCLE, ["m1", "mod"])
    assert room.views["m3"] == ["m1", "mod", None]

    room.relay.set_audible(CIRCLE, ["m2", "mod"])  # floor moves from m1 to m2

    assert room.views["m3"] == ["m2", "mod", None]


async def test_close_member_closes_their_peer_and_leaves_nothing_behind(room: Room) -> None:
    fds_before = len(os.listdir("/proc/self/fd"))
    tasks_before = asyncio.all_tasks()
    await room.join_all()
    room.relay.set_audible(CIRCLE, ["m1"])
    await wait_until(lambda: heard(room, "m2", "m1") >= ENOUGH)

    closing = room.relay.close_member(CIRCLE, "m1")
    # taken out at the call, before anything awaits: its slots and routes are gone already
    assert room.views["m2"] == [None, None, None]
    assert room.relay.slots(CIRCLE, "m1") is None
    await closing
    await room.relay.close_member(CIRCLE, "m1")  # twice is safe

    assert room.views["m2"] == [None, None, None]
    stats = room.relay.stats()
    assert (stats["peers"], stats["speakers"], stats["listeners"], stats["routes"]) == (3, 3, 3, 0)
    await wait_until(lambda: room.peers["m1"].pc.connectionState == "closed")

    for name in ("mod", "m2", "m3"):
        await room.relay.close_member(CIRCLE, name)
    for peer in room.peers.values():
        await peer.close()
    stats = room.relay.stats()
    assert (stats["peers"], stats["listeners"], stats["tasks"]) == (0, 0, 0)
    leftover = asyncio.all_tasks() - tasks_before
    if leftover:
        _, pending = await asyncio.wait(leftover, timeout=5)
        assert not pending, pending
    # only the relay's shared sockets (one per address, bound by the first member) stay
    assert len(os.listdir("/proc/self/fd")) <= fds_before + len(room.relay.shared_sockets())
    assert all(s.connections == 0 for s in room.relay.shared_sockets())
    await room.relay.close()
    assert len(os.listdir("/proc/self/fd")) <= fds_before


async def test_client_that_goes_away_is_closed_on_the_relay(room: Room) -> None:
    await room.join_all()
    room.relay.set_audible(CIRCLE, ["m1"])
    await wait_until(lambda: heard(room, "m2", "m1") >= ENOUGH)

    await room.peers["m1"].close()

    await wait_until(lambda: room.views["m2"] == [None, None, None])
    assert room.relay.stats()["peers"] == 3


async def test_close_circle_closes_every_peer_of_that_circle_only(room: Room) -> None:
    await room.join_all()
    other = await room.join("x1", circle="circle-2")
    room.relay.set_audible(CIRCLE, ["m1"])
    await wait_until(lambda: heard(room, "m2", "m1") >= ENOUGH)

    await room.relay.close_circle(CIRCLE)

    await wait_until(lambda: all(p.pc.connectionState == "closed" for p in room.others("x1")))
    assert other.pc.connectionState == "connected"
    stats = room.relay.stats()
    assert (stats["circles"], stats["peers"], stats["level_timers"]) == (1, 1, 0)
    assert room.relay.slots(CIRCLE, "m2") is None


async def test_speaking_levels_come_from_audio_level_at_a_bounded_rate(room: Room) -> None:
    await room.join_all()
    room.relay.set_audible(CIRCLE, ["m1", "mod"])

    await wait_until(lambda: room.levels != [] and room.relay.packets_in >= 4 * 2 * ENOUGH)
    assert room.levels[-1] == {"m1": 30, "mod": 30}  # the clients send level 30 (-30 dBov)
    # aggregated per window and only sent when something changed, never per packet
    assert len(room.levels) * 5 <= room.relay.packets_in

    room.relay.set_audible(CIRCLE, ["mod"])
    await wait_until(lambda: room.levels[-1].get("m1") == 127)
    assert room.levels[-1]["mod"] == 30


async def test_metrics_count_in_forwarded_and_dropped(room: Room) -> None:
    def sample(name: str) -> float:
        return REGISTRY.get_sample_value(name) or 0.0

    before = {
        n: sample(n) for n in ("lingkar_media_packets_in_total", "lingkar_media_packets_forwarded_total")
    }
    dropped_before = sample("lingkar_media_packets_dropped_total")
    await room.join_all()
    room.relay.set_audible(CIRCLE, ["m1"])
    await wait_until(lambda: heard(room, "m2", "m1") >= ENOUGH)

    stats = room.relay.stats()
    assert (
        sample("lingkar_media_packets_in_total") - before["lingkar_media_packets_in_total"]
        == stats["packets_in"]
    )
    assert (
        sample("lingkar_media_packets_forwarded_total") - before["lingkar_media_packets_forwarded_total"]
        == stats["packets_forwarded"]
    )
    assert sample("lingkar_media_packets_dropped_total") - dropped_before == stats["packets_dropped_gated"]
    assert stats["packets_in"] == stats["packets_dropped_gated"] + stats["packets_forwarded"] // 3


async def test_new_offer_from_a_member_replaces_their_previous_peer(room: Room) -> None:
    await room.join_all()
    old = room.peers["m1"]
    # connected first: a peer closed by the relay mid-handshake ends "failed" or never
    # hears of it, not "closed" (the test raced the handshake; timing-dependent)
    await wait_until(lambda: old.pc.connectionState == "connected")
    await room.join("m1")  # e.g. a reconnect

    await wait_until(lambda: old.pc.connectionState == "closed")
    await old.close()
    room.relay.set_audible(CIRCLE, ["m1"])
    await wait_until(lambda: heard(room, "m2", "m1") >= ENOUGH)
    assert room.relay.stats()["peers"] == 4


@pytest.mark.parametrize(
    ("offer", "problem"),
    [("not an sdp", OfferProblem.MALFORMED), ("datachannel", OfferProblem.UNSUPPORTED)],
)
async def test_unusable_offer_is_refused_and_leaves_nothing(offer: str, problem: OfferProblem) -> None:
    relay = MediaRelay()
    client = RTCPeerConnection(RTCConfiguration(iceServers=[]))  # None: Google's STUN server
    try:
        if offer == "datachannel":
            client.createDataChannel("x")
            await client.setLocalDescription(await client.createOffer())
            offer = client.localDescription.sdp
        with pytest.raises(OfferError) as error:
            await relay.answer(CIRCLE, "m1", offer, listen_only=False)
        assert error.value.problem == problem
        assert relay.stats()["peers"] == 0
    finally:
        await client.close()
        await relay.close()


async def test_listener_joining_later_sees_the_current_slots_without_a_callback(room: Room) -> None:
    await room.join("m1")
    room.relay.set_audible(CIRCLE, ["m1"])
    room.slot_calls.clear()

    late = await room.join("m2")

    assert room.views["m2"] == ["m1", None, None]
    assert room.slot_calls == []  # its first view is read with slots(), after the answer
    await wait_until(lambda: late.received_from("m1") >= ENOUGH)


def test_client_helper_marks_valid_opus_that_names_its_sender() -> None:
    from .peers import encode_tone, mark, unmark

    packet = encode_tone(440.0, frames=3)[1]
    marked = mark(packet, "m1", 7)
    assert unmark(marked) == ("m1", 7)
    assert unmark(packet) is None
    assert unmark(b"\xf8\xff\xfe") is None
    import av

    decoder = av.CodecContext.create("libopus", "r")
    frames = decoder.decode(av.Packet(marked))
    assert frames and frames[0].samples == 960


async def test_relay_is_usable_with_ice_servers_given_as_dicts() -> None:
    relay = MediaRelay(ice_servers=[{"urls": ["turn:127.0.0.1:9"], "username": "u", "credential": "c"}])
    client = ClientPeer("m1")
    try:
        # an unreachable TURN server must not stop the answer
        answer = await relay.answer(CIRCLE, "m1", await client.offer(), listen_only=False)
        assert "a=candidate" in answer
    finally:
        await client.close()
        await relay.close()
