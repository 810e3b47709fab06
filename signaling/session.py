"""One WebSocket connection: `hello`, then commands in and events out, until it closes.

The session owns who this connection is (member, role, circle, seat session number) and the
last room version it has delivered. Everything it sends goes through one bounded queue and
one writer task, so fan-out never waits for a slow client: a client whose queue fills up is
dropped (it may resume within the grace period).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from rooms import commands as c
from rooms.errors import Code, RoomError
from rooms.events import Event, Name
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
from storage.homes import Homes
from storage.manager import Busy, RoomManager
from storage.store import NoSuchCircle, Owner, StaleOwner, StoreError
from storage.subscription import Closed, Item, Resync, Subscription

NO_ICE_SERVERS = IceServers()

log = logging.getLogger("lingkar.session")


class Transport(Protocol):
    """The socket, reduced to what a session needs."""

    async def receive(self) -> bytes | str | None:
        """The next message; None once the client has gone."""

    async def send(self, data: bytes) -> None: ...

    def write_now(self, *frames: bytes) -> bool:
        """Write these frames now, in order and in one write, without awaiting, if the socket
        can take them at once (open, and not pushing back); False: nothing written, `send`
        them instead."""

    async def close(self, code: int, reason: str = "") -> None: ...


class Media(Protocol):
    async def answer(self, circle_id: str, member_id: str, offer_sdp: str, *,
                     listen_only: bool) -> str: ...

    def slots(self, circle_id: str, member_id: str) -> list[str | None] | None: ...

    def close_member(self, circle_id: str, member_id: str) -> Awaitable[None]:
        """Take the member out of the media at once (nothing forwarded from or to it from the
        call on); the awaitable closes its connection."""


class Observer(Protocol):
    """What the server wants to know about sessions (registry, metrics)."""

    def joined(self, session: Session) -> None: ...

    def gone(self, session: Session) -> bool:
        """Forget the session; False when a newer session of the same member is here (its
        media is then that session's: the relay replaces the PeerConnection on its offer)."""

    def frame_in(self) -> None: ...

    def frame_out(self) -> None: ...

    def error(self, code: str) -> None: ...

    def closed(self, code: int) -> None: ...

    def command_took(self, seconds: float) -> None:
        """One command's time, whichever command it was (metrics never tell them apart)."""


@dataclass(frozen=True)
class Limits:
    hello_seconds: float = 10.0
    rate: float = 20.0
    burst: int = 40
    send_queue: int = 512


DEFAULT_LIMITS = Limits()


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


_ENCODED: dict[int, tuple[Event, bytes]] = {}


def _encoded_event(event: Event) -> bytes:
    """An event's frame bytes, encoded once for all the members it reaches: the hub hands
    the same object to every subscriber in one step of the event loop, so the cache lives
    for that step only (keeping the event keeps its id unique meanwhile). Kept longer, it
    held the last few hundred events, pseudonyms of departed members included, for as long
    as the server stayed quiet (issue 17)."""
    if event.ephemeral:  # a private note's text is not kept, not even in this cache
        return f.encode_server_frame(event_frame(event))
    hit = _ENCODED.get(id(event))
    if hit is not None and hit[0] is event:
        return hit[1]
    if not _ENCODED:
        asyncio.get_running_loop().call_soon(_ENCODED.clear)
    elif len(_ENCODED) > 256:
        _ENCODED.clear()  # a clear is already due
    data = f.encode_server_frame(event_frame(event))
    _ENCODED[id(event)] = (event, data)
    return data


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class Session:
    def __init__(self, transport: Transport, manager: RoomManager, *, secret: str, media: Media,
                 observer: Observer, limits: Limits = DEFAULT_LIMITS,
                 now_ms: Callable[[], int] = _now_ms, homes: Homes | None = None,
                 address: str = "", ice: IceServers = NO_ICE_SERVERS) -> None:
        self.transport = transport
        self.address = address  # the client's address, as the limits see it (never logged)
        self.ice = ice  # STUN servers, and TURN credentials minted for this member
        self.manager = manager
        self.homes = homes  # None: no leases (every process may write every circle)
        self.secret = secret
        self.media = media
        self.observer = observer
        self.limits = limits
        self.now_ms = now_ms
        self.circle_id = ""
        self.member_id = ""
        self.role = Role.MEMBER
        self.listen_only = False
        self.admitted = False
        self.seat_session = 0
        self.last_version = 0  # the version of the last snapshot sent (welcome, admitted, sync)
        self.gone = False  # left, removed, declined, ended or replaced: no Disconnect
        self._closing = False
        self._in_command = False  # a command is being executed: its answer goes out first
        self._deferred_close: tuple[int, str] | None = None
        self._out: asyncio.Queue[object] = asyncio.Queue(limits.send_queue)
        self._sub: Subscription | None = None
        self._writer_task: asyncio.Task[None] | None = None
        self._writing = False  # the writer awaits a send: new frames queue behind it
        self._corked: list[bytes] | None = None  # frames held while this session's command runs
        self._held: list[Item] | None = None  # items that arrive while an admission loads
        self._admitting: asyncio.Future[None] | None = None

    # --- outbound -----------------------------------------------------------------------

    def send(self, frame: f.ServerFrame) -> None:
        self.send_encoded(f.encode_server_frame(frame))

    def send_encoded(self, data: bytes) -> None:
        if self._closing:
            return
        if self._corked is not None:
            self._corked.append(data)
            return
        if self._write_now(data):
            return
        try:
            self._out.put_nowait(data)
        except asyncio.QueueFull:
            # It does not read: drop it now (its seat waits out the grace period) rather than
            # queue a close frame behind sends that never complete.
            log.info("slow client dropped", extra={"code": 1008})
            self._closing = True
            self._drain()
            if self._writer_task is not None:
                self._writer_task.cancel()

    def _drain(self) -> None:
        while not self._out.empty():
            self._out.get_nowait()

    def close(self, code: int, reason: str = "") -> None:
        """Close after what is queued has been sent. While a command of this connection is
        being executed the close waits for its answer: the moderator who ends the circle, or
        a member who leaves, gets the `ack` before the close (the event that closes them may
        reach the pump before `execute` returns)."""
        if self._closing:
            return
        if self._in_command:
            if self._deferred_close is None:
                self._deferred_close = (code, reason)
            return
        self._closing = True
        try:
            self._out.put_nowait((code, reason))
        except asyncio.QueueFull:
            self._drain()
            self._out.put_nowait((code, reason))

    def error(self, ref: int | None, code: f.ErrorCode, message: str) -> None:
        self.observer.error(code.value)
        self.send(f.Error(ref=ref, code=code, message=message))

    async def _writer(self) -> None:
        while True:
            item = await self._out.get()
            if isinstance(item, bytes):
                self._writing = True  # frames sent meanwhile queue behind this one
                try:
                    await self.transport.send(item)
                finally:
                    self._writing = False
                self.observer.frame_out()
                continue
            assert isinstance(item, tuple)
            code: int = item[0]
            reason: str = item[1]
            self.observer.closed(code)
            await self.transport.close(code, reason)
            return

    async def _close_now(self, code: int, reason: str = "") -> None:
        """Before the writer runs (the hello phase)."""
        self.observer.closed(code)
        await self.transport.close(code, reason)

    # --- the connection's life ----------------------------------------------------------

    async def run(self) -> None:
        try:
            first = await asyncio.wait_for(self.transport.receive(), self.limits.hello_seconds)
        except TimeoutError:
            await self._close_now(CloseCode.HELLO_TIMEOUT, "no hello")
            return
        if first is None:
            return
        self.observer.frame_in()
        if not await self._hello(first):
            return
        self.observer.joined(self)
        writer = self._writer_task = asyncio.create_task(self._writer())
        assert self._sub is not None
        self._sub.listen(self._on_item)
        reader = asyncio.create_task(self._reader())
        try:
            await asyncio.wait({writer, reader}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            reader.cancel()
            if self._admitting is not None:
                self._admitting.cancel()
            if not writer.done():
                self.close(CloseCode.GOING_AWAY)
                try:
                    await asyncio.wait_for(writer, 2)
                except (TimeoutError, Exception):
                    writer.cancel()
            await asyncio.gather(reader, writer, return_exceptions=True)
            await self._cleanup()

    async def _cleanup(self) -> None:
        if self._sub is not None:
            self._sub.close()
        if self.observer.gone(self):
            try:
                await self.media.close_member(self.circle_id, self.member_id)
            except Exception:
                log.exception("closing media failed")
        if not self.gone:  # keep the seat for the grace period (F12)
            try:
                await self.manager.execute(self.circle_id, c.Disconnect(self.member_id, self.seat_session))
            except (RoomError, StoreError, Busy):
                pass
            except Exception:
                log.exception("disconnect failed")

    async def _hello(self, data: bytes | str) -> bool:
        if not isinstance(data, bytes):
            await self._close_now(CloseCode.BAD_FIRST_FRAME, "binary msgpack hello expected")
            return False
        try:
            hello = f.decode_client_frame(data)
        except f.FrameError:
            hello = None
        if not isinstance(hello, f.Hello):
            await self._close_now(CloseCode.BAD_FIRST_FRAME, "hello expected")
            return False
        circle_id = tokens.unverified_circle(hello.token)
        try:
            if circle_id is None:
                raise tokens.TokenError(tokens.TokenProblem.INVALID)
            claims = tokens.verify(self.secret, hello.token, circle_id)
        except tokens.TokenError as err:
            log.info("token refused", extra={"problem": err.problem.value})
            await self._close_now(CloseCode.BAD_TOKEN, "bad token")
            return False
        self.circle_id = circle_id
        new_secret = secrets.token_urlsafe(32)
        try:
            if self.homes is not None:  # DESIGN §8: the circle lives on one process
                home = await self.homes.claim(circle_id)
                if isinstance(home, Owner) and home.url == self.homes.url:
                    # An earlier run of this process (same URL, now gone) still holds it:
                    # no redirect to ourselves; the client retries once the lease is out.
                    raise StaleOwner("the lease of an earlier run has not run out yet")
                if isinstance(home, Owner):
                    await self.transport.send(f.encode_server_frame(f.Redirect(url=home.url + "/ws")))
                    self.observer.frame_out()
                    await self._close_now(CloseCode.REDIRECT, "the circle lives on another process")
                    return False
            if hello.resume is not None:
                state = await self._resume(hello.resume, claims.invite_id, new_secret)
            else:
                cmd = c.Join(member_id=secrets.token_hex(8), invite_id=claims.invite_id,
                             role=Role(claims.role), name=hello.name,
                             listen_only=hello.listen_only, resume_hash=_hash(new_secret),
                             knock_tag=keyed(self.secret, circle_id, self.address) if self.address else "")
                state, _ = await self.manager.execute(circle_id, cmd, fence=self._fence())
                self.member_id = joined_member_id(state, cmd)
        except RoomError as err:
            log.info("join refused", extra={"code": err.code.value})
            await self._close_now(join_close_code(err.code), err.code.value)
            return False
        except NoSuchCircle:
            await self._close_now(CloseCode.NO_SUCH_CIRCLE, "no such circle")
            return False
        except (StoreError, CorruptState, Busy):
            await self._close_now(CloseCode.TRY_AGAIN_LATER, "try again later")
            return False
        me = state.find(self.member_id)
        assert me is not None
        self.role = me.role
        self.listen_only = me.listen_only
        self.seat_session = me.session
        self.admitted = self.member_id in state.members
        self.last_version = state.version
        self._sub = self.manager.subscribe(circle_id, state.version)
        now = self.now_ms()
        if self.admitted:
            self.send(f.Welcome(member_id=self.member_id, role=me.role.value, resume=new_secret,
                                now=now, state=snapshot(state, self.member_id, now),
                                ice_servers=self._ice_servers(now)))
        else:
            lc = lobby_circle(state)
            self.send(f.Lobby(member_id=self.member_id, resume=new_secret, now=now,
                              circle=f.LobbyCircle(title=lc["title"], language=lc["language"])))
        return True

    async def _resume(self, secret: str, invite_id: str, new_secret: str) -> RoomState:
        cmd = c.Resume(invite_id, _hash(secret), _hash(new_secret))
        state, _ = await self.manager.execute(self.circle_id, cmd, fence=self._fence())
        self.member_id = joined_member_id(state, cmd)
        return state

    def _fence(self) -> int | None:
        """This process's lease token for the circle, or StaleOwner when it is not (or no
        longer surely) the circle's home: then nothing is written (DESIGN §8)."""
        if self.homes is None:
            return None
        token = self.homes.fence(self.circle_id)
        if token is None:
            raise StaleOwner("this process is not the circle's home now")
        return token

    # --- events out ---------------------------------------------------------------------

    def _on_item(self, item: Item) -> None:
        """Called by the subscription for every item, synchronously: no task per member on
        the fan-out path. While an admission is being loaded, items wait in `_held`."""
        if self._held is not None:
            self._held.append(item)
            return
        if isinstance(item, Closed):
            self.gone = True
            self.close(CloseCode.ENDED, "ended")
        elif isinstance(item, Resync):
            if not self._still_here(item.state):
                return
            if not self.admitted and self.member_id in item.state.members:
                self._start_admission()  # admitted in events this process never saw
            else:
                self._send_snapshot(item.state)
        else:
            self._deliver(item)

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

    def _start_admission(self) -> None:
        self._held = []
        self._admitting = asyncio.ensure_future(self._admit())

    def _deliver(self, event: Event) -> None:
        if not event.ephemeral and event.version <= self.last_version:
            return  # already part of the snapshot this client was sent
        if event.for_server:
            self._act_on(event)
        elif visible_to(event, self.member_id, self.role is Role.MODERATOR, self.admitted):
            self.send_encoded(_encoded_event(event))

    def _act_on(self, event: Event) -> None:
        name, who = event.name, event.data.get("member_id")
        if name is Name.ENDED:
            self.gone = True
            self.close(CloseCode.ENDED, "ended")
        elif who != self.member_id:
            return
        elif name is Name.ADMITTED:
            self._start_admission()
        elif name in (Name.DECLINED, Name.REMOVED):
            self.gone = True
            self.close(CloseCode.REFUSED, name.value)
        elif name is Name.LEFT:
            self.gone = True
            self.close(CloseCode.LEFT, "left")
        elif name is Name.REPLACED and event.data["session"] > self.seat_session:
            self.gone = True
            self.close(CloseCode.LEFT, "replaced by a newer connection")

    async def _admit(self) -> None:
        """Send `admitted {state}`, then what arrived meanwhile and is newer than it."""
        try:
            state = await self.manager.load(self.circle_id)
        except NoSuchCircle:
            self._held = None
            self.gone = True
            self.close(CloseCode.ENDED, "ended")
            return
        except (StoreError, Busy):
            state = None
        held, self._held = self._held or [], None
        if state is None:
            self.close(CloseCode.TRY_AGAIN_LATER, "try again later")
            return
        # Removed (or replaced) while the state loaded: that event is older than the state
        # loaded, so it would be skipped below as already part of the snapshot.
        if not self._still_here(state):
            return
        self.admitted = True
        self.last_version = state.version
        now = self.now_ms()
        self.send(f.Admitted(state=snapshot(state, self.member_id, now), ice_servers=self._ice_servers(now)))
        for item in held:
            self._on_item(item)

    def _ice_servers(self, now_ms: int) -> list[f.IceServer]:
        """Fresh on every welcome (a resume too) and admission: minted for this member."""
        return [f.IceServer(**server) for server in self.ice.for_member(self.member_id, now_ms // 1000)]

    def _send_snapshot(self, state: RoomState) -> None:
        self.last_version = max(self.last_version, state.version)
        if self.admitted:
            self.send(f.Snapshot(version=state.version,
                                 state=snapshot(state, self.member_id, self.now_ms())))

    # --- commands in --------------------------------------------------------------------

    async def _reader(self) -> None:
        limiter = RateLimiter(time.monotonic(), rate=self.limits.rate, burst=self.limits.burst)
        while not self._closing:
            data = await self.transport.receive()
            if data is None:
                return
            self.observer.frame_in()
            verdict = limiter.check(time.monotonic())
            if verdict is Verdict.CLOSE:
                self.close(CloseCode.FLOOD, "too many frames")
                return
            if verdict is Verdict.REFUSE:
                self.error(None, f.ErrorCode.RATE_LIMITED, "slow down")
                continue
            if not isinstance(data, bytes):
                self.error(None, f.ErrorCode.BAD_FRAME, "frames are binary msgpack")
                continue
            try:
                frame = f.decode_client_frame(data)
            except f.FrameError as err:
                self.error(err.ref, err.code, err.message)
                continue
            await self._handle(frame)

    async def _handle(self, frame: f.ClientFrame) -> None:
        if isinstance(frame, f.Hello):
            self.error(None, f.ErrorCode.BAD_FRAME, "already joined")
            return
        ref = frame.ref
        if isinstance(frame, f.Sync):
            await self._guard(ref, self._sync(ref))
            return
        if isinstance(frame, f.Offer):
            await self._guard(ref, self._offer(frame))
            return
        if isinstance(frame, f.LeaveQuietly):
            await self.media.close_member(self.circle_id, self.member_id)  # in the same step (F8)
        command = to_command(frame, self.member_id)
        assert command is not None
        started = time.perf_counter()
        self._in_command = True
        try:
            ok = await self._guard(ref, self._execute(ref, command))
        finally:
            self._in_command = False
            deferred, self._deferred_close = self._deferred_close, None
            if deferred is not None:
                self.close(*deferred)
        self.observer.command_took(time.perf_counter() - started)
        if ok and isinstance(command, (c.Leave, c.LeaveQuietly)):
            self.gone = True
            self.close(CloseCode.LEFT, "left")

    async def _execute(self, ref: int | None, command: c.Command) -> None:
        # The command's own event reaches this session while it runs, its ack right after:
        # both leave in one write (one system call instead of two, for every command).
        self._corked = []
        try:
            state, _ = await self.manager.execute(self.circle_id, command, fence=self._fence())
            self.send(f.Ack(ref=ref, version=state.version))
        finally:
            self._uncork()

    def _write_now(self, *frames: bytes) -> bool:
        """Nothing waiting ahead of them: written at once, from the caller's own step (a
        fan-out of one event to a circle's members costs no task switch per member)."""
        if self._writing or not self._out.empty() or not self.transport.write_now(*frames):
            return False
        for _ in frames:
            self.observer.frame_out()
        return True

    def _uncork(self) -> None:
        corked, self._corked = self._corked, None
        if not corked or self._closing or self._write_now(*corked):
            return
        for data in corked:
            self.send_encoded(data)

    async def _sync(self, ref: int | None) -> None:
        if not self.admitted:
            raise RoomError(Code.FORBIDDEN, "not admitted yet")
        state = await self.manager.load(self.circle_id)
        self._send_snapshot(state)

    async def _offer(self, frame: f.Offer) -> None:
        if not self.admitted:
            raise RoomError(Code.FORBIDDEN, "lobby members have no media")
        try:
            sdp = await self.media.answer(self.circle_id, self.member_id, frame.sdp,
                                          listen_only=self.listen_only)
        except ValueError as err:
            self.error(frame.ref, f.ErrorCode.BAD_FRAME, f"offer refused: {err}")
            return
        self.send(f.Answer(sdp=sdp, ref=frame.ref))
        slots = self.media.slots(self.circle_id, self.member_id)
        if slots is not None:
            self.send(f.Media(slots=slots))

    async def _guard(self, ref: int | None, work: Awaitable[None]) -> bool:
        """Run one command; map every refusal to its `error` frame. True when it succeeded."""
        try:
            await work
            return True
        except RoomError as err:
            self.error(ref, error_code(err.code), err.message)
        except Busy:
            self.error(ref, f.ErrorCode.CONFLICT, "busy, try again")
        except NoSuchCircle:
            self.gone = True
            self.close(CloseCode.ENDED, "ended")
        except StoreError as err:
            if isinstance(err, StaleOwner):
                if self.homes is not None:  # lost? then `on_lost` moves the circle's sessions
                    self.homes.recheck(self.circle_id)
                self.error(ref, f.ErrorCode.UNAVAILABLE,
                           "this process is not the circle's home now; nothing changed")
            else:
                self.error(ref, f.ErrorCode.UNAVAILABLE,
                           "the store cannot be reached; nothing changed")
        return False

