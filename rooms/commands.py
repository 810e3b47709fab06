"""Commands: what someone asks the room to do, as imperative frozen dataclasses.

`actor` is the member id of whoever sent the command. Commands without an actor come from the
server itself (`Join`, `Resume`, `Disconnect`, `Tick`, `CreateInvite`, `RevokeInvite`, `EndByOrganizer`).
"""

from __future__ import annotations

from dataclasses import dataclass

from rooms.model import FloorMode, Role


@dataclass(frozen=True, slots=True)
class Join:
    member_id: str  # chosen by the caller (random); the rules stay deterministic
    invite_id: str
    role: Role  # as the token claims; must match the invite
    name: str
    listen_only: bool
    resume_hash: str
    knock_tag: str = ""  # a keyed tag of the client's address (signaling.addresses.keyed)


@dataclass(frozen=True, slots=True)
class Resume:
    """A connection comes back with the resume secret of a seat (or lobby place) it held: the
    rules find the one member whose secret it is, on the invite the token names."""

    invite_id: str  # the join token's invite: a secret only resumes on its own invite
    resume_hash: str  # hash of the secret presented
    new_resume_hash: str  # the secret rotates on every resume


@dataclass(frozen=True, slots=True)
class Disconnect:
    member_id: str
    session: int  # ignored when a newer session has taken the seat over


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed: fire due deadlines (turn warning, turn over, grace end)."""


@dataclass(frozen=True, slots=True)
class CreateInvite:
    invite_id: str
    role: Role
    personal: bool
    label: str = ""


@dataclass(frozen=True, slots=True)
class RevokeInvite:
    """The organizer revokes an invite: it is refused from now on, and whoever holds a seat
    or a lobby place through it is out (F10)."""

    invite_id: str


@dataclass(frozen=True, slots=True)
class EndByOrganizer:
    pass


@dataclass(frozen=True, slots=True)
class RaiseHand:
    actor: str


@dataclass(frozen=True, slots=True)
class LowerHand:
    actor: str


@dataclass(frozen=True, slots=True)
class GiveFloor:
    actor: str
    member_id: str


@dataclass(frozen=True, slots=True)
class Next:
    actor: str


@dataclass(frozen=True, slots=True)
class ReleaseFloor:
    actor: str


@dataclass(frozen=True, slots=True)
class Pass:
    actor: str


@dataclass(frozen=True, slots=True)
class ExtendTurn:
    actor: str
    seconds: int


@dataclass(frozen=True, slots=True)
class SetMode:
    actor: str
    mode: FloorMode


@dataclass(frozen=True, slots=True)
class MuteSelf:
    actor: str


@dataclass(frozen=True, slots=True)
class UnmuteSelf:
    actor: str


@dataclass(frozen=True, slots=True)
class Mute:
    actor: str
    member_id: str


@dataclass(frozen=True, slots=True)
class MuteAll:
    actor: str


@dataclass(frozen=True, slots=True)
class AskUnmute:
    actor: str
    member_id: str


@dataclass(frozen=True, slots=True)
class Admit:
    actor: str
    member_id: str


@dataclass(frozen=True, slots=True)
class Decline:
    actor: str
    member_id: str


@dataclass(frozen=True, slots=True)
class Remove:
    actor: str
    member_id: str


@dataclass(frozen=True, slots=True)
class Lock:
    actor: str


@dataclass(frozen=True, slots=True)
class Unlock:
    actor: str


@dataclass(frozen=True, slots=True)
class End:
    actor: str


@dataclass(frozen=True, slots=True)
class PrivateNote:
    actor: str
    text: str
    need_support: bool = False


@dataclass(frozen=True, slots=True)
class Leave:
    actor: str


@dataclass(frozen=True, slots=True)
class LeaveQuietly:
    actor: str
    need_support: bool = False


Command = (
    Join | Resume | Disconnect | Tick | CreateInvite | RevokeInvite | EndByOrganizer
    | RaiseHand | LowerHand | GiveFloor | Next | ReleaseFloor | Pass | ExtendTurn | SetMode
    | MuteSelf | UnmuteSelf | Mute | MuteAll | AskUnmute | Admit | Decline | Remove
    | Lock | Unlock | End | PrivateNote | Leave | LeaveQuietly
)
