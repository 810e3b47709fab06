"""A downstream slot: a track that hands already-encoded Opus packets to aiortc's sender.

aiortc's ``RTCRtpSender`` sends whatever ``recv()`` returns as is when it is an
``av.Packet`` (no encoder runs), taking the RTP timestamp from ``pts`` in 1/48000.
One slot carries one source at a time; when the source changes the outgoing timestamps
stay continuous (the new source starts where the old one left off, plus the wall-clock
gap), and when a source leaves the slot a few Opus silence frames end its sound cleanly.
"""

from __future__ import annotations

import asyncio
import fractions
import time
from collections import deque

import av
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

OPUS_CLOCK = 48000
FRAME_SAMPLES = 960  # 20 ms
TIME_BASE = fractions.Fraction(1, OPUS_CLOCK)
# TOC 0xF8 (CELT FB 20 ms, mono, one frame) + the 2-byte silence frame browsers send in DTX.
OPUS_SILENCE = b"\xf8\xff\xfe"
SILENCE_FRAMES = 3
# A listener whose sender stalls loses the oldest packets rather than growing memory.
MAX_QUEUED = 10
_U32 = 1 << 32


class SlotTrack(MediaStreamTrack):
    """Outgoing audio of one slot of one listener."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._queue: deque[av.Packet] = deque(maxlen=MAX_QUEUED)
        self._waiter: asyncio.Future[None] | None = None
        self._source: str | None = None
        self._offset: int | None = None  # out_ts = in_ts + offset for the current source
        self._last_in: int | None = None  # last incoming RTP timestamp (unwrapped)
        self._last_out: int | None = None  # last outgoing pts
        self._last_out_time = 0.0

    @property
    def source(self) -> str | None:
        return self._source

    def set_source(self, source: str | None) -> None:
        """Carry `source` from now on; end the previous source's sound with silence."""
        if source == self._source:
            return
        if self._source is not None and self._last_out is not None:
            for _ in range(SILENCE_FRAMES):
                self._emit(self._last_out + FRAME_SAMPLES, OPUS_SILENCE)
        self._source = source
        self._offset = None
        self._last_in = None

    def push(self, timestamp: int, payload: bytes) -> None:
        """Queue one packet of the current source (RTP `timestamp`, encoded `payload`)."""
        if self._offset is None or self._last_in is None:
            self._offset = self._start_offset(timestamp)
            in_ts = timestamp
        else:
            # Unwrap the 32-bit timestamp around the previous one (reordering allowed).
            delta = (timestamp - self._last_in + _U32 // 2) % _U32 - _U32 // 2
            in_ts = self._last_in + delta
        self._last_in = in_ts
        self._emit(in_ts + self._offset, payload)

    def _start_offset(self, timestamp: int) -> int:
        if self._last_out is None:
            return -timestamp
        # Continue after the last packet sent, leaving the real gap (whole frames) so the
        # listener's jitter buffer sees it as a pause, not as a burst.
        gap = time.monotonic() - self._last_out_time
        frames = max(1, round(gap * OPUS_CLOCK / FRAME_SAMPLES))
        return self._last_out + frames * FRAME_SAMPLES - timestamp

    def _emit(self, pts: int, payload: bytes) -> None:
        packet = av.Packet(payload)
        packet.pts = pts
        packet.time_base = TIME_BASE
        self._queue.append(packet)
        if self._last_out is None or pts > self._last_out:
            self._last_out = pts
        self._last_out_time = time.monotonic()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def queued(self) -> int:
        return len(self._queue)

    async def recv(self) -> av.Packet:  # type: ignore[override]
        while not self._queue:
            if self.readyState != "live":
                raise MediaStreamError
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._queue.popleft()

    def stop(self) -> None:
        super().stop()
        self._queue.clear()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
