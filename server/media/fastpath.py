"""The one place that touches aiortc's (and aioice's) private *send* path.

Handing encoded packets to aiortc's ``RTCRtpSender`` through a ``MediaStreamTrack`` costs,
per packet and per listener, an asyncio task wake-up, the sender's packetization, and an
async send chain (``RTCDtlsTransport._send_rtp`` → ``Connection.sendto`` →
``StunProtocol.send_data``). The relay instead sends each forwarded packet synchronously
from the tap callback: it writes the RTP header itself (the SSRC, payload type and header
extension ids of the *answer* SDP, its own sequence numbers), protects it with the DTLS
transport's SRTP session (in the session's own buffer, calling libsrtp directly) and hands
the datagram to the nominated ICE pair's transport — exactly what aiortc's chain ends up
doing, minus the awaits and the copies.

Once bound to a connected transport on a shared socket, a slot's copies are written by the
compiled fan-out (`native`, ``fanout.c``'s ``lk_send``) from the ``lk_out`` struct `RtpOut.c`
(its SRTP context, batch, address, header templates, sequence numbers and counters): the
same steps, byte for byte (``tests/media/test_mux.py``). It checks nothing per copy, so
whatever could change the binding clears ``c.ready`` first (`RtpOut.unbind`: the DTLS
state, a pair nominated or the ICE connection closed) and the next copy goes through
`RtpOut.send`, which binds again. Without the library `send` writes the copy itself.

aiortc keeps everything else: negotiation, ICE (consent checks included), DTLS, and RTCP —
the slot's ``RTCRtpSender`` still runs its RTCP loop (sender reports carry the counters
this module keeps up to date) but its RTP loop waits forever on an `IdleTrack`.

Private names used (aiortc 1.16, aioice 0.13, pylibsrtp 1.0; ``tests/media/test_fastpath.py``
fails loudly if an upgrade moves any of them):

- ``RTCDtlsTransport._state`` (``State.CONNECTED``), ``._tx_srtp`` (a ``pylibsrtp.Session``)
  and the statistics counters ``__tx_bytes`` / ``__tx_packets``;
- ``RTCIceTransport._connection`` (an ``aioice.Connection``) and its ``_nominated``
  ``{component: CandidatePair}``; ``CandidatePair.protocol.transport.sendto`` is a
  datagram transport (or aioice's ``TurnTransport``), both synchronous;
- ``pylibsrtp.Session._srtp`` (the libsrtp context), ``._cdata`` (its 1500-byte buffer) and
  ``._buffer`` (a cffi buffer over it), used as ``Session.protect`` uses them;
- ``RTCRtpSender``'s sender-report counters ``__ntp_timestamp``, ``__rtp_timestamp``,
  ``__packet_count``, ``__octet_count``;
- ``aioice.Connection.data_received`` (replaced per listen-only peer: see `ignore_rtcp`);
- ``RTCRtpSender._run_rtcp`` and ``getStats`` (replaced per slot sender: the counters above
  are brought up to date lazily, at each RTCP tick and in ``getStats``), the events
  ``__rtcp_started`` / ``__rtcp_exited`` that ``stop()`` waits on, ``__cname``, ``__lsr``,
  ``__lsr_time`` (round-trip time from the listener's receiver reports) and ``_send_rtcp``.

RTCP of a slot: aiortc's sender sends a sender report every 0.5–1.5 s whether it sent
anything or not; with S slots per listener that was most of the relay's idle CPU. A slot
sender here reports every `RTCP_INTERVAL` (randomised ×0.5–1.5, as libwebrtc does for
audio) and only while it has sent RTP in the last two intervals (RFC 3550 §6.4: a
participant that sent nothing reports as a receiver, and a slot receives nothing). The
reports of all the slots of one peer come from one timer, `RtcpClock` (no task per slot
waking up to find nothing to say), and are protected and sent synchronously as `send`
sends RTP (what ``RTCDtlsTransport._send_rtp`` does for RTCP: ``protect_rtcp``, the ICE
pair's transport, the transport's counters); the sender's RTCP task only waits for
``stop()`` and then says BYE as before.
"""

from __future__ import annotations

import asyncio
import logging
import random
import struct
import time
import weakref
from collections import deque
from collections.abc import Coroutine
from typing import Any

