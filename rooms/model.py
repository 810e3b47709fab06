"""The room's data: circle settings, members, floor, and the whole room state.

Everything here is plain data. `RoomState` is mutable only inside `rooms.rules.apply`, which
works on a copy (`RoomState.copy`) so a refused command leaves the original untouched.
Members are frozen: a change replaces the `Member` in the dict, so copies can share them.
Times are integers in epoch milliseconds, given to the rules by the caller.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace


class Role(enum.StrEnum):
    MODERATOR = "moderator"
    MEMBER = "member"
    GUEST = "guest"


class FloorMode(enum.StrEnum):
    HANDS = "hands"
    ROUND = "round"
    OPEN = "open"


class Language(enum.StrEnum):
    ID = "id"
    EN = "en"


@dataclass(frozen=True, slots=True)
class CircleSettings:
    """A circle's settings, fixed when the organizer creates it."""

    id: str
    title: str
    topic: str = ""
    language: Language = Language.ID
    capacity: int = 15
    turn_seconds: int = 180
    floor_mode: FloorMode = FloorMode.HANDS
    lobby: bool = True
    grace_seconds: int = 30
    created_at: int = 0  # epoch ms


@dataclass(frozen=True, slots=True)
class Invite:
    """An invite a join token points at (`inv` claim). Personal invites are for one person."""

    id: str
    role: Role
    personal: bool = False
    label: str = ""  # the organizer's own note ("Bu Sari"), never shown in the circle

    @property
    def for_one_person(self) -> bool:
        """A moderator invite is always for one person (F10), whatever it was made as."""
        return self.personal or self.role is Role.MODERATOR


@dataclass(frozen=True, slots=True)
class Member:
    """A person in the circle, admitted or waiting in the lobby."""

    id: str
    name: str
    role: Role
    invite_id: str
    listen_only: bool = False
    seat: int = 0  # 0 while in the lobby; seats start at 1
    muted: bool = True
    connected: bool = True
    grace_deadline: int | None = None  # set while disconnected
    session: int = 1  # bumped when a newer connection takes the seat over
    resume_hash: str = ""  # sha256 hex of the current resume secret
    knock_tag: str = ""  # while in the lobby: a keyed tag of the address it knocked from

    def with_(self, **changes: object) -> Member:
        return replace(self, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Floor:
    holder: str
    since: int
    deadline: int
    warned: bool = False
    over: bool = False


@dataclass(slots=True)
class RoomState:
    circle: CircleSettings
    version: int = 0
    mode: FloorMode = FloorMode.HANDS
    locked: bool = False
    members: dict[str, Member] = field(default_factory=dict)  # admitted, in seat order
    lobby: dict[str, Member] = field(default_factory=dict)  # waiting, in arrival order
    floor: Floor | None = None
    queue: list[str] = field(default_factory=list)
    invites: dict[str, Invite] = field(default_factory=dict)
    revoked: set[str] = field(default_factory=set)  # personal invites of removed members
    invite_holders: dict[str, str] = field(default_factory=dict)  # personal invite -> member id
    screen_shared_links: bool = False  # set by a removal (F10)
    airtime: dict[str, int] = field(default_factory=dict)  # member id -> ms spoken
    next_seat: int = 1
    ended: bool = False
    knocks: list[int] = field(default_factory=list)  # times of the lobby knocks of the last minute
    declined: dict[str, int] = field(default_factory=dict)  # knock tag -> refused until (epoch ms)

    @classmethod
    def new(cls, circle: CircleSettings) -> RoomState:
        return cls(circle=circle, mode=circle.floor_mode)

    def copy(self) -> RoomState:
        """A copy sharing only immutable parts (members and floor are frozen). The fields
        are passed by position, in the order declared above (once per command: keywords
        cost twice as much)."""
        return RoomState(
            self.circle, self.version, self.mode, self.locked, dict(self.members),
            dict(self.lobby), self.floor, list(self.queue), dict(self.invites),
            set(self.revoked), dict(self.invite_holders), self.screen_shared_links,
            dict(self.airtime), self.next_seat, self.ended, list(self.knocks), dict(self.declined),
        )

    # Derived facts, never stored, so they cannot drift from what they describe.

    @property
    def moderator_present(self) -> bool:
        return any(m.role is Role.MODERATOR and m.connected for m in self.members.values())

    @property
    def seated(self) -> int:
        """Admitted members and guests: what `capacity` counts (moderators do not)."""
        return sum(1 for m in self.members.values() if m.role is not Role.MODERATOR)

    @property
    def holder(self) -> str | None:
        return self.floor.holder if self.floor else None

    def find(self, member_id: str) -> Member | None:
        return self.members.get(member_id) or self.lobby.get(member_id)
