"""The wire frames of DESIGN §5 as typed msgspec structs, and their codec.

Every frame is one msgpack map tagged by its ``type`` string. Client frames are decoded
with :func:`decode_client_frame`, which raises :class:`FrameError` carrying an
:class:`ErrorCode` and never any other exception; server frames are encoded with
:func:`encode_server_frame`.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any, Final

import msgspec

from rooms.model import FloorMode, Language, Role
from rooms.rules import NAME_MAX, valid_name

MAX_FRAME_BYTES: Final = 64 * 1024
NAME_MAX_CHARS: Final = NAME_MAX
PRIVATE_NOTE_MAX_CHARS: Final = 500

# Generous ceilings so a single field cannot be absurd; the 64 KiB frame cap bounds the rest.
MemberId = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
Ref = int | None
_Token = Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]
_RawName = Annotated[str, msgspec.Meta(max_length=256)]
_ResumeSecret = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
_Seconds = Annotated[int, msgspec.Meta(ge=1, le=600)]
_NoteText = Annotated[str, msgspec.Meta(max_length=PRIVATE_NOTE_MAX_CHARS)]


class ErrorCode(enum.StrEnum):
    """The ``code`` of an ``error`` frame (DESIGN §5)."""

    BAD_FRAME = "bad_frame"
    UNKNOWN_TYPE = "unknown_type"
    FORBIDDEN = "forbidden"
    NOT_ALLOWED = "not_allowed"
    NO_SUCH_MEMBER = "no_such_member"
    RATE_LIMITED = "rate_limited"
    TOO_LONG = "too_long"
    CONFLICT = "conflict"
    UNAVAILABLE = "unavailable"


class FrameError(Exception):
    """A client frame was refused; ``ref`` is the frame's ``ref`` when it could be read."""

    def __init__(self, code: ErrorCode, message: str, ref: int | None = None) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message
        self.ref = ref


class _Frame(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="type"):
    pass


# ---------------------------------------------------------------- client frames


class Hello(_Frame, frozen=True, tag="hello"):
    """First frame of a connection. ``name`` is trimmed and checked by :func:`clean_name`."""

    token: _Token
    name: _RawName
    listen_only: bool = False
    resume: _ResumeSecret | None = None


class _Command(_Frame, frozen=True, kw_only=True):
    ref: Ref = None


class RaiseHand(_Command, frozen=True, tag="raise_hand"):
    pass


class LowerHand(_Command, frozen=True, tag="lower_hand"):
    pass


class GiveFloor(_Command, frozen=True, tag="give_floor"):
    member_id: MemberId


class Next(_Command, frozen=True, tag="next"):
    pass


class ReleaseFloor(_Command, frozen=True, tag="release_floor"):
    pass


class Pass(_Command, frozen=True, tag="pass"):
    pass


class ExtendTurn(_Command, frozen=True, tag="extend_turn"):
    seconds: _Seconds


class SetMode(_Command, frozen=True, tag="set_mode"):
    mode: FloorMode


class MuteSelf(_Command, frozen=True, tag="mute_self"):
    pass


class UnmuteSelf(_Command, frozen=True, tag="unmute_self"):
    pass


class Mute(_Command, frozen=True, tag="mute"):
    member_id: MemberId


class MuteAll(_Command, frozen=True, tag="mute_all"):
    pass


class AskUnmute(_Command, frozen=True, tag="ask_unmute"):
    member_id: MemberId


class Admit(_Command, frozen=True, tag="admit"):
    member_id: MemberId


class Decline(_Command, frozen=True, tag="decline"):
    member_id: MemberId


class Remove(_Command, frozen=True, tag="remove"):
    member_id: MemberId


class Lock(_Command, frozen=True, tag="lock"):
    pass


class Unlock(_Command, frozen=True, tag="unlock"):
    pass


class End(_Command, frozen=True, tag="end"):
    pass


class PrivateNote(_Command, frozen=True, tag="private_note"):
    text: _NoteText
    need_support: bool = False


