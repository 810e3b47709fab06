"""Events: what happened, in the past tense, each with the audience the rules chose for it.

An event reaches clients as `event {version, name, data}` when its audience is a person
(everyone admitted, the moderators, one member). Events for the `SERVER` audience are never
sent as such: they tell the signaling layer and the media relay to act (send `admitted`,
close a socket with a code, change who may be heard).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any


class AudienceKind(enum.StrEnum):
    EVERYONE = "everyone"  # every admitted member (never the lobby)
    MODERATORS = "moderators"
    MEMBER = "member"  # one member, named in `member_id`
    SERVER = "server"  # the signaling layer and the relay only


@dataclass(frozen=True, slots=True)
class Audience:
    kind: AudienceKind
    member_id: str | None = None

    def includes(self, member_id: str, is_moderator: bool) -> bool:
        if self.kind is AudienceKind.EVERYONE:
            return True
        if self.kind is AudienceKind.MODERATORS:
            return is_moderator
        if self.kind is AudienceKind.MEMBER:
            return self.member_id == member_id
        return False


EVERYONE = Audience(AudienceKind.EVERYONE)
MODERATORS = Audience(AudienceKind.MODERATORS)
SERVER = Audience(AudienceKind.SERVER)


def only(member_id: str) -> Audience:
    return Audience(AudienceKind.MEMBER, member_id)


class Name(enum.StrEnum):
    """Event names. Those of DESIGN §5 go to people; the rest are for the server."""

    MEMBER_JOINED = "member_joined"
    MEMBER_LEFT = "member_left"
    MEMBER_LEFT_QUIETLY = "member_left_quietly"
    MEMBER_REMOVED = "member_removed"
    PRESENCE = "presence"
    LOBBY_WAITING = "lobby_waiting"
    LOBBY_LEFT = "lobby_left"
    HAND_RAISED = "hand_raised"
    HAND_LOWERED = "hand_lowered"
    FLOOR_GIVEN = "floor_given"
    FLOOR_RELEASED = "floor_released"
    TURN_WARNING = "turn_warning"
    TURN_OVER = "turn_over"
    MODE_CHANGED = "mode_changed"
    MUTED = "muted"
    UNMUTED = "unmuted"
    UNMUTE_REQUESTED = "unmute_requested"
    MODERATOR_PRESENT = "moderator_present"
    LOCKED = "locked"
    PRIVATE_NOTE = "private_note"
    # For the server only (audience SERVER):
    ADMITTED = "admitted"  # data: member_id — send `admitted {state}` to that member
    DECLINED = "declined"  # data: member_id — close that member with 4403
    REMOVED = "removed"  # data: member_id — close with 4403, drop their media
    LEFT = "left"  # data: member_id — close with 4001, drop their media
    ENDED = "ended"  # close everyone with 4000, drop all media, delete the circle
    REPLACED = "replaced"  # data: member_id, session — close older sessions of that member
    AUDIBLE = "audible"  # data: members (ordered) — who the relay may forward now


@dataclass(frozen=True, slots=True)
class Event:
    name: Name
    data: dict[str, Any]
    audience: Audience
    version: int = 0  # set by `apply` to the version the event belongs to

    @property
    def for_server(self) -> bool:
        return self.audience.kind is AudienceKind.SERVER

    @property
    def ephemeral(self) -> bool:
        """Delivered live and never kept in any store or log: private notes (their text must
        not outlive the moment) and requests to unmute (a nudge, not a state change)."""
        return self.name in _EPHEMERAL


_EPHEMERAL = frozenset({Name.PRIVATE_NOTE, Name.UNMUTE_REQUESTED})