import pylibsrtp
from aiortc import RTCRtpSender, sdp
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtcdtlstransport import RTCDtlsTransport, State
from aiortc.rtcrtpparameters import RTCRtpSendParameters
from aiortc.rtp import (
    HeaderExtensions,
    HeaderExtensionsMap,
    RtcpByePacket,
    RtcpSdesPacket,
    RtcpSenderInfo,
    RtcpSourceInfo,
    RtcpSrPacket,
)
from pylibsrtp import _binding as _srtp_binding

from . import mux as _mux
from . import native as _native
from .sendmmsg import SLOT as _SLOT
from .ticker import Ticker

logger = logging.getLogger(__name__)

_NTP_OFFSET = 2208988800  # seconds from 1900-01-01 (NTP) to 1970-01-01 (Unix)
_RTP_COMPONENT = 1
PENDING = 10  # packets kept for a listener whose connection is not up yet
RTCP_INTERVAL = 5.0  # seconds between a slot's sender reports (libwebrtc's audio default)
_CONNECTED = State.CONNECTED


class _Closed:
    """Stands in for the DTLS transport of a closed `RtpOut`: never connected."""

    _state = State.CLOSED


_CLOSED = _Closed()
_ffi = _srtp_binding.ffi
_srtp_protect = _srtp_binding.lib.srtp_protect
_SRTP_TRAILER = pylibsrtp.SRTP_MAX_TRAILER_LEN  # room libsrtp may add to a packet


