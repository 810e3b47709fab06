"""Example tests of the room rules, each named for the behaviour it proves."""

from __future__ import annotations

import pytest

from rooms import commands as c
from rooms.errors import Code
from rooms.events import AudienceKind, Name
from rooms.model import FloorMode, Role
from rooms.rules import (
    audible,
    joined_member_id,
    lobby_circle,
    next_deadline,
    snapshot,
    valid_name,
)
from signaling.frames import FrameError, clean_name
from tests.rules.room import Room


@pytest.fixture
def room() -> Room:
    return Room.new()


def circle_with_two(room: Room) -> tuple[str, str, str]:
    mod = room.join("Bu Siti", Role.MODERATOR)
    a = room.join("Melati")
    b = room.join("Kenanga")
    return mod, a, b


def test_members_enter_muted_and_moderators_unmuted(room: Room) -> None:
    mod, a, _ = circle_with_two(room)
    assert room.state.members[a].muted
    assert not room.state.members[mod].muted


def test_seats_are_given_in_join_order(room: Room) -> None:
    mod, a, b = circle_with_two(room)
    assert [room.state.members[x].seat for x in (mod, a, b)] == [1, 2, 3]


def test_every_accepted_change_increments_version_by_one(room: Room) -> None:
    mod, a, _ = circle_with_two(room)
    v = room.state.version
    events = room.do(c.RaiseHand(a))
    assert room.state.version == v + 1
    assert all(e.version == v + 1 for e in events)


def test_command_that_changes_nothing_keeps_the_version(room: Room) -> None:
    mod, a, _ = circle_with_two(room)
    v = room.state.version
    assert room.do(c.MuteSelf(a)) == []
    assert room.state.version == v


def test_raise_hand_queues_in_order_once(room: Room) -> None:
    mod, a, b = circle_with_two(room)
    room.do(c.RaiseHand(b))
    room.do(c.RaiseHand(a))
    room.do(c.RaiseHand(b))
    assert room.state.queue == [b, a]


def test_next_gives_floor_to_head_of_queue_and_lowers_hand(room: Room) -> None:
    mod, a, b = circle_with_two(room)
    room.do(c.RaiseHand(b))
    room.do(c.RaiseHand(a))
    events = room.do(c.Next(mod))
    assert room.state.holder == b
    assert room.state.queue == [a]
    assert Name.FLOOR_GIVEN in room.names(events)
    given = next(e for e in events if e.name is Name.FLOOR_GIVEN)
    assert given.data["deadline"] == room.now + 180_000


def test_giving_the_floor_does_not_unmute_the_member(room: Room) -> None:
    mod, a, _ = circle_with_two(room)
    room.do(c.GiveFloor(mod, a))
    assert room.state.members[a].muted
    assert a not in audible(room.state)
    room.do(c.UnmuteSelf(a))
    assert audible(room.state)[0] == a


def test_member_without_floor_is_not_heard_even_unmuted(room: Room) -> None:
    mod, a, b = circle_with_two(room)
    room.do(c.UnmuteSelf(b))
    assert b not in audible(room.state)
    assert audible(room.state) == [mod]


def test_open_mode_lets_every_unmuted_member_be_heard(room: Room) -> None:
    mod, a, b = circle_with_two(room)
    room.do(c.SetMode(mod, FloorMode.OPEN))
    room.do(c.UnmuteSelf(b))
    assert set(audible(room.state)) == {mod, b}


def test_only_moderators_give_floor_mute_admit_remove_lock_end(room: Room) -> None:
    mod, a, b = circle_with_two(room)
    for cmd in (c.GiveFloor(a, b), c.Next(a), c.Mute(a, b), c.MuteAll(a), c.AskUnmute(a, b),
                c.Admit(a, b), c.Decline(a, b), c.Remove(a, b), c.Lock(a), c.Unlock(a), c.End(a),
                c.SetMode(a, FloorMode.OPEN), c.ExtendTurn(a, 30)):
        assert room.refused(cmd).code is Code.FORBIDDEN, cmd


