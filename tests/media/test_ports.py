"""The relay's media address and ports (issue 13, DESIGN §7 "Real networks", §10).

Real aiortc peers on loopback. Nothing is ever sent to the announced documentation address
203.0.113.7: it is only written into SDP, and a test that connects through it hands the
client an answer in which a simulated 1:1 NAT replaced it with this host's own address.

If `test_the_gathering_path_has_the_expected_shape` fails after an aioice or aiortc upgrade,
the relay listens on ports the firewall does not open: read aioice's ice.py and fix
server/media/ports.py before anything else.
"""

from __future__ import annotations

import re
import socket

import aioice
import pytest
from aioice import ice
from aiortc import sdp

from server.media import OfferError, OfferProblem, ports
from testkit.ports import free_port_range

from .conftest import CIRCLE, Room
from .peers import ClientPeer, wait_until

ENOUGH = 25  # packets: half a second of audio
ANNOUNCED = "203.0.113.7"  # TEST-NET-3: never reached, only written into SDP


@pytest.fixture
def port_range() -> tuple[int, int]:
    return free_port_range(10)


@pytest.fixture
def two_ports() -> tuple[int, int]:
    return free_port_range(2)


def candidates(answer_sdp: str) -> list[tuple[str, int]]:
    found = []
    for media in sdp.SessionDescription.parse(answer_sdp).media:
        found += [(c.ip, c.port) for c in media.ice_candidates]
    return found


def host_ipv4() -> str:
    """An IPv4 address of this host that aioice gathers on (the test peers' own)."""
    return next(a for a in ice.get_host_addresses(use_ipv4=True, use_ipv6=False))


def taken(port_range: tuple[int, int]) -> set[tuple[str, int]]:
    """(address, port) in the range that something on this host holds, on the addresses
    aioice gathers on (probed by binding, which sends nothing)."""
    held = set()
    for address in ice.get_host_addresses(use_ipv4=True, use_ipv6=True):
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        for port in range(port_range[0], port_range[1] + 1):
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                try:
                    probe.bind((address, port))
                except OSError:
                    held.add((address, port))
    return held


def in_range(addresses: list[tuple[str, int]], port_range: tuple[int, int]) -> bool:
    return bool(addresses) and all(port_range[0] <= port <= port_range[1] for _, port in addresses)


async def talk(room: Room, *names: str) -> None:
    """Every named member hears every other one (each audible in turn is too slow: all at once)."""
    room.relay.set_audible(CIRCLE, list(names))
    base = {(a, b): room.peers[a].received_from(b) for a in names for b in names if a != b}
    await wait_until(lambda: all(room.peers[a].received_from(b) >= n + ENOUGH for (a, b), n in base.items()))


# --- the fence ---------------------------------------------------------------------------


def test_aioice_minor_version_is_the_one_the_port_range_was_written_for() -> None:
    assert aioice.__version__.startswith("0.13."), aioice.__version__


def test_the_gathering_path_has_the_expected_shape() -> None:
    ports.check_supported()


# --- LINGKAR_MEDIA_PORTS -----------------------------------------------------------------


@pytest.mark.parametrize("udp_mux", [True, False], ids=["shared", "per-member"])
async def test_every_socket_of_the_relay_lies_in_the_range(
    rooms: list[Room], port_range: tuple[int, int], udp_mux: bool
) -> None:
    room = Room(media_ports=port_range, udp_mux=udp_mux)
    rooms.append(room)
    await room.join("mod")
    await room.join("m1")
    await room.join("ear", listen_only=True)
    await talk(room, "mod", "m1")
    await wait_until(lambda: room.peers["ear"].received_from("m1") >= ENOUGH)

    sockets = room.relay.local_addresses()
    assert in_range(sockets, port_range), sockets
    # every member has a socket on each address aioice gathers on, and each is announced
    addresses = ice.get_host_addresses(use_ipv4=True, use_ipv6=True)
    assert len(sockets) == 3 * len(addresses)
    assert {a for a, _ in sockets} == set(addresses)
    if udp_mux:  # ... the same one: one shared socket per address, for everyone
        assert len(set(sockets)) == len(addresses)
        assert {s.sockname for s in room.relay.shared_sockets()} == set(sockets)
        assert taken(port_range) == set(sockets)
    else:
        assert len(set(sockets)) == 3 * len(addresses)
    for name in ("mod", "m1", "ear"):
        answer = room.peers[name].pc.remoteDescription.sdp
        assert in_range(candidates(answer), port_range)
    # the nominated pairs run over those sockets
    for peer in room.relay._peers.values():
        nominated = peer.pc.getTransceivers()[0].receiver.transport.transport._connection._nominated
        assert in_range([pair.protocol.transport.get_extra_info("sockname")[:2] for pair in nominated.values()],
                        port_range)


async def test_a_used_up_range_refuses_the_next_offer_and_the_others_keep_their_audio(
    rooms: list[Room], two_ports: tuple[int, int]
) -> None:
    """Each relay (each `lingkar serve` on the host) holds one port of the range per
    address; a range with no port left for one more refuses its offers clearly."""
    first, second, third = Room(media_ports=two_ports), Room(media_ports=two_ports), Room(media_ports=two_ports)
    rooms.extend((first, second, third))
    await first.join("m1")
    await first.join("m2")
    await second.join("m3")
    await second.join("m4")
    await talk(first, "m1", "m2")
    before = set(first.relay.local_addresses()) | set(second.relay.local_addresses())
    assert taken(two_ports) == before  # two relays fill two ports on every address

    late = ClientPeer("m5")
    with pytest.raises(OfferError) as refused:
        await third.relay.answer(CIRCLE, "m5", await late.offer(), listen_only=False)
    await late.close()
    assert refused.value.problem is OfferProblem.NO_PORT
    assert str(refused.value) == "no media port free; try again later"
    stats = third.relay.stats()
    assert (stats["peers"], stats["listeners"], stats["offers_refused_no_port"]) == (0, 0, 1)
    assert third.relay.slots(CIRCLE, "m5") is None
    # the refused offer left no socket behind, and the others did not notice
    assert taken(two_ports) == before
    await talk(first, "m1", "m2")
    await talk(second, "m3", "m4")
    assert all(p.pc.connectionState == "connected" for p in first.peers.values())

    # a relay stops: its port goes back to the range, and the next offer gets it
    await second.aclose()
    rooms.remove(second)
    assert taken(two_ports) == set(first.relay.local_addresses())
    await third.join("m5")
    await third.join("m6")
    assert in_range(third.relay.local_addresses(), two_ports)
    await talk(third, "m5", "m6")