class _Nominated(dict):  # type: ignore[type-arg]
    """A connection's ``_nominated`` that tells its slots when a pair is nominated (again):
    they sent from a bound copy of the old one (`RtpOut.unbind`)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.watchers: weakref.WeakSet[RtpOut] = weakref.WeakSet()

    def _changed(self) -> None:
        for out in list(self.watchers):
            out.unbind()

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value)
        self._changed()

    def __delitem__(self, key: Any) -> None:
        super().__delitem__(key)
        self._changed()

    def clear(self) -> None:  # aioice's close()
        super().clear()
        self._changed()

    def pop(self, *args: Any) -> Any:
        value = super().pop(*args)
        self._changed()
        return value


def _watch_nominated(connection: Any, out: RtpOut) -> dict[int, Any]:
    nominated = connection._nominated
    if not isinstance(nominated, _Nominated):
        nominated = connection._nominated = _Nominated(nominated)
    nominated.watchers.add(out)
    return nominated


_DTLS_ATTRS = ("_state", "_tx_srtp", "_RTCDtlsTransport__tx_bytes", "_RTCDtlsTransport__tx_packets")
_SENDER_ATTRS = (
    "_RTCRtpSender__ntp_timestamp",
    "_RTCRtpSender__rtp_timestamp",
    "_RTCRtpSender__packet_count",
    "_RTCRtpSender__octet_count",
    "_RTCRtpSender__rtcp_started",
    "_RTCRtpSender__rtcp_exited",
    "_RTCRtpSender__cname",
    "_RTCRtpSender__lsr",
    "_RTCRtpSender__lsr_time",
)


class FastPathUnsupported(RuntimeError):
    """The installed aiortc/aioice no longer look the way this module expects."""


def check_supported() -> None:
    """Raise `FastPathUnsupported` unless the private send path is where it was (cheap:
    source inspection only; attributes of live objects are checked by `RtpOut.check`)."""
    import inspect

    from aioice import ice

    checks = {
        "RTCDtlsTransport._send_rtp protects with _tx_srtp and sends on the ICE transport": (
            RTCDtlsTransport._send_rtp,
            ("self._state != State.CONNECTED", "self._tx_srtp.protect(data)", "self.transport._send(data)"),
        ),
        "aioice Connection.sendto uses the nominated pair": (
            ice.Connection.sendto,
            (
                "self._nominated.get(component)",
                "active_pair.protocol.send_data(data, active_pair.remote_addr)",
            ),
        ),
        "pylibsrtp Session keeps its context and a 1500-byte buffer": (
            pylibsrtp.Session.__init__,
            (
                'self._cdata = ffi.new("char[]", 1500)',
                "self._buffer = ffi.buffer(self._cdata)",
                "self._srtp = ",
            ),
        ),
        "pylibsrtp Session.protect is srtp_protect on that buffer": (
            pylibsrtp.Session._Session__process,  # type: ignore[attr-defined]
            (
                "len_p[0] = len(data)",
                "self._buffer[0 : len(data)] = data",
                "func(self._srtp[0], self._cdata, len_p)",
                "return self._buffer[0 : len_p[0]]",
            ),
        ),
        "aioice Connection nominates a pair by setting _nominated[component]": (
            ice.Connection.check_complete,
            ("self._nominated[pair.component] = pair",),
        ),
        "aioice Connection.data_received queues every datagram that is not STUN": (
            ice.Connection.data_received,
            ("self._queue.put_nowait((data, component))",),
        ),
        "aioice StunProtocol hands what is not STUN to its receiver's data_received": (
            ice.StunProtocol.datagram_received,
            ("self.receiver.data_received(data, self.local_candidate.component)",),
        ),
        "aioice StunProtocol.send_data is transport.sendto": (
            ice.StunProtocol.send_data,
            ("self.transport.sendto(data, addr)",),
        ),
        "RTCRtpSender keeps sender-report counters": (
            RTCRtpSender._run_rtp,
            ("self.__packet_count += 1", "self.__octet_count += len(payload)", "packet.extensions.mid"),
        ),
        "RTCRtpSender sends its sender reports from those counters": (
            RTCRtpSender._run_rtcp,
            (
                "self.__rtcp_started.set()",
                "packet_count=self.__packet_count & 0xFFFFFFFF",
                "rtp_timestamp=self.__rtp_timestamp",
                "self.__lsr = ((self.__ntp_timestamp) >> 16) & 0xFFFFFFFF",
                "self.__lsr_time = time.time()",
                "await self._send_rtcp([packet])",
                "self.__rtcp_exited.set()",
            ),
        ),
        "RTCRtpSender.send starts the RTCP loop through the instance attribute": (
            RTCRtpSender.send,
            ("self.__cname = parameters.rtcp.cname", "asyncio.ensure_future(self._run_rtcp())"),
        ),
        "RTCDtlsTransport._send_rtp protects RTCP with protect_rtcp and counts it": (
            RTCDtlsTransport._send_rtp,
            (
                "data = self._tx_srtp.protect_rtcp(data)",
                "self.__tx_bytes += len(data)",
                "self.__tx_packets += 1",
            ),
        ),
        "RTCRtpSender.stop waits for the RTCP loop's events": (
            RTCRtpSender.stop,
            ("self.__rtcp_started.wait()", "self.__rtcp_exited.wait()"),
        ),
    }
    for what, (function, needles) in checks.items():
        try:
            source = inspect.getsource(function)
        except (OSError, TypeError) as exc:
            raise FastPathUnsupported(f"{what}: no source ({exc})") from exc
        for needle in needles:
            if needle not in source:
                raise FastPathUnsupported(f"{what}: {needle!r} not found")


class IdleTrack(MediaStreamTrack):
    """The track given to a slot's ``RTCRtpSender``: it never yields a frame, so the
    sender's RTP loop sleeps (no polling) while its RTCP loop keeps running."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._ended: asyncio.Future[None] | None = None

    async def recv(self) -> Any:
        if self.readyState == "live":
            self._ended = asyncio.get_running_loop().create_future()
            await self._ended
        raise MediaStreamError

    def stop(self) -> None:
        super().stop()
        if self._ended is not None and not self._ended.done():
            self._ended.set_result(None)


_reports = Ticker(lambda: RTCP_INTERVAL * 0.2)  # one timer for every peer's sender reports


class RtcpClock:
    """The sender reports of a peer's slots (see the module's docstring): due every
    `interval` (randomised ×0.5–1.5) while any `RtpOut` is registered, on the relay's one
    report `Ticker` (no timer of its own)."""

    __slots__ = ("interval", "_outs", "__weakref__")

    def __init__(self, interval: float | None = None) -> None:
        self.interval = RTCP_INTERVAL if interval is None else interval
        self._outs: list[RtpOut] = []

    @property
    def scheduled(self) -> bool:
        return self._tick in _reports

    def add(self, out: RtpOut) -> None:
        if out not in self._outs:
            self._outs.append(out)
        if not self.scheduled:
            self._schedule()

    def remove(self, out: RtpOut) -> None:
        if out in self._outs:
            self._outs.remove(out)
        if not self._outs:
            _reports.cancel(self._tick)

    def _schedule(self) -> None:
        delay = self.interval * (0.5 + random.random())
        _reports.at(asyncio.get_running_loop().time() + delay, self._tick)

    def _tick(self) -> None:
        for out in list(self._outs):
            try:
                out.report()
            except Exception:
                logger.exception("media: a sender report failed")
        if self._outs:
            self._schedule()