def test_moderator_mutes_but_cannot_unmute(room: Room) -> None:
    mod, a, _ = circle_with_two(room)
    room.do(c.UnmuteSelf(a))
    events = room.do(c.Mute(mod, a))
    assert events[0].data == {"member_id": a, "by": "moderator"}
    events = room.do(c.AskUnmute(mod, a))
    assert room.state.members[a].muted
    assert [(e.name, e.audience.kind, e.audience.member_id) for e in events] == [
        (Name.UNMUTE_REQUESTED, AudienceKind.MEMBER, a)]


def test_mute_all_mutes_every_non_moderator(room: Room) -> None:
    mod, a, b = circle_with_two(room)
    room.do(c.UnmuteSelf(a))
    room.do(c.UnmuteSelf(b))
    room.do(c.MuteAll(mod))
    assert all(room.state.members[x].muted for x in (a, b))
    assert not room.state.members[mod].muted


def test_listen_only_member_cannot_unmute_raise_hand_or_take_floor(room: Room) -> None:
    mod = room.join("Mod", Role.MODERATOR)
    quiet = room.join("Sunyi", listen_only=True)
    assert room.refused(c.UnmuteSelf(quiet)).code is Code.NOT_ALLOWED
    assert room.refused(c.RaiseHand(quiet)).code is Code.NOT_ALLOWED
    assert room.refused(c.GiveFloor(mod, quiet)).code is Code.NOT_ALLOWED


def test_turn_warning_at_thirty_seconds_then_turn_over_to_moderators(room: Room) -> None:
    mod, a, _ = circle_with_two(room)
    room.do(c.GiveFloor(mod, a))
    assert next_deadline(room.state) == room.now + 150_000
    assert room.advance(149) == []
    warning = room.advance(1)
    assert {(e.name, e.audience.kind) for e in warning} == {
        (Name.TURN_WARNING, AudienceKind.MEMBER), (Name.TURN_WARNING, AudienceKind.MODERATORS)}
    assert warning[0].data["remaining"] == 30
    over = room.advance(30)
    assert [(e.name, e.audience.kind) for e in over] == [(Name.TURN_OVER, AudienceKind.MODERATORS)]
    assert room.state.holder == a  # in hands mode the moderator decides what comes next


def test_round_mode_moves_the_floor_on_at_turn_end(room: Room) -> None:
    room = Room.new(mode=FloorMode.ROUND)
    mod, a, b = circle_with_two(room)
    room.do(c.Next(mod))
    assert room.state.holder == a
    room.advance(180)
    assert room.state.holder == b


def test_round_mode_pass_skips_to_next_seat(room: Room) -> None:
    room = Room.new(mode=FloorMode.ROUND)
    mod, a, b = circle_with_two(room)
    room.do(c.GiveFloor(mod, a))
    room.do(c.Pass(a))
    assert room.state.holder == b
    room.do(c.Pass(b))
    assert room.state.holder == a


def test_extend_turn_pushes_deadline_and_rearms_warning(room: Room) -> None:
    mod, a, _ = circle_with_two(room)
    room.do(c.GiveFloor(mod, a))
    room.advance(160)
    assert room.state.floor is not None and room.state.floor.warned
    room.do(c.ExtendTurn(mod, 60))
    assert room.state.floor.deadline == room.now - 160_000 + 240_000
    assert not room.state.floor.warned
    assert room.refused(c.ExtendTurn(mod, 0)).code is Code.NOT_ALLOWED
    assert room.refused(c.ExtendTurn(mod, 601)).code is Code.NOT_ALLOWED


def test_set_mode_releases_floor_and_clears_queue(room: Room) -> None:
    mod, a, b = circle_with_two(room)
    room.do(c.GiveFloor(mod, a))
    room.do(c.RaiseHand(b))
    events = room.do(c.SetMode(mod, FloorMode.ROUND))
    assert room.names(events)[:2] == [Name.FLOOR_RELEASED, Name.MODE_CHANGED]
    assert room.state.holder is None and room.state.queue == []


