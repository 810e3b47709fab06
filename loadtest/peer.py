"""A lean aiortc client peer for the media load (shaped like the browser, DESIGN §7).

The offer has one `sendrecv` microphone m-line (only for a peer that sends) and then S
`recvonly` slots. A sending peer's packets are real Opus packets (a tone encoded once with
libopus) re-framed as Opus "code 3" packets whose *padding* carries a mark:

    b"LT" · room (u16) · sender (u16) · seq (u32) · send time (u64, CLOCK_MONOTONIC ns)

Opus decoders ignore padding and the relay forwards payloads unchanged, so a listener
knows who sent each packet, which one it was and when it left, without decoding anything.
CLOCK_MONOTONIC is system-wide, so the mark holds across processes on this machine.

Receiving is tapped at aiortc's private `RTCRtpReceiver._handle_rtp_packet` (aiortc 1.16,
the same hook as `server/media/tap.py`), *replacing* it: no jitter buffer, no decoder, no
RTCP receiver statistics — the load generator must stay cheap so it measures the relay.
"""

from __future__ import annotations

import asyncio
import fractions
import struct
import time
from collections.abc import Callable
from typing import Any

import av
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack

CLOCK = 48000
FRAME = 960  # 20 ms
TIME_BASE = fractions.Fraction(1, CLOCK)
MAGIC = b"LT"
_MARK = struct.Struct("!HHIQ")
MARK_SIZE = len(MAGIC) + _MARK.size

# (room, sender, seq, sent_ns, arrived_ns)
Sink = Callable[[int, int, int, int, int], None]

_tone: list[bytes] | None = None


def encode_tone(hz: float, frames: int = 50) -> list[bytes]:
    """`frames` 20 ms code-0 Opus packets of a sine tone (mono, 48 kHz)."""
    codec = av.CodecContext.create("libopus", "w")
    codec.bit_rate = 32000
    codec.sample_rate = CLOCK
    codec.layout = "mono"
    codec.format = "s16"
    codec.time_base = TIME_BASE
    codec.options = {"application": "voip"}
    t = np.arange(frames * FRAME) / CLOCK
    pcm = (np.sin(2 * np.pi * hz * t) * 6000).astype(np.int16)
    packets: list[bytes] = []
    for i in range(frames):
        frame = av.AudioFrame.from_ndarray(pcm[None, i * FRAME : (i + 1) * FRAME], format="s16",
                                           layout="mono")
        frame.sample_rate = CLOCK
        frame.pts = i * FRAME
        frame.time_base = TIME_BASE
        packets += [bytes(p) for p in codec.encode(frame)]
    packets += [bytes(p) for p in codec.encode(None)]
    tone = [p for p in packets if p and p[0] & 3 == 0][:frames]
    if not tone:
        raise RuntimeError("libopus produced no code-0 packets")
    return tone


def tone_packets(frames: int = 50, hz: float = 440.0) -> list[bytes]:
    """The generator's tone, encoded once per process."""
    global _tone
    if _tone is None:
        _tone = encode_tone(hz, frames)
    return _tone


def mark(packet: bytes, room: int, sender: int, seq: int, sent_ns: int) -> bytes:
    """A code-0 Opus packet re-framed as code 3 (one CBR frame) with the mark as padding."""
    marker = MAGIC + _MARK.pack(room, sender, seq & 0xFFFFFFFF, sent_ns)
    return bytes([packet[0] | 3, 0x41, len(marker)]) + packet[1:] + marker


def unmark(payload: bytes) -> tuple[int, int, int, int] | None:
    """(room, sender, seq, sent_ns) from a marked packet; None for any other payload
    (the relay's own silence frames at a slot change)."""
    if len(payload) < 3 + MARK_SIZE or payload[0] & 3 != 3 or not payload[1] & 0x40 or payload[2] != MARK_SIZE:
        return None
    if payload[-MARK_SIZE : -MARK_SIZE + 2] != MAGIC:
        return None
    room, sender, seq, sent = _MARK.unpack_from(payload, len(payload) - _MARK.size)
    return room, sender, seq, sent


