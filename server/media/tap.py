"""The one place that touches aiortc's private receive path.

aiortc has no public hook for encoded packets: every RTP packet reaches
``RTCRtpReceiver._handle_rtp_packet(packet, arrival_time_ms)`` (called by the DTLS
transport with ``arrival_time_ms`` as a keyword), then a jitter buffer (~80 ms for audio)
and a decoder thread. The relay forwards encoded Opus, so it taps each receiver at that
method, *before* the jitter buffer, and lets the original still run for RTCP receiver
statistics. The decoder thread is stopped as soon as ``receive()`` started it: nothing
decodes, no frame piles up in a track nobody reads, and no thread per receiver stays.

Of aiortc's handler only what anything still reads runs (`count_only`): the receiver's
statistics (``StreamStatistics``, which the receiver reports to the speaker and
``getStats`` are built from) and its active sources. The rest — depayloading, the
jitter buffer, the decoder queue — fed a decoder that no longer runs; for video, RTX or
a bitrate estimator (none of which the relay negotiates) the original handler runs whole.

This is tied to aiortc 1.16 (pinned ``aiortc>=1.16,<1.17``);
``tests/media/test_tap.py`` fails loudly if an upgrade moves any of it.
"""

from __future__ import annotations

import asyncio
import inspect
import weakref
from collections.abc import Callable
from typing import Any

import pylibsrtp
from aiortc import RTCRtpReceiver, clock
from aiortc.codecs import is_rtx
from aiortc.rtcdtlstransport import RTCDtlsTransport, State
from aiortc.rtcrtpreceiver import StreamStatistics
from aiortc.rtp import RtpPacket

_CONNECTED = State.CONNECTED
PacketSink = Callable[[RtpPacket, int], None]
"""Called with (packet, arrival_time_ms) for every RTP packet the receiver gets."""

_STOP_DECODER = "_RTCRtpReceiver__stop_decoder"
_DECODER_THREAD = "_RTCRtpReceiver__decoder_thread"
_COUNTED = (
    "if not self._enabled:",
    "if self.__remote_bitrate_estimator is not None:",
    "self.__active_ssrc[packet.ssrc] = clock.current_datetime()",
    "codec = self.__codecs.get(packet.payload_type)",
    "self.__remote_streams[packet.ssrc] = StreamStatistics(codec.clockRate)",
    "self.__remote_streams[packet.ssrc].add(packet)",
    "if is_rtx(codec):",
    "if self.__nack_generator is not None and self.__nack_generator.add(packet):",
    "pli_flag, encoded_frame = self.__jitter_buffer.add(packet)",
    "if encoded_frame is not None and self.__decoder_thread:",
)


_AT_ONCE = (  # what `_receive_at_once` does in aiortc's stead, as aiortc does it
    "data = await self.transport._recv()",
    "self.__rx_bytes += len(data)",
    "self.__rx_packets += 1",
    "elif first_byte > 127 and first_byte < 192 and self._rx_srtp:",
    "if is_rtcp(data):",
    "data = self._rx_srtp.unprotect(data)",
    "packet = RtpPacket.parse(data, self._rtp_header_extensions_map)",
    "receiver = self._rtp_router.route_rtp(packet)",
    "await receiver._handle_rtp_packet(packet, arrival_time_ms=arrival_time_ms)",
)


class TapUnsupported(RuntimeError):
    """The installed aiortc no longer has the private receive path this module hooks."""


def check_supported() -> None:
    """Raise `TapUnsupported` unless aiortc's receiver looks the way the tap expects."""
    handler = getattr(RTCRtpReceiver, "_handle_rtp_packet", None)
    if handler is None or not inspect.iscoroutinefunction(handler):
        raise TapUnsupported("RTCRtpReceiver._handle_rtp_packet is gone or not async")
    params = list(inspect.signature(handler).parameters)
    if params != ["self", "packet", "arrival_time_ms"]:
        raise TapUnsupported(f"RTCRtpReceiver._handle_rtp_packet{params} changed signature")
    for name in (_STOP_DECODER, "receive"):
        if not callable(getattr(RTCRtpReceiver, name, None)):
            raise TapUnsupported(f"RTCRtpReceiver.{name} is gone")
    receive = inspect.getsource(RTCDtlsTransport._recv_next) + inspect.getsource(RTCDtlsTransport._handle_rtp_data)
    for needle in _AT_ONCE:
        if needle not in receive:
            raise TapUnsupported(f"RTCDtlsTransport's receive path: {needle!r} not found")
    source = inspect.getsource(handler)
    for needle in _COUNTED:
        if needle not in source:
            raise TapUnsupported(f"RTCRtpReceiver._handle_rtp_packet: {needle!r} not found")


def count_only(receiver: RTCRtpReceiver, packet: RtpPacket) -> bool:
    """Do for `packet` what aiortc's ``_handle_rtp_packet`` does that is still read once
    nothing decodes (statistics, active sources); False, doing nothing, where it would do
    more than that (video: NACK, bitrate estimation; RTX) and must run itself."""
    if (
        receiver._RTCRtpReceiver__nack_generator is not None  # type: ignore[attr-defined]
        or receiver._RTCRtpReceiver__remote_bitrate_estimator is not None  # type: ignore[attr-defined]
        or getattr(receiver, _DECODER_THREAD, None) is not None
    ):
        return False
    if not receiver._enabled:
        return True
    codec = receiver._RTCRtpReceiver__codecs.get(packet.payload_type)  # type: ignore[attr-defined]
    if codec is not None and is_rtx(codec):
        return False
    receiver._RTCRtpReceiver__active_ssrc[packet.ssrc] = clock.current_datetime()  # type: ignore[attr-defined]
    if codec is None:
        return True
    streams = receiver._RTCRtpReceiver__remote_streams  # type: ignore[attr-defined]
    stream = streams.get(packet.ssrc)
    if stream is None:
        stream = streams[packet.ssrc] = StreamStatistics(codec.clockRate)
    stream.add(packet)
    return True


