"""Hostile offers (issue 16): what a client's offer can no longer make the relay do.

No test here sends a packet anywhere but 127.0.0.0/8: the relay gets no ICE servers, the
client peers only make offers (their answers are never applied, so they check nothing),
and `aioice` below hands aioice loopback candidates only, whatever the relay lets through.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from aioice import Candidate, Connection, stun
from aiortc import RTCConfiguration, RTCPeerConnection, sdp

from server.media import MediaRelay, OfferError, OfferProblem, relay
from server.media.candidates import AddressKind, classify_address

from .conftest import CIRCLE
from .peers import ClientPeer

PUBLIC_SERVER = {AddressKind.PUBLIC}

# What a hostile client lists as its candidates to make the relay probe the server's network.
HOSTILE = [
    "1 1 udp 2130706431 10.0.0.5 6379 typ host",  # RFC 1918: a Redis next door
    "2 1 udp 2130706431 172.16.0.1 5000 typ host",
    "3 1 udp 2130706431 192.168.1.1 5000 typ host",
    "4 1 udp 1694498815 100.64.0.1 5000 typ srflx raddr 0.0.0.0 rport 0",  # carrier-grade NAT space
    "5 1 udp 2130706431 fd00::5 5000 typ host",  # ULA
    "6 1 udp 2130706431 169.254.169.254 8080 typ host",  # the clouds' metadata service
    "7 1 udp 2130706431 fe80::1 5000 typ host",
    "8 1 udp 2130706431 127.0.0.1 5000 typ host",  # the server's own loopback
    "9 1 udp 2130706431 ::ffff:10.0.0.5 6379 typ host",  # IPv4-mapped
    "10 1 udp 2130706431 2f1b4c55-8f5c-4b2e-9d1c-3e6a1b2c3d4e.local 5000 typ host",  # mDNS
]


def with_candidates(offer: str, candidates: list[str]) -> str:
    """`offer` with the candidates of every m-line replaced by `candidates`."""
    lines = []
    for line in offer.splitlines():
        if not line.startswith("a=candidate:"):
            lines.append(line)
        if line.startswith("m="):
            lines += [f"a=candidate:{c}" for c in candidates]
    return "\r\n".join(lines) + "\r\n"


class Aioice:
    """What aioice is given in a test, and a guard: every remote candidate handed to any
    aioice Connection is recorded, and only loopback ones (and end-of-candidates) are
    passed on, so no check can go anywhere else even if the relay's filter failed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.given: list[Candidate | None] = []
        self.connecting: list[Connection] = []
        self._connect_called = asyncio.Event()
        add_remote_candidate = Connection.add_remote_candidate
        connect = Connection.connect

        async def recording_add(connection: Connection, candidate: Candidate | None) -> None:
            self.given.append(candidate)
            if candidate is None or classify_address(candidate.host) is AddressKind.LOOPBACK:
                await add_remote_candidate(connection, candidate)

        async def recording_connect(connection: Connection) -> None:
            self.connecting.append(connection)
            self._connect_called.set()
            # Forms the check list and starts the first check before its first await, so
            # whoever waited for `connected()` sees the check list aioice really built.
            await connect(connection)

        monkeypatch.setattr(Connection, "add_remote_candidate", recording_add)
        monkeypatch.setattr(Connection, "connect", recording_connect)

    async def connected(self) -> Connection:
        """The first Connection whose connect() (ICE checks) started."""
        async with asyncio.timeout(10):
            await self._connect_called.wait()
        return self.connecting[0]


@pytest.fixture
def aioice(monkeypatch: pytest.MonkeyPatch) -> Iterator[Aioice]:
    yield Aioice(monkeypatch)


def media_lines(offer: str) -> int:
    return len(sdp.SessionDescription.parse(offer).media)


# --- m-lines -------------------------------------------------------------------------------


