"""Typed refusals. A refused command raises `RoomError` and changes nothing."""

from __future__ import annotations

import enum


class Code(enum.StrEnum):
    # Answered to a command as `error {code}` (DESIGN §5):
    FORBIDDEN = "forbidden"  # wrong role
    NOT_ALLOWED = "not_allowed"  # the rules refuse now
    NO_SUCH_MEMBER = "no_such_member"
    TOO_LONG = "too_long"
    # Answered to a join or resume with a close code:
    BAD_INVITE = "bad_invite"  # 4401: unknown invite, or the token's role does not match it
    BAD_RESUME = "bad_resume"  # 4401: wrong or dead resume secret
    BANNED = "banned"  # 4403: a removed member's personal invite
    LOCKED = "locked"  # 4403
    FULL = "full"  # 4409: capacity reached, or the lobby is full
    KNOCKS = "too_many_knocks"  # 4429: the lobby took 10 new knocks in the last minute
    DECLINED = "declined"  # 4403: this address was declined from this lobby a moment ago
    ENDED = "ended"  # 4404


class RoomError(Exception):
    def __init__(self, code: Code, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
