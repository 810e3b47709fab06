"""The `/ws` write path: frames go straight to uvicorn's protocol when nothing is queued."""

from __future__ import annotations

import os

import pytest
from websockets.frames import Frame, Opcode

from server import ws
from tests.live import Live, join
from tests.server.conftest import ack_of, circle_of


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_a_frame_is_framed_as_websockets_would(size: int) -> None:
    data = os.urandom(size)
    assert ws._framed(data) == Frame(Opcode.BINARY, data).serialize(mask=False, extensions=[])
    assert ws._framed(data) is ws._framed(data)  # built once for every member it goes to


async def test_events_reach_members_through_the_direct_write(live: Live,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Against a real uvicorn: the direct path is found and used (an upgrade of uvicorn or
    websockets that moves what it reads makes this fail, not the circle go silent)."""
    written: list[tuple[bool, int]] = []
    original = ws._StarletteTransport.write_now

    def counting(self: ws._StarletteTransport, *frames: bytes) -> bool:
        done = original(self, *frames)
        written.append((done, len(frames)))
        return done

    monkeypatch.setattr(ws._StarletteTransport, "write_now", counting)
    circle = await live.create_circle(title="t")
    mod = await join(live, circle["links"]["moderator"], "Pendamping")
    a = await join(live, circle["links"]["member"], "Melati")
    await ack_of(a, "raise_hand")
    await mod.event("hand_raised", member_id=a.member_id)
    assert written and all(done for done, _ in written)
    # Once the circle's delivery has settled (a new subscriber, or Redis confirming the
    # subscription, hands the next delivery to the hub's pump), a member's own event and
    # the ack of its command leave in one write.
    for _ in range(15):  # within the rate limit's burst
        if (True, 2) in written:
            break
        await ack_of(a, "lower_hand")
        await ack_of(a, "raise_hand")
    assert (True, 2) in written


async def test_a_broken_direct_write_falls_back_loudly_and_loses_no_event(
        live: Live, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Should uvicorn's private attributes change under us, the direct path raises: the
    frame then goes through ASGI, once with an error in the log, and nothing is lost."""
    class Renamed:  # uvicorn's protocol, had its attributes been renamed
        pass

    monkeypatch.setattr(ws, "_uvicorn_protocol", lambda socket: Renamed())
    monkeypatch.setattr(ws.WritePath, "direct", True)
    circle, mod, a, b = await circle_of(live)
    await ack_of(a, "raise_hand")
    await b.event("hand_raised", member_id=a.member_id)
    await mod.event("hand_raised", member_id=a.member_id)
    assert ws.WritePath.name() == "asgi"
    errors = [r for r in caplog.records if r.name == "lingkar.ws" and r.levelname == "ERROR"]
    assert len(errors) == 1 and "through ASGI" in errors[0].getMessage()
