"""The one place that touches aiortc's private receive path.

aiortc has no public hook for encoded packets: every RTP packet reaches
``RTCRtpReceiver._handle_rtp_packet(packet, arrival_time_ms)`` (called by the DTLS
transport with ``arrival_time_ms`` as a keyword), then a jitter buffer (~80 ms for audio)
and a decoder thread. The relay forwards encoded Opus, so it taps each receiver at that
method, *before* the jitter buffer, and lets the original still run for RTCP receiver
statistics. The decoder thread is stopped as soon as ``receive()`` started it: nothing
decodes, no frame piles up in a track nobody reads, and no thread per receiver stays.

This is tied to aiortc 1.16 (pinned ``aiortc>=1.16,<1.17``);
``tests/media/test_tap.py`` fails loudly if an upgrade moves any of it.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable
from typing import Any

from aiortc import RTCRtpReceiver
from aiortc.rtp import RtpPacket

PacketSink = Callable[[RtpPacket, int], None]
"""Called with (packet, arrival_time_ms) for every RTP packet the receiver gets."""

_STOP_DECODER = "_RTCRtpReceiver__stop_decoder"
_DECODER_THREAD = "_RTCRtpReceiver__decoder_thread"


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
        if receiver is not None:
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
