"""WebSocket close codes of the wire protocol (DESIGN §5)."""

from __future__ import annotations

import enum


class CloseCode(enum.IntEnum):
    """Why the server closed a connection; the client decides what to show from the code."""

    GOING_AWAY = 1001
    """The server is shutting down (drain); reconnect with the resume secret."""
    TOO_BIG = 1009
    """A frame larger than 64 KiB."""
    TRY_AGAIN_LATER = 1013
    """The store cannot be reached; nothing changed."""
    ENDED = 4000
    """The moderator ended the circle (or it was deleted)."""
    LEFT = 4001
    """The client sent ``leave`` or ``leave_quietly``."""
    REDIRECT = 4300
    """The circle lives on another process; sent after a ``redirect`` frame."""
    BAD_FIRST_FRAME = 4400
    """The first frame was not a valid ``hello``."""
    BAD_TOKEN = 4401
    """Bad, expired or forged token, or a dead resume secret."""
    REFUSED = 4403
    """Removed, declined (also a new knock from a just-declined address), an invite revoked,
    or the circle is locked."""
    NO_SUCH_CIRCLE = 4404
    """No such circle, or it has ended."""
    HELLO_TIMEOUT = 4408
    """No ``hello`` within 10 s."""
    FULL = 4409
    """The circle is at capacity, or its lobby is full."""
    FLOOD = 4429
    """Far over the rate limit (see ``signaling.ratelimit``), or the lobby took its 10 new
    knocks of the last minute."""
