"""A hypothesis state machine: random sequences of every command and tick from every role,
with the ten invariants of DESIGN §4 checked after every step."""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from rooms import commands as c
from rooms.errors import Code, RoomError
from rooms.events import AudienceKind, Event, Name
from rooms.model import FloorMode, Role, RoomState
from rooms.rules import DECLINED_FOR_MS, apply, audible, joined_member_id
from storage.codec import decode_state, encode_state
from tests.rules.room import SHARED, Room

MODERATOR_ONLY = (c.GiveFloor, c.Next, c.Mute, c.MuteAll, c.AskUnmute, c.Admit, c.Decline,
                  c.Remove, c.Lock, c.Unlock, c.End, c.SetMode, c.ExtendTurn)


class RoomMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.room: Room
        self.ids: list[str] = []  # everyone who ever joined, gone ones too
        self.gone: set[str] = set()
        self.revoked_invites: set[str] = set()
        self.raised_at: dict[str, int] = {}
        self.step_no = 0
        self.declined_until: dict[str, int] = {}  # knock tag -> when it may knock again

    @initialize(lobby=st.booleans(), mode=st.sampled_from(list(FloorMode)),
                capacity=st.integers(2, 10), turn=st.sampled_from([30, 60, 180]))
    def start(self, lobby: bool, mode: FloorMode, capacity: int, turn: int) -> None:
        self.room = Room.new(lobby=lobby, mode=mode, capacity=capacity, turn_seconds=turn)
        for n in range(3):
            self.room.do(c.CreateInvite(f"p{n}", Role.MEMBER, personal=True))
        for n in range(2):  # asked for as shared: moderator invites are personal all the same
            self.room.do(c.CreateInvite(f"pm{n}", Role.MODERATOR, personal=False))
        self.ids.append(self.room.join("Pendamping", Role.MODERATOR))
        for name in ("Melati", "Kenanga")[: capacity - 1]:
            self.ids.append(self.room.join(name))

    # --- driving --------------------------------------------------------------------------

    def run(self, command: c.Command) -> None:
        before = self.room.state
        blob = encode_state(before)
        self.step_no += 1
        try:
            after, events = apply(before, command, self.room.now)
        except RoomError as err:
            assert encode_state(before) == blob, "a refused command changed the state"
            self.check_refusal(before, command, err)
            return
        if isinstance(command, MODERATOR_ONLY):
            actor = before.members.get(command.actor)
            assert actor is not None and actor.role is Role.MODERATOR, "invariant 4"
        self.check_step(before, after, command, events)
        self.room.state = after
        self.track(before, after, command, events)

    def check_refusal(self, before: RoomState, command: c.Command, err: RoomError) -> None:
        if before.ended:
            assert err.code is Code.ENDED
            return
        if isinstance(command, MODERATOR_ONLY):
            actor = before.members.get(command.actor)
            if actor is None or actor.role is not Role.MODERATOR:
                assert err.code is Code.FORBIDDEN
        if isinstance(command, c.Join) and command.invite_id in self.revoked_invites:
            assert err.code is Code.BANNED or before.ended
        # Who gets in (DESIGN §5): a moderator is never refused for capacity, the lobby or
        # its knocks; a knock is refused as declined only within ten minutes of a decline.
        if isinstance(command, c.Join) and command.role is Role.MODERATOR:
            assert err.code not in (Code.FULL, Code.KNOCKS, Code.DECLINED), err
        if isinstance(command, c.Join) and err.code is Code.DECLINED:
            assert self.room.now < self.declined_until.get(command.knock_tag, 0)
        if isinstance(command, c.Join) and err.code is Code.FULL:
            lobby_full = len(before.lobby) >= before.circle.capacity
            assert lobby_full or before.seated >= before.circle.capacity

    def track(self, before: RoomState, after: RoomState, command: c.Command,
              events: list[Event]) -> None:
        for e in events:
            if e.name in (Name.LEFT, Name.REMOVED, Name.DECLINED):
                self.gone.add(e.data["member_id"])
            if e.name is Name.REMOVED:
                removed = before.find(e.data["member_id"])
                assert removed is not None
                if before.invites[removed.invite_id].for_one_person or isinstance(command, c.RevokeInvite):
                    self.revoked_invites.add(removed.invite_id)
            if e.name is Name.HAND_RAISED:
                self.raised_at[e.data["member_id"]] = self.step_no
            if e.name is Name.DECLINED:
                tag = before.lobby[e.data["member_id"]].knock_tag
                if tag:
                    self.declined_until[tag] = self.room.now + DECLINED_FOR_MS
        if isinstance(command, c.RevokeInvite):
            self.revoked_invites.add(command.invite_id)
            assert not [m for m in (*after.members.values(), *after.lobby.values())
                        if m.invite_id == command.invite_id], "a revoked invite's holders are out"
        if isinstance(command, c.Join):
            mid = joined_member_id(after, command)
            if mid not in self.ids:
                self.ids.append(mid)

    def check_step(self, before: RoomState, after: RoomState, command: c.Command,
                   events: list[Event]) -> None:
        changed = after is not before
        if isinstance(command, c.Join) and command.member_id in after.lobby and command.knock_tag:
            assert self.room.now >= self.declined_until.get(command.knock_tag, 0), "a declined address knocked"
        # 9. every change increments the version by exactly one; every event carries it
        if changed:
            assert after.version == before.version + 1
            assert all(e.version == after.version for e in events)
            assert decode_state(encode_state(after)) == after
        else:
            assert after.version == before.version
            assert all(e.ephemeral and e.version == before.version for e in events)
        # 3. nobody but the member themself unmutes them
        for mid, m in after.members.items():
            was = before.members.get(mid) or before.lobby.get(mid)
            if was is not None and was.muted and not m.muted:
                assert isinstance(command, c.UnmuteSelf) and command.actor == mid, "invariant 3"
        # 7. lobby members are never the audience of anything
        for e in events:
            if e.audience.kind is AudienceKind.MEMBER:
                assert e.audience.member_id in after.members, "invariant 7"
        # 8. a quiet leave shows members only the roster change
        if isinstance(command, c.LeaveQuietly):
            public = [e.name for e in events if e.audience.kind in (AudienceKind.EVERYONE,
                                                                     AudienceKind.MEMBER)]
            assert set(public) <= {Name.MEMBER_LEFT, Name.MODERATOR_PRESENT}, public
            assert Name.MEMBER_LEFT_QUIETLY in [e.name for e in events if e.audience.kind
                                                is AudienceKind.MODERATORS]
        # 10. with no moderator connected, nobody gains the floor
        if after.holder is not None and after.holder != before.holder:
            assert after.moderator_present, "invariant 10"
            assert before.moderator_present or isinstance(command, (c.Resume, c.Join))

    # --- rules: every command, from every role ------------------------------------------

    def someone(self, data: st.DataObject) -> str:
        """Mostly someone in the circle now; sometimes anyone who ever was, or a stranger."""
        present = [*self.room.state.members, *self.room.state.lobby]
        if present and data.draw(st.integers(0, 4)) > 0:
            return data.draw(st.sampled_from(present))
        return data.draw(st.sampled_from([*self.ids, "stranger"]))

    def moderator(self, data: st.DataObject) -> str:
        mods = [m.id for m in self.room.state.members.values() if m.role is Role.MODERATOR]
        return data.draw(st.sampled_from(mods)) if mods else self.someone(data)

    @rule(data=st.data(), kind=st.sampled_from(list(MODERATOR_ONLY)))
    def moderator_acts(self, data: st.DataObject, kind: type) -> None:
        """Moderator commands from a real moderator, so that they are mostly accepted."""
        actor = self.moderator(data)
        if kind is c.End and data.draw(st.integers(0, 9)) > 0:
            kind = c.Next
        if kind in (c.Admit, c.Decline) and self.room.state.lobby and data.draw(st.booleans()):
            self.run(kind(actor, data.draw(st.sampled_from(list(self.room.state.lobby)))))
        elif kind in (c.GiveFloor, c.Mute, c.AskUnmute, c.Admit, c.Decline, c.Remove):
            self.run(kind(actor, self.someone(data)))
        elif kind is c.SetMode:
            self.run(c.SetMode(actor, data.draw(st.sampled_from(list(FloorMode)))))
        elif kind is c.ExtendTurn:
            self.run(c.ExtendTurn(actor, data.draw(st.integers(-5, 700))))
        else:
            self.run(kind(actor))

    @rule(data=st.data(), role=st.sampled_from(list(Role)), listen_only=st.booleans(),
          personal=st.sampled_from([None, "p0", "p1", "p2", "pm0", "pm1"]),
          name=st.sampled_from(["Melati", " Kenanga ", "Mawar", "Anggrek", "", "x" * 33, "a\x01"]),
          tag=st.sampled_from(["", "addr-a", "addr-b", "addr-c"]))
    def join(self, data: st.DataObject, role: Role, listen_only: bool, personal: str | None,
             name: str, tag: str) -> None:
        mid = f"m{len(self.ids) + 1}-{self.step_no}"
        invite = personal or SHARED[role]
        if personal:
            role = Role.MODERATOR if personal.startswith("pm") else Role.MEMBER
        self.run(c.Join(mid, invite, role, name, listen_only, f"h-{mid}", tag))

    @rule(data=st.data(), count=st.integers(1, 14))
    def lobby_flood(self, data: st.DataObject, count: int) -> None:
        """Guest-link knocks in a burst, as a hostile holder of the link would send them."""
        for n in range(count):
            mid = f"g{len(self.ids) + 1}-{self.step_no}-{n}"
            self.run(c.Join(mid, SHARED[Role.GUEST], Role.GUEST, "Tamu", False, f"h-{mid}",
                            data.draw(st.sampled_from(["addr-a", "addr-b", "flood"]))))

    @rule(invite=st.sampled_from(["p0", "p1", "pm0", "pm1", "inv-member", "inv-guest", "nope"]))
    def revoke_invite(self, invite: str) -> None:
        self.run(c.RevokeInvite(invite))

    @rule(data=st.data())
    def resume(self, data: st.DataObject) -> None:
        mid = self.someone(data)
        m = self.room.state.find(mid)
        secret = m.resume_hash if m and data.draw(st.booleans()) else "wrong"
        self.run(c.Resume(m.invite_id if m else "nope", secret, f"h-{mid}-{self.step_no}"))

    @rule(data=st.data())
    def disconnect(self, data: st.DataObject) -> None:
        mid = self.someone(data)
        m = self.room.state.find(mid)
        if data.draw(st.integers(0, 2)) == 0:
            self.run(c.Disconnect(mid, m.session if m else 1))

    @rule(seconds=st.sampled_from([1, 5, 29, 30, 31, 150, 200]))
    def tick(self, seconds: int) -> None:
        self.room.now += seconds * 1000
        self.run(c.Tick())

    @rule(data=st.data(), kind=st.sampled_from([
        c.RaiseHand, c.LowerHand, c.Next, c.ReleaseFloor, c.Pass, c.MuteSelf, c.UnmuteSelf,
        c.MuteAll, c.Lock, c.Unlock, c.Leave, c.UnmuteSelf, c.RaiseHand]))
    def actor_only(self, data: st.DataObject, kind: type) -> None:
        self.run(kind(self.someone(data)))

    @rule(data=st.data(), kind=st.sampled_from([c.GiveFloor, c.Mute, c.AskUnmute, c.Admit,
                                                c.Decline, c.Remove]))
    def actor_and_target(self, data: st.DataObject, kind: type) -> None:
        self.run(kind(self.someone(data), self.someone(data)))

    @rule(data=st.data(), seconds=st.integers(-5, 700))
    def extend(self, data: st.DataObject, seconds: int) -> None:
        self.run(c.ExtendTurn(self.someone(data), seconds))

    @rule(data=st.data(), mode=st.sampled_from(list(FloorMode)))
    def set_mode(self, data: st.DataObject, mode: FloorMode) -> None:
        self.run(c.SetMode(self.someone(data), mode))

    @rule(data=st.data(), need=st.booleans(), long=st.booleans())
    def notes_and_quiet_leave(self, data: st.DataObject, need: bool, long: bool) -> None:
        self.run(c.PrivateNote(self.someone(data), "x" * (501 if long else 20), need))
        if data.draw(st.integers(0, 3)) == 0:
            self.run(c.LeaveQuietly(self.someone(data), need))

    @rule(data=st.data(), kind=st.sampled_from([c.Pass, c.ReleaseFloor, c.UnmuteSelf, c.MuteSelf]))
    def holder_acts(self, data: st.DataObject, kind: type) -> None:
        holder = self.room.state.holder
        self.run(kind(holder if holder is not None else self.someone(data)))

    @rule(data=st.data())
    def member_raises_hand(self, data: st.DataObject) -> None:
        self.run(c.RaiseHand(self.someone(data)))

    # --- invariants after every step ----------------------------------------------------

    @invariant()
    def floor_has_one_eligible_holder(self) -> None:  # 1
        s = self.room.state
        if s.floor is not None:
            m = s.members.get(s.floor.holder)
            assert m is not None, "holder must be admitted"
            assert m.connected or m.grace_deadline is not None
            assert m.role is not Role.MODERATOR and not m.listen_only

    @invariant()
    def heard_iff_unmuted_and_allowed(self) -> None:  # 2
        s = self.room.state
        expected = {m.id for m in s.members.values()
                    if not m.muted and not m.listen_only and m.connected
                    and (m.role is Role.MODERATOR or s.holder == m.id or s.mode is FloorMode.OPEN)}
        assert set(audible(s)) == expected
        assert len(audible(s)) == len(expected)

    @invariant()
    def queue_once_each_in_raise_order(self) -> None:  # 5
        q = self.room.state.queue
        assert len(q) == len(set(q))
        assert all(mid in self.room.state.members for mid in q)
        assert self.room.state.holder not in q
        assert [self.raised_at[mid] for mid in q] == sorted(self.raised_at[mid] for mid in q)

    @invariant()
    def gone_members_appear_nowhere(self) -> None:  # 6
        s = self.room.state
        for mid in self.gone:
            assert mid not in s.members and mid not in s.lobby and mid not in s.queue
            assert s.holder != mid and mid not in s.airtime
        assert self.revoked_invites <= s.revoked

    @invariant()
    def only_admitted_members_have_seats(self) -> None:
        s = self.room.state
        assert all(m.seat > 0 for m in s.members.values())
        assert all(m.seat == 0 for m in s.lobby.values())
        assert not set(s.members) & set(s.lobby)

    @invariant()
    def capacity_counts_members_and_guests_and_bounds_the_lobby(self) -> None:
        s = self.room.state
        assert s.seated <= s.circle.capacity
        assert len(s.lobby) <= s.circle.capacity
        assert all(m.role is not Role.MODERATOR for m in s.lobby.values()), "moderators never wait"
        assert all(not m.knock_tag for m in s.members.values()), "an address tag only while waiting"


RoomMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
test_room_rules_keep_every_invariant = RoomMachine.TestCase