class MarkTrack(MediaStreamTrack):
    """A microphone: 20 ms marked Opus packets, paced, handed to aiortc as `av.Packet`s."""

    kind = "audio"

    def __init__(self, room: int, sender: int) -> None:
        super().__init__()
        self.room = room
        self.sender = sender
        self.sent: list[tuple[int, int]] = []  # (seq, sent_ns)
        self._packets = tone_packets()
        self._seq = 0
        self._start: float | None = None

    async def recv(self) -> av.Packet:  # type: ignore[override]
        loop = asyncio.get_running_loop()
        if self._start is None:
            self._start = loop.time()
        due = self._start + self._seq * FRAME / CLOCK
        now = loop.time()
        if due > now:
            await asyncio.sleep(due - now)
        elif now - due > 0.2:  # the loop fell behind: do not burst to catch up
            self._start += now - due
        seq = self._seq
        self._seq += 1
        sent = time.monotonic_ns()
        packet = av.Packet(mark(self._packets[seq % len(self._packets)], self.room, self.sender, seq, sent))
        packet.pts = seq * FRAME
        packet.time_base = TIME_BASE
        self.sent.append((seq, sent))
        return packet


_STOP_DECODER = "_RTCRtpReceiver__stop_decoder"


def _tap(receiver: Any, sink: Callable[[bytes], None]) -> None:
    """Replace the receiver's packet handler with `sink(payload)`; stop its decoder thread."""
    original_receive = receiver.receive

    async def handle_rtp_packet(packet: Any, arrival_time_ms: int) -> None:
        sink(packet.payload)

    async def receive(parameters: Any) -> None:
        await original_receive(parameters)
        getattr(receiver, _STOP_DECODER)()

    receiver._handle_rtp_packet = handle_rtp_packet
    receiver.receive = receive


class DirectPair:
    """The same path without the relay: a sending peer connected straight to a receiving
    one in this process, so its latency is the client side's share (aiortc send + receive,
    SRTP, loopback UDP, this event loop) of what the listeners measure through the relay."""

    def __init__(self, room: int) -> None:
        self.latencies: list[float] = []
        self.sent_s: list[float] = []
        self.track = MarkTrack(room, 0)
        self.sender = LoadPeer(lambda *a: None, track=self.track, slots=0)
        self.receiver = RTCPeerConnection(RTCConfiguration(iceServers=[]))

    def _on_payload(self, payload: bytes) -> None:
        arrived = time.monotonic_ns()
        marked = unmark(payload)
        if marked is not None:
            self.latencies.append((arrived - marked[3]) / 1e6)
            self.sent_s.append(marked[3] / 1e9)

    async def connect(self) -> None:
        offer = await self.sender.offer()
        await self.receiver.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
        for transceiver in self.receiver.getTransceivers():
            transceiver.direction = "recvonly"
            _tap(transceiver.receiver, self._on_payload)
        await self.receiver.setLocalDescription(await self.receiver.createAnswer())
        await self.sender.accept(self.receiver.localDescription.sdp)

    def window(self, start_ns: int, end_ns: int) -> list[float]:
        return [ms for ms, t in zip(self.latencies, self.sent_s, strict=True) if start_ns <= t * 1e9 <= end_ns]

    async def close(self) -> None:
        await self.sender.close()
        await self.receiver.close()


class LoadPeer:
    """One member's browser, reduced to what the relay sees: a microphone (or none) and S
    slots whose packets go to `sink` with their arrival time."""

    def __init__(self, sink: Sink, *, track: MarkTrack | None = None, slots: int = 3) -> None:
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.track = track
        self.slots = slots
        self.unmarked = 0
        self._sink = sink
        self.connected = asyncio.Event()
        self.pc.on("connectionstatechange", self._state)

    def _state(self) -> None:
        if self.pc.connectionState == "connected":
            self.connected.set()

    def _on_payload(self, payload: bytes) -> None:
        arrived = time.monotonic_ns()
        marked = unmark(payload)
        if marked is None:
            self.unmarked += 1
            return
        self._sink(marked[0], marked[1], marked[2], marked[3], arrived)

    async def offer(self) -> str:
        if self.track is not None:
            self.pc.addTransceiver(self.track, direction="sendrecv")
        for _ in range(self.slots):
            transceiver = self.pc.addTransceiver("audio", direction="recvonly")
            _tap(transceiver.receiver, self._on_payload)
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return str(self.pc.localDescription.sdp)

    async def accept(self, answer_sdp: str) -> None:
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer_sdp, type="answer"))

    async def close(self) -> None:
        if self.track is not None:
            self.track.stop()
        await self.pc.close()
