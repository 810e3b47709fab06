"""The relay's shared UDP socket (server/media/mux.py) and its batched sends (issue 15).

Real aiortc peers on loopback, and real UDP sockets for the demultiplexing rules.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aioice import ice, stun
from aiortc import sdp
from aiortc.rtcrtpparameters import RTCRtpReceiveParameters
from aiortc.rtp import HeaderExtensionsMap, RtpPacket
from pylibsrtp import Policy, Session

from server.media import mux, native, sendmmsg

from .conftest import CIRCLE, Room
from .peers import SILENCE, wait_until

KEY = bytes(range(30))  # an SRTP master key and salt (AES-CM-128, HMAC-SHA1-80)
ENOUGH = 25


def _session(direction: int) -> Session:
    return Session(Policy(key=KEY, ssrc_type=direction))


def _capture(connection: Any, into: list[bytes]) -> None:
    """Keep every SRTP datagram (RTP, not RTCP) `connection` receives, as it arrived."""
    original = connection.data_received

    def data_received(data: bytes, component: int) -> None:
        if len(data) > 1 and 127 < data[0] < 192 and not 191 < data[1] < 224:
            into.append(bytes(data))
        original(data, component)

    connection.data_received = data_received


@pytest.mark.parametrize(
    ("udp_mux", "compiled"),
    [(True, True), (True, False), (False, False)],
    ids=["shared-compiled", "shared-python", "per-member"],
)
async def test_forwarded_packets_are_on_the_wire_byte_for_byte_what_aiortc_would_send(
    rooms: list[Room], udp_mux: bool, compiled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every send path (one sendmmsg on the shared socket, written by the compiled fan-out
    or by Python; one sendto per listener) puts on the wire exactly what aiortc's own chain
    makes of the same packet: its RTP serialization (header, mid and audio-level
    extensions, payload), SRTP-protected.

    The relay's session towards the listener and the listener's own are swapped for sessions
    on a known key, so the test can protect the expected packets itself, in the same order."""
    if compiled and native.LIB is None:
        pytest.skip("the fan-out library is not built here")
    if not compiled:
        monkeypatch.setattr(native, "LIB", None)
    room = Room(udp_mux=udp_mux)
    rooms.append(room)
    await room.join("m1")
    ear = await room.join("ear", listen_only=True)
    room.relay.set_audible(CIRCLE, ["m1"])
    await wait_until(lambda: ear.received_from("m1") >= 5)

    peer = room.relay._peers[(CIRCLE, "ear")]
    (out,) = [o for o in peer.outs if o.sent]
    wire: list[bytes] = []
    receiver = next(t.receiver for t in ear.pc.getTransceivers() if t.receiver.transport)
    ear_dtls = receiver.transport
    silence = ear.received_from(SILENCE)
    room.relay.set_audible(CIRCLE, [])  # m1's sound ends with silence frames, on the old keys
    await wait_until(lambda: ear.received_from(SILENCE) >= silence + 3)
    out._dtls._tx_srtp = _session(Policy.SSRC_ANY_OUTBOUND)
    # aiortc sets a transport's SRTP session once, with its CONNECTED state (which makes the
    # relay bind again); swapped behind its back, the relay is told to bind again
    out.unbind()
    ear_dtls._rx_srtp = _session(Policy.SSRC_ANY_INBOUND)
    _capture(ear_dtls.transport._connection, wire)
    before = ear.received_from("m1")
    room.relay.set_audible(CIRCLE, ["m1"])
    await wait_until(lambda: ear.received_from("m1") >= before + ENOUGH)  # it still decodes
    assert len(wire) >= ENOUGH

    answer = peer.pc.localDescription.sdp
    extensions = HeaderExtensionsMap()


    media = next(m for m in sdp.SessionDescription.parse(answer).media if m.rtp.muxId == out._mid)
    extensions.configure(RTCRtpReceiveParameters(headerExtensions=media.rtp.headerExtensions))
    unprotect = _session(Policy.SSRC_ANY_INBOUND)
    protect = _session(Policy.SSRC_ANY_OUTBOUND)
    for datagram in wire:
        packet = RtpPacket.parse(unprotect.unprotect(datagram), extensions)
        assert packet.ssrc == out.ssrc and packet.payload_type == out.payload_type
        assert packet.extensions.mid == out._mid
        assert protect.protect(packet.serialize(extensions)) == datagram
    assert bool(out.c.ready) == compiled  # written by the compiled loop, or by Python


