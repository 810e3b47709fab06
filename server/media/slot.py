"""A downstream slot: one listener's outgoing stream that carries one source at a time.

Packets are forwarded as they are (encoded Opus, never decoded) the moment the tap sees
them, through `fastpath.RtpOut`. A slot's state is a `native` struct: `Route.push` runs
`Slot.push` for every slot carrying a source in one compiled call where the library is
built (this module's Python is the same steps, and what runs where it is not). When the source changes the outgoing timestamps stay
continuous (the new source starts where the old one left off, plus the wall-clock gap),
the first packet of a new source carries the RTP marker bit (start of a talkspurt), and
when a source leaves the slot a few Opus silence frames end its sound cleanly.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from . import native

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
    """Outgoing audio of one slot of one listener. `state` is the output's ``lk_out``
    struct (a `fastpath.RtpOut`'s ``c``), if it has one: the compiled fan-out then sends
    this slot's copies itself once the output is bound."""

    __slots__ = ("_out", "_on_stop", "_source", "_s")

    def __init__(
        self, out: Output | None = None, on_stop: Callable[[], None] | None = None, state: Any = None
    ) -> None:
        self._out: Output = out or _discard
        self._on_stop = on_stop  # called once by stop() (the output's close)
        self._source: str | None = None
        # offset: out_ts = in_ts + offset for the current source (set by its first packet);
        # last_in (has_in): last incoming RTP timestamp, unwrapped; last_out (has_out): last
        # outgoing pts, at last_out_time (time.time()); marker: the next packet starts a talkspurt
        s = self._s = native.ffi.new("struct lk_slot *")
        s.live = 1
        s.marker = 1
        if state is not None:
            s.out = state

    @property
    def source(self) -> str | None:
        return self._source

    def set_source(self, source: str | None) -> None:
        """Carry `source` from now on; end the previous source's sound with silence."""
        if source == self._source:
            return
        s = self._s
        if self._source is not None and s.has_out:
            now = time.time()
            for _ in range(SILENCE_FRAMES):
                self._emit(s.last_out + FRAME_SAMPLES, OPUS_SILENCE, SILENT_LEVEL, now)
        self._source = source
        s.has_in = 0
        s.marker = 1

    def push(self, timestamp: int, payload: bytes, level: int | None, now: float) -> None:
        """Send one packet of the current source (its RTP `timestamp`, encoded `payload`,
        its ssrc-audio-level if any); `now` is ``time.time()``. What ``lk_fanout`` does for
        one slot (`Route.push` runs that where it is built)."""
        s = self._s
        if not s.has_in:
            s.offset = self._start_offset(timestamp, now)
            in_ts = timestamp
            s.has_in = 1
        else:
            # Unwrap the 32-bit timestamp around the previous one (reordering allowed).
            last_in = s.last_in
            in_ts = last_in + ((timestamp - last_in + _HALF) & _MASK) - _HALF
        s.last_in = in_ts
        if not s.live:
            return
        pts = in_ts + s.offset
        marker = bool(s.marker)
        s.marker = 0
        self._out(pts, payload, level, marker, now)  # `_emit`, inlined: once per copy
        if not s.has_out or pts > s.last_out:
            s.last_out = pts
            s.has_out = 1
        s.last_out_time = now

    def _left(self, payload: bytes, level: int | None, now: float) -> None:
        """The copy the compiled fan-out left to Python (its pts and marker are in the
        struct; the slot's timestamps are already advanced)."""
        s = self._s
        self._out(s.pts, payload, level, bool(s.left_marker), now)

    def _start_offset(self, timestamp: int, now: float) -> int:
        s = self._s
        if not s.has_out:
            return -timestamp
        # Continue after the last packet sent, leaving the real gap (whole frames) so the
        # listener's jitter buffer sees it as a pause, not as a burst.
        gap = now - s.last_out_time
        frames = max(1, round(gap * OPUS_CLOCK / FRAME_SAMPLES))
        return int(s.last_out) + frames * FRAME_SAMPLES - timestamp

    def _emit(self, pts: int, payload: bytes, level: int | None, now: float) -> None:
        s = self._s
        if not s.live:
            return
        marker = bool(s.marker)
        s.marker = 0
        self._out(pts, payload, level, marker, now)
        if not s.has_out or pts > s.last_out:
            s.last_out = pts
            s.has_out = 1
        s.last_out_time = now

    def stop(self) -> None:
        """Send nothing more, ever; let go of the output (and close it: `on_stop`)."""
        s = self._s
        s.live = 0
        s.out = native.ffi.NULL
        self._out = _discard
        on_stop, self._on_stop = self._on_stop, None
        if on_stop is not None:
            on_stop()


class Route:
    """The slots carrying one source: `push` forwards a packet to all of them, in one
    compiled call (``lk_fanout``) where the library is built. The copies it cannot send
    itself (an output without a struct, one not connected yet) it leaves to each slot's
    Python output, in order, after the others."""

    __slots__ = ("slots", "_array", "_left")

    def __init__(self, slots: Sequence[Slot]) -> None:
        self.slots = list(slots)
        self._array = native.ffi.new("struct lk_slot *[]", [slot._s for slot in self.slots])
        self._left = native.ffi.new("int32_t[]", max(1, len(self.slots)))

    def __len__(self) -> int:
        return len(self.slots)

    def push(self, timestamp: int, payload: bytes, level: int | None, now: float) -> None:
        lib = native.LIB
        if lib is None:
            for slot in self.slots:
                slot.push(timestamp, payload, level, now)
            return
        left = lib.lk_fanout(
            self._array,
            len(self.slots),
            timestamp,
            payload,
            len(payload),
            -1 if level is None else level,
            now,
            native.PROTECT,
            self._left,
        )
        for k in range(left):
            self.slots[self._left[k]]._left(payload, level, now)
