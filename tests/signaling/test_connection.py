"""The session's protocol machine, driven frame by frame with no socket, no event loop and no
store: the pure rules make the states and events it is fed."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from rooms import commands as c
from rooms.model import Role
from signaling import tokens
from signaling.close import CloseCode
from signaling.connection import (
    Admit,
    AnswerOffer,
    CloseMedia,
    Connection,
    Execute,
    JoinRequest,
    Limits,
    Load,
    Phase,
    resume_hash,
)
from storage.store import NoSuchCircle, StaleOwner
from storage.subscription import Closed, Resync
from tests.rules.room import SHARED, T0, Room

SECRET = "machine-secret-0123456789abcdef0123456789"


def frame(**fields: Any) -> bytes:
    return msgpack.packb(fields)  # type: ignore[no-any-return]


def sent(conn: Connection) -> list[dict[str, Any]]:
    return [msgpack.unpackb(data) for data in conn.data_to_send()]


def hello(role: Role = Role.MEMBER, **extra: Any) -> bytes:
    token = tokens.issue(SECRET, "c1", role, SHARED[role], 60)
    return frame(type="hello", token=token, name="Melati", **extra)


def joined(room: Room, role: Role = Role.MEMBER, *, limits: Limits | None = None) -> Connection:
    """A connection whose hello was executed by the rules on `room`."""
    conn = Connection(secret=SECRET, limits=limits or Limits(), token=lambda: "new-secret",
                      member_token=lambda: f"m{room.counter + 100}")
    request = conn.hello(hello(role))
    assert isinstance(request, JoinRequest)
    room.do(request.command)
    conn.joined(request, room.state, room.now, 0.0)
    return conn


def with_moderator(*, lobby: bool = False) -> tuple[Room, str]:
    room = Room.new(lobby=lobby)
    return room, room.join("Pendamping", Role.MODERATOR)


def test_a_first_frame_that_is_not_a_hello_closes_with_4400() -> None:
    for data in ("hello", b"\x93\x01\x02", frame(type="raise_hand")):
        conn = Connection(secret=SECRET)
        assert conn.hello(data) is None
        assert conn.close_to_send() == (CloseCode.BAD_FIRST_FRAME, conn._close[1])  # type: ignore[index]
        assert conn.phase is Phase.CLOSED and sent(conn) == []


def test_a_forged_token_closes_with_4401_and_asks_for_nothing() -> None:
    forged = tokens.issue("another-secret-0123456789abcdef01234", "c1", Role.MODERATOR, "inv-mod", 60)
    conn = Connection(secret=SECRET)
    assert conn.hello(frame(type="hello", token=forged, name="X")) is None
    assert conn.close_to_send() == (CloseCode.BAD_TOKEN, "bad token")


def test_a_hello_asks_to_join_and_the_answer_is_a_welcome_with_a_fresh_secret() -> None:
    room, _ = with_moderator()
    conn = Connection(secret=SECRET, token=lambda: "fresh", member_token=lambda: "m42")
    request = conn.hello(hello(Role.MEMBER, listen_only=True))
    assert isinstance(request, JoinRequest) and isinstance(request.command, c.Join)
    assert request.circle_id == "c1" and request.command.listen_only
    assert request.command.resume_hash == resume_hash("fresh")
    room.do(request.command)
    conn.joined(request, room.state, T0, 0.0)
    (welcome,) = sent(conn)
    assert welcome["type"] == "welcome" and welcome["member_id"] == "m42" and welcome["resume"] == "fresh"
    assert welcome["state"]["version"] == room.state.version


def test_a_resume_is_a_command_that_finds_the_seat_by_its_secret() -> None:
    room, _ = with_moderator()
    first = joined(room)
    me = first.member_id
    room.do(c.RaiseHand(me))
    assert first.lost() == c.Disconnect(me, 1)
    room.do(c.Disconnect(me, 1))
    again = Connection(secret=SECRET, token=lambda: "rotated")
    request = again.hello(hello(Role.MEMBER, resume="new-secret"))
    assert request is not None and request.command == c.Resume(SHARED[Role.MEMBER], resume_hash("new-secret"),
                                                               resume_hash("rotated"))
    room.do(request.command)
    again.joined(request, room.state, room.now, 0.0)
    assert again.member_id == me and again.seat_session == 2
    (welcome,) = sent(again)
    assert welcome["state"]["queue"] == [me]


def test_a_refused_join_closes_with_the_code_of_its_refusal() -> None:
    conn = Connection(secret=SECRET)
    assert conn.hello(hello()) is not None
    conn.join_failed(NoSuchCircle("c1"))
    assert conn.close_to_send() == (CloseCode.NO_SUCH_CIRCLE, "no such circle")
    conn = Connection(secret=SECRET)
    assert conn.hello(hello()) is not None
    conn.join_failed(StaleOwner("not here"))
    assert conn.close_to_send() == (CloseCode.TRY_AGAIN_LATER, "try again later")


def test_a_redirect_is_a_frame_then_4300() -> None:
    conn = Connection(secret=SECRET)
    assert conn.hello(hello()) is not None
    conn.redirect("http://b.example/ws")
    assert sent(conn) == [{"type": "redirect", "url": "http://b.example/ws"}]
    assert conn.close_to_send() == (CloseCode.REDIRECT, "the circle lives on another process")


def test_a_command_s_own_event_and_its_ack_leave_together() -> None:
    room, _ = with_moderator()
    conn = joined(room)
    sent(conn)
    (request,) = conn.receive(frame(type="raise_hand", ref=7), 1.0)
    assert isinstance(request, Execute) and request.command == c.RaiseHand(conn.member_id)
    for event in room.do(request.command):
        assert conn.item(event, room.now) == []
    assert conn.data_to_send() == []  # held while the command is in flight
    conn.executed(room.state.version)
    out = sent(conn)
    assert [f["type"] for f in out] == ["event", "ack"] and out[1]["ref"] == 7


def test_a_close_that_lands_during_the_command_waits_for_its_ack() -> None:
    room, mod = with_moderator()
    conn = joined(room, Role.MODERATOR)
    sent(conn)
    (request,) = conn.receive(frame(type="end", ref=3), 1.0)
    assert isinstance(request, Execute)
    for event in room.do(request.command):
        conn.item(event, room.now)
    assert conn.close_to_send() is None
    conn.executed(room.state.version)
    assert sent(conn)[-1] == {"type": "ack", "ref": 3, "version": room.state.version}
    assert conn.close_to_send() == (CloseCode.ENDED, "ended")
    assert conn.lost() is None  # the circle is over: no grace period to start


def test_leaving_quietly_closes_the_media_before_the_leave_and_ends_with_4001() -> None:
    room, _ = with_moderator()
    conn = joined(room)
    requests = conn.receive(frame(type="leave_quietly", ref=1, need_support=True), 1.0)
    assert [type(r) for r in requests] == [CloseMedia, Execute]
    for event in room.do(requests[1].command):  # type: ignore[union-attr]
        conn.item(event, room.now)
    conn.executed(room.state.version)
    assert sent(conn)[-1]["type"] == "ack"
    assert conn.close_to_send() == (CloseCode.LEFT, "left")
    assert conn.lost() is None


def test_a_dropped_connection_starts_the_grace_period_of_its_own_seat_session() -> None:
    room, _ = with_moderator()
    conn = joined(room)
    assert conn.lost() == c.Disconnect(conn.member_id, conn.seat_session)


def test_refusals_are_typed_errors_and_the_connection_carries_on() -> None:
    room, mod = with_moderator()
    conn = joined(room)
    sent(conn)
    (request,) = conn.receive(frame(type="give_floor", member_id=mod, ref=2), 1.0)
    assert isinstance(request, Execute)
    err = room.refused(request.command)
    conn.failed(request.ref, err)
    assert sent(conn) == [{"type": "error", "ref": 2, "code": "forbidden", "message": err.message}]
    assert conn.errors == ["forbidden"]
    assert conn.receive(b"\xc1", 1.0) == []  # not msgpack
    assert sent(conn)[0]["code"] == "bad_frame"
    assert conn.receive(hello(), 1.0) == []
    assert sent(conn)[0]["message"] == "already joined"
    assert conn.phase is Phase.OPEN and conn.close_to_send() is None


def test_a_circle_that_is_gone_ends_the_connection() -> None:
    room, _ = with_moderator()
    conn = joined(room)
    (request,) = conn.receive(frame(type="lower_hand", ref=1), 1.0)
    conn.failed(1, NoSuchCircle("c1"))
    assert conn.close_to_send() == (CloseCode.ENDED, "ended") and conn.lost() is None


def test_a_flood_is_refused_then_closed_with_4429() -> None:
    room, _ = with_moderator()
    conn = joined(room, limits=Limits(rate=1.0, burst=2))
    sent(conn)
    answers = [conn.receive(frame(type="sync", ref=i), 0.0) for i in range(12)]
    assert answers[0] == [Load(0)] and answers[1] == [Load(1)]
    assert any(err["code"] == "rate_limited" for err in sent(conn))
    assert conn.close_to_send() == (CloseCode.FLOOD, "too many frames")
    assert conn.receive(frame(type="sync", ref=99), 0.0) == []  # nothing more is read


def test_the_lobby_sees_no_events_no_media_and_no_sync() -> None:
    room, mod = with_moderator(lobby=True)
    conn = joined(room)
    (lobby,) = sent(conn)
    assert lobby["type"] == "lobby" and not conn.admitted
    for event in room.do(c.MuteAll(mod)):
        conn.item(event, room.now)
    assert sent(conn) == []
    assert conn.receive(frame(type="sync", ref=1), 1.0) == []
    assert conn.receive(frame(type="offer", sdp="v=0", ref=2), 1.0) == []
    assert [e["code"] for e in sent(conn)] == ["forbidden", "forbidden"]


def test_an_admission_loads_the_state_and_then_what_arrived_meanwhile() -> None:
    room, mod = with_moderator(lobby=True)
    conn = joined(room)
    sent(conn)
    requests: list[Any] = []
    for event in room.do(c.Admit(mod, conn.member_id)):
        requests += conn.item(event, room.now)
    assert requests == [Admit()]
    loaded = room.state
    later = room.do(c.GiveFloor(mod, conn.member_id))  # saved while the admission loaded
    for event in later:
        assert conn.item(event, room.now) == []
    assert sent(conn) == []
    conn.admission_loaded(loaded, room.now)
    out = sent(conn)
    assert out[0]["type"] == "admitted" and conn.admitted
    assert "floor_given" in [f.get("name") for f in out[1:]]
    (offer,) = conn.receive(frame(type="offer", sdp="v=0", ref=5), 1.0)
    assert offer == AnswerOffer(5, "v=0", False)


def test_removed_while_the_admission_loaded_is_put_out() -> None:
    room, mod = with_moderator(lobby=True)
    conn = joined(room)
    for event in room.do(c.Admit(mod, conn.member_id)):
        conn.item(event, room.now)
    room.do(c.Remove(mod, conn.member_id))
    conn.admission_loaded(room.state, room.now)
    assert not conn.admitted
    assert conn.close_to_send() == (CloseCode.REFUSED, "no longer in the circle")


@pytest.mark.parametrize("gone", ["removed", "replaced", "ended", "closed"])
def test_the_server_events_that_end_this_connection(gone: str) -> None:
    room, mod = with_moderator()
    conn = joined(room)
    sent(conn)
    if gone == "removed":
        for event in room.do(c.Remove(mod, conn.member_id)):
            conn.item(event, room.now)
        expected = (CloseCode.REFUSED, "removed")
    elif gone == "replaced":
        state = room.state
        me = state.members[conn.member_id]
        state.members[conn.member_id] = me.with_(session=me.session + 1)
        conn.item(Resync(state), room.now)
        expected = (CloseCode.LEFT, "replaced by a newer connection")
    elif gone == "ended":
        for event in room.do(c.End(mod)):
            conn.item(event, room.now)
        expected = (CloseCode.ENDED, "ended")
    else:
        conn.item(Closed(), room.now)
        expected = (CloseCode.ENDED, "ended")
    assert conn.close_to_send() == expected and conn.lost() is None
    assert sent(conn) == [] or all(f["type"] == "event" for f in sent(conn))