class RtpOut:
    """Sends RTP packets of one slot (one ``RTCRtpSender``) synchronously.

    Built from the answer's m-line, so the SSRC, payload type and header extension ids
    are the ones the listener's browser accepted. `send` returns False (and sends
    nothing) until the DTLS transport is connected over a nominated ICE pair, and after
    it closed. Until the first connection the last `PENDING` packets wait (as they did in
    aiortc's own path) and go out as soon as DTLS is connected.
    """

    # Slots, not a dict: one compact object per listener's slot, touched once per copy of
    # every packet (with hundreds of listeners the fan-out runs on a cold cache).
    __slots__ = (
        "ssrc", "payload_type", "c", "_sender", "_mid", "_ext_map", "_ext", "_origin", "_dtls",
        "_nominated", "_pair", "_addr", "_sendto", "_batch", "_name", "_session", "_srtp", "_cdata",
        "_buffer", "_room", "_length", "_synced", "_pending", "_clock", "_reported", "__weakref__",
    )

    def __init__(
        self,
        sender: RTCRtpSender,
        media: sdp.MediaDescription,
        payload_type: int,
        *,
        rtcp_interval: float | None = None,
        clock: RtcpClock | None = None,
    ) -> None:
        if not media.ssrc:
            raise ValueError("answer m-line without an SSRC")
        self.ssrc = media.ssrc[0].ssrc
        self.payload_type = payload_type
        self._sender = sender
        self._mid = media.rtp.muxId
        self._ext_map = HeaderExtensionsMap()
        self._ext_map.configure(RTCRtpSendParameters(headerExtensions=media.rtp.headerExtensions))
        self._ext: dict[int | None, tuple[int, bytes, struct.Struct]] = {}
        self._origin = random.getrandbits(32)
        # What changes per copy (sequence numbers, counters) and what the compiled fan-out
        # needs to send a copy (`native`): the header templates here, the SRTP context, the
        # batch and the address once bound (`_bind`, which sets ``ready``).
        c = self.c = _native.ffi.new("struct lk_out *")
        c.ssrc = self.ssrc
        c.payload_type = payload_type
        c.origin = self._origin
        c.seq = random.getrandbits(15)  # lower half: no early wrap (as aiortc does)
        self._templates()
        self._dtls = sender.transport
        self._nominated: dict[int, Any] = _watch_nominated(sender.transport.transport._connection, self)
        self._pair: Any = None
        self._addr: tuple[str, int] = ("", 0)
        self._sendto: Any = None
        self._batch: Any = None  # the shared socket's `sendmmsg.Batch` (`mux`), if any
        self._name: Any = None  # the listener's address as the batch takes it
        self._session: Any = None
        self._srtp: Any = None
        self._cdata: Any = None
        self._buffer: Any = None
        self._room = 0
        self._length = _ffi.new("int *")
        self._synced = (0, 0, 0)  # (sent, octets, bytes) already copied into aiortc's counters
        self._pending: deque[tuple[int, bytes, int | None, bool, float]] | None = deque(maxlen=PENDING)
        sender.transport.on("statechange", self._state_changed)
        # RTCRtpSender.send() starts self._run_rtcp(): this instance's replaces the class's
        self._clock: RtcpClock | None = clock if clock is not None else RtcpClock(rtcp_interval)
        self._reported = (0, 0)  # packet counts at the previous two reports' ticks
        sender._run_rtcp = self._run_rtcp  # type: ignore[method-assign]
        sender.getStats = self._get_stats  # type: ignore[method-assign]

    def close(self) -> None:
        """Send nothing more; take back what this installed on the sender and its DTLS
        transport and let go of both, so no reference cycle runs through this object (a
        closed connection is then freed by reference counting, not by a full collection).

        The sender's RTCP loop, if running, goes on until ``RTCRtpSender.stop()`` with the
        counters brought up to date here (it holds the sender itself). Idempotent."""
        sender = self._sender
        if sender is None:
            return
        self.sync_counters()
        if self._clock is not None:
            self._clock.remove(self)  # no reference cycle through the clock either
            self._clock = None
        installed = vars(sender)
        for name, method in (("_run_rtcp", self._run_rtcp), ("getStats", self._get_stats)):
            if installed.get(name) == method:
                del installed[name]
        dtls = self._dtls
        if self._state_changed in dtls.listeners("statechange"):
            dtls.remove_listener("statechange", self._state_changed)
        self._sender = None
        self._dtls = _CLOSED
        self._nominated = {}
        self._pending = None
        self._pair = self._sendto = self._session = self._srtp = self._cdata = self._buffer = None
        self._batch = self._name = None
        self.c.ready = 0
        self.c.srtp = self.c.batch = self.c.name = _native.ffi.NULL

    @property
    def sent(self) -> int:
        """RTP packets sent."""
        return int(self.c.sent)

    def _state_changed(self) -> None:
        self.unbind()
        self._flush()

    def unbind(self) -> None:
        """What `send` bound may have changed (a pair nominated, the DTLS state): the next
        copy goes through `send`, which binds again."""
        self.c.ready = 0
        self._pair = None

    def _templates(self) -> None:
        """The header templates the compiled fan-out writes (first byte and extension
        block without a level, and with one, the level's byte located by writing two)."""
        c = self.c
        first, ext, _ = self._extensions(None)
        with_level = [self._extensions(level) for level in (0, 0x55)]
        diff = [i for i, (a, b) in enumerate(zip(with_level[0][1], with_level[1][1], strict=False)) if a != b]
        usable = (
            len(ext) <= 64
            and len(with_level[0][1]) == len(with_level[1][1]) <= 64
            and len(diff) == 1
            and with_level[1][1][diff[0]] == 0x55
        )
        if not usable:  # an extension layout this does not know: the Python path sends
            c.ext_len[0] = c.ext_len[1] = 255
            return
        c.first[0], c.ext_len[0] = first, len(ext)
        c.first[1], c.ext_len[1] = with_level[0][0], len(with_level[0][1])
        _native.ffi.memmove(c.ext[0], ext, len(ext))
        _native.ffi.memmove(c.ext[1], with_level[0][1], len(with_level[0][1]))
        c.level_at = diff[0]

    def _flush(self) -> None:
        pending = self._pending
        if pending is None or self._dtls._state is not _CONNECTED:
            return
        self._pending = None
        for packet in pending:
            if not self.send(*packet):
                break

    def _extensions(self, level: int | None) -> tuple[int, bytes, struct.Struct]:
        """(first header byte, extension block, the header's layout with that block) for
        `level`, as aiortc would write them."""
        values = HeaderExtensions(mid=self._mid)
        if level is not None:
            values.audio_level = (False, level)
        profile, value = self._ext_map.set(values)
        ext = struct.pack("!HH", profile, len(value) >> 2) + value if value else b""
        entry = (0x90 if value else 0x80, ext, struct.Struct(f"!BBHLL{len(ext)}s"))
        self._ext[level] = entry
        return entry

    def _bind(self, dtls: RTCDtlsTransport, pair: Any) -> bool:
        """Cache what `send` needs of the connected transport; False if it has no SRTP."""
        session = dtls._tx_srtp
        if session is None:
            return False
        self._session = session
        self._srtp = session._srtp[0]
        self._cdata = session._cdata
        self._buffer = session._buffer
        self._room = len(session._cdata) - _SRTP_TRAILER
        self._pair = pair
        self._addr = pair.remote_addr
        self._sendto = pair.protocol.transport.sendto
        shared = getattr(pair.protocol, "mux", None)
        self._batch = None if shared is None else shared.batch
        self._name = None if self._batch is None else self._batch.name(self._addr)
        c = self.c
        c.ready = 0
        if self._batch is not None and c.ext_len[0] != 255:
            c.srtp = _native.foreign(self._srtp, _ffi)
            c.room = self._room
            c.batch = self._batch.c
            c.name = self._name[0]
            c.namelen = self._name[1]
            c.ready = _native.LIB is not None  # sent by the compiled code from now on
        return True

    def send(self, pts: int, payload: bytes, level: int | None, marker: bool, now: float) -> bool:
        """Send one packet with RTP timestamp origin + `pts`; False if not sent.

        The header, extensions and payload are written straight into the SRTP session's
        buffer and protected there (``pylibsrtp.Session.protect`` does the same with a
        copy and an allocation more); the datagram leaves as bytes, so a transport that
        has to queue it (the socket is full) keeps its own copy."""
        dtls = self._dtls
        pair = self._nominated.get(_RTP_COMPONENT)
        if dtls._state is not _CONNECTED or pair is None:
            if self._pending is not None:
                self._pending.append((pts, payload, level, marker, now))
            return False
        if self._pending is not None:
            self._flush()  # what waited for the connection goes first
        if (pair is not self._pair or dtls._tx_srtp is not self._session) and not self._bind(dtls, pair):
            return False
        c = self.c
        if c.ready:
            batch = self._batch
            if not _native.LIB.lk_send(
                c, pts, payload, len(payload), -1 if level is None else level, marker, now, _native.PROTECT
            ):
                return False
            if batch.c.count == 1:
                _mux.queued(batch)
            return True
        first, ext, header = self._ext.get(level) or self._extensions(level)
        timestamp = (self._origin + pts) & 0xFFFFFFFF
        seq = c.seq
        start = 12 + len(ext)
        end = start + len(payload)
        if end > self._room:
            return False  # larger than any Opus packet (the relay only takes ≤ 1500 bytes in)
        length = self._length
        length[0] = end
        batch = self._batch
        if batch is not None:
            # Written and protected in place in the shared socket's batch; it leaves with the
            # other listeners' copies in one sendmmsg (`mux.flush`).
            index = batch.count
            if index == batch.capacity:
                batch.flush()
                index = 0
            if index == 0:
                _mux.queued(batch)
            base = index * _SLOT
            buffer = batch.buffer
            header.pack_into(
                buffer, base, first, self.payload_type | (0x80 if marker else 0), seq, timestamp, self.ssrc, ext
            )
            buffer[base + start : base + end] = payload
            if _srtp_protect(self._srtp, batch.slots[index], length):
                return False
            size = length[0]
            batch.commit(index, size, self._name)
        else:
            buffer = self._buffer
            header.pack_into(
                buffer, 0, first, self.payload_type | (0x80 if marker else 0), seq, timestamp, self.ssrc, ext
            )
            buffer[start:end] = payload
            if _srtp_protect(self._srtp, self._cdata, length):
                return False
            size = length[0]
            self._sendto(buffer[0:size], self._addr)
        c.seq = (seq + 1) & 0xFFFF
        c.sent += 1
        c.octets += len(payload)
        c.bytes += size
        c.last_now = now
        c.last_timestamp = timestamp
        return True

    def sync_counters(self) -> None:
        """Copy what was sent since the last call into aiortc's counters (sender reports
        and ``getStats()`` read them): at every RTCP tick and in the sender's getStats
        (nothing once closed)."""
        sender, dtls = self._sender, self._dtls
        if sender is None:
            return
        c = self.c
        sent, octets, sent_bytes = int(c.sent), int(c.octets), int(c.bytes)
        packets = sent - self._synced[0]
        if packets:
            sender._RTCRtpSender__packet_count += packets
            sender._RTCRtpSender__octet_count += octets - self._synced[1]
            dtls._RTCDtlsTransport__tx_packets += packets
            dtls._RTCDtlsTransport__tx_bytes += sent_bytes - self._synced[2]
            sender._RTCRtpSender__ntp_timestamp = int((c.last_now + _NTP_OFFSET) * 4294967296.0)
            sender._RTCRtpSender__rtp_timestamp = int(c.last_timestamp)
            self._synced = (sent, octets, sent_bytes)

    async def _get_stats(self) -> Any:
        """The slot sender's ``getStats()``, counting what this fast path sent."""
        self.sync_counters()
        return await RTCRtpSender.getStats(self._sender)

    def report(self) -> None:
        """One tick of the slot's RTCP (`RtcpClock`): a sender report (and SDES) if RTP
        went out in the last two intervals, sent at once (see the module's docstring)."""
        sender = self._sender
        if sender is None:
            return
        self.sync_counters()
        count = sender._RTCRtpSender__packet_count
        quiet = count == self._reported[0]
        self._reported = (self._reported[1], count)
        if quiet:
            return  # nothing sent in the last two intervals: no report
        dtls = self._dtls
        pair = self._nominated.get(_RTP_COMPONENT)
        if dtls._state is not _CONNECTED or pair is None:
            return
        if (pair is not self._pair or dtls._tx_srtp is not self._session) and not self._bind(dtls, pair):
            return
        ntp = sender._RTCRtpSender__ntp_timestamp
        payload = bytes(
            RtcpSrPacket(
                ssrc=self.ssrc,
                sender_info=RtcpSenderInfo(
                    ntp_timestamp=ntp,
                    rtp_timestamp=sender._RTCRtpSender__rtp_timestamp,
                    packet_count=count & 0xFFFFFFFF,
                    octet_count=sender._RTCRtpSender__octet_count & 0xFFFFFFFF,
                ),
            )
        )
        sender._RTCRtpSender__lsr = (ntp >> 16) & 0xFFFFFFFF
        sender._RTCRtpSender__lsr_time = time.time()
        cname = sender._RTCRtpSender__cname
        if cname is not None:
            chunk = RtcpSourceInfo(ssrc=self.ssrc, items=[(1, cname.encode())])
            payload += bytes(RtcpSdesPacket(chunks=[chunk]))
        data = self._session.protect_rtcp(payload)
        self._sendto(data, self._addr)
        dtls._RTCDtlsTransport__tx_bytes += len(data)
        dtls._RTCDtlsTransport__tx_packets += 1

    def _run_rtcp(self) -> Coroutine[Any, Any, None]:
        """The slot sender's RTCP task (``RTCRtpSender.send`` runs ``self._run_rtcp()``).

        The sender is bound when the coroutine is made, not when the task first runs: a
        member closed in between (`close` lets go of the sender) would otherwise leave a
        task that never sets ``__rtcp_started``, and ``RTCRtpSender.stop()`` waits for it
        forever (seen once in CI: a peer connection's close that never returned)."""
        return self._rtcp_task(self._sender, self._clock)

    async def _rtcp_task(self, sender: Any, clock: RtcpClock | None) -> None:
        """Reports come from the peer's `RtcpClock`; this only waits for ``stop()`` and
        then says BYE (see the module's docstring)."""
        sender._RTCRtpSender__rtcp_started.set()
        if self._sender is None:
            clock = None  # closed before the task ran: nothing to report, nothing to hold
        try:
            if clock is not None:
                clock.add(self)
            await asyncio.get_running_loop().create_future()  # until cancelled by stop()
        except asyncio.CancelledError:
            pass
        finally:
            if clock is not None:
                clock.remove(self)
        self.sync_counters()
        if sender._RTCRtpSender__packet_count:
            await sender._send_rtcp([RtcpByePacket(sources=[self.ssrc])])
        sender._RTCRtpSender__rtcp_exited.set()

    def check(self) -> None:
        """Raise `FastPathUnsupported` unless the live objects have every private
        attribute `send` uses (call once connected; used by the regression test)."""
        dtls = self._sender.transport
        for name in _DTLS_ATTRS:
            if not hasattr(dtls, name):
                raise FastPathUnsupported(f"RTCDtlsTransport.{name} is gone")
        session = dtls._tx_srtp
        for name in ("_srtp", "_cdata", "_buffer"):
            if not hasattr(session, name):
                raise FastPathUnsupported(f"pylibsrtp.Session.{name} is gone")
        connection = getattr(dtls.transport, "_connection", None)
        if not isinstance(getattr(connection, "_nominated", None), dict):
            raise FastPathUnsupported("RTCIceTransport._connection._nominated is gone")
        for name in _SENDER_ATTRS:
            if not hasattr(self._sender, name):
                raise FastPathUnsupported(f"RTCRtpSender.{name} is gone")


