"""One connection's protocol as a state machine with no I/O, in the manner of h11 and of
websockets' `protocol.py`.

It is fed what happens — the first frame, the answer to the join, every later frame, the
circle's events, the answers to what it asked for — and it answers with what to do: frames to
send (`data_to_send`), a close (`close_to_send`), and requests for the adapter
(`signaling.session`), which owns the socket, the tasks and the store:

- `Execute(ref, command)`: run a room command; answer with `executed` or `failed`.
- `Load(ref)`: load the circle's state for a `sync`; answer with `loaded` or `failed`.
- `Admit()`: load the state to admit this lobby member with; answer with `admission_loaded`.
- `AnswerOffer(ref, sdp, listen_only)`: negotiate media; answer with `answered`/`offer_refused`.
- `CloseMedia()`: take this member out of the media now, before the leave is executed (F8).

Nothing here awaits, reads a clock of its own, or touches a socket: the tests drive it
frame by frame (tests/signaling/test_connection.py), and the fuzzer pushes a million frames a
minute through it with the manager and the rules (tests/fuzz).

The phases: `HELLO` (nothing received) → `JOINING` (a `Join`/`Resume` is being executed) →
`OPEN` → `CLOSED` (a close was asked for: nothing more is sent).
"""

from __future__ import annotations

import enum
import hashlib
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from rooms import commands as c
from rooms.errors import Code, RoomError
from rooms.events import AudienceKind, Event, Name
from rooms.model import Role, RoomState
from rooms.rules import joined_member_id, lobby_circle, snapshot
from signaling import frames as f
from signaling import tokens
from signaling.addresses import keyed
from signaling.close import CloseCode
from signaling.ratelimit import RateLimiter, Verdict
from signaling.translate import error_code, event_frame, join_close_code, to_command, visible_to
from signaling.turn import IceServers
from storage.codec import CorruptState
from storage.manager import Busy
from storage.store import NoSuchCircle, StaleOwner, StoreError
from storage.subscription import Closed, Item, Resync

log = logging.getLogger("lingkar.session")

NO_ICE_SERVERS = IceServers()
_EVERYONE = AudienceKind.EVERYONE


def resume_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def encode_event(event: Event) -> bytes:
    return f.encode_server_frame(event_frame(event))


# --- what the machine asks for ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Execute:
    ref: int | None
    command: c.Command


@dataclass(frozen=True, slots=True)
class Load:
    ref: int | None


@dataclass(frozen=True, slots=True)
class Admit:
    pass


@dataclass(frozen=True, slots=True)
class AnswerOffer:
    ref: int | None
    sdp: str
    listen_only: bool


@dataclass(frozen=True, slots=True)
class CloseMedia:
    pass


Request = Execute | Load | Admit | AnswerOffer | CloseMedia


@dataclass(frozen=True, slots=True)
class JoinRequest:
    """What a valid `hello` asks for: execute `command` (a `Join` or a `Resume`) on
    `circle_id`, once the join step has found this process to be the circle's home."""

    circle_id: str
    command: c.Join | c.Resume


class Phase(enum.Enum):
    HELLO = "hello"
    JOINING = "joining"
    OPEN = "open"
    CLOSED = "closed"


@dataclass(frozen=True)
class Limits:
    hello_seconds: float = 10.0
    rate: float = 20.0
    burst: int = 40
    send_queue: int = 512


DEFAULT_LIMITS = Limits()