async def test_a_new_offer_from_a_member_replaces_the_connection_on_the_same_port(
    rooms: list[Room], two_ports: tuple[int, int]
) -> None:
    """A client that rebuilt its RTCPeerConnection (ICE failure, network change) offers
    again: the old connection closes first, and the new one is on the same shared port."""
    room = Room(media_ports=two_ports)
    rooms.append(room)
    await room.join("m1")
    old = await room.join("m2")
    await talk(room, "m1", "m2")
    old_sockets = set(room.relay.local_addresses())

    new = await room.join("m2")  # the same member, a new peer connection
    await wait_until(lambda: old.pc.connectionState == "closed" and new.pc.connectionState == "connected")
    await old.close()
    assert room.relay.stats()["peers"] == 2
    assert set(room.relay.local_addresses()) == taken(two_ports) == old_sockets
    await talk(room, "m1", "m2")
    assert room.views["m1"] == ["m2", None, None] and room.views["m2"] == ["m1", None, None]


async def test_a_range_of_one_port_serves_every_member_on_every_address(rooms: list[Room]) -> None:
    one = free_port_range(1)
    room = Room(media_ports=one)
    rooms.append(room)
    for name in ("m1", "m2", "m3"):
        await room.join(name)
    await room.join("ear", listen_only=True)
    assert {port for _, port in room.relay.local_addresses()} == {one[0]}
    await talk(room, "m1", "m2", "m3")
    await wait_until(lambda: room.peers["ear"].received_from("m1") >= ENOUGH)


async def test_a_connection_closed_while_it_gathers_keeps_no_socket(port_range: tuple[int, int]) -> None:
    gathering = ports.Gathering(ports=port_range)
    connection = ice.Connection(ice_controlling=False)
    gathering._install(connection)
    await connection.close()  # as a close_member during an answer does
    await connection.gather_candidates()
    assert connection.local_candidates == []
    assert taken(port_range) == set()


# --- LINGKAR_MEDIA_ADDRESS ---------------------------------------------------------------


async def test_the_answer_announces_only_the_media_address(rooms: list[Room], port_range: tuple[int, int]) -> None:
    room = Room(media_address=ANNOUNCED, media_ports=port_range)
    rooms.append(room)
    peer = ClientPeer("m1")
    try:
        answer = await room.relay.answer(CIRCLE, "m1", await peer.offer(), listen_only=False)
    finally:
        await peer.close()  # never given the answer: nothing tries to reach 203.0.113.7
    found = candidates(answer)
    assert found and {address for address, _ in found} == {ANNOUNCED}
    assert in_range(found, port_range)
    parsed = sdp.SessionDescription.parse(answer)
    assert {m.host for m in parsed.media} == {ANNOUNCED}
    for address in ice.get_host_addresses(use_ipv4=True, use_ipv6=True):
        assert address not in answer  # the private addresses stay out
    assert not re.search(r"typ (srflx|relay)|raddr", answer)
    # one socket, on the wildcard (the address is on no interface here), on the announced port
    (socket_address,) = room.relay.local_addresses()
    assert socket_address == ("0.0.0.0", found[0][1])


async def test_a_member_is_heard_through_a_1_to_1_nat_to_the_media_address(
    rooms: list[Room], port_range: tuple[int, int]
) -> None:
    """A 1:1 NAT rewrites the public destination to the host's private address and keeps
    the port: here the answer the client gets has the host's address where the relay wrote
    203.0.113.7, and the relay's socket on the wildcard receives what arrives there."""
    private = host_ipv4()
    room = Room(media_address=ANNOUNCED, media_ports=port_range)
    rooms.append(room)
    for name in ("m1", "m2"):
        peer = ClientPeer(name)
        room.peers[name] = peer
        answer = await room.relay.answer(CIRCLE, name, await peer.offer(), listen_only=False)
        assert ANNOUNCED in answer
        await peer.accept(answer.replace(ANNOUNCED, private))
    await talk(room, "m1", "m2")
    assert in_range(room.relay.local_addresses(), port_range)


async def test_a_media_address_this_host_has_is_listened_on_and_announced(rooms: list[Room]) -> None:
    room = Room(media_address="127.0.0.1")
    rooms.append(room)
    await room.join("m1")
    await room.join("m2")
    assert {address for address, _ in candidates(room.peers["m1"].pc.remoteDescription.sdp)} == {"127.0.0.1"}
    assert {address for address, _ in room.relay.local_addresses()} == {"127.0.0.1"}
    await talk(room, "m1", "m2")


def test_a_relay_with_a_media_address_or_ports_refuses_turn_servers_of_its_own() -> None:
    with pytest.raises(ValueError, match="STUN only"):
        Room(media_ports=(40000, 40999), ice_servers=[{"urls": "turn:turn.example.org", "username": "u",
                                                      "credential": "c"}])