def test_lobby_member_sees_nothing_until_admitted(room: Room) -> None:
    room = Room.new(lobby=True)
    mod = room.join("Mod", Role.MODERATOR)
    events_before = len(room.log)
    waiting = room.join("Melati")
    assert waiting in room.state.lobby and waiting not in room.state.members
    new = room.log[events_before:]
    assert [(e.name, e.audience.kind) for e in new] == [(Name.LOBBY_WAITING, AudienceKind.MODERATORS)]
    assert lobby_circle(room.state) == {"title": "Lingkar Ibu Tunggal", "language": "id"}
    assert room.refused(c.RaiseHand(waiting)).code is Code.FORBIDDEN
    events = room.do(c.Admit(mod, waiting))
    assert [(e.name, e.audience.kind) for e in events] == [
        (Name.LOBBY_LEFT, AudienceKind.MODERATORS), (Name.MEMBER_JOINED, AudienceKind.EVERYONE),
        (Name.ADMITTED, AudienceKind.SERVER)]


def test_guest_invite_always_goes_through_lobby(room: Room) -> None:
    room.join("Mod", Role.MODERATOR)
    guest = room.join("Teman", Role.GUEST)
    assert guest in room.state.lobby


def test_declined_member_is_closed_and_gone(room: Room) -> None:
    room = Room.new(lobby=True)
    mod = room.join("Mod", Role.MODERATOR)
    waiting = room.join("Melati")
    events = room.do(c.Decline(mod, waiting))
    assert Name.DECLINED in room.names(events)
    assert room.state.find(waiting) is None


def test_quiet_leave_tells_members_only_that_the_seat_emptied(room: Room) -> None:
    mod, a, b = circle_with_two(room)
    room.do(c.GiveFloor(mod, a))
    room.do(c.RaiseHand(b))
    events = room.do(c.LeaveQuietly(a, need_support=True))
    to_people = [(e.name, e.audience.kind, e.data) for e in events if not e.for_server]
    assert to_people == [
        (Name.MEMBER_LEFT, AudienceKind.EVERYONE, {"member_id": a}),
        (Name.MEMBER_LEFT_QUIETLY, AudienceKind.MODERATORS, {"member_id": a, "need_support": True}),
    ]
    assert room.state.holder is None and a not in room.state.airtime


def test_plain_leave_and_quiet_leave_look_identical_to_members(room: Room) -> None:
    mod, a, b = circle_with_two(room)
    plain = [(e.name, e.data) for e in room.do(c.Leave(a)) if e.audience.kind is AudienceKind.EVERYONE]
    quiet = [(e.name, e.data) for e in room.do(c.LeaveQuietly(b))
             if e.audience.kind is AudienceKind.EVERYONE]
    assert [n for n, _ in plain] == [n for n, _ in quiet] == [Name.MEMBER_LEFT]


def test_removed_member_cannot_rejoin_with_personal_invite(room: Room) -> None:
    mod = room.join("Mod", Role.MODERATOR)
    room.do(c.CreateInvite("inv-personal", Role.MEMBER, personal=True))
    x = room.join("Pengganggu", invite="inv-personal")
    events = room.do(c.Remove(mod, x))
    assert {e.name for e in events} >= {Name.MEMBER_REMOVED, Name.REMOVED}
    assert room.refused(c.Join("m99", "inv-personal", Role.MEMBER, "Lagi", False, "h")).code is Code.BANNED


def test_after_a_removal_shared_link_joins_go_through_lobby(room: Room) -> None:
    mod, a, _ = circle_with_two(room)
    room.do(c.Remove(mod, a))
    again = room.join("Nama Baru")
    assert again in room.state.lobby


def test_personal_invite_joined_twice_keeps_one_seat(room: Room) -> None:
    room.join("Mod", Role.MODERATOR)
    room.do(c.CreateInvite("inv-p", Role.MEMBER, personal=True))
    first = room.join("Melati", invite="inv-p")
    room.do(c.RaiseHand(first))
    second = room.join("Melati", invite="inv-p")
    assert second == first
    assert len(room.state.members) == 2 and room.state.queue == [first]
    replaced = [e for e in room.log if e.name is Name.REPLACED]
    assert replaced[-1].data == {"member_id": first, "session": 2}