async def test_the_copies_of_one_packet_leave_in_one_system_call(rooms: list[Room]) -> None:
    if not sendmmsg.AVAILABLE:
        pytest.skip("no sendmmsg in this libc")
    room = Room(media_address="127.0.0.1")  # one address, one shared socket: every copy on it
    rooms.append(room)
    await room.join("m1")
    ears = [await room.join(f"ear{i}", listen_only=True) for i in range(4)]
    room.relay.set_audible(CIRCLE, ["m1"])
    await wait_until(lambda: all(e.received_from("m1") >= ENOUGH for e in ears))
    (shared,) = room.relay.shared_sockets()
    batch = shared.batch
    calls, sent = batch.calls, batch.sent
    forwarded = room.relay.stats()["packets_forwarded"]
    await wait_until(lambda: room.relay.stats()["packets_forwarded"] >= forwarded + 4 * ENOUGH)
    # every incoming packet's four copies went out together, in one system call (counted by
    # the batch, whether the compiled fan-out or the Python path made it)
    assert len(room.relay.shared_sockets()) == 1
    calls, sent = batch.calls - calls, batch.sent - sent
    assert calls >= ENOUGH
    assert sent == 4 * calls, (sent, calls)


# --- demultiplexing ----------------------------------------------------------------------


class _Client:
    """A UDP socket that speaks as a client would (or as a forger would)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.address = self.sock.getsockname()

    def request(self, to: tuple[str, int], connection: ice.Connection, *, password: str | None = None) -> bytes:
        message = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
        message.attributes["USERNAME"] = f"{connection.local_username}:client"
        message.attributes["PRIORITY"] = 1
        message.attributes["ICE-CONTROLLING"] = 1
        message.add_message_integrity((password or connection.local_password).encode())
        data = bytes(message)
        self.sock.sendto(data, to)
        return data


@pytest.fixture
async def shared() -> AsyncIterator[tuple[mux.UdpMux, mux.MuxSocket]]:
    udp_mux = mux.UdpMux()

    def bind(address: str) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((address, 0))
        return sock

    shared_socket = await udp_mux.socket_for("127.0.0.1", bind)
    assert shared_socket is not None
    yield udp_mux, shared_socket
    await udp_mux.close()


def _attach(shared_socket: mux.MuxSocket) -> tuple[ice.Connection, list[bytes]]:
    connection = ice.Connection(ice_controlling=False)
    got: list[bytes] = []
    protocol = shared_socket.attach(connection, 1, "127.0.0.1")
    protocol.receiver = type("Receiver", (), {})()  # records what the mux hands over
    protocol.receiver.local_username = connection.local_username  # type: ignore[attr-defined]
    protocol.receiver.local_password = connection.local_password  # type: ignore[attr-defined]
    protocol.receiver._closing = False  # type: ignore[attr-defined]
    protocol.datagram_received = lambda data, addr: got.append(bytes(data))  # type: ignore[method-assign]
    return connection, got


async def _settle(shared_socket: mux.MuxSocket, expected: int) -> None:
    """Wait until the shared socket has handled `expected` more datagrams."""
    loop = asyncio.get_running_loop()
    original = shared_socket.datagram_received
    seen = [0]
    done = loop.create_future()

    def counting(data: bytes, addr: tuple[Any, ...]) -> None:
        original(data, addr)
        seen[0] += 1
        if seen[0] >= expected and not done.done():
            done.set_result(None)

    shared_socket.datagram_received = counting  # type: ignore[method-assign]
    try:
        async with asyncio.timeout(5):
            await done
    finally:
        shared_socket.datagram_received = original  # type: ignore[method-assign]


async def test_a_client_address_belongs_to_a_connection_only_after_an_authenticated_check(
    shared: tuple[mux.UdpMux, mux.MuxSocket],
) -> None:
    _, shared_socket = shared
    victim, victim_got = _attach(shared_socket)
    other, other_got = _attach(shared_socket)
    client, forger = _Client(), _Client()
    to = shared_socket.sockname
    try:
        # media from an address nobody checked from: dropped
        waiting = _settle(shared_socket, 1)
        client.sock.sendto(b"\x80" + os.urandom(40), to)
        await waiting
        assert victim_got == other_got == [] and shared_socket.dropped == 1

        # a check with the right ufrag but a wrong password reaches aioice (which refuses
        # it) but does not make the address the connection's
        waiting = _settle(shared_socket, 2)
        client.request(to, victim, password="wrong")
        client.sock.sendto(b"\x80" + os.urandom(40), to)
        await waiting
        assert len(victim_got) == 1 and other_got == [] and shared_socket.dropped == 2

        # an authenticated check does: then the client's media reaches its connection
        waiting = _settle(shared_socket, 2)
        client.request(to, victim)
        client.sock.sendto(b"\x80media", to)
        await waiting
        assert victim_got[-1] == b"\x80media" and other_got == []

        # a listen-only member's RTCP is dropped as it arrives; its RTP and DTLS are not
        shared_socket._by_ufrag[victim.local_username].drop_rtcp = True
        waiting = _settle(shared_socket, 3)
        client.sock.sendto(bytes([0x80, 200]) + bytes(30), to)  # RTCP (a sender report)
        client.sock.sendto(b"\x80\x6frtp", to)
        client.sock.sendto(bytes([22, 0xFE, 0xFD]) + bytes(20), to)
        await waiting
        assert victim_got[-2:] == [b"\x80\x6frtp", bytes([22, 0xFE, 0xFD]) + bytes(20)]

        # a check for an unknown ufrag is dropped; a forger cannot take the address away
        # (it can only send from its own, which then belongs to the connection it proved)
        waiting = _settle(shared_socket, 3)
        message = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
        message.attributes["USERNAME"] = "nobody:client"
        message.add_message_integrity(b"x" * 22)
        client.sock.sendto(bytes(message), to)
        forger.request(to, other)
        forger.sock.sendto(b"\x80forged", to)
        await waiting
        assert other_got[-1] == b"\x80forged"
        waiting = _settle(shared_socket, 1)
        client.sock.sendto(b"\x80again", to)
        await waiting
        assert victim_got[-1] == b"\x80again"
        # ... not even with its own valid check sent from the victim's address (a forged source)
        waiting = _settle(shared_socket, 2)
        client.request(to, other)
        client.sock.sendto(b"\x80still", to)
        await waiting
        assert victim_got[-1] == b"\x80still" and other_got[-1] != b"\x80still"
        assert shared_socket.refused == 1

        # a connection that closes gives its addresses back: its client is dropped again
        (protocol,) = [p for p in [shared_socket._by_ufrag[victim.local_username]]]
        protocol.transport.close()
        waiting = _settle(shared_socket, 1)
        dropped = shared_socket.dropped
        client.sock.sendto(b"\x80late", to)
        await waiting
        assert victim_got[-1] == b"\x80still" and shared_socket.dropped == dropped + 1
        assert shared_socket.connections == 1
    finally:
        client.sock.close()
        forger.sock.close()


async def test_two_connections_that_drew_the_same_ufrag_are_told_apart(
    shared: tuple[mux.UdpMux, mux.MuxSocket],
) -> None:
    """aioice draws a 4-character ufrag: on a shared socket a second connection that drew a
    taken one gets a fresh one before its answer is written, and each gets its own checks."""
    udp_mux, shared_socket = shared
    first = ice.Connection(ice_controlling=False, local_username="abcd")
    second = ice.Connection(ice_controlling=False, local_username="abcd")
    for connection in (first, second):
        udp_mux.claim_ufrag(connection)
        shared_socket.attach(connection, 1, "127.0.0.1")
    assert first.local_username == "abcd" and second.local_username != "abcd"
    assert len(second.local_username) >= 4 and second.local_username.isalnum()
    assert shared_socket.connections == 2


async def test_receiver_reports_are_dropped_in_the_kernel_and_the_rest_arrives(
    shared: tuple[mux.UdpMux, mux.MuxSocket],
) -> None:
    """RTCP compound packets that begin with a receiver report (members sending no media)
    never reach the event loop; sender reports, RTP, DTLS and STUN do."""
    _, shared_socket = shared
    connection, got = _attach(shared_socket)
    client = _Client()
    to = shared_socket.sockname
    receiver_report = bytes([0x81, 201, 0, 7]) + bytes(28)
    sender_report = bytes([0x80, 200, 0, 6]) + bytes(24)
    rtp = bytes([0x80, 0x6F]) + bytes(30)
    dtls = bytes([22, 0xFE, 0xFD]) + bytes(20)
    try:
        waiting = _settle(shared_socket, 1)
        client.request(to, connection)
        await waiting
        waiting = _settle(shared_socket, 3)
        for data in (receiver_report, sender_report, receiver_report, rtp, receiver_report, dtls):
            client.sock.sendto(data, to)
        await waiting
        assert got[1:] == [sender_report, rtp, dtls]
        assert shared_socket.dropped == 0  # dropped before Python saw them
    finally:
        client.sock.close()


async def test_offers_answered_at_once_share_one_socket_per_address(rooms: list[Room]) -> None:
    """The first offers arrive together (a circle starting): they all wait for the one
    socket per address being bound, none binds its own."""
    room = Room()
    rooms.append(room)
    await asyncio.gather(*(room.join(f"m{i}", listen_only=i > 0) for i in range(8)))
    addresses = ice.get_host_addresses(use_ipv4=True, use_ipv6=True)
    assert len(room.relay.shared_sockets()) == len(addresses)
    assert len(set(room.relay.local_addresses())) == len(addresses)
    assert sum(s.connections for s in room.relay.shared_sockets()) == 8 * len(addresses)


async def test_the_compiled_fan_out_binds_again_when_a_pair_is_nominated_or_the_transport_changes(
    rooms: list[Room],
) -> None:
    """The compiled loop sends from a copy of the binding (SRTP context, socket, address)
    and checks nothing per copy: whatever could change it makes the slot bind again
    through Python first (a nominated pair, ICE closing, the DTLS state)."""
    if native.LIB is None:
        pytest.skip("the fan-out library is not built here")
    room = Room()
    rooms.append(room)
    await room.join("m1")
    ear = await room.join("ear", listen_only=True)
    room.relay.set_audible(CIRCLE, ["m1"])
    await wait_until(lambda: ear.received_from("m1") >= ENOUGH)
    peer = room.relay._peers[(CIRCLE, "ear")]
    (out,) = [o for o in peer.outs if o.sent]
    assert out.c.ready
    nominated = out._nominated
    nominated[1] = nominated[1]  # nominated (again): aioice sets the entry
    assert not out.c.ready
    heard = ear.received_from("m1")
    await wait_until(
        lambda: out.c.ready and ear.received_from("m1") >= heard + ENOUGH
    )  # bound again, still heard
    out._dtls.emit("statechange")
    assert not out.c.ready
    await wait_until(lambda: bool(out.c.ready))
    await ear.close()  # its DTLS close_notify closes the relay's transport
    await wait_until(lambda: not out.c.ready)
