"""Opus in-band FEC and DTX are kept in the relay's answer as the browser offers them (DESIGN §7).

In an answer, Opus's ``useinbandfec`` and ``usedtx`` tell the *offerer* how to encode what it
sends (RFC 7587 §6.1): without them in the relay's answer a browser sends neither FEC (a
listener conceals loss with it, without retransmission) nor DTX.
"""

from __future__ import annotations

import re

import pytest
from aiortc import sdp

from server.media.relay import keep_opus_fec_dtx

from .conftest import CIRCLE, Room
from .peers import ClientPeer, wait_until


def browser_like(offer_sdp: str, fmtp: str) -> str:
    """The offer as Chrome writes Opus: a=fmtp right after a=rtpmap."""
    return re.sub(r"(a=rtpmap:(\d+) opus/48000/2\r\n)", lambda m: f"{m.group(1)}a=fmtp:{m.group(2)} {fmtp}\r\n",
                  offer_sdp)


def opus_fmtp(answer_sdp: str) -> list[dict[str, str]]:
    """The Opus fmtp parameters of each m-line, as text."""
    return [
        {k: str(v) for c in m.rtp.codecs if c.mimeType.lower() == "audio/opus" for k, v in c.parameters.items()}
        for m in sdp.SessionDescription.parse(answer_sdp).media
    ]


@pytest.mark.parametrize(
    ("offered", "answered"),
    [
        ("minptime=10;useinbandfec=1", {"useinbandfec": "1"}),
        ("minptime=10;useinbandfec=1;usedtx=1", {"useinbandfec": "1", "usedtx": "1"}),
        (None, {}),
    ],
)
async def test_the_answer_keeps_opus_fec_and_dtx_as_offered(
    room: Room, offered: str | None, answered: dict[str, str]
) -> None:
    peer = ClientPeer("m1")
    room.peers["m1"] = peer
    offer = await peer.offer()
    if offered is not None:
        offer = browser_like(offer, offered)
    answer = await room.relay.answer(CIRCLE, "m1", offer, listen_only=False)
    assert opus_fmtp(answer) == [answered] * 4  # the microphone and the three slots
    await peer.accept(answer)
    await wait_until(lambda: peer.pc.connectionState == "connected")


def test_keep_opus_fec_dtx_touches_nothing_else() -> None:
    offer = (
        "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n"
        "m=audio 9 UDP/TLS/RTP/SAVPF 111 0\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\na=sendrecv\r\n"
        "a=rtpmap:111 opus/48000/2\r\na=fmtp:111 minptime=10;useinbandfec=1;usedtx=1;stereo=1\r\n"
        "a=rtpmap:0 PCMU/8000\r\n"
    )
    answer = (
        "v=0\r\no=- 2 2 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n"
        "m=audio 9 UDP/TLS/RTP/SAVPF 111 0\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\na=recvonly\r\n"
        "a=rtpmap:111 opus/48000/2\r\na=rtpmap:0 PCMU/8000\r\n"
    )
    kept = keep_opus_fec_dtx(offer, answer)
    assert opus_fmtp(kept) == [{"useinbandfec": "1", "usedtx": "1"}]
    assert "minptime" not in kept and "stereo" not in kept
    assert keep_opus_fec_dtx(answer, answer) == answer  # nothing offered: the answer as it was
