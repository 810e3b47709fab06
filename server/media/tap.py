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

import inspect
import weakref
from collections.abc import Callable
from typing import Any

from aiortc import RTCRtpReceiver, clock
from aiortc.codecs import is_rtx
from aiortc.rtcrtpreceiver import StreamStatistics
from aiortc.rtp import RtpPacket

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


def install_tap(receiver: RTCRtpReceiver, sink: PacketSink) -> None:
    """Send every RTP packet reaching `receiver` to `sink` first, and never decode it.

    Install before the peer connects (right after ``setRemoteDescription``). `sink` runs
    synchronously on the event loop and must not raise. The receiver is held weakly (the
    replacements live on it); `remove_tap` takes them away again, and with them `sink`.
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


def remove_tap(receiver: RTCRtpReceiver) -> None:
    """Undo `install_tap` (call once the connection is closed): the sink, and whatever it
    holds, is no longer reachable from the receiver. Safe without a tap."""
    installed = vars(receiver)
    installed.pop("_handle_rtp_packet", None)
    installed.pop("receive", None)


def stop_decoder(receiver: RTCRtpReceiver) -> None:
    """Stop the receiver's decoder thread; later packets skip decoding entirely."""
    getattr(receiver, _STOP_DECODER)()


def decoder_running(receiver: RTCRtpReceiver) -> bool:
    """True while aiortc's decoder thread of `receiver` exists (for tests)."""
    return getattr(receiver, _DECODER_THREAD, None) is not None