class Leave(_Command, frozen=True, tag="leave"):
    pass


class LeaveQuietly(_Command, frozen=True, tag="leave_quietly"):
    need_support: bool = False


class Sync(_Command, frozen=True, tag="sync"):
    pass


class Offer(_Command, frozen=True, tag="offer"):
    sdp: str


ClientCommand = (
    RaiseHand
    | LowerHand
    | GiveFloor
    | Next
    | ReleaseFloor
    | Pass
    | ExtendTurn
    | SetMode
    | MuteSelf
    | UnmuteSelf
    | Mute
    | MuteAll
    | AskUnmute
    | Admit
    | Decline
    | Remove
    | Lock
    | Unlock
    | End
    | PrivateNote
    | Leave
    | LeaveQuietly
    | Sync
    | Offer
)
ClientFrame = Hello | ClientCommand

# ---------------------------------------------------------------- server frames

State = dict[str, Any]
"""A state snapshot (DESIGN §5 "State snapshot"); its shape is owned by the room layer."""


class LobbyCircle(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """All a lobby member learns of the circle."""

    title: str
    language: Language


class IceServer(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True,
                omit_defaults=True):
    """An RTCIceServer for this member's PeerConnection (TURN credentials minted for it)."""

    urls: str | list[str]
    username: str | None = None
    credential: str | None = None


class Welcome(_Frame, frozen=True, tag="welcome"):
    member_id: str
    role: Role
    resume: str
    now: int
    state: State
    ice_servers: list[IceServer] = []


class Lobby(_Frame, frozen=True, tag="lobby"):
    member_id: str
    resume: str
    now: int
    circle: LobbyCircle


class Admitted(_Frame, frozen=True, tag="admitted"):
    state: State
    ice_servers: list[IceServer] = []


class Redirect(_Frame, frozen=True, tag="redirect"):
    url: str


class Ack(_Frame, frozen=True, tag="ack"):
    ref: Ref
    version: int


class Error(_Frame, frozen=True, tag="error"):
    ref: Ref
    code: ErrorCode
    message: str


class Event(_Frame, frozen=True, tag="event"):
    version: int
    name: str
    data: dict[str, Any]


class Snapshot(_Frame, frozen=True, tag="snapshot"):
    version: int
    state: State


class Answer(_Frame, frozen=True, tag="answer"):
    sdp: str
    ref: Ref = None


class Media(_Frame, frozen=True, tag="media"):
    slots: list[str | None]


class Levels(_Frame, frozen=True, tag="levels"):
    """Speaking indicators (not a room event, no version): RFC 6464 levels, 0 loudest, 127
    silence, for the members heard now; sent at most a few times a second."""

    levels: dict[str, int]


ServerFrame = Welcome | Lobby | Admitted | Redirect | Ack | Error | Event | Snapshot | Answer | Media | Levels

# ---------------------------------------------------------------- codec

CLIENT_FRAME_TYPES: Final[frozenset[str]] = frozenset(
    str(cls.__struct_config__.tag) for cls in ClientFrame.__args__
)


class _TypeEnvelope(msgspec.Struct):
    type: str


class _RefEnvelope(msgspec.Struct):
    ref: Ref = None


class _UncappedPrivateNote(_Command, frozen=True, tag="private_note"):
    """``PrivateNote`` without the length cap: tells ``too_long`` apart from ``bad_frame``."""

    text: str
    need_support: bool = False


_client_decoder: Final[msgspec.msgpack.Decoder[ClientFrame]] = msgspec.msgpack.Decoder(ClientFrame)
_server_decoder: Final[msgspec.msgpack.Decoder[ServerFrame]] = msgspec.msgpack.Decoder(ServerFrame)
_type_decoder: Final = msgspec.msgpack.Decoder(_TypeEnvelope)
_ref_decoder: Final = msgspec.msgpack.Decoder(_RefEnvelope)
_uncapped_note_decoder: Final = msgspec.msgpack.Decoder(_UncappedPrivateNote)
_encoder: Final = msgspec.msgpack.Encoder()

# Everything msgspec may raise on hostile input: malformed msgpack and schema mismatches
# (DecodeError, ValidationError), bad UTF-8 (UnicodeDecodeError, a ValueError), deep nesting.
_DECODE_FAILURES: Final = (msgspec.DecodeError, ValueError, RecursionError)

def clean_name(raw: str) -> str:
    """Return the pseudonym trimmed, or raise ``FrameError(bad_frame)``.

    A name is 1–32 characters after trimming whitespace, with no control characters
    (Unicode category Cc), line or paragraph separators, or bidi overrides/isolates.
    """
    name = valid_name(raw)  # the rule is the room's (rooms.rules), written once
    if name is None:
        raise FrameError(ErrorCode.BAD_FRAME,
                         f"name must be 1-{NAME_MAX_CHARS} characters, without control characters")
    return name


def decode_client_frame(data: bytes) -> ClientFrame:
    """Decode one client frame, or raise :class:`FrameError`; never raises anything else.

    Codes: a value that is not a map, or has no known string ``type`` → ``unknown_type``;
    a private note over 500 characters → ``too_long``; more than ``MAX_FRAME_BYTES``
    → ``too_long`` (the WebSocket layer closes with 1009 before this is reached); anything
    else malformed (missing, wrongly typed or extra fields, bad UTF-8, deep nesting,
    truncated data) → ``bad_frame``. ``FrameError.ref`` echoes the frame's ``ref`` when it
    can still be read. A ``Hello`` is returned with its name already cleaned.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise FrameError(ErrorCode.BAD_FRAME, "frames are binary msgpack")
    if len(data) > MAX_FRAME_BYTES:
        raise FrameError(ErrorCode.TOO_LONG, f"frame larger than {MAX_FRAME_BYTES} bytes")
    try:
        frame = _client_decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise _classify(data, exc) from None
    except _DECODE_FAILURES:
        raise FrameError(ErrorCode.BAD_FRAME, "malformed msgpack") from None
    if isinstance(frame, Hello):
        return msgspec.structs.replace(frame, name=clean_name(frame.name))
    return frame


def _classify(data: bytes, exc: msgspec.ValidationError) -> FrameError:
    """Explain why a well-formed msgpack value is not a valid client frame."""
    ref = _recover_ref(data)
    try:
        frame_type = _type_decoder.decode(data).type
    except msgspec.ValidationError:
        return FrameError(ErrorCode.UNKNOWN_TYPE, "a frame is a map with a string `type`", ref)
    except _DECODE_FAILURES:
        return FrameError(ErrorCode.BAD_FRAME, "malformed msgpack", ref)
    if frame_type not in CLIENT_FRAME_TYPES:
        return FrameError(ErrorCode.UNKNOWN_TYPE, "unknown frame type", ref)
    if frame_type == "private_note" and _is_uncapped_note(data):
        return FrameError(ErrorCode.TOO_LONG, f"text longer than {PRIVATE_NOTE_MAX_CHARS} characters", ref)
    return FrameError(ErrorCode.BAD_FRAME, str(exc)[:200], ref)


def _recover_ref(data: bytes) -> int | None:
    try:
        return _ref_decoder.decode(data).ref
    except _DECODE_FAILURES:
        return None


def _is_uncapped_note(data: bytes) -> bool:
    try:
        _uncapped_note_decoder.decode(data)
    except _DECODE_FAILURES:
        return False
    return True


def encode_server_frame(frame: ServerFrame) -> bytes:
    """Encode a server frame as one msgpack map (shared encoder instance)."""
    return _encoder.encode(frame)


def encode_client_frame(frame: ClientFrame) -> bytes:
    """Encode a client frame (for tests)."""
    return _encoder.encode(frame)


def decode_server_frame(data: bytes) -> ServerFrame:
    """Decode a server frame (for tests); raises msgspec errors."""
    return _server_decoder.decode(data)