def test_locked_circle_refuses_new_joins(room: Room) -> None:
    mod = room.join("Mod", Role.MODERATOR)
    room.do(c.Lock(mod))
    assert room.refused(c.Join("m9", "inv-member", Role.MEMBER, "X", False, "h")).code is Code.LOCKED
    room.do(c.Unlock(mod))
    room.join("X")


def test_full_circle_refuses_joins(room: Room) -> None:
    room = Room.new(capacity=2)
    room.join("Mod", Role.MODERATOR)
    room.join("A")
    room.join("B")  # the moderator does not count: capacity is members and guests
    assert room.refused(c.Join("m9", "inv-member", Role.MEMBER, "C", False, "h")).code is Code.FULL


def test_a_full_circle_still_takes_a_moderator(room: Room) -> None:
    room = Room.new(capacity=2)
    room.join("A")
    room.join("B")
    room.do(c.CreateInvite("pm2", Role.MODERATOR, personal=True))
    for invite in ("inv-mod", "pm2"):
        mod = room.join("Pendamping", Role.MODERATOR, invite=invite)
        assert mod in room.state.members
    assert room.state.seated == 2


def test_a_lobby_flood_cannot_keep_a_moderator_out(room: Room) -> None:
    room = Room.new(capacity=3, lobby=True)
    for n in range(3):
        assert room.join(f"Tamu{n}", Role.GUEST) in room.state.lobby
    assert room.refused(c.Join("m9", "inv-guest", Role.GUEST, "Lagi", False, "h")).code is Code.FULL
    mod = room.join("Pendamping", Role.MODERATOR)
    assert mod in room.state.members  # never kept in the lobby, never refused for it


def test_the_lobby_takes_ten_new_knocks_a_minute(room: Room) -> None:
    room = Room.new(capacity=50, lobby=True)
    for n in range(10):
        room.join(f"Tamu{n}", Role.GUEST)
    assert room.refused(c.Join("m99", "inv-guest", Role.GUEST, "X", False, "h")).code is Code.KNOCKS
    room.now += 60_001
    assert room.join("Tamu10", Role.GUEST) in room.state.lobby


def test_a_declined_address_cannot_knock_again_for_ten_minutes(room: Room) -> None:
    room = Room.new(lobby=True)
    mod = room.join("Pendamping", Role.MODERATOR)
    room.do(c.Join("m90", "inv-guest", Role.GUEST, "Mawar", False, "h90", "tag-a"))
    assert room.state.lobby["m90"].knock_tag == "tag-a"
    room.do(c.Decline(mod, "m90"))
    again = c.Join("m91", "inv-guest", Role.GUEST, "Mawar", False, "h91", "tag-a")
    assert room.refused(again).code is Code.DECLINED
    room.do(c.Join("m92", "inv-guest", Role.GUEST, "Melati", False, "h92", "tag-b"))  # others may
    room.now += 10 * 60_000 - 1
    assert room.refused(again).code is Code.DECLINED
    room.now += 1
    room.do(c.Tick())  # the tag is forgotten on time, not only on the next knock
    assert room.state.declined == {}
    room.do(again)
    assert "m91" in room.state.lobby


def test_an_admitted_member_keeps_no_address_tag(room: Room) -> None:
    room = Room.new(lobby=True)
    mod = room.join("Pendamping", Role.MODERATOR)
    room.do(c.Join("m90", "inv-member", Role.MEMBER, "Mawar", False, "h90", "tag-a"))
    room.do(c.Admit(mod, "m90"))
    assert room.state.members["m90"].knock_tag == ""


def test_admitting_into_a_full_circle_is_refused(room: Room) -> None:
    room = Room.new(capacity=2, lobby=True)
    mod = room.join("Pendamping", Role.MODERATOR)
    for name in ("A", "B"):
        room.do(c.Admit(mod, room.join(name)))
    waiting = room.join("C")
    assert room.refused(c.Admit(mod, waiting)).code is Code.NOT_ALLOWED


def test_moderator_invites_are_always_personal(room: Room) -> None:
    room.do(c.CreateInvite("pm9", Role.MODERATOR, personal=False))
    assert room.state.invites["pm9"].personal


