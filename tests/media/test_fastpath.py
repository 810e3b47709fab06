"""Regression tests for the one private aiortc/aioice send path (server/media/fastpath.py).

If any of these fails after an aiortc or aioice upgrade, listeners hear nothing: read
aiortc's rtcdtlstransport.py / rtcrtpsender.py and aioice's ice.py, and fix fastpath.py
before anything else.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import time

import aioice
import av
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription, sdp
from aiortc.rtp import RtcpSrPacket, RtpPacket

from server.media import fastpath
from server.media.slot import OPUS_SILENCE

from .peers import ClientPeer, encode_tone, mark, unmark, wait_until


def test_aioice_minor_version_is_the_one_the_fast_path_was_written_for() -> None:
    assert aioice.__version__.startswith("0.13."), aioice.__version__


def test_pylibsrtp_minor_version_is_the_one_the_fast_path_was_written_for() -> None:
    assert importlib.metadata.version("pylibsrtp").startswith("1.0."), importlib.metadata.version("pylibsrtp")


def test_private_send_path_has_the_expected_shape() -> None:
    fastpath.check_supported()


async def test_packets_sent_through_the_fast_path_reach_a_real_peer_and_decode() -> None:
    """A relay-like answerer (one sendonly slot, aiortc's sender on an IdleTrack) sends
    through `RtpOut`; a real aiortc peer receives, taps and decodes."""
    listener = ClientPeer("listener", slots=1, mic=False, keep_arrivals=True)
    received: list[RtpPacket] = []
    relay_pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        await relay_pc.setRemoteDescription(RTCSessionDescription(sdp=await listener.offer(), type="offer"))
        (transceiver,) = relay_pc.getTransceivers()
        transceiver.sender.replaceTrack(fastpath.IdleTrack())
        transceiver.direction = "sendonly"
        await relay_pc.setLocalDescription(await relay_pc.createAnswer())
        (media,) = sdp.SessionDescription.parse(relay_pc.localDescription.sdp).media
        opus = media.rtp.codecs[0]
        assert opus.mimeType.lower() == "audio/opus"
        out = fastpath.RtpOut(transceiver.sender, media, opus.payloadType, rtcp_interval=0.1)
        # the SSRC the browser is told about is the one aiortc's sender reports on
        assert out.ssrc == transceiver.sender._ssrc

        # sent before the connection is up: kept, then sent first once it is
        tone = encode_tone(440.0, frames=30)
        assert not out.send(0, mark(tone[0], "relay", 0), 20, True, time.time())

        receiver = listener.pc.getTransceivers()[0].receiver
        original = receiver._handle_rtp_packet

        async def keep(packet: RtpPacket, arrival_time_ms: int) -> None:
            received.append(packet)
            await original(packet, arrival_time_ms=arrival_time_ms)

        receiver._handle_rtp_packet = keep  # type: ignore[method-assign]
        await listener.accept(relay_pc.localDescription.sdp)
        await wait_until(lambda: relay_pc.connectionState == "connected" and len(received) >= 1)
        out.check()

        for seq in range(1, len(tone)):
            assert out.send(
                seq * 960, mark(tone[seq], "relay", seq), 20 + seq % 3, False, time.time()
            )
        assert out.send(len(tone) * 960, OPUS_SILENCE, 127, False, time.time())
        await wait_until(lambda: len(received) >= len(tone) + 1)

        # every packet arrived once, in order, from our SSRC, with our payload type
        assert [unmark(p.payload) for p in received[:-1]] == [("relay", s) for s in range(len(tone))]
        assert received[-1].payload == OPUS_SILENCE
        assert {p.ssrc for p in received} == {out.ssrc}
        assert {p.payload_type for p in received} == {opus.payloadType}
        seqs = [p.sequence_number for p in received]
        assert all((b - a) % (1 << 16) == 1 for a, b in zip(seqs, seqs[1:], strict=False))
        stamps = [p.timestamp for p in received]
        assert all((b - a) % (1 << 32) == 960 for a, b in zip(stamps, stamps[1:], strict=False))
        assert [p.marker for p in received[:2]] == [1, 0]
        # header extensions as negotiated: mid and ssrc-audio-level
        assert {p.extensions.mid for p in received} == {media.rtp.muxId}
        assert [p.extensions.audio_level for p in received[:4]] == [
            (False, 20),
            (False, 21),
            (False, 22),
            (False, 20),
        ]
        assert received[-1].extensions.audio_level == (False, 127)
        # aiortc's own RTP loop sent nothing (all packets above are ours) ...
        assert listener.counts[0]["relay"] == len(tone)
        # ... and the payloads are valid Opus
        decoder = av.CodecContext.create("libopus", "r")
        frames = [f for p in received for f in decoder.decode(av.Packet(p.payload))]
        assert len(frames) == len(received) and all(f.samples == 960 for f in frames)
        # the sender's statistics (and RTCP sender reports) count what the fast path sent
        stats = await transceiver.sender.getStats()
        (outbound,) = [s for s in stats.values() if s.type == "outbound-rtp"]
        assert outbound.packetsSent == len(received)
        # the slot's own RTCP loop sends sender reports counting what the fast path sent
        reports: list[RtcpSrPacket] = []
        got_report = asyncio.Event()
        original_rtcp = receiver._handle_rtcp_packet

        async def keep_rtcp(packet: object) -> None:
            if isinstance(packet, RtcpSrPacket) and packet.ssrc == out.ssrc:
                reports.append(packet)
                got_report.set()
            await original_rtcp(packet)

        receiver._handle_rtcp_packet = keep_rtcp  # type: ignore[method-assign]
        async with asyncio.timeout(10):
            await got_report.wait()
        assert reports[0].sender_info.packet_count == len(received)
        assert reports[0].sender_info.rtp_timestamp == received[-1].timestamp
    finally:
        await listener.close()
        await relay_pc.close()


def test_a_listen_only_connection_drops_rtcp_and_keeps_everything_else() -> None:
    """RFC 5761/7983 demultiplexing: RTCP (packet types 192-223) is dropped before it is
    decrypted; RTP, DTLS and anything else still reach aiortc."""

    class Connection:
        def __init__(self) -> None:
            self.queued: list[bytes] = []

        def data_received(self, data: bytes, component: int) -> None:
            self.queued.append(data)

    connection = Connection()
    fastpath.ignore_rtcp(connection)
    receiver_report = bytes([0x81, 201]) + bytes(30)
    sender_report = bytes([0x80, 200]) + bytes(26)
    sdes = bytes([0x81, 202]) + bytes(10)
    rtp = bytes([0x80, 111]) + bytes(30)
    rtp_with_marker = bytes([0x90, 0x80 | 111]) + bytes(30)
    dtls = bytes([22, 0xFE, 0xFD]) + bytes(20)
    for data in (receiver_report, sender_report, sdes, rtp, rtp_with_marker, dtls, b"\x80"):
        connection.data_received(data, 1)
    assert connection.queued == [rtp, rtp_with_marker, dtls, b"\x80"]