def install_tap(receiver: RTCRtpReceiver, sink: PacketSink, *, at_once: bool = False) -> None:
    """Send every RTP packet reaching `receiver` to `sink` first, and never decode it.

    Install before the peer connects (right after ``setRemoteDescription``). `sink` runs
    synchronously on the event loop and must not raise. The receiver is held weakly (the
    replacements live on it); `remove_tap` takes them away again, and with them `sink`.
    ``at_once``: the relay's receivers take their RTP in the datagram's callback
    (`_receive_at_once`), not through aiortc's queue.
    """
    cls = type(receiver)
    original_handle = cls._handle_rtp_packet
    original_receive = cls.receive
    ref = weakref.ref(receiver)

    async def handle_rtp_packet(packet: RtpPacket, arrival_time_ms: int) -> None:
        sink(packet, arrival_time_ms)
        receiver = ref()
        if receiver is not None and not count_only(receiver, packet):
            await original_handle(receiver, packet, arrival_time_ms=arrival_time_ms)

    async def receive(parameters: Any) -> None:
        receiver = ref()
        if receiver is not None:
            await original_receive(receiver, parameters)
            stop_decoder(receiver)

    # Instance attributes shadow the class methods for this receiver only.
    receiver._handle_rtp_packet = handle_rtp_packet  # type: ignore[method-assign]
    receiver.receive = receive  # type: ignore[method-assign]
    if at_once:
        _receive_at_once(receiver.transport.transport._connection, receiver.transport, receiver, sink)


def _receive_at_once(connection: Any, dtls: RTCDtlsTransport, receiver: RTCRtpReceiver, sink: PacketSink) -> None:
    """Hand the RTP packets of `receiver` to `sink` as the datagram arrives.

    aiortc queues every datagram of a connection (``aioice.Connection.data_received``) for
    the DTLS transport's task, which takes it on a later turn of the event loop, unprotects
    and parses it, routes it and awaits the receiver's handler: a queue, a task wake-up and
    three awaits per packet. For RTP (not RTCP: RFC 5761 §4) once SRTP keys exist this does
    the same, synchronously, in the datagram's own callback: the transport's counters,
    ``unprotect``, ``RtpPacket.parse``, the router, then `sink` and `count_only` — what
    ``_handle_rtp_data`` and `install_tap`'s handler do, in that order. Anything else
    (DTLS, RTCP, packets before the handshake, a packet routed to another receiver or one
    `count_only` leaves to aiortc) goes through aiortc's queue as before. Everything is held
    weakly but `sink`, and `remove_tap` takes it away again."""
    queue = type(connection).data_received
    connection_ref = weakref.ref(connection)
    dtls_ref = weakref.ref(dtls)
    receiver_ref = weakref.ref(receiver)

    def at_once(data: bytes, component: int) -> None:
        if len(data) > 11 and 127 < data[0] < 192 and not 191 < data[1] < 224:
            dtls = dtls_ref()
            receiver = receiver_ref()
            if dtls is not None and receiver is not None and dtls._rx_srtp is not None and dtls._state is _CONNECTED:
                dtls._RTCDtlsTransport__rx_bytes += len(data)  # type: ignore[attr-defined]
                dtls._RTCDtlsTransport__rx_packets += 1  # type: ignore[attr-defined]
                try:
                    packet = RtpPacket.parse(dtls._rx_srtp.unprotect(data), dtls._rtp_header_extensions_map)
                except (pylibsrtp.Error, ValueError):
                    return  # as aiortc drops a packet that does not unprotect or parse
                routed = dtls._rtp_router.route_rtp(packet)
                if routed is receiver:
                    sink(packet, clock.current_ms())
                    if count_only(receiver, packet):
                        return
                if routed is not None:
                    asyncio.ensure_future(routed._handle_rtp_packet(packet, arrival_time_ms=clock.current_ms()))
                return
        connection = connection_ref()
        if connection is not None:
            queue(connection, data, component)

    connection.data_received = at_once


def remove_tap(receiver: RTCRtpReceiver) -> None:
    """Undo `install_tap` (call once the connection is closed): the sink, and whatever it
    holds, is no longer reachable from the receiver. Safe without a tap."""
    installed = vars(receiver)
    installed.pop("_handle_rtp_packet", None)
    installed.pop("receive", None)
    connection = getattr(getattr(getattr(receiver, "transport", None), "transport", None), "_connection", None)
    if connection is not None and getattr(vars(connection).get("data_received"), "__name__", "") == "at_once":
        del vars(connection)["data_received"]


def stop_decoder(receiver: RTCRtpReceiver) -> None:
    """Stop the receiver's decoder thread; later packets skip decoding entirely."""
    getattr(receiver, _STOP_DECODER)()


def decoder_running(receiver: RTCRtpReceiver) -> bool:
    """True while aiortc's decoder thread of `receiver` exists (for tests)."""
    return getattr(receiver, _DECODER_THREAD, None) is not None