def test_a_removed_moderators_link_is_dead(room: Room) -> None:
    boss = room.join("Pendamping", Role.MODERATOR)
    room.do(c.CreateInvite("pm2", Role.MODERATOR, personal=True))
    other = room.join("Pendamping2", Role.MODERATOR, invite="pm2")
    room.do(c.Remove(boss, other))
    back = c.Join("m99", "pm2", Role.MODERATOR, "Pendamping2", False, "h")
    assert room.refused(back).code is Code.BANNED
    assert other not in room.state.members


def test_a_revoked_invite_puts_out_whoever_holds_it(room: Room) -> None:
    mod, a, b = circle_with_two(room)
    room.do(c.CreateInvite("pm2", Role.MODERATOR, personal=True))
    co = room.join("Pendamping2", Role.MODERATOR, invite="pm2")
    events = room.do(c.RevokeInvite("pm2"))
    assert [(e.name, e.data) for e in events if e.name in (Name.MEMBER_REMOVED, Name.REMOVED)] == [
        (Name.MEMBER_REMOVED, {"member_id": co}), (Name.REMOVED, {"member_id": co})]
    assert co not in room.state.members and {mod, a, b} <= set(room.state.members)
    assert room.refused(c.Join("m99", "pm2", Role.MODERATOR, "X", False, "h")).code is Code.BANNED
    room.do(c.RevokeInvite("inv-member"))  # a shared link: everyone who came through it
    assert set(room.state.members) == {mod}
    assert room.refused(c.RevokeInvite("nope")).code is Code.BAD_INVITE


def test_invite_with_other_role_or_unknown_is_refused(room: Room) -> None:
    assert room.refused(c.Join("m9", "inv-member", Role.MODERATOR, "B", False, "h")).code is Code.BAD_INVITE
    assert room.refused(c.Join("m9", "nope", Role.MEMBER, "B", False, "h")).code is Code.BAD_INVITE


@pytest.mark.parametrize("name", ["", "   ", "x" * 33, "a\x00b", "tab\there"])
def test_bad_pseudonym_is_refused(room: Room, name: str) -> None:
    assert room.refused(c.Join("m9", "inv-member", Role.MEMBER, name, False, "h")).code is Code.NOT_ALLOWED


def test_no_moderator_connected_freezes_the_floor(room: Room) -> None:
    room = Room.new(mode=FloorMode.ROUND)
    mod, a, b = circle_with_two(room)
    room.do(c.GiveFloor(mod, a))
    events = room.do(c.Disconnect(mod, session=1))
    assert (Name.MODERATOR_PRESENT, {"present": False}) in [(e.name, e.data) for e in events]
    room.do(c.Pass(a))
    assert room.state.holder is None  # released, but nobody new gains the floor
    room.do(c.Resume(room.state.members[mod].invite_id, "h1", "h1b"))
    assert room.state.moderator_present
    room.do(c.Next(mod))
    assert room.state.holder is not None


def test_disconnect_keeps_seat_for_grace_then_leaves_quietly(room: Room) -> None:
    mod, a, b = circle_with_two(room)
    room.do(c.RaiseHand(a))
    events = room.do(c.Disconnect(a, session=1))
    assert [(e.name, e.data) for e in events] == [(Name.PRESENCE, {"member_id": a, "connected": False})]
    assert room.state.queue == [a]
    room.advance(29)
    assert a in room.state.members
    events = room.advance(1)
    assert {e.name for e in events} >= {Name.MEMBER_LEFT, Name.MEMBER_LEFT_QUIETLY}
    assert a not in room.state.members and room.state.queue == []


def test_resume_inside_grace_keeps_seat_floor_and_rotates_secret(room: Room) -> None:
    mod, a, b = circle_with_two(room)
    room.do(c.GiveFloor(mod, a))
    room.do(c.Disconnect(a, session=1))
    room.advance(10)
    room.do(c.Resume(room.state.members[a].invite_id, "h2", "h2-new"))
    assert room.state.holder == a and room.state.members[a].connected
    assert room.refused(c.Resume(room.state.members[a].invite_id, "h2", "again")).code is Code.BAD_RESUME  # single use


