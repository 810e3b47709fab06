"""Opus test audio: a tone encoded once, the one packet marker, a paced track, a lean tap.

A test packet is a real Opus packet (a tone encoded with PyAV's libopus) re-framed as an
Opus "code 3" packet (one CBR frame) whose *padding* carries the mark:

    b"LK" · seq (u32) · send time (u64, CLOCK_MONOTONIC ns) · source (UTF-8, the rest)

Opus decoders ignore padding, so the audio is still valid for a browser, and the relay
forwards payloads unchanged, so a listener knows who sent a packet, which one it was and
when it left without decoding anything. CLOCK_MONOTONIC is system-wide, so the send time
holds across processes (and network namespaces) on one machine.

`tap_payloads` is the load generator's cheap receive path: it *replaces* aiortc's private
`RTCRtpReceiver._handle_rtp_packet` (aiortc 1.16, pinned; the server's own tap is
`server/media/tap.py`, fenced by tests/media/test_tap.py): no jitter buffer, no decoder, no
RTCP receiver statistics.
"""

from __future__ import annotations

import array
import asyncio
import fractions
import functools
import math
import struct
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import av
from aiortc.mediastreams import MediaStreamTrack

CLOCK = 48000
FRAME = 960  # 20 ms
TIME_BASE = fractions.Fraction(1, CLOCK)
MAGIC = b"LK"
_HEAD = struct.Struct("!2sIQ")  # magic, seq, sent_ns
MAX_SOURCE = 254 - _HEAD.size  # the padding length must fit one byte below 255


class Mark(NamedTuple):
    source: str
    seq: int  # modulo 2**32
    sent_ns: int  # time.monotonic_ns() when the packet was made


@functools.lru_cache(maxsize=32)
def encode_tone(hz: float = 440.0, frames: int = 50) -> tuple[bytes, ...]:
    """`frames` 20 ms code-0 Opus packets of a sine tone (mono, 48 kHz, 32 kbit/s), encoded
    once per process for each (hz, frames)."""
    codec = av.CodecContext.create("libopus", "w")
    codec.bit_rate = 32000
    codec.sample_rate = CLOCK
    codec.layout = "mono"
    codec.format = "s16"
    codec.time_base = TIME_BASE
    codec.options = {"application": "voip"}
    packets: list[bytes] = []
    for i in range(frames):
        pcm = array.array("h", (int(math.sin(2 * math.pi * hz * (i * FRAME + n) / CLOCK) * 6000)
                                for n in range(FRAME)))
        frame = av.AudioFrame(format="s16", layout="mono", samples=FRAME)
        frame.planes[0].update(pcm.tobytes())
        frame.sample_rate = CLOCK
        frame.pts = i * FRAME
        frame.time_base = TIME_BASE
        packets += [bytes(p) for p in codec.encode(frame)]
    packets += [bytes(p) for p in codec.encode(None)]
    tone = tuple(p for p in packets if p and p[0] & 3 == 0)[:frames]
    if not tone:
        raise RuntimeError("libopus produced no code-0 packets")
    return tone


def mark(packet: bytes, source: str, seq: int, sent_ns: int | None = None) -> bytes:
    """A code-0 Opus packet re-framed as code 3 with the mark as its padding; `sent_ns`
    defaults to now."""
    name = source.encode()
    if packet[0] & 3 != 0 or len(name) > MAX_SOURCE:
        raise ValueError("a code-0 Opus packet and a source of at most "
                         f"{MAX_SOURCE} bytes, please")
    sent = time.monotonic_ns() if sent_ns is None else sent_ns
    marker = _HEAD.pack(MAGIC, seq & 0xFFFFFFFF, sent) + name
    return bytes([packet[0] | 3, 0x41, len(marker)]) + packet[1:] + marker


def unmark(payload: bytes) -> Mark | None:
    """The mark of a packet made by `mark`; None for any other payload (the relay's own
    silence frames, a browser's packets)."""
    if len(payload) < 3 or payload[0] & 3 != 3 or not payload[1] & 0x40:
        return None
    size = payload[2]
    if size == 255 or size < _HEAD.size or len(payload) < 3 + size:
        return None
    start = len(payload) - size
    magic, seq, sent = _HEAD.unpack_from(payload, start)
    if magic != MAGIC:
        return None
    try:
        source = bytes(payload[start + _HEAD.size :]).decode()
    except UnicodeDecodeError:
        return None
    return Mark(source, seq, sent)


class PacedTone(MediaStreamTrack):
    """A microphone: a marked 20 ms Opus packet of a tone every 20 ms, handed to aiortc as
    `av.Packet`s (sent as they are). `log` holds (seq, sent_ns) of every packet made. If the
    event loop falls more than 200 ms behind, the pace starts again from now rather than
    bursting to catch up."""

    kind = "audio"

    def __init__(self, source: str, hz: float = 440.0) -> None:
        super().__init__()
        self.source = source
        self.log: list[tuple[int, int]] = []
        self._packets = encode_tone(hz)
        self._seq = 0
        self._start: float | None = None

    @property
    def sent(self) -> int:
        """How many packets were made."""
        return self._seq

    async def recv(self) -> av.Packet[Any]:
        loop = asyncio.get_running_loop()
        if self._start is None:
            self._start = loop.time()
        due = self._start + self._seq * FRAME / CLOCK
        now = loop.time()
        if due > now:
            await asyncio.sleep(due - now)
        elif now - due > 0.2:
            self._start += now - due
        seq = self._seq
        self._seq += 1
        sent = time.monotonic_ns()
        packet = av.Packet(mark(self._packets[seq % len(self._packets)], self.source, seq, sent))
        packet.pts = seq * FRAME
        packet.time_base = TIME_BASE
        self.log.append((seq, sent))
        return packet


_STOP_DECODER = "_RTCRtpReceiver__stop_decoder"


def tap_payloads(receiver: Any, sink: Callable[[bytes], None]) -> None:
    """Hand every RTP payload reaching `receiver` (an aiortc `RTCRtpReceiver`) to
    `sink(payload)` instead of aiortc's receive path, and stop its decoder thread as soon
    as it starts. Install right after the transceiver is made."""
    original_receive = receiver.receive

    async def handle_rtp_packet(packet: Any, arrival_time_ms: int) -> None:
        sink(packet.payload)

    async def receive(parameters: Any) -> None:
        await original_receive(parameters)
        getattr(receiver, _STOP_DECODER)()

    receiver._handle_rtp_packet = handle_rtp_packet
    receiver.receive = receive
