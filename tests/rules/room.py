"""A small driver for the pure rules: a circle, people joining, commands, and the events seen."""

from __future__ import annotations

from dataclasses import dataclass, field

from rooms import commands as c
from rooms.errors import RoomError
from rooms.events import Event, Name
from rooms.model import CircleSettings, FloorMode, Language, Role, RoomState
from rooms.rules import apply, joined_member_id
from storage.codec import encode_state

T0 = 1_700_000_000_000
SHARED = {Role.MODERATOR: "inv-mod", Role.MEMBER: "inv-member", Role.GUEST: "inv-guest"}


@dataclass
class Room:
    state: RoomState
    now: int = T0
    log: list[Event] = field(default_factory=list)
    counter: int = 0

    @classmethod
    def new(cls, *, lobby: bool = False, mode: FloorMode = FloorMode.HANDS, capacity: int = 15,
            turn_seconds: int = 180, grace_seconds: int = 30) -> Room:
        circle = CircleSettings(id="c1", title="Lingkar Ibu Tunggal", language=Language.ID,
                        capacity=capacity, turn_seconds=turn_seconds, floor_mode=mode, lobby=lobby,
                        grace_seconds=grace_seconds)
        room = cls(RoomState.new(circle))
        for role, inv in SHARED.items():
            room.do(c.CreateInvite(inv, role, personal=False))
        return room

    def do(self, command: c.Command) -> list[Event]:
        self.state, events = apply(self.state, command, self.now)
        self.log.extend(events)
        return events

    def refused(self, command: c.Command) -> RoomError:
        before = encode_state(self.state)
        try:
            apply(self.state, command, self.now)
        except RoomError as err:
            assert encode_state(self.state) == before, "a refused command changed the state"
            return err
        raise AssertionError(f"{command} was accepted")

    def join(self, name: str, role: Role = Role.MEMBER, *, invite: str | None = None,
             listen_only: bool = False) -> str:
        self.counter += 1
        cmd = c.Join(member_id=f"m{self.counter}", invite_id=invite or SHARED[role], role=role,
                     name=name, listen_only=listen_only, resume_hash=f"h{self.counter}")
        self.do(cmd)
        return joined_member_id(self.state, cmd)

    def admit(self, moderator: str, name: str, role: Role = Role.MEMBER) -> str:
        mid = self.join(name, role)
        if mid in self.state.lobby:
            self.do(c.Admit(moderator, mid))
        return mid

    def advance(self, seconds: float) -> list[Event]:
        self.now += int(seconds * 1000)
        return self.do(c.Tick())

    def names(self, events: list[Event]) -> list[Name]:
        return [e.name for e in events]
