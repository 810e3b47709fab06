"""The room rules: every decision about a circle's state, in one place.

`apply(state, command, now)` is the only way the state changes. It is pure: no clock (`now`
is given, epoch ms), no I/O, no randomness (ids and secrets come in the commands). A refused
command raises `RoomError` and leaves `state` untouched; an accepted one returns a new state
whose version is one more, with the events it caused, each carrying that version and the
audience the rules chose. A command that changes nothing returns the same state and no events.
Timers are deadlines in the state; `next_deadline` says when a `Tick` is due.
"""

from __future__ import annotations

import hmac
import unicodedata
from collections.abc import Callable
from typing import Any

from rooms import commands as c
from rooms.errors import Code, RoomError
from rooms.events import EVERYONE, MODERATORS, SERVER, Audience, Event, Name, only
from rooms.model import Floor, FloorMode, Invite, Member, Role, RoomState

WARNING_MS = 30_000  # the gentle warning before a turn ends (F5)
NOTE_MAX = 500
NAME_MAX = 32
EXTEND_MAX = 600
KNOCKS_PER_MINUTE = 10  # new lobby knocks a circle takes in a minute (DESIGN §5 "Who gets in")
KNOCK_WINDOW_MS = 60_000
DECLINED_FOR_MS = 10 * 60_000  # a declined address may not knock on the circle again for this long


class _Step:
    """The work area of one `apply`: the new state and the events so far."""

    __slots__ = ("state", "now", "version", "events", "changed")

    def __init__(self, state: RoomState, now: int) -> None:
        self.state = state
        self.now = now
        self.version = state.version + 1
        self.events: list[Event] = []
        self.changed = False

    def emit(self, name: Name, data: dict[str, Any], audience: Audience) -> None:
        event = Event(name, data, audience, self.version)
        if event.ephemeral:
            event = Event(name, data, audience, self.version - 1)
        else:
            self.changed = True
        self.events.append(event)

    # Lookups that refuse with the right code.

    def admitted(self, member_id: str) -> Member:
        m = self.state.members.get(member_id)
        if m is None:
            raise RoomError(Code.FORBIDDEN, "only admitted members may do this")
        return m

    def moderator(self, member_id: str) -> Member:
        m = self.admitted(member_id)
        if m.role is not Role.MODERATOR:
            raise RoomError(Code.FORBIDDEN, "only moderators may do this")
        return m

    def target(self, member_id: str) -> Member:
        m = self.state.members.get(member_id)
        if m is None:
            raise RoomError(Code.NO_SUCH_MEMBER, "no such member in this circle")
        return m

    def put(self, m: Member) -> None:
        if m.id in self.state.members:
            self.state.members[m.id] = m
        else:
            self.state.lobby[m.id] = m
        self.changed = True


# --- Views (what people are shown) ---------------------------------------------------------


def member_view(state: RoomState, m: Member) -> dict[str, Any]:
    return {"id": m.id, "name": m.name, "role": m.role.value, "seat": m.seat,
            "listen_only": m.listen_only, "muted": m.muted, "hand": m.id in state.queue,
            "connected": m.connected}


def lobby_view(m: Member) -> dict[str, Any]:
    return {"id": m.id, "name": m.name, "role": m.role.value}