class Connection:
    """The protocol of one WebSocket connection, from `hello` to its close."""

    def __init__(self, *, secret: str, limits: Limits = DEFAULT_LIMITS, address: str = "",
                 ice: IceServers = NO_ICE_SERVERS,
                 encode: Callable[[Event], bytes] = encode_event,
                 token: Callable[[], str] = tokens.new_resume_secret,
                 member_token: Callable[[], str] = lambda: secrets.token_hex(8)) -> None:
        self.secret = secret  # verifies join tokens, keys the address tag
        self.limits = limits
        self.address = address  # the client's address, as the limits see it (never logged)
        self.ice = ice  # STUN servers, and TURN credentials minted for this member
        self._encode = encode
        self._token = token
        self._member_token = member_token
        self.phase = Phase.HELLO
        self.circle_id = ""
        self.member_id = ""
        self.role = Role.MEMBER
        self.listen_only = False
        self.admitted = False
        self.seat_session = 0
        self.last_version = 0  # the version of the last snapshot sent (welcome, admitted, sync)
        self.gone = False  # left, removed, declined, ended or replaced: no Disconnect
        self._new_secret = ""
        self._limiter: RateLimiter | None = None
        self._out: list[bytes] = []
        self._close: tuple[int, str] | None = None
        self._close_taken = False
        self._command: Execute | None = None  # in flight: its answer goes out with its ack
        self._deferred_close: tuple[int, str] | None = None
        self._held: list[Item] | None = None  # items that arrive while an admission loads
        self.errors: list[str] = []  # error codes sent since the adapter last looked

    # --- output ---------------------------------------------------------------------------

    def data_to_send(self) -> list[bytes]:
        """Frames to write, in order. While a command is in flight they are held, so that its
        own event and its `ack` leave in one write."""
        if self._command is not None or not self._out:
            return []
        out, self._out = self._out, []
        return out

    def close_to_send(self) -> tuple[int, str] | None:
        """The close (code, reason) to send after `data_to_send`, once."""
        if self._close is None or self._close_taken or self._command is not None:
            return None
        self._close_taken = True
        return self._close

    @property
    def closing(self) -> bool:
        return self.phase is Phase.CLOSED

    def send(self, frame: f.ServerFrame) -> None:
        self.send_encoded(f.encode_server_frame(frame))

    def send_encoded(self, data: bytes) -> None:
        if self.phase is not Phase.CLOSED:
            self._out.append(data)

    def encode_with(self, encode: Callable[[Event], bytes]) -> None:
        """Encode events with `encode` from now on (the adapter's, while it is subscribed:
        a frame made once for all the members one delivery reaches)."""
        self._encode = encode

    def close(self, code: int, reason: str = "") -> None:
        """Close after what is queued. While a command of this connection is in flight the
        close waits for its answer: the moderator who ends the circle, or a member who leaves,
        gets the `ack` before the close (the event that closes them comes first)."""
        if self.phase is Phase.CLOSED:
            return
        if self._command is not None:
            if self._deferred_close is None:
                self._deferred_close = (code, reason)
            return
        self.phase = Phase.CLOSED
        self._close = (code, reason)

    def _error(self, ref: int | None, code: f.ErrorCode, message: str) -> None:
        self.errors.append(code.value)
        self.send(f.Error(ref=ref, code=code, message=message))

    # --- hello ----------------------------------------------------------------------------

    def hello(self, data: bytes | str) -> JoinRequest | None:
        """The first frame. A valid hello with a valid token asks to join (or resume); else
        None and a close is due."""
        assert self.phase is Phase.HELLO
        if not isinstance(data, bytes):
            self.close(CloseCode.BAD_FIRST_FRAME, "binary msgpack hello expected")
            return None
        try:
            hello = f.decode_client_frame(data)
        except f.FrameError:
            hello = None
        if not isinstance(hello, f.Hello):
            self.close(CloseCode.BAD_FIRST_FRAME, "hello expected")
            return None
        circle_id = tokens.unverified_circle(hello.token)
        try:
            if circle_id is None:
                raise tokens.TokenError(tokens.TokenProblem.INVALID)
            claims = tokens.verify(self.secret, hello.token, circle_id)
        except tokens.TokenError as err:
            log.info("token refused", extra={"problem": err.problem.value})
            self.close(CloseCode.BAD_TOKEN, "bad token")
            return None
        self.circle_id = circle_id
        self._new_secret = self._token()
        command: c.Join | c.Resume
        if hello.resume is not None:
            command = c.Resume(claims.invite_id, resume_hash(hello.resume), resume_hash(self._new_secret))
        else:
            command = c.Join(member_id=self._member_token(), invite_id=claims.invite_id,
                             role=Role(claims.role), name=hello.name, listen_only=hello.listen_only,
                             resume_hash=resume_hash(self._new_secret),
                             knock_tag=keyed(self.secret, circle_id, self.address) if self.address else "")
        self.phase = Phase.JOINING
        return JoinRequest(circle_id, command)

    def redirect(self, url: str) -> None:
        """The circle lives on another process (DESIGN §8)."""
        self.send(f.Redirect(url=url))
        self.close(CloseCode.REDIRECT, "the circle lives on another process")

    def join_failed(self, exc: BaseException) -> None:
        if isinstance(exc, RoomError):
            log.info("join refused", extra={"code": exc.code.value})
            self.close(join_close_code(exc.code), exc.code.value)
        elif isinstance(exc, NoSuchCircle):
            self.close(CloseCode.NO_SUCH_CIRCLE, "no such circle")
        elif isinstance(exc, StoreError | CorruptState | Busy):
            self.close(CloseCode.TRY_AGAIN_LATER, "try again later")
        else:
            raise exc

    def joined(self, request: JoinRequest, state: RoomState, now_ms: int, monotonic: float) -> None:
        """The join (or resume) was executed: `welcome`, or `lobby` for a knock."""
        assert self.phase is Phase.JOINING
        self.member_id = joined_member_id(state, request.command)
        me = state.find(self.member_id)
        assert me is not None
        self.phase = Phase.OPEN
        self.role = me.role
        self.listen_only = me.listen_only
        self.seat_session = me.session
        self.admitted = self.member_id in state.members
        self.last_version = state.version
        self._limiter = RateLimiter(monotonic, rate=self.limits.rate, burst=self.limits.burst)
        if self.admitted:
            self.send(f.Welcome(member_id=self.member_id, role=me.role, resume=self._new_secret,
                                now=now_ms, state=snapshot(state, self.member_id, now_ms),
                                ice_servers=self._ice_servers(now_ms)))
        else:
            lc = lobby_circle(state)
            self.send(f.Lobby(member_id=self.member_id, resume=self._new_secret, now=now_ms,
                              circle=f.LobbyCircle(title=lc["title"], language=lc["language"])))
        self._new_secret = ""

    # --- frames in ------------------------------------------------------------------------

    def receive(self, data: bytes | str, monotonic: float) -> list[Request]:
        """A frame after the hello: what to do for it (nothing, when it was answered here)."""
        if self.phase is not Phase.OPEN:
            return []
        assert self._limiter is not None
        verdict = self._limiter.check(monotonic)
        if verdict is Verdict.CLOSE:
            self.close(CloseCode.FLOOD, "too many frames")
            return []
        if verdict is Verdict.REFUSE:
            self._error(None, f.ErrorCode.RATE_LIMITED, "slow down")
            return []
        if not isinstance(data, bytes):
            self._error(None, f.ErrorCode.BAD_FRAME, "frames are binary msgpack")
            return []
        try:
            frame = f.decode_client_frame(data)
        except f.FrameError as err:
            self._error(err.ref, err.code, err.message)
            return []
        if isinstance(frame, f.Hello):
            self._error(None, f.ErrorCode.BAD_FRAME, "already joined")
            return []
        ref = frame.ref
        if isinstance(frame, f.Sync):
            if not self.admitted:
                self._error(ref, error_code(Code.FORBIDDEN), "not admitted yet")
                return []
            return [Load(ref)]
        if isinstance(frame, f.Offer):
            if not self.admitted:
                self._error(ref, error_code(Code.FORBIDDEN), "lobby members have no media")
                return []
            return [AnswerOffer(ref, frame.sdp, self.listen_only)]
        command = to_command(frame, self.member_id)
        assert command is not None
        self._command = Execute(ref, command)
        if isinstance(frame, f.LeaveQuietly):
            return [CloseMedia(), self._command]  # in the same step (F8)
        return [self._command]

    @property
    def in_command(self) -> bool:
        return self._command is not None

    def executed(self, version: int) -> None:
        """The command in flight succeeded, at this room version."""
        command = self._command
        assert command is not None
        self.send(f.Ack(ref=command.ref, version=version))
        self._done()
        if isinstance(command.command, c.Leave | c.LeaveQuietly):
            self.gone = True
            self.close(CloseCode.LEFT, "left")

    def failed(self, ref: int | None, exc: BaseException) -> None:
        """What was asked for (the command in flight, a sync's load) was refused."""
        if isinstance(exc, RoomError):
            self._error(ref, error_code(exc.code), exc.message)
        elif isinstance(exc, Busy):
            self._error(ref, f.ErrorCode.CONFLICT, "busy, try again")
        elif isinstance(exc, NoSuchCircle):
            self.gone = True
            self._done()
            self.close(CloseCode.ENDED, "ended")
        elif isinstance(exc, StaleOwner):
            self._error(ref, f.ErrorCode.UNAVAILABLE,
                        "this process is not the circle's home now; nothing changed")
        elif isinstance(exc, StoreError | CorruptState):
            self._error(ref, f.ErrorCode.UNAVAILABLE, "the store cannot be reached; nothing changed")
        else:
            self._done()
            raise exc
        self._done()

    def _done(self) -> None:
        if self._command is None:
            return
        self._command = None
        deferred, self._deferred_close = self._deferred_close, None
        if deferred is not None:
            self.close(*deferred)

    def loaded(self, state: RoomState, now_ms: int) -> None:
        """The state a `sync` asked for."""
        self._send_snapshot(state, now_ms)

    def answered(self, ref: int | None, sdp: str, slots: list[str | None] | None) -> None:
        self.send(f.Answer(sdp=sdp, ref=ref))
        if slots is not None:
            self.send(f.Media(slots=slots))

    def offer_refused(self, ref: int | None, reason: str) -> None:
        self._error(ref, f.ErrorCode.BAD_FRAME, f"offer refused: {reason}")

    def lost(self) -> c.Disconnect | None:
        """The socket is gone: the command that starts the seat's grace period (F12), unless
        the member left, was removed, or a newer connection holds the seat."""
        self.phase = Phase.CLOSED
        if self.gone or not self.member_id:
            return None
        return c.Disconnect(self.member_id, self.seat_session)

    # --- media, as the relay reports it ---------------------------------------------------

    def media(self, slots: list[str | None]) -> None:
        self.send(f.Media(slots=slots))

    def levels(self, data: bytes) -> None:
        """An encoded `levels` frame (encoded once for the whole circle)."""
        if self.admitted:
            self.send_encoded(data)

    # --- events out -----------------------------------------------------------------------

    def item(self, item: Item, now_ms: int) -> list[Request]:
        """One item from the circle's subscription. While an admission loads, items wait."""
        if self._held is not None:
            self._held.append(item)
            return []
        if isinstance(item, Closed):
            self.gone = True
            self.close(CloseCode.ENDED, "ended")
        elif isinstance(item, Resync):
            if not self._still_here(item.state):
                return []
            if not self.admitted and self.member_id in item.state.members:
                return self._start_admission()  # admitted in events this process never saw
            self._send_snapshot(item.state, now_ms)
        else:
            return self._deliver(item)
        return []

    def deliverable(self, event: Event) -> bytes | None:
        """The common case of `item`, decided in one step: an event for everyone, newer than
        this client's snapshot, reaching an admitted member while nothing else is pending
        (open, no admission loading, no command in flight, nothing waiting to be sent): its
        frame, to be written now; nothing is recorded. None: not that case — hand the item to
        `item`, which decides every case (this one the same way)."""
        if (self._out or self._command is not None or self._held is not None
                or self.phase is not Phase.OPEN or not self.admitted
                or event.audience.kind is not _EVERYONE
                or event.version <= self.last_version):
            return None
        return self._encode(event)

    def _deliver(self, event: Event) -> list[Request]:
        if not event.ephemeral and event.version <= self.last_version:
            return []  # already part of the snapshot this client was sent
        if event.for_server:
            return self._act_on(event)
        if visible_to(event, self.member_id, self.role is Role.MODERATOR, self.admitted):
            self.send_encoded(self._encode(event))
        return []

    def _act_on(self, event: Event) -> list[Request]:
        name, who = event.name, event.data.get("member_id")
        if name is Name.ENDED:
            self.gone = True
            self.close(CloseCode.ENDED, "ended")
        elif who != self.member_id:
            pass
        elif name is Name.ADMITTED:
            return self._start_admission()
        elif name in (Name.DECLINED, Name.REMOVED):
            self.gone = True
            self.close(CloseCode.REFUSED, name.value)
        elif name is Name.LEFT:
            self.gone = True
            self.close(CloseCode.LEFT, "left")
        elif name is Name.REPLACED and event.data["session"] > self.seat_session:
            self.gone = True
            self.close(CloseCode.LEFT, "replaced by a newer connection")
        return []

    def _still_here(self, state: RoomState) -> bool:
        """After a snapshot that may hold this member's own server events (removed, declined,
        left, replaced: swallowed by a replay gap, or saved while an admission loaded), act on
        them: False, and the connection is closed, when this seat is no longer this one's."""
        me = state.find(self.member_id)
        if me is None:
            self.gone = True
            self.close(CloseCode.REFUSED, "no longer in the circle")
            return False
        if me.session > self.seat_session:
            self.gone = True
            self.close(CloseCode.LEFT, "replaced by a newer connection")
            return False
        return True

    def _start_admission(self) -> list[Request]:
        self._held = []
        return [Admit()]

    def admission_loaded(self, state: RoomState | None, now_ms: int, *, ended: bool = False) -> list[Request]:
        """Send `admitted {state}`, then what arrived meanwhile and is newer than it. None:
        the store could not be read (`ended`: the circle is gone)."""
        held, self._held = self._held or [], None
        if ended:
            self.gone = True
            self.close(CloseCode.ENDED, "ended")
            return []
        if state is None:
            self.close(CloseCode.TRY_AGAIN_LATER, "try again later")
            return []
        # Removed (or replaced) while the state loaded: that event is older than the state
        # loaded, so it would be skipped below as already part of the snapshot.
        if not self._still_here(state):
            return []
        self.admitted = True
        self.last_version = state.version
        self.send(f.Admitted(state=snapshot(state, self.member_id, now_ms),
                             ice_servers=self._ice_servers(now_ms)))
        requests: list[Request] = []
        for item in held:
            requests += self.item(item, now_ms)
        return requests

    def _ice_servers(self, now_ms: int) -> list[f.IceServer]:
        """Fresh on every welcome (a resume too) and admission: minted for this member."""
        return [f.IceServer(**server) for server in self.ice.for_member(self.member_id, now_ms // 1000)]

    def _send_snapshot(self, state: RoomState, now_ms: int) -> None:
        self.last_version = max(self.last_version, state.version)
        if self.admitted:
            self.send(f.Snapshot(version=state.version, state=snapshot(state, self.member_id, now_ms)))