def test_resume_finds_the_seat_by_its_secret_on_its_own_invite_only(room: Room) -> None:
    mod, a, _ = circle_with_two(room)
    room.do(c.Disconnect(a, session=1))
    moderators_invite = room.state.members[mod].invite_id
    assert room.refused(c.Resume(moderators_invite, "h2", "x")).code is Code.BAD_RESUME
    assert room.refused(c.Resume(room.state.members[a].invite_id, "h9", "x")).code is Code.BAD_RESUME
    cmd = c.Resume(room.state.members[a].invite_id, "h2", "h2-new")
    room.do(cmd)
    assert joined_member_id(room.state, cmd) == a and room.state.members[a].connected


def test_resume_after_grace_is_refused(room: Room) -> None:
    mod, a, _ = circle_with_two(room)
    room.do(c.Disconnect(a, session=1))
    room.now += 30_000
    assert room.refused(c.Resume(room.state.members[a].invite_id, "h2", "x")).code is Code.BAD_RESUME


def test_disconnect_of_an_older_session_is_ignored(room: Room) -> None:
    room.join("Mod", Role.MODERATOR)
    room.do(c.CreateInvite("inv-p", Role.MEMBER, personal=True))
    a = room.join("Melati", invite="inv-p")
    room.join("Melati", invite="inv-p")
    assert room.do(c.Disconnect(a, session=1)) == []
    assert room.state.members[a].connected


def test_private_note_goes_to_moderators_only_and_is_not_a_state_change(room: Room) -> None:
    mod, a, _ = circle_with_two(room)
    v = room.state.version
    events = room.do(c.PrivateNote(a, "Saya butuh bantuan", need_support=True))
    assert [(e.name, e.audience.kind, e.ephemeral) for e in events] == [
        (Name.PRIVATE_NOTE, AudienceKind.MODERATORS, True)]
    assert room.state.version == v and events[0].version == v
    assert room.refused(c.PrivateNote(a, "x" * 501)).code is Code.TOO_LONG


def test_end_stops_everything(room: Room) -> None:
    mod, a, _ = circle_with_two(room)
    events = room.do(c.End(mod))
    assert [e.name for e in events] == [Name.ENDED]
    assert room.refused(c.RaiseHand(a)).code is Code.ENDED


def test_airtime_counts_each_turn(room: Room) -> None:
    mod, a, b = circle_with_two(room)
    room.do(c.GiveFloor(mod, a))
    room.now += 42_000
    room.do(c.GiveFloor(mod, b))
    room.now += 5_000
    view = snapshot(room.state, mod, room.now)
    assert view["airtime"] == {mod: 0, a: 42, b: 5}
    assert "airtime" not in snapshot(room.state, a, room.now)
    assert "lobby" not in snapshot(room.state, a, room.now)


def test_targets_from_another_circle_are_no_such_member(room: Room) -> None:
    mod, a, _ = circle_with_two(room)
    assert room.refused(c.Mute(mod, "someone-else")).code is Code.NO_SUCH_MEMBER
    assert room.refused(c.GiveFloor(mod, "someone-else")).code is Code.NO_SUCH_MEMBER


def test_audible_event_tells_the_relay_when_who_is_heard_changes(room: Room) -> None:
    mod, a, _ = circle_with_two(room)
    room.do(c.GiveFloor(mod, a))
    events = room.do(c.UnmuteSelf(a))
    heard = [e for e in events if e.name is Name.AUDIBLE]
    assert heard and heard[0].data == {"members": [a, mod]}
    assert heard[0].audience.kind is AudienceKind.SERVER


@pytest.mark.parametrize("name", ["", "   ", "x" * 33, "Mel\x00ati", "Mel\u2028ati", "Mel\u202eati", "Mel\x85ati"])
def test_the_rules_refuse_a_pseudonym_the_wire_refuses(name: str) -> None:
    # One rule (rooms.rules.valid_name), which signaling.frames.clean_name applies too.
    assert valid_name(name) is None
    with pytest.raises(FrameError):
        clean_name(name)


def test_a_pseudonym_is_trimmed_and_may_carry_any_script() -> None:
    assert valid_name("  Budi 👨‍👩‍👧 ") == "Budi 👨‍👩‍👧"
    assert valid_name("ß" * 32) == "ß" * 32
