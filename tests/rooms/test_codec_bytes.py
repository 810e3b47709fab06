"""The codec packs the `StrEnum` members as they are: the bytes must be those of `.value`."""

from __future__ import annotations

from typing import Any

import msgpack

from rooms import commands as c
from rooms.events import Event
from rooms.model import FloorMode, Member, Role, RoomState
from storage.codec import FORMAT, Packed, decode_event, decode_state, encode_event, encode_state
from tests.rules.room import Room


def _old_member(m: Member) -> list[Any]:
    return [m.id, m.name, m.role.value, m.invite_id, m.listen_only, m.seat, m.muted,
            m.connected, m.grace_deadline, m.session, m.resume_hash, m.knock_tag]


def _old_state(s: RoomState) -> bytes:
    """The encoding as it was, every enum written with `.value`."""
    c_, f = s.circle, s.floor
    blob: bytes = msgpack.packb([
        FORMAT, s.version,
        [c_.id, c_.title, c_.topic, c_.language.value, c_.capacity, c_.turn_seconds,
         c_.floor_mode.value, c_.lobby, c_.grace_seconds, c_.created_at],
        s.mode.value, s.locked,
        [_old_member(m) for m in s.members.values()],
        [_old_member(m) for m in s.lobby.values()],
        [f.holder, f.since, f.deadline, f.warned, f.over] if f else None,
        s.queue,
        [[i.id, i.role.value, i.personal, i.label] for i in s.invites.values()],
        sorted(s.revoked), s.invite_holders, s.screen_shared_links, s.airtime, s.next_seat,
        s.ended, s.knocks, s.declined,
    ], use_bin_type=True)
    return blob


def _old_event(e: Event) -> bytes:
    blob: bytes = msgpack.packb([e.version, e.name.value, e.data, e.audience.kind.value,
                                 e.audience.member_id], use_bin_type=True)
    return blob


def _rooms() -> list[tuple[RoomState, list[Event]]]:
    out = []
    room = Room.new()
    states = [room.state]
    mod = room.join("Ibu Sari", Role.MODERATOR)
    a, b = room.join("Ani"), room.join("Budi")
    room.join("Tamu", Role.GUEST, listen_only=True)
    room.do(c.RaiseHand(a))
    room.do(c.RaiseHand(b))
    states.append(room.state)
    room.do(c.GiveFloor(mod, a))
    room.do(c.Mute(mod, b))
    states.append(room.state)
    room.do(c.SetMode(mod, FloorMode.OPEN))
    room.do(c.Disconnect(b, room.state.members[b].session))
    room.advance(10)
    states.append(room.state)
    out.append((room.state, list(room.log)))
    out += [(s, []) for s in states]

    lobby = Room.new(lobby=True, mode=FloorMode.OPEN)
    host = lobby.join("Host", Role.MODERATOR)
    lobby.join("Menunggu")
    lobby.admit(host, "Masuk")
    lobby.advance(200)
    out.append((lobby.state, list(lobby.log)))
    return out


def test_states_and_events_encode_to_the_same_bytes_as_with_value() -> None:
    cases = _rooms()
    assert sum(len(events) for _, events in cases) > 10
    for state, events in cases:
        assert encode_state(state) == _old_state(state)
        back = decode_state(encode_state(state))
        assert encode_state(back) == encode_state(state)
        assert type(back.mode) is FloorMode and type(back.circle.language) is type(state.circle.language)
        for m in back.members.values():
            assert type(m.role) is Role
        for i in back.invites.values():
            assert type(i.role) is Role
        for e in events:
            assert encode_event(e) == _old_event(e)
            d = decode_event(encode_event(e))
            assert d == e
            assert type(d.name) is type(e.name) and type(d.audience.kind) is type(e.audience.kind)


def test_a_circles_packed_parts_give_the_same_bytes_as_packing_anew() -> None:
    packed = Packed()
    room = Room.new(lobby=True)
    host = room.join("Host", Role.MODERATOR)
    states = [room.state]
    a = room.join("Ani")  # in the lobby
    states.append(room.state)
    room.do(c.Admit(host, a))
    states.append(room.state)
    b = room.admit(host, "Budi")
    room.do(c.RaiseHand(a))  # the members unchanged: their packed list is written again
    states.append(room.state)
    room.do(c.RaiseHand(b))
    room.do(c.GiveFloor(host, a))
    room.do(c.Mute(host, b))  # one member replaced
    states.append(room.state)
    room.do(c.Disconnect(b, room.state.members[b].session))
    room.advance(60)  # gone after the grace period
    states.append(room.state)
    states.append(decode_state(encode_state(room.state)))  # equal members, other objects
    for state in states + states[::-1]:
        assert encode_state(state, packed) == encode_state(state) == _old_state(state)
