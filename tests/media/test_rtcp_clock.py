"""Sender reports of a peer's slots come from one timer (fastpath.RtcpClock), only for
slots that carry something, and count what the fast path sent."""

from __future__ import annotations

import pytest
from aiortc.rtp import RtcpSrPacket

from server.media import fastpath

from .conftest import CIRCLE, Room
from .peers import wait_until


async def test_one_clock_per_peer_reports_only_the_slots_that_carry_something(
    room: Room, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fastpath, "RTCP_INTERVAL", 0.1)
    await room.join("mod")
    listener = await room.join("l1", listen_only=True)
    room.relay.set_audible(CIRCLE, ["mod"])
    await wait_until(lambda: listener.received_from("mod") > 5)

    peer = room.relay._peers[(CIRCLE, "l1")]
    assert len(peer.outs) == 3
    (clock,) = {id(out._clock) for out in peer.outs}
    assert peer.outs[0]._clock.scheduled  # one report job for the three slots

    reports: dict[int, list[RtcpSrPacket]] = {out.ssrc: [] for out in peer.outs}
    for transceiver in listener.pc.getTransceivers():
        receiver = transceiver.receiver
        original = receiver._handle_rtcp_packet

        async def keep(packet: object, original: object = original) -> None:
            if isinstance(packet, RtcpSrPacket) and packet.ssrc in reports:
                reports[packet.ssrc].append(packet)
            await original(packet)  # type: ignore[operator]

        receiver._handle_rtcp_packet = keep  # type: ignore[method-assign]

    carrying = next(out for out in peer.outs if out.sent)
    await wait_until(lambda: len(reports[carrying.ssrc]) >= 3)
    quiet = [out for out in peer.outs if not out.sent]
    assert quiet and all(not reports[out.ssrc] for out in quiet)
    last = reports[carrying.ssrc][-1]
    assert 0 < last.sender_info.packet_count <= carrying.sent
    # aiortc's statistics of the DTLS transport count the reports too
    stats = await carrying._sender.getStats()
    (transport,) = [s for s in stats.values() if s.type == "transport"]
    assert transport.packetsSent > carrying.sent

    # closing the peer takes the outs off the clock: nothing holds them
    await room.relay.close_member(CIRCLE, "l1")
    assert all(out._clock is None for out in peer.outs)


async def test_a_slot_closed_before_its_rtcp_task_ran_still_lets_the_sender_stop(room: Room) -> None:
    """``RTCRtpSender.send`` makes the RTCP coroutine; if the relay closes the slot before
    the task's first step, the task must still say it started and exited, or the sender's
    ``stop()`` (and the peer connection's close) waits forever."""
    import asyncio

    await room.join("mod")
    await room.join("l1", listen_only=True)
    out = room.relay._peers[(CIRCLE, "l1")].outs[0]
    sender = out._sender
    started, exited = asyncio.Event(), asyncio.Event()
    sender._RTCRtpSender__rtcp_started = started
    sender._RTCRtpSender__rtcp_exited = exited
    coroutine = sender._run_rtcp()  # what send() does ...
    out.close()  # ... and the member goes before the task runs
    task = asyncio.ensure_future(coroutine)
    async with asyncio.timeout(5):
        await started.wait()
    task.cancel()
    async with asyncio.timeout(5):
        await exited.wait()