def ignore_rtcp(connection: Any) -> None:
    """Drop the RTCP a listen-only member's connection receives, before it is decrypted.

    All it carries is the listener's receiver reports on our slots (and SDES, BYE): aiortc
    would decrypt and parse each, route it to the slot's sender and build statistics objects
    from it, for a round-trip time nobody reads; the relay does no retransmission or rate
    control for audio it passes through. At 300 listen-only members that was a third of the
    relay's idle CPU (`python -m server.media.bench`). RTP, DTLS and STUN (consent) are
    untouched; `connection` is the peer's ``aioice.Connection`` (RFC 5761 §4 demultiplexing:
    RTCP packet types 192-223, RFC 7983 first-byte range 128-191).

    The replacement holds the connection weakly: installed on the connection, a strong
    reference would make a cycle that only a full collection frees."""
    for protocol in getattr(connection, "_protocols", ()):
        if isinstance(protocol, _mux.MuxProtocol):
            protocol.drop_rtcp = True  # dropped as it arrives on the shared socket, even earlier
    queue = type(connection).data_received
    ref = weakref.ref(connection)

    def data_received(data: bytes, component: int) -> None:
        if len(data) > 1 and 127 < data[0] < 192 and 191 < data[1] < 224:
            return
        connection = ref()
        if connection is not None:
            queue(connection, data, component)

    connection.data_received = data_received
