"""msgpack encoding of the room state and of events, for the stores and the wire.

Decoding checks the shape and raises `CorruptState` rather than guessing: a store must never
silently reset a circle because its blob could not be read.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import Any

import msgpack
import msgspec

from rooms.events import Audience, AudienceKind, Event, Name
from rooms.model import CircleSettings, Floor, FloorMode, Invite, Language, Member, Role, RoomState

FORMAT = 1  # bump when the layout below changes (fields added at the end keep it: see decode)


class CorruptState(Exception):
    """A stored blob that is not a room state (or an event) of this format."""


# Packed by msgspec (about three times faster than msgpack's packb on a state): for what is
# packed here (lists, str-keyed maps, str, int, float, bool, None, bytes) it writes the very
# bytes msgpack's `packb(..., use_bin_type=True)` does, smallest forms alike
# (tests/rooms/test_codec_bytes.py); read back with msgpack.
_pack = msgspec.msgpack.Encoder().encode

# The enums are `StrEnum`s: msgpack packs a `str` subclass as the plain string it is, so they go
# in without `.value` (the same bytes; tests/rooms/test_codec_bytes.py), and come back as members.
def _circle(c: CircleSettings) -> list[Any]:
    return [c.id, c.title, c.topic, c.language, c.capacity, c.turn_seconds,
            c.floor_mode, c.lobby, c.grace_seconds, c.created_at]


def _member(m: Member) -> list[Any]:
    return [m.id, m.name, m.role, m.invite_id, m.listen_only, m.seat, m.muted,
            m.connected, m.grace_deadline, m.session, m.resume_hash, m.knock_tag]


def _unmember(v: list[Any]) -> Member:
    return Member(id=v[0], name=v[1], role=Role(v[2]), invite_id=v[3], listen_only=v[4],
                  seat=v[5], muted=v[6], connected=v[7], grace_deadline=v[8], session=v[9],
                  resume_hash=v[10], knock_tag=v[11] if len(v) > 11 else "")


def _same(a: tuple[Member, ...], b: tuple[Member, ...]) -> bool:
    """The very same members, in the same order."""
    return len(a) == len(b) and all(map(operator.is_, a, b))


class Packed:
    """What `encode_state` packed of one circle's states, written again as it is while it
    stays the same: the circle's settings (the very object) and the lists of members and of
    the lobby (the same members in the same order: a state's copies share the frozen members,
    and a change replaces one). Holds the latest lists only. One per circle, kept by whoever
    saves its states (`storage.manager`) for as long as it keeps the circle."""

    __slots__ = ("circle", "members", "lobby")

    def __init__(self) -> None:
        self.circle: tuple[CircleSettings, msgspec.Raw] | None = None
        self.members: tuple[tuple[Member, ...], msgspec.Raw] | None = None
        self.lobby: tuple[tuple[Member, ...], msgspec.Raw] | None = None

    def pack(self, s: RoomState) -> tuple[msgspec.Raw, msgspec.Raw, msgspec.Raw]:
        """The circle, the members and the lobby, packed (anew where they changed)."""
        hit = self.circle
        if hit is None or hit[0] is not s.circle:
            hit = self.circle = (s.circle, msgspec.Raw(_pack(_circle(s.circle))))
        members = self.members = _group(self.members, s.members.values())
        lobby = self.lobby = _group(self.lobby, s.lobby.values())
        return hit[1], members[1], lobby[1]


def _group(
    packed: tuple[tuple[Member, ...], msgspec.Raw] | None, members: Iterable[Member]
) -> tuple[tuple[Member, ...], msgspec.Raw]:
    """`packed` if it holds these very members in this order, else them packed anew."""
    key = tuple(members)
    if packed is None or not _same(packed[0], key):
        packed = (key, msgspec.Raw(_pack(list(map(_member, key)))))
    return packed


def encode_state(s: RoomState, packed: Packed | None = None) -> bytes:
    """The state's bytes; with `packed` (the circle's), its unchanged parts are not packed
    again (the same bytes either way: a packed part is written as it is)."""
    f = s.floor
    if packed is None:
        circle: Any = _circle(s.circle)
        members: Any = list(map(_member, s.members.values()))
        lobby: Any = list(map(_member, s.lobby.values()))
    else:
        circle, members, lobby = packed.pack(s)
    return _pack([
        FORMAT, s.version, circle, s.mode, s.locked,
        members,
        lobby,
        [f.holder, f.since, f.deadline, f.warned, f.over] if f else None,
        s.queue,
        [[i.id, i.role, i.personal, i.label] for i in s.invites.values()],
        sorted(s.revoked),
        s.invite_holders,
        s.screen_shared_links,
        s.airtime,
        s.next_seat,
        s.ended,
        s.knocks,
        s.declined,
    ])


def decode_state(blob: bytes) -> RoomState:
    try:
        v = msgpack.unpackb(blob, raw=False, strict_map_key=True)
        # 16 fields: states saved before the lobby's knocks and declines were kept (read on)
        if not isinstance(v, list) or len(v) not in (16, 18) or v[0] != FORMAT:
            raise CorruptState(f"not a room state of format {FORMAT}")
        c = v[2]
        circle = CircleSettings(id=c[0], title=c[1], topic=c[2], language=Language(c[3]),
                                capacity=c[4], turn_seconds=c[5], floor_mode=FloorMode(c[6]),
                                lobby=c[7], grace_seconds=c[8], created_at=c[9])
        members = [_unmember(m) for m in v[5]]
        lobby = [_unmember(m) for m in v[6]]
        f = v[7]
        return RoomState(
            circle=circle,
            version=int(v[1]),
            mode=FloorMode(v[3]),
            locked=bool(v[4]),
            members={m.id: m for m in members},
            lobby={m.id: m for m in lobby},
            floor=Floor(f[0], f[1], f[2], f[3], f[4]) if f else None,
            queue=list(v[8]),
            invites={i[0]: Invite(i[0], Role(i[1]), bool(i[2]), str(i[3]) if len(i) > 3 else "")
                     for i in v[9]},
            revoked=set(v[10]),
            invite_holders=dict(v[11]),
            screen_shared_links=bool(v[12]),
            airtime=dict(v[13]),
            next_seat=int(v[14]),
            ended=bool(v[15]),
            knocks=[int(t) for t in v[16]] if len(v) > 16 else [],
            declined={str(k): int(t) for k, t in v[17].items()} if len(v) > 16 else {},
        )
    except CorruptState:
        raise
    except Exception as exc:  # any shape error in a stored blob is corruption, typed
        raise CorruptState(f"unreadable room state: {type(exc).__name__}") from None


def state_version(blob: bytes) -> int:
    """The version inside a blob, without decoding the rest."""
    return decode_state(blob).version


def encode_event(e: Event) -> bytes:
    return _pack([e.version, e.name, e.data, e.audience.kind, e.audience.member_id])


def decode_event(blob: bytes) -> Event:
    try:
        v = msgpack.unpackb(blob, raw=False)
        return Event(name=Name(v[1]), data=v[2], audience=Audience(AudienceKind(v[3]), v[4]),
                     version=int(v[0]))
    except Exception as exc:
        raise CorruptState(f"unreadable event: {type(exc).__name__}") from None