async def test_an_offer_with_40_m_lines_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_aiortc(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the offer reached aiortc")

    the_relay = MediaRelay()  # 3 slots: a microphone and 3 slots make 4 m-lines at most
    client = ClientPeer("m1", slots=39)
    try:
        offer = await client.offer()
        assert media_lines(offer) == 40
        monkeypatch.setattr(relay, "_offer_shape", no_aiortc)  # aiortc's SDP parser
        monkeypatch.setattr(relay, "RTCPeerConnection", no_aiortc)
        with pytest.raises(OfferError) as error:
            await the_relay.answer(CIRCLE, "m1", offer, listen_only=False)
        assert error.value.problem == OfferProblem.TOO_MANY_MEDIA
        assert str(error.value) == "too many m-lines: 40, at most 4 (a microphone and 3 slots)"
        assert the_relay.stats()["peers"] == 0
    finally:
        await client.close()
        await the_relay.close()


async def test_an_offer_with_a_microphone_and_as_many_slots_as_the_relay_has_is_answered(
    aioice: Aioice,
) -> None:
    the_relay = MediaRelay(slots=5, address_kinds=PUBLIC_SERVER)
    client, listener = ClientPeer("m1", slots=5), ClientPeer("m2", slots=6, mic=False)
    try:
        answer = await the_relay.answer(CIRCLE, "m1", await client.offer(), listen_only=False)
        assert media_lines(answer) == 6
        assert the_relay.slots(CIRCLE, "m1") == [None] * 5
        # listening only, a client may still offer 6 m-lines: all of them slots, 5 filled
        answer = await the_relay.answer(CIRCLE, "m2", await listener.offer(), listen_only=True)
        assert media_lines(answer) == 6
        assert the_relay.slots(CIRCLE, "m2") == [None] * 5
        one_more = ClientPeer("m3", slots=6)
        try:
            with pytest.raises(OfferError, match="too many m-lines: 7, at most 6"):
                await the_relay.answer(CIRCLE, "m3", await one_more.offer(), listen_only=False)
        finally:
            await one_more.close()
        assert the_relay.stats()["peers"] == 2
    finally:
        await client.close()
        await listener.close()
        await the_relay.close()


async def test_an_offer_with_a_video_m_line_is_refused() -> None:
    the_relay = MediaRelay()
    client = ClientPeer("m1", slots=1)
    try:
        client.pc.addTransceiver("video", direction="recvonly")
        offer = await client.offer()
        assert [m.kind for m in sdp.SessionDescription.parse(offer).media] == ["video", "audio", "audio"]
        with pytest.raises(OfferError) as error:
            await the_relay.answer(CIRCLE, "m1", offer, listen_only=False)
        assert error.value.problem == OfferProblem.UNSUPPORTED
        assert str(error.value) == "unsupported: m-line 0 is not audio"
        assert the_relay.stats()["peers"] == 0
    finally:
        await client.close()
        await the_relay.close()


# --- candidates ----------------------------------------------------------------------------


async def test_a_private_candidate_draws_no_stun_check_from_a_public_server(aioice: Aioice) -> None:
    the_relay = MediaRelay(address_kinds=PUBLIC_SERVER)
    client = ClientPeer("m1")
    try:
        offer = with_candidates(await client.offer(), HOSTILE)
        assert [c.ip for c in sdp.SessionDescription.parse(offer).media[0].ice_candidates] == [
            c.split()[4] for c in HOSTILE
        ]

        answer = await the_relay.answer(CIRCLE, "m1", offer, listen_only=False)
        connection = await aioice.connected()

        assert aioice.given == []  # not one candidate, nor the end of them
        assert connection.remote_candidates == []
        assert connection._check_list == []  # type: ignore[attr-defined]
        assert the_relay.stats()["candidates_refused"] == len(HOSTILE) * 4  # in each m-line
        # still answered, and waiting for the client's own checks (peer-reflexive): not failed
        assert "a=candidate:" in answer
        assert the_relay.stats()["peers"] == 1
        pc = the_relay._peers[(CIRCLE, "m1")].pc  # type: ignore[attr-defined]
        assert pc.iceConnectionState == "checking"
    finally:
        await client.close()
        await the_relay.close()


class Trap(asyncio.DatagramProtocol):
    """A UDP socket on 127.0.0.1 that keeps the first datagram it gets."""

    def __init__(self) -> None:
        self.first: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if not self.first.done():
            self.first.set_result(data)


async def test_a_loopback_candidate_draws_a_stun_check_from_a_loopback_relay(aioice: Aioice) -> None:
    """The other side of the test above: a candidate the relay serves is checked, so that
    test saw a filter at work and not a relay that checks nothing."""
    loop = asyncio.get_running_loop()
    transport, trap = await loop.create_datagram_endpoint(Trap, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    the_relay = MediaRelay(address_kinds={AddressKind.LOOPBACK})
    client = ClientPeer("m1", slots=1)
    try:
        mine = f"1 1 udp 2130706431 127.0.0.1 {port} typ host"
        others = [c for c in HOSTILE if " 127.0.0.1 " not in c]
        offer = with_candidates(await client.offer(), [*others, mine])

        await the_relay.answer(CIRCLE, "m1", offer, listen_only=False)

        # only the trap, kept with the end of candidates (the m-line's own, for the bundle)
        assert [c if c is None else (c.host, c.port) for c in aioice.given] == [("127.0.0.1", port), None]
        assert the_relay.stats()["candidates_refused"] == len(others) * 2  # in each m-line
        async with asyncio.timeout(10):
            check = stun.parse_message(await trap.first)
        assert (check.message_method, check.message_class) == (stun.Method.BINDING, stun.Class.REQUEST)
    finally:
        transport.close()
        await client.close()
        await the_relay.close()


async def test_the_guard_hands_aioice_no_candidate_outside_loopback(aioice: Aioice) -> None:
    """The guard itself: given straight to aiortc, a private candidate is recorded and
    dropped before aioice, so no test here can send a check to it by mistake."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        pc.addTransceiver("audio")
        await pc.setLocalDescription(await pc.createOffer())
        transport = pc.getTransceivers()[0].receiver.transport.transport
        await transport.addRemoteCandidate(sdp.candidate_from_sdp(HOSTILE[0]))
        assert [c.host for c in aioice.given if c] == ["10.0.0.5"]
        assert transport.getRemoteCandidates() == []
    finally:
        await pc.close()
