"""A test client for the media relay: a real aiortc peer shaped like the browser (§7).

`ClientPeer` offers one sendrecv microphone m-line (unless listening only) and S recvonly
slots, sends a tone, and counts what arrives in each slot by source.

Every packet it sends is a marked Opus packet of `testkit.opus` (a real tone; the mark in
its padding names the sender and carries a sequence number and the send time). Opus
decoders ignore padding, so the audio is still valid for a browser, and any listener can
tell who sent a packet without decoding anything. The relay never looks at payloads, so
this proves what it forwards.

Used by tests/media and tests/net.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import av
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.rtp import RtpPacket

from server.media.tap import install_tap
from testkit import opus
from testkit.opus import encode_tone, mark

__all__ = ["SILENCE", "Arrival", "ClientPeer", "ToneTrack", "encode_tone", "mark", "unmark", "wait_until"]

SILENCE = "<silence>"  # source name for the relay's unmarked Opus frames


def unmark(payload: bytes) -> tuple[str, int] | None:
    """(source, seq) of a marked packet (`testkit.opus.unmark` without the send time)."""
    marked = opus.unmark(payload)
    return None if marked is None else (marked.source, marked.seq)


_waiters: list[asyncio.Future[None]] = []


def _poke() -> None:
    """Something was sent or received: let every `wait_until` recheck its condition."""
    while _waiters:
        waiter = _waiters.pop()
        if not waiter.done():
            waiter.set_result(None)


async def wait_until(condition: Callable[[], bool], limit: float = 10.0) -> None:
    """Wait (at most `limit` s) until `condition()` holds; it is rechecked whenever any
    test peer sends or receives a packet, so it may look at relay counters too."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(limit):
        while not condition():
            waiter = loop.create_future()
            _waiters.append(waiter)
            await waiter


class ToneTrack(opus.PacedTone):
    """A microphone (`testkit.opus.PacedTone`) that wakes every `wait_until` as it sends,
    and says how loud it is (`level`, RFC 6464: 0 loudest) in ssrc-audio-level."""

    def __init__(self, source: str, hz: float, *, level: int = 30) -> None:
        super().__init__(source, hz)
        self.level = level

    async def recv(self) -> av.Packet:  # type: ignore[override]
        packet = await super().recv()
        asyncio.get_running_loop().call_soon(_poke)
        return packet


def _send_audio_level(sender: object, track: ToneTrack) -> None:
    """Make aiortc's sender put `track.level` in ssrc-audio-level, as a browser does.

    aiortc only sets the extension for frames it encodes itself; for pre-encoded packets
    we set the (negative dBov) level on its encoded frame. Test-only reach into aiortc.
    """
    original = sender._next_encoded_frame  # type: ignore[attr-defined]

    async def next_encoded_frame(codec: object) -> object:
        frame = await original(codec)
        if frame is not None:
            frame.audio_level = -track.level
        return frame

    sender._next_encoded_frame = next_encoded_frame  # type: ignore[attr-defined]


@dataclass
class Arrival:
    slot: int
    source: str
    seq: int | None
    at: float  # perf_counter
    ssrc: int
    timestamp: int  # RTP timestamp as the relay sent it


class ClientPeer:
    """A member's browser, reduced to what the relay sees."""

    def __init__(
        self,
        name: str,
        *,
        slots: int = 3,
        mic: bool = True,
        hz: float = 440.0,
        level: int = 30,
        keep_arrivals: bool = False,
    ) -> None:
        self.name = name
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.track: ToneTrack | None = ToneTrack(name, hz, level=level) if mic else None
        self.counts: list[Counter[str]] = [Counter() for _ in range(slots)]
        self.arrivals: list[Arrival] | None = [] if keep_arrivals else None
        self.on_arrival: Callable[[Arrival], None] | None = None
        self._slot_count = slots
        self.pc.on("connectionstatechange", _poke)

    async def offer(self) -> str:
        """The complete offer: microphone first (sendrecv), then one recvonly m-line per slot."""
        if self.track is not None:
            mic = self.pc.addTransceiver(self.track, direction="sendrecv")
            _send_audio_level(mic.sender, self.track)
        for index in range(self._slot_count):
            transceiver = self.pc.addTransceiver("audio", direction="recvonly")
            install_tap(transceiver.receiver, self._sink(index))
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return self.pc.localDescription.sdp

    async def accept(self, answer_sdp: str) -> None:
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer_sdp, type="answer"))

    def _sink(self, slot: int) -> Callable[[RtpPacket, int], None]:
        def on_packet(packet: RtpPacket, arrival_time_ms: int) -> None:
            marked = unmark(packet.payload)
            source, seq = marked if marked else (SILENCE, None)
            self.counts[slot][source] += 1
            if self.arrivals is not None or self.on_arrival is not None:
                arrival = Arrival(slot, source, seq, time.perf_counter(), packet.ssrc, packet.timestamp)
                if self.arrivals is not None:
                    self.arrivals.append(arrival)
                if self.on_arrival is not None:
                    self.on_arrival(arrival)
            _poke()

        return on_packet

    async def force_mic(self) -> None:
        """Behave like a modified browser: send the microphone even though the answer made
        that m-line inactive (listen-only). Waits for the connection first."""
        await wait_until(lambda: self.pc.connectionState == "connected")
        mic = self.pc.getTransceivers()[0]
        assert self.track is not None and mic.sender.track is self.track
        parameters = self.pc._RTCPeerConnection__localRtp(mic)  # type: ignore[attr-defined]
        await mic.sender.send(parameters)

    def received_from(self, source: str) -> int:
        return sum(c[source] for c in self.counts)

    def slot_of(self, source: str) -> list[int]:
        """Slots in which packets of `source` arrived."""
        return [i for i, c in enumerate(self.counts) if c[source]]

    def reset_counts(self) -> None:
        for counter in self.counts:
            counter.clear()

    async def close(self) -> None:
        await self.pc.close()
