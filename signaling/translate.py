"""Frames to commands and rule refusals to wire answers: the pure middle of signaling."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rooms import commands as c
from rooms.errors import Code
from rooms.events import AudienceKind, Event
from signaling import frames as f
from signaling.close import CloseCode

_BY_FRAME: dict[type, Callable[[Any, str], c.Command]] = {
    f.RaiseHand: lambda fr, me: c.RaiseHand(me),
    f.LowerHand: lambda fr, me: c.LowerHand(me),
    f.GiveFloor: lambda fr, me: c.GiveFloor(me, fr.member_id),
    f.Next: lambda fr, me: c.Next(me),
    f.ReleaseFloor: lambda fr, me: c.ReleaseFloor(me),
    f.Pass: lambda fr, me: c.Pass(me),
    f.ExtendTurn: lambda fr, me: c.ExtendTurn(me, fr.seconds),
    f.SetMode: lambda fr, me: c.SetMode(me, fr.mode),
    f.MuteSelf: lambda fr, me: c.MuteSelf(me),
    f.UnmuteSelf: lambda fr, me: c.UnmuteSelf(me),
    f.Mute: lambda fr, me: c.Mute(me, fr.member_id),
    f.MuteAll: lambda fr, me: c.MuteAll(me),
    f.AskUnmute: lambda fr, me: c.AskUnmute(me, fr.member_id),
    f.Admit: lambda fr, me: c.Admit(me, fr.member_id),
    f.Decline: lambda fr, me: c.Decline(me, fr.member_id),
    f.Remove: lambda fr, me: c.Remove(me, fr.member_id),
    f.Lock: lambda fr, me: c.Lock(me),
    f.Unlock: lambda fr, me: c.Unlock(me),
    f.End: lambda fr, me: c.End(me),
    f.PrivateNote: lambda fr, me: c.PrivateNote(me, fr.text, fr.need_support),
    f.Leave: lambda fr, me: c.Leave(me),
    f.LeaveQuietly: lambda fr, me: c.LeaveQuietly(me, fr.need_support),
}


def to_command(frame: f.ClientCommand, member_id: str) -> c.Command | None:
    """The room command a frame asks for, or None for frames the session answers itself
    (`sync`, `offer`)."""
    make = _BY_FRAME.get(type(frame))
    return make(frame, member_id) if make else None


_ERROR_CODES = {
    Code.FORBIDDEN: f.ErrorCode.FORBIDDEN,
    Code.NOT_ALLOWED: f.ErrorCode.NOT_ALLOWED,
    Code.NO_SUCH_MEMBER: f.ErrorCode.NO_SUCH_MEMBER,
    Code.TOO_LONG: f.ErrorCode.TOO_LONG,
}

_JOIN_CLOSES = {
    Code.BAD_INVITE: CloseCode.BAD_TOKEN,
    Code.BAD_RESUME: CloseCode.BAD_TOKEN,
    Code.BANNED: CloseCode.REFUSED,
    Code.LOCKED: CloseCode.REFUSED,
    Code.FULL: CloseCode.FULL,
    Code.KNOCKS: CloseCode.FLOOD,
    Code.DECLINED: CloseCode.REFUSED,
    Code.ENDED: CloseCode.NO_SUCH_CIRCLE,
    Code.NOT_ALLOWED: CloseCode.BAD_FIRST_FRAME,  # a pseudonym the rules refuse
}


def error_code(code: Code) -> f.ErrorCode:
    """The `error` code for a refused command."""
    return _ERROR_CODES.get(code, f.ErrorCode.NOT_ALLOWED)


def join_close_code(code: Code) -> CloseCode:
    """The close code for a refused `hello`."""
    return _JOIN_CLOSES.get(code, CloseCode.REFUSED)


def visible_to(event: Event, member_id: str, is_moderator: bool, admitted: bool) -> bool:
    """Whether one connection may see an event: lobby members see none (invariant 7)."""
    if not admitted or event.audience.kind is AudienceKind.SERVER:
        return False
    return event.audience.includes(member_id, is_moderator)


def event_frame(event: Event) -> f.Event:
    return f.Event(version=event.version, name=event.name.value, data=event.data)
