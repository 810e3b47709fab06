"""A lean aiortc client peer for the media load (shaped like the browser, DESIGN §7).

The offer has one `sendrecv` microphone m-line (only for a peer that sends) and then S
`recvonly` slots. A sending peer's microphone is `testkit.opus.PacedTone`: real Opus
packets of a tone, each marked in its padding with its source, sequence number and send
time (CLOCK_MONOTONIC ns). The source names the room and the sender, `"<room>.<sender>"`
(`source_of`), so a listener knows who sent each packet, which one it was and when it left,
without decoding anything.

Receiving goes through `testkit.opus.tap_payloads`, which *replaces* aiortc's receive path:
no jitter buffer, no decoder, no RTCP receiver statistics — the load generator must stay
cheap so it measures the relay.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from testkit.opus import Mark, PacedTone, tap_payloads, unmark

# (mark, arrived_ns)
Sink = Callable[[Mark, int], None]


def source_of(room: int, sender: int) -> str:
    """The source name the marks of `sender` in `room` carry."""
    return f"{room}.{sender}"


class DirectPair:
    """The same path without the relay: a sending peer connected straight to a receiving
    one in this process, so its latency is the client side's share (aiortc send + receive,
    SRTP, loopback UDP, this event loop) of what the listeners measure through the relay."""

    def __init__(self, room: int) -> None:
        self.latencies: list[float] = []
        self.sent_s: list[float] = []
        self.track = PacedTone(source_of(room, 0))
        self.sender = LoadPeer(lambda *a: None, track=self.track, slots=0)
        self.receiver = RTCPeerConnection(RTCConfiguration(iceServers=[]))

    def _on_payload(self, payload: bytes) -> None:
        arrived = time.monotonic_ns()
        marked = unmark(payload)
        if marked is not None:
            self.latencies.append((arrived - marked.sent_ns) / 1e6)
            self.sent_s.append(marked.sent_ns / 1e9)

    async def connect(self) -> None:
        offer = await self.sender.offer()
        await self.receiver.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
        for transceiver in self.receiver.getTransceivers():
            transceiver.direction = "recvonly"
            tap_payloads(transceiver.receiver, self._on_payload)
        await self.receiver.setLocalDescription(await self.receiver.createAnswer())
        await self.sender.accept(self.receiver.localDescription.sdp)

    def window(self, start_ns: int, end_ns: int) -> list[float]:
        return [ms for ms, t in zip(self.latencies, self.sent_s, strict=True) if start_ns <= t * 1e9 <= end_ns]

    async def close(self) -> None:
        await self.sender.close()
        await self.receiver.close()


class LoadPeer:
    """One member's browser, reduced to what the relay sees: a microphone (or none) and S
    slots whose marked packets go to `sink` with their arrival time."""

    def __init__(self, sink: Sink, *, track: PacedTone | None = None, slots: int = 3) -> None:
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
        self._sink(marked, arrived)

    async def offer(self) -> str:
        if self.track is not None:
            self.pc.addTransceiver(self.track, direction="sendrecv")
        for _ in range(self.slots):
            transceiver = self.pc.addTransceiver("audio", direction="recvonly")
            tap_payloads(transceiver.receiver, self._on_payload)
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return str(self.pc.localDescription.sdp)

    async def accept(self, answer_sdp: str) -> None:
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer_sdp, type="answer"))

    async def close(self) -> None:
        if self.track is not None:
            self.track.stop()
        await self.pc.close()
