"""Regression tests for the one private aiortc hook (server/media/tap.py).

If any of these fails after an aiortc upgrade, the relay's receive path is broken: read
aiortc's rtcrtpreceiver.py and fix tap.py before anything else.
"""

from __future__ import annotations

import inspect
import threading

import aiortc
from aiortc import RTCRtpReceiver
from aiortc.rtcdtlstransport import RTCDtlsTransport

from server.media import tap

from .peers import ClientPeer, unmark, wait_until


def test_aiortc_minor_version_is_the_one_the_tap_was_written_for() -> None:
    assert aiortc.__version__.startswith("1.16."), aiortc.__version__


def test_private_receive_path_has_the_expected_shape() -> None:
    tap.check_supported()
    handler = RTCRtpReceiver._handle_rtp_packet
    assert inspect.iscoroutinefunction(handler)
    assert list(inspect.signature(handler).parameters) == ["self", "packet", "arrival_time_ms"]
    # the DTLS transport calls it with arrival_time_ms as a keyword
    source = inspect.getsource(RTCDtlsTransport._handle_rtp_data)
    assert "receiver._handle_rtp_packet(packet, arrival_time_ms=arrival_time_ms)" in source
    # the decoder thread we stop, and the attribute that tells whether it runs
    receiver_source = inspect.getsource(RTCRtpReceiver)
    assert "self.__decoder_thread = threading.Thread(" in receiver_source
    assert "if encoded_frame is not None and self.__decoder_thread:" in receiver_source


async def test_packet_through_a_real_peer_hits_the_tap_and_is_never_decoded() -> None:
    """Two real peers on loopback: the receiving side taps its receiver."""
    sender = ClientPeer("speaker", slots=0)
    receiver_pc = aiortc.RTCPeerConnection(aiortc.RTCConfiguration(iceServers=[]))
    seen: list[tuple[str, int]] = []
    arrival_times: list[int] = []
    threads_before = threading.active_count()
    try:
        await receiver_pc.setRemoteDescription(
            aiortc.RTCSessionDescription(sdp=await sender.offer(), type="offer")
        )
        (transceiver,) = receiver_pc.getTransceivers()

        def sink(packet: aiortc.rtp.RtpPacket, arrival_time_ms: int) -> None:
            marked = unmark(packet.payload)
            assert marked is not None
            seen.append(marked)
            arrival_times.append(arrival_time_ms)

        tap.install_tap(transceiver.receiver, sink)
        await receiver_pc.setLocalDescription(await receiver_pc.createAnswer())
        await sender.accept(receiver_pc.localDescription.sdp)

        await wait_until(lambda: len(seen) >= 10)
        assert [source for source, _ in seen] == ["speaker"] * len(seen)
        assert all(isinstance(t, int) and t > 0 for t in arrival_times)
        assert not tap.decoder_running(transceiver.receiver)
        assert threading.active_count() <= threads_before
        # aiortc's own statistics counted the packets (tap.count_only) ...
        await wait_until(lambda: len(seen) >= 20)
        report = await transceiver.receiver.getStats()
        inbound = [s for s in report.values() if s.type == "inbound-rtp"]
        assert inbound and inbound[0].packetsReceived >= 10
        # ... exactly as many as it received, and nothing reached the jitter buffer
        streams = transceiver.receiver._RTCRtpReceiver__remote_streams  # type: ignore[attr-defined]
        (stream,) = streams.values()
        assert stream.packets_received >= len(seen) - 2
        jitter_buffer = transceiver.receiver._RTCRtpReceiver__jitter_buffer  # type: ignore[attr-defined]
        assert all(packet is None for packet in jitter_buffer._packets)
    finally:
        await sender.close()
        await receiver_pc.close()


async def test_the_relay_takes_a_speakers_rtp_in_the_datagrams_callback_not_through_aiortcs_queue() -> None:
    """`install_tap(..., at_once=True)`: the speaker's RTP reaches the relay's sink without
    aiortc's queue and task; DTLS and RTCP still take aiortc's path; closing takes it away."""
    from .conftest import CIRCLE, Room

    room = Room()
    try:
        speaker = await room.join("m1")
        ear = await room.join("ear", listen_only=True)
        relay_peer = room.relay._peers[(CIRCLE, "m1")]
        connection = relay_peer.tapped.transport.transport._connection  # type: ignore[union-attr]
        assert vars(connection)["data_received"].__name__ == "at_once"
        queued: list[bytes] = []
        put = connection._queue.put_nowait

        def keep(item: object) -> None:
            if isinstance(item, tuple):
                queued.append(item[0])
            put(item)

        connection._queue.put_nowait = keep
        room.relay.set_audible(CIRCLE, ["m1"])
        await wait_until(lambda: ear.received_from("m1") >= 5)
        queued.clear()  # what arrived before the relay's DTLS was up waited in the queue, rightly
        await wait_until(lambda: ear.received_from("m1") >= 55 and any(191 < d[1] < 224 for d in queued))
        # RTCP (the speaker's sender reports) and DTLS went through the queue, never RTP
        assert not [d for d in queued if 127 < d[0] < 192 and not 191 < d[1] < 224]
        # the receiver's statistics still count every packet (what its reports to the speaker say)
        stats = await relay_peer.tapped.getStats()  # type: ignore[union-attr]
        (inbound,) = [s for s in stats.values() if s.type == "inbound-rtp"]
        assert inbound.packetsReceived >= 50
        assert speaker.pc.connectionState == "connected"
        await room.relay.close_member(CIRCLE, "m1")
        assert "data_received" not in vars(connection)
    finally:
        await room.aclose()
