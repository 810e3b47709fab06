"""A downstream slot: one listener's outgoing stream that carries one source at a time.

Packets are forwarded as they are (encoded Opus, never decoded) the moment the tap sees
them, through `fastpath.RtpOut`. When the source changes the outgoing timestamps stay
continuous (the new source starts where the old one left off, plus the wall-clock gap),
the first packet of a new source carries the RTP marker bit (start of a talkspurt), and
when a source leaves the slot a few Opus silence frames end its sound cleanly.
"""

from __future__ import annotations

import time
from collections.abc import Callable

OPUS_CLOCK = 48000
FRAME_SAMPLES = 960  # 20 ms
# TOC 0xF8 (CELT FB 20 ms, mono, one frame) + the 2-byte silence frame browsers send in DTX.
OPUS_SILENCE = b"\xf8\xff\xfe"
SILENCE_FRAMES = 3
SILENT_LEVEL = 127  # RFC 6464 ssrc-audio-level of the silence frames
_HALF = 1 << 31
_MASK = (1 << 32) - 1

Output = Callable[[int, bytes, "int | None", bool, float], bool]
"""send(pts, payload, audio_level, marker, wall_time) -> sent; pts counts 1/48000 s from
the slot's start, the output adds its own random origin and sequence numbers."""


def _discard(pts: int, payload: bytes, level: int | None, marker: bool, now: float) -> bool:
    return False


class Slot:
    """Outgoing audio of one slot of one listener."""

    __slots__ = (
        "_out", "_on_stop", "_source", "_offset", "_last_in", "_last_out", "_last_out_time", "_marker", "_live"
    )

    def __init__(self, out: Output | None = None, on_stop: Callable[[], None] | None = None) -> None:
        self._out: Output = out or _discard
        self._on_stop = on_stop  # called once by stop() (the output's close)
        self._source: str | None = None
        self._offset = 0  # out_ts = in_ts + offset for the current source (set by its first packet)
        self._last_in: int | None = None  # last incoming RTP timestamp (unwrapped); None: no packet yet
        self._last_out: int | None = None  # last outgoing pts
        self._last_out_time = 0.0  # time.time() of the last outgoing packet
        self._marker = True
        self._live = True

    @property
    def source(self) -> str | None:
        return self._source

    def set_source(self, source: str | None) -> None:
        """Carry `source` from now on; end the previous source's sound with silence."""
        if source == self._source:
            return
        if self._source is not None and self._last_out is not None:
            now = time.time()
            for _ in range(SILENCE_FRAMES):
                self._emit(self._last_out + FRAME_SAMPLES, OPUS_SILENCE, SILENT_LEVEL, now)
        self._source = source
        self._last_in = None
        self._marker = True

    def push(self, timestamp: int, payload: bytes, level: int | None, now: float) -> None:
        """Send one packet of the current source (its RTP `timestamp`, encoded `payload`,
        its ssrc-audio-level if any); `now` is ``time.time()``. Runs once per listener
        per forwarded packet: kept flat on purpose."""
        last_in = self._last_in
        if last_in is None:
            self._offset = self._start_offset(timestamp)
            in_ts = timestamp
        else:
            # Unwrap the 32-bit timestamp around the previous one (reordering allowed).
            in_ts = last_in + ((timestamp - last_in + _HALF) & _MASK) - _HALF
        self._last_in = in_ts
        if not self._live:
            return
        pts = in_ts + self._offset
        marker = self._marker
        if marker:
            self._marker = False
        self._out(pts, payload, level, marker, now)  # `_emit`, inlined: once per copy
        last_out = self._last_out
        if last_out is None or pts > last_out:
            self._last_out = pts
        self._last_out_time = now

    def _start_offset(self, timestamp: int) -> int:
        if self._last_out is None:
            return -timestamp
        # Continue after the last packet sent, leaving the real gap (whole frames) so the
        # listener's jitter buffer sees it as a pause, not as a burst.
        gap = time.time() - self._last_out_time
        frames = max(1, round(gap * OPUS_CLOCK / FRAME_SAMPLES))
        return self._last_out + frames * FRAME_SAMPLES - timestamp

    def _emit(self, pts: int, payload: bytes, level: int | None, now: float) -> None:
        if not self._live:
            return
        marker = self._marker
        if marker:
            self._marker = False
        self._out(pts, payload, level, marker, now)
        last_out = self._last_out
        if last_out is None or pts > last_out:
            self._last_out = pts
        self._last_out_time = now

    def stop(self) -> None:
        """Send nothing more, ever; let go of the output (and close it: `on_stop`)."""
        self._live = False
        self._out = _discard
        on_stop, self._on_stop = self._on_stop, None
        if on_stop is not None:
            on_stop()