def airtime(state: RoomState, now: int) -> dict[str, int]:
    """Seconds each admitted member has held the floor, the running turn included."""
    ms = {mid: state.airtime.get(mid, 0) for mid in state.members}
    if state.floor is not None and state.floor.holder in ms:
        ms[state.floor.holder] += max(0, now - state.floor.since)
    return {mid: v // 1000 for mid, v in ms.items()}


def snapshot(state: RoomState, viewer_id: str, now: int) -> dict[str, Any]:
    """The state as DESIGN §5 shows it to one admitted member (more for moderators)."""
    circle = state.circle
    view: dict[str, Any] = {
        "circle": {"id": circle.id, "title": circle.title, "topic": circle.topic,
                   "language": circle.language.value, "floor_mode": state.mode.value,
                   "turn_seconds": circle.turn_seconds, "capacity": circle.capacity,
                   "locked": state.locked},
        "version": state.version,
        "me": viewer_id,
        "members": [member_view(state, m) for m in state.members.values()],
        "floor": {"holder": state.floor.holder if state.floor else None,
                  "deadline": state.floor.deadline if state.floor else None},
        "queue": list(state.queue),
        "moderator_present": state.moderator_present,
    }
    viewer = state.members.get(viewer_id)
    if viewer is not None and viewer.role is Role.MODERATOR:
        view["lobby"] = [lobby_view(m) for m in state.lobby.values()]
        view["airtime"] = airtime(state, now)
    return view


def lobby_circle(state: RoomState) -> dict[str, Any]:
    """All a lobby member learns of the circle (F3, invariant 7)."""
    return {"title": state.circle.title, "language": state.circle.language.value}


def audible(state: RoomState) -> list[str]:
    """Who may be heard now (invariant 2), most important first: the floor holder, then
    moderators, then in `open` mode everyone else unmuted, by seat."""
    heard: list[str] = []
    holder = state.holder
    if holder is not None:
        m = state.members.get(holder)
        if m is not None and not m.muted and not m.listen_only and m.connected:
            heard.append(holder)
    for m in state.members.values():
        if m.id == holder or m.muted or m.listen_only or not m.connected:
            continue
        if m.role is Role.MODERATOR:
            heard.append(m.id)
    if state.mode is FloorMode.OPEN:
        for m in state.members.values():
            if m.id not in heard and not m.muted and not m.listen_only and m.connected:
                heard.append(m.id)
    return heard


def next_deadline(state: RoomState) -> int | None:
    """When a `Tick` is next due, or None."""
    due = [m.grace_deadline for m in (*state.members.values(), *state.lobby.values())
           if m.grace_deadline is not None]
    f = state.floor
    if f is not None:
        if not f.warned:
            due.append(f.deadline - WARNING_MS)
        elif not f.over:
            due.append(f.deadline)
    due.extend(state.declined.values())  # a declined address is forgotten on time
    return min(due) if due else None


def joined_member_id(state: RoomState, command: c.Join | c.Resume) -> str:
    """The member a `Join` seated (a personal invite joined twice keeps its first seat), or
    the one a `Resume` took back (its secret rotated to the new one)."""
    if isinstance(command, c.Resume):
        return next(m.id for m in (*state.members.values(), *state.lobby.values())
                    if m.resume_hash == command.new_resume_hash)
    return state.invite_holders.get(command.invite_id, command.member_id)


_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def valid_name(name: str) -> str | None:
    """The pseudonym rule, the one place it is written (DESIGN §5): the name trimmed, or None
    when it is not 1-32 characters or has a control character (Unicode Cc), a line or
    paragraph separator, or a bidi override or isolate (a name that reverses the text after it
    on everyone's screen)."""
    name = name.strip()
    if not 1 <= len(name) <= NAME_MAX:
        return None
    if any(unicodedata.category(ch) in ("Cc", "Zl", "Zp") or ch in _BIDI_CONTROLS for ch in name):
        return None
    return name


# --- The floor ------------------------------------------------------------------------------


def _release(step: _Step, announce: bool = True) -> None:
    s = step.state
    if s.floor is None:
        return
    holder = s.floor.holder
    s.airtime[holder] = s.airtime.get(holder, 0) + max(0, step.now - s.floor.since)
    s.floor = None
    step.changed = True
    if announce:
        step.emit(Name.FLOOR_RELEASED, {"member_id": holder}, EVERYONE)


def _give(step: _Step, member_id: str) -> None:
    s = step.state
    if not s.moderator_present:
        raise RoomError(Code.NOT_ALLOWED, "no moderator is present: the floor is frozen")
    m = s.members.get(member_id)
    if m is None:
        raise RoomError(Code.NO_SUCH_MEMBER, "no such member in this circle")
    if m.role is Role.MODERATOR or m.listen_only or not m.connected:
        raise RoomError(Code.NOT_ALLOWED, "that member cannot take the floor now")
    _release(step)
    if member_id in s.queue:
        s.queue.remove(member_id)
        step.emit(Name.HAND_LOWERED, {"member_id": member_id, "queue": list(s.queue)}, EVERYONE)
    deadline = step.now + s.circle.turn_seconds * 1000
    s.floor = Floor(member_id, step.now, deadline, warned=deadline - step.now < WARNING_MS)
    step.emit(Name.FLOOR_GIVEN, {"member_id": member_id, "deadline": deadline}, EVERYONE)


def _round_candidates(s: RoomState) -> list[Member]:
    return [m for m in s.members.values()
            if m.role is not Role.MODERATOR and not m.listen_only and m.connected]


def _next_in_round(s: RoomState) -> str | None:
    candidates = sorted(_round_candidates(s), key=lambda m: m.seat)
    if not candidates:
        return None
    after = s.members[s.holder].seat if s.holder in s.members else 0
    for m in candidates:
        if m.seat > after:
            return m.id
    return candidates[0].id


def _advance_round(step: _Step) -> None:
    """In `round` mode the floor moves on, unless no moderator is present (F11)."""
    s = step.state
    nxt = _next_in_round(s)
    if nxt is None or nxt == s.holder or not s.moderator_present:
        _release(step)
        return
    _give(step, nxt)


# --- Leaving --------------------------------------------------------------------------------


def _drop(step: _Step, m: Member) -> None:
    """Remove every trace of a member: roster, lobby, queue, floor, airtime (invariant 6)."""
    s = step.state
    s.members.pop(m.id, None)
    s.lobby.pop(m.id, None)
    if m.id in s.queue:
        s.queue.remove(m.id)
    if s.floor is not None and s.floor.holder == m.id:
        _release(step, announce=False)  # members see only the seat vanish (invariant 8)
    s.airtime.pop(m.id, None)
    if s.invite_holders.get(m.invite_id) == m.id:
        del s.invite_holders[m.invite_id]
    step.changed = True


def _leave(step: _Step, m: Member, quietly: bool, need_support: bool) -> None:
    admitted = m.id in step.state.members
    _drop(step, m)
    if admitted:
        step.emit(Name.MEMBER_LEFT, {"member_id": m.id}, EVERYONE)
    else:
        step.emit(Name.LOBBY_LEFT, {"member_id": m.id}, MODERATORS)
    if quietly:
        step.emit(Name.MEMBER_LEFT_QUIETLY, {"member_id": m.id, "need_support": need_support},
                  MODERATORS)
    step.emit(Name.LEFT, {"member_id": m.id}, SERVER)


# --- Handlers, one per command --------------------------------------------------------------


def _join(step: _Step, cmd: c.Join) -> None:
    s = step.state
    invite = s.invites.get(cmd.invite_id)
    if invite is None or invite.role is not cmd.role:
        raise RoomError(Code.BAD_INVITE, "this invite is not valid for this circle")
    if invite.id in s.revoked:
        raise RoomError(Code.BANNED, "this invite was revoked")
    holder_id = s.invite_holders.get(invite.id) if invite.for_one_person else None
    if holder_id is not None:  # the same person again: the newest connection takes the seat
        _take_over(step, s.find(holder_id), cmd.resume_hash)  # type: ignore[arg-type]
        return
    if s.locked:
        raise RoomError(Code.LOCKED, "the circle is locked")
    name = valid_name(cmd.name)
    if name is None:
        raise RoomError(Code.NOT_ALLOWED, "a pseudonym is 1-32 characters, no control characters")
    if cmd.member_id in s.members or cmd.member_id in s.lobby:
        raise RoomError(Code.NOT_ALLOWED, "member id already in use")
    # Moderators are never kept out by capacity nor kept waiting (F10): the lobby, bounded
    # on its own, can never lock the moderator out of their circle.
    screened = cmd.role is Role.GUEST or (
        cmd.role is Role.MEMBER and (s.circle.lobby or (s.screen_shared_links and not invite.personal)))
    if screened:
        _knock(step, cmd.knock_tag)
    elif cmd.role is not Role.MODERATOR and s.seated >= s.circle.capacity:
        raise RoomError(Code.FULL, "the circle is full")
    m = Member(id=cmd.member_id, name=name, role=cmd.role, invite_id=invite.id,
               listen_only=cmd.listen_only, muted=cmd.role is not Role.MODERATOR,
               resume_hash=cmd.resume_hash, knock_tag=cmd.knock_tag if screened else "")
    if invite.for_one_person:
        s.invite_holders[invite.id] = m.id
    if screened:
        s.lobby[m.id] = m
        step.emit(Name.LOBBY_WAITING, {"member": lobby_view(m)}, MODERATORS)
    else:
        _seat(step, m)


def _knock(step: _Step, tag: str) -> None:
    """A new knock on the lobby: refused when this address was just declined, when the
    lobby is full (`capacity` waiting), or when it took its 10 knocks of the last minute."""
    s = step.state
    now = step.now
    if tag and s.declined.get(tag, 0) > now:
        raise RoomError(Code.DECLINED, "declined from this circle a moment ago")
    if len(s.lobby) >= s.circle.capacity:
        raise RoomError(Code.FULL, "the lobby is full")
    recent = [t for t in s.knocks if t > now - KNOCK_WINDOW_MS]
    if len(recent) >= KNOCKS_PER_MINUTE:
        raise RoomError(Code.KNOCKS, "too many people knocked in the last minute")
    s.knocks = [*recent, now]


def _seat(step: _Step, m: Member) -> None:
    s = step.state
    m = m.with_(seat=s.next_seat)
    s.next_seat += 1
    s.members[m.id] = m
    step.emit(Name.MEMBER_JOINED, {"member": member_view(s, m)}, EVERYONE)


def _take_over(step: _Step, m: Member, resume_hash: str) -> None:
    was_away = not m.connected
    m = m.with_(connected=True, grace_deadline=None, session=m.session + 1, resume_hash=resume_hash)
    step.put(m)
    step.emit(Name.REPLACED, {"member_id": m.id, "session": m.session}, SERVER)
    if was_away and m.id in step.state.members:
        step.emit(Name.PRESENCE, {"member_id": m.id, "connected": True}, EVERYONE)


def _resume(step: _Step, cmd: c.Resume) -> None:
    s = step.state
    found = [m for m in (*s.members.values(), *s.lobby.values())
             if hmac.compare_digest(m.resume_hash, cmd.resume_hash)]
    if len(found) != 1 or found[0].invite_id != cmd.invite_id:
        raise RoomError(Code.BAD_RESUME, "this resume secret is not valid")
    m = found[0]
    if m.grace_deadline is not None and step.now >= m.grace_deadline:
        raise RoomError(Code.BAD_RESUME, "the grace period is over")
    _take_over(step, m, cmd.new_resume_hash)


def _disconnect(step: _Step, cmd: c.Disconnect) -> None:
    m = step.state.find(cmd.member_id)
    if m is None or m.session != cmd.session or not m.connected:
        return  # an older connection of a seat taken over, or already away
    deadline = step.now + step.state.circle.grace_seconds * 1000
    step.put(m.with_(connected=False, grace_deadline=deadline))
    if m.id in step.state.members:
        step.emit(Name.PRESENCE, {"member_id": m.id, "connected": False}, EVERYONE)


def _tick(step: _Step, cmd: c.Tick) -> None:
    s = step.state
    if any(until <= step.now for until in s.declined.values()):
        s.declined = {tag: until for tag, until in s.declined.items() if until > step.now}
        step.changed = True
    for m in [*s.members.values(), *s.lobby.values()]:
        if m.grace_deadline is not None and step.now >= m.grace_deadline:
            _leave(step, m, quietly=True, need_support=False)  # F12: grace over, leaves quietly
    f = s.floor
    if f is None:
        return
    if not f.over and step.now >= f.deadline:
        s.floor = Floor(f.holder, f.since, f.deadline, warned=True, over=True)
        step.emit(Name.TURN_OVER, {"member_id": f.holder}, MODERATORS)
        if s.mode is FloorMode.ROUND:
            _advance_round(step)
    elif not f.warned and step.now >= f.deadline - WARNING_MS:
        s.floor = Floor(f.holder, f.since, f.deadline, warned=True)
        data = {"member_id": f.holder, "remaining": max(0, (f.deadline - step.now) // 1000)}
        step.emit(Name.TURN_WARNING, data, only(f.holder))
        step.emit(Name.TURN_WARNING, data, MODERATORS)


def _create_invite(step: _Step, cmd: c.CreateInvite) -> None:
    if cmd.invite_id in step.state.invites:
        raise RoomError(Code.NOT_ALLOWED, "invite id already in use")
    personal = cmd.personal or cmd.role is Role.MODERATOR  # moderator invites: one person each
    step.state.invites[cmd.invite_id] = Invite(cmd.invite_id, cmd.role, personal, cmd.label)
    step.changed = True


def _end(step: _Step) -> None:
    step.state.ended = True
    step.changed = True
    step.emit(Name.ENDED, {}, SERVER)


def _end_by_moderator(step: _Step, actor: str) -> None:
    step.moderator(actor)
    _end(step)


def _raise_hand(step: _Step, cmd: c.RaiseHand) -> None:
    m = step.admitted(cmd.actor)
    s = step.state
    if m.role is Role.MODERATOR:
        raise RoomError(Code.FORBIDDEN, "moderators may always speak")
    if s.mode is not FloorMode.HANDS:
        raise RoomError(Code.NOT_ALLOWED, "hands are raised only in the hands mode")
    if m.listen_only:
        raise RoomError(Code.NOT_ALLOWED, "listening only: no microphone")
    if m.id in s.queue or s.holder == m.id:
        return
    s.queue.append(m.id)
    step.emit(Name.HAND_RAISED, {"member_id": m.id, "queue": list(s.queue)}, EVERYONE)


def _lower_hand(step: _Step, cmd: c.LowerHand) -> None:
    m = step.admitted(cmd.actor)
    if m.id not in step.state.queue:
        return
    step.state.queue.remove(m.id)
    step.emit(Name.HAND_LOWERED, {"member_id": m.id, "queue": list(step.state.queue)}, EVERYONE)


def _give_floor(step: _Step, cmd: c.GiveFloor) -> None:
    step.moderator(cmd.actor)
    _give(step, cmd.member_id)


def _next(step: _Step, cmd: c.Next) -> None:
    step.moderator(cmd.actor)
    s = step.state
    if s.mode is FloorMode.HANDS:
        if s.queue:
            _give(step, s.queue[0])
        elif s.floor is not None:
            _release(step)
        else:
            raise RoomError(Code.NOT_ALLOWED, "nobody is waiting for the floor")
    elif s.mode is FloorMode.ROUND:
        nxt = _next_in_round(s)
        if nxt is None:
            raise RoomError(Code.NOT_ALLOWED, "nobody can take the floor")
        if nxt == s.holder:
            _release(step)
        else:
            _give(step, nxt)
    else:
        raise RoomError(Code.NOT_ALLOWED, "there are no turns in the open mode")


def _release_floor(step: _Step, cmd: c.ReleaseFloor) -> None:
    m = step.admitted(cmd.actor)
    s = step.state
    if s.floor is None:
        raise RoomError(Code.NOT_ALLOWED, "nobody holds the floor")
    if m.role is not Role.MODERATOR and s.floor.holder != m.id:
        raise RoomError(Code.FORBIDDEN, "only the holder or a moderator may release the floor")
    if s.mode is FloorMode.ROUND:
        _advance_round(step)
    else:
        _release(step)


def _pass(step: _Step, cmd: c.Pass) -> None:
    m = step.admitted(cmd.actor)
    s = step.state
    if s.mode is not FloorMode.ROUND:
        raise RoomError(Code.NOT_ALLOWED, "passing is for the round mode")
    if s.holder != m.id:
        raise RoomError(Code.NOT_ALLOWED, "only the holder may pass")
    _advance_round(step)


def _extend_turn(step: _Step, cmd: c.ExtendTurn) -> None:
    step.moderator(cmd.actor)
    s = step.state
    if not 1 <= cmd.seconds <= EXTEND_MAX:
        raise RoomError(Code.NOT_ALLOWED, "a turn is extended by 1-600 seconds")
    f = s.floor
    if f is None:
        raise RoomError(Code.NOT_ALLOWED, "nobody holds the floor")
    deadline = max(f.deadline, step.now) + cmd.seconds * 1000
    s.floor = Floor(f.holder, f.since, deadline, warned=deadline - step.now < WARNING_MS)
    step.emit(Name.FLOOR_GIVEN, {"member_id": f.holder, "deadline": deadline}, EVERYONE)


def _set_mode(step: _Step, cmd: c.SetMode) -> None:
    step.moderator(cmd.actor)
    s = step.state
    if s.mode is cmd.mode:
        return
    _release(step)
    s.queue.clear()  # clients clear the queue on `mode_changed`
    s.mode = cmd.mode
    step.emit(Name.MODE_CHANGED, {"mode": cmd.mode.value}, EVERYONE)


def _mute_self(step: _Step, cmd: c.MuteSelf) -> None:
    m = step.admitted(cmd.actor)
    if m.muted:
        return
    step.put(m.with_(muted=True))
    step.emit(Name.MUTED, {"member_id": m.id, "by": "self"}, EVERYONE)


def _unmute_self(step: _Step, cmd: c.UnmuteSelf) -> None:
    m = step.admitted(cmd.actor)
    if m.listen_only:
        raise RoomError(Code.NOT_ALLOWED, "listening only: no microphone")
    if not m.muted:
        return
    step.put(m.with_(muted=False))
    step.emit(Name.UNMUTED, {"member_id": m.id}, EVERYONE)


def _mute(step: _Step, cmd: c.Mute) -> None:
    step.moderator(cmd.actor)
    m = step.target(cmd.member_id)
    if m.muted:
        return
    step.put(m.with_(muted=True))
    step.emit(Name.MUTED, {"member_id": m.id, "by": "moderator"}, EVERYONE)


def _mute_all(step: _Step, cmd: c.MuteAll) -> None:
    step.moderator(cmd.actor)
    for m in list(step.state.members.values()):
        if m.role is not Role.MODERATOR and not m.muted:
            step.put(m.with_(muted=True))
            step.emit(Name.MUTED, {"member_id": m.id, "by": "moderator"}, EVERYONE)


def _ask_unmute(step: _Step, cmd: c.AskUnmute) -> None:
    step.moderator(cmd.actor)
    m = step.target(cmd.member_id)
    if m.listen_only or not m.muted:
        raise RoomError(Code.NOT_ALLOWED, "that member is not muted or has no microphone")
    step.emit(Name.UNMUTE_REQUESTED, {}, only(m.id))


def _admit(step: _Step, cmd: c.Admit) -> None:
    step.moderator(cmd.actor)
    s = step.state
    m = s.lobby.pop(cmd.member_id, None)
    if m is None:
        raise RoomError(Code.NO_SUCH_MEMBER, "nobody with that id is waiting")
    if s.seated >= s.circle.capacity:
        raise RoomError(Code.NOT_ALLOWED, "the circle is full")
    step.emit(Name.LOBBY_LEFT, {"member_id": m.id}, MODERATORS)
    _seat(step, m.with_(knock_tag=""))
    step.emit(Name.ADMITTED, {"member_id": m.id}, SERVER)


def _decline(step: _Step, cmd: c.Decline) -> None:
    step.moderator(cmd.actor)
    m = step.state.lobby.get(cmd.member_id)
    if m is None:
        raise RoomError(Code.NO_SUCH_MEMBER, "nobody with that id is waiting")
    _drop(step, m)
    if m.knock_tag:  # the same address cannot knock again at once (DESIGN §5)
        step.state.declined[m.knock_tag] = step.now + DECLINED_FOR_MS
    step.emit(Name.LOBBY_LEFT, {"member_id": m.id}, MODERATORS)
    step.emit(Name.DECLINED, {"member_id": m.id}, SERVER)


def _remove(step: _Step, cmd: c.Remove) -> None:
    step.moderator(cmd.actor)
    s = step.state
    m = s.find(cmd.member_id)
    if m is None:
        raise RoomError(Code.NO_SUCH_MEMBER, "no such member in this circle")
    if m.id == cmd.actor:
        raise RoomError(Code.NOT_ALLOWED, "use leave to leave")
    invite = s.invites.get(m.invite_id)
    if invite is not None and invite.for_one_person:
        s.revoked.add(invite.id)  # the ban sticks (F10): a removed moderator's link is dead too
    _out(step, m)


def _out(step: _Step, m: Member) -> None:
    """A member put out of the circle (removed, or their invite revoked): every trace gone,
    and from now on shared links go through the lobby (F10)."""
    s = step.state
    admitted = m.id in s.members
    _drop(step, m)
    s.screen_shared_links = True
    if admitted:
        step.emit(Name.MEMBER_REMOVED, {"member_id": m.id}, EVERYONE)
    else:
        step.emit(Name.LOBBY_LEFT, {"member_id": m.id}, MODERATORS)
    step.emit(Name.REMOVED, {"member_id": m.id}, SERVER)


def _revoke_invite(step: _Step, cmd: c.RevokeInvite) -> None:
    s = step.state
    if cmd.invite_id not in s.invites:
        raise RoomError(Code.BAD_INVITE, "no such invite in this circle")
    if cmd.invite_id not in s.revoked:
        s.revoked.add(cmd.invite_id)
        step.changed = True
    for m in [*s.members.values(), *s.lobby.values()]:
        if m.invite_id == cmd.invite_id:
            _out(step, m)


def _set_lock(step: _Step, actor: str, locked: bool) -> None:
    step.moderator(actor)
    if step.state.locked is locked:
        return
    step.state.locked = locked
    step.emit(Name.LOCKED, {"locked": locked}, EVERYONE)


def _private_note(step: _Step, cmd: c.PrivateNote) -> None:
    m = step.admitted(cmd.actor)
    if len(cmd.text) > NOTE_MAX:
        raise RoomError(Code.TOO_LONG, "a private note is at most 500 characters")
    data = {"member_id": m.id, "text": cmd.text, "need_support": cmd.need_support}
    step.emit(Name.PRIVATE_NOTE, data, MODERATORS)


def _leave_cmd(step: _Step, actor: str, quietly: bool, need_support: bool) -> None:
    m = step.state.find(actor)
    if m is None:
        raise RoomError(Code.FORBIDDEN, "not in this circle")
    _leave(step, m, quietly, need_support)


_HANDLERS: dict[type, Callable[[_Step, Any], None]] = {
    c.Join: _join,
    c.Resume: _resume,
    c.Disconnect: _disconnect,
    c.Tick: _tick,
    c.CreateInvite: _create_invite,
    c.RevokeInvite: _revoke_invite,
    c.EndByOrganizer: lambda step, cmd: _end(step),
    c.RaiseHand: _raise_hand,
    c.LowerHand: _lower_hand,
    c.GiveFloor: _give_floor,
    c.Next: _next,
    c.ReleaseFloor: _release_floor,
    c.Pass: _pass,
    c.ExtendTurn: _extend_turn,
    c.SetMode: _set_mode,
    c.MuteSelf: _mute_self,
    c.UnmuteSelf: _unmute_self,
    c.Mute: _mute,
    c.MuteAll: _mute_all,
    c.AskUnmute: _ask_unmute,
    c.Admit: _admit,
    c.Decline: _decline,
    c.Remove: _remove,
    c.Lock: lambda step, cmd: _set_lock(step, cmd.actor, True),
    c.Unlock: lambda step, cmd: _set_lock(step, cmd.actor, False),
    c.End: lambda step, cmd: _end_by_moderator(step, cmd.actor),
    c.PrivateNote: _private_note,
    c.Leave: lambda step, cmd: _leave_cmd(step, cmd.actor, False, False),
    c.LeaveQuietly: lambda step, cmd: _leave_cmd(step, cmd.actor, True, cmd.need_support),
}


def apply(state: RoomState, command: c.Command, now: int) -> tuple[RoomState, list[Event]]:
    """Apply one command at time `now` (epoch ms). See the module docstring for the promise."""
    if state.ended:
        raise RoomError(Code.ENDED, "the circle has ended")
    handler = _HANDLERS.get(type(command))
    if handler is None:
        raise TypeError(f"not a room command: {command!r}")
    step = _Step(state.copy(), now)
    handler(step, command)
    if not step.changed:
        return state, step.events  # nothing changed; ephemeral events only, if any
    new = step.state
    new.version = step.version
    # Who is present and who may be heard follow from the members (in seat order), the floor
    # and the mode alone: when none of them changed (a hand raised, say), neither did those.
    if (new.floor is state.floor and new.mode is state.mode and new.members == state.members
            and list(new.members) == list(state.members)):
        return new, step.events
    present = new.moderator_present
    if present != state.moderator_present:
        step.emit(Name.MODERATOR_PRESENT, {"present": present}, EVERYONE)
    heard = audible(new)
    if heard != audible(state):
        step.emit(Name.AUDIBLE, {"members": heard}, SERVER)
    return new, step.events
