"""One WebSocket connection on asyncio: the adapter around the protocol machine
(`signaling.connection.Connection`).

The machine decides; this adapter does: it reads the socket, hands each frame, event and
answer to the machine, runs what the machine asks for (commands and loads on the manager,
media on the circle's runtime), and writes what the machine wants sent. Everything goes out
through one bounded queue and one writer task, or straight into the socket when nothing is
waiting ahead (fan-out costs no task switch per member). A client whose queue fills up is
dropped (it may resume within the grace period).

Where the circle lives is decided before the machine sees the join (`Home.place`): here, or a
redirect to the process that holds its lease (DESIGN §8).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from rooms.errors import RoomError
from rooms.events import Event
from rooms.model import RoomState
from signaling.close import CloseCode
from signaling.connection import (
    DEFAULT_LIMITS,
    NO_ICE_SERVERS,
    Admit,
    AnswerOffer,
    CloseMedia,
    Connection,
    Execute,
    JoinRequest,
    Limits,
    Load,
    Request,
    encode_event,
)
from signaling.turn import IceServers
from storage.codec import CorruptState
from storage.manager import Busy, RoomManager
from storage.store import NoSuchCircle, StaleOwner, StoreError
from storage.subscription import Item, Subscription

__all__ = ["DEFAULT_LIMITS", "Limits", "Session"]

log = logging.getLogger("lingkar.session")

_REFUSALS = (StoreError, CorruptState, Busy, NoSuchCircle)


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


class Home(Protocol):
    """Where a circle lives (DESIGN §8)."""

    async def place(self, circle_id: str, *, routed: bool = False) -> str | None:
        """None: the circle lives here (this process holds its lease now); else the URL of
        the `/ws` of the process that does. `routed`: a proxy chose this process for the
        circle (`/ws?c=`). Raises StoreError, NoSuchCircle."""

    def fence(self, circle_id: str) -> int | None:
        """The lease token every write of the circle carries; raises StaleOwner when this
        process is not (or no longer surely) its home."""

    def recheck(self, circle_id: str) -> None:
        """A write was refused as stale: find out whether the lease is still ours."""


class Anywhere:
    """No leases: every process may write every circle (one process, or tests)."""

    async def place(self, circle_id: str, *, routed: bool = False) -> str | None:
        return None

    def fence(self, circle_id: str) -> int | None:
        return None

    def recheck(self, circle_id: str) -> None:
        pass


class Here(Protocol):
    """The runtime of the session's circle on this process (`server.circles.CircleRuntime`)."""

    async def answer(self, member_id: str, offer_sdp: str, *, listen_only: bool) -> str: ...

    def slots(self, member_id: str) -> list[str | None] | None: ...

    def close_media(self, member_id: str) -> Awaitable[None]:
        """Take the member out of the media at once; the awaitable closes its connection."""

    def leave(self, session: Session) -> Awaitable[None]:
        """The session is over: forget it, and close its media unless a newer session of the
        same member is here (the relay replaces the PeerConnection on that one's offer)."""


class Circles(Protocol):
    """The circles this process serves (`server.circles.Circles`)."""

    def enter(self, session: Session) -> Here:
        """The session has joined its circle: register it with the circle's runtime."""


class Observer(Protocol):
    """Counts (metrics); never anything that tells circles or commands apart."""

    def frame_in(self) -> None: ...

    def frame_out(self) -> None: ...

    def error(self, code: str) -> None: ...

    def closed(self, code: int) -> None: ...

    def command_took(self, seconds: float) -> None: ...


class Unobserved:
    def frame_in(self) -> None: ...

    def frame_out(self) -> None: ...

    def error(self, code: str) -> None: ...

    def closed(self, code: int) -> None: ...

    def command_took(self, seconds: float) -> None: ...


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class Session:
    def __init__(self, transport: Transport, manager: RoomManager, *, secret: str, circles: Circles,
                 observer: Observer | None = None, limits: Limits = DEFAULT_LIMITS,
                 now_ms: Callable[[], int] = _now_ms, home: Home | None = None,
                 address: str = "", ice: IceServers = NO_ICE_SERVERS, routed: bool = False) -> None:
        self.transport = transport
        self.routed = routed  # a proxy sent this socket here for its circle (`/ws?c=`)
        self.manager = manager
        self.circles = circles
        self.observer = observer or Unobserved()
        self.home = home or Anywhere()
        self.limits = limits
        self.now_ms = now_ms
        self.conn = Connection(secret=secret, limits=limits, address=address, ice=ice)
        self._frame_out = self.observer.frame_out  # once per member on the fan-out path
        self.here: Here | None = None  # the circle's runtime, once joined
        self._out: asyncio.Queue[bytes | tuple[int, str]] = asyncio.Queue(limits.send_queue)
        self._sub: Subscription | None = None
        self._writer_task: asyncio.Task[None] | None = None
        # Frames wait in `_out` or are being sent from it (or the client was dropped): new
        # frames queue behind them. Set when one is queued; cleared by the writer once the
        # queue is empty (one flag read on the fan-out path instead of three checks).
        self._behind = False
        self._dropped = False  # too slow: nothing more is written
        self._admitting: asyncio.Task[None] | None = None

    @property
    def circle_id(self) -> str:
        return self.conn.circle_id

    @property
    def member_id(self) -> str:
        return self.conn.member_id

    @property
    def admitted(self) -> bool:
        return self.conn.admitted

    # --- outbound -----------------------------------------------------------------------

    def flush(self) -> None:
        """Write what the machine wants sent (call after every input to it)."""
        conn = self.conn
        if conn.errors:
            for code in conn.errors:
                self.observer.error(code)
            conn.errors.clear()
        frames = conn.data_to_send()
        close = conn.close_to_send()
        if self._dropped:
            return
        if frames and not self._write_now(frames):
            for data in frames:
                if not self._enqueue(data):
                    return
        if close is not None:
            self._behind = True
            try:
                self._out.put_nowait(close)
            except asyncio.QueueFull:
                self._drain()
                self._out.put_nowait(close)

    def close(self, code: int, reason: str = "") -> None:
        """Close from outside (drain, a lease lost): after what is queued."""
        self.conn.close(code, reason)
        self.flush()

    def redirect(self, url: str) -> None:
        """Send the client to the circle's new home (a drain): `redirect`, then 4300."""
        self.conn.redirect(url)
        self.flush()

    def _enqueue(self, data: bytes) -> bool:
        self._behind = True
        try:
            self._out.put_nowait(data)
            return True
        except asyncio.QueueFull:
            # It does not read: drop it now (its seat waits out the grace period) rather than
            # queue a close frame behind sends that never complete.
            log.info("slow client dropped", extra={"code": 1008})
            self._dropped = True
            self.conn.close(1008, "too slow")  # never sent: nothing more is written
            self._drain()
            if self._writer_task is not None:
                self._writer_task.cancel()
            return False

    def _drain(self) -> None:
        while not self._out.empty():
            self._out.get_nowait()

    def _write_now(self, frames: list[bytes]) -> bool:
        """Nothing waiting ahead of them: written at once, from the caller's own step (a
        fan-out of one event to a circle's members costs no task switch per member)."""
        if self._behind or not self.transport.write_now(*frames):
            return False
        for _ in frames:
            self.observer.frame_out()
        return True

    async def _writer(self) -> None:
        while True:
            item = await self._out.get()
            if isinstance(item, bytes):
                await self.transport.send(item)  # frames sent meanwhile queue behind this one
                self.observer.frame_out()
                if not self._dropped and self._out.empty():
                    self._behind = False
                continue
            code, reason = item
            self.observer.closed(code)
            await self.transport.close(code, reason)
            return

    async def _flush_before_writer(self) -> None:
        """The hello phase: what the machine wants sent, then its close, awaited in turn."""
        for data in self.conn.data_to_send():
            await self.transport.send(data)
            self.observer.frame_out()
        close = self.conn.close_to_send()
        if close is not None:
            self.observer.closed(close[0])
            await self.transport.close(*close)

    # --- the connection's life ----------------------------------------------------------

    async def run(self) -> None:
        try:
            first = await asyncio.wait_for(self.transport.receive(), self.limits.hello_seconds)
        except TimeoutError:
            self.observer.closed(CloseCode.HELLO_TIMEOUT)
            await self.transport.close(CloseCode.HELLO_TIMEOUT, "no hello")
            return
        if first is None:
            return
        self.observer.frame_in()
        request = self.conn.hello(first)
        state = await self._join(request) if request is not None else None
        if request is None or state is None:
            await self._flush_before_writer()
            return
        self.conn.joined(request, state, self.now_ms(), time.monotonic())
        self._sub = self.manager.subscribe(self.circle_id, state.version)
        # An event's frame encoded once for all the members here that one delivery hands it
        # to; the subscription forgets it when that delivery ends (kept longer, frames held
        # the pseudonyms of departed members while the server stayed quiet, issue 17). A
        # private note is encoded for its one reader only.
        self.conn.encode_with(self._sub.encoder(encode_event))
        self.here = self.circles.enter(self)
        writer = self._writer_task = asyncio.create_task(self._writer())
        self.flush()
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

    async def _join(self, request: JoinRequest) -> RoomState | None:
        """The join step: find the circle's home (a redirect when it is elsewhere), then run
        the machine's `Join` or `Resume` there."""
        try:
            url = await self.home.place(request.circle_id, routed=self.routed)
            if url is not None:
                self.conn.redirect(url)
                return None
            state, _ = await self.manager.execute(request.circle_id, request.command,
                                                  fence=self.home.fence(request.circle_id))
        except (RoomError, *_REFUSALS) as exc:
            self.conn.join_failed(exc)
            return None
        return state

    async def _cleanup(self) -> None:
        if self._sub is not None:
            self._sub.close()
            self.conn.encode_with(encode_event)  # lets go of the circle's hub
        if self.here is not None:
            try:
                await self.here.leave(self)
            except Exception:
                log.exception("closing media failed")
        disconnect = self.conn.lost()
        if disconnect is not None:  # keep the seat for the grace period (F12)
            try:
                await self.manager.execute(self.circle_id, disconnect)
            except (RoomError, StoreError, Busy):
                pass
            except Exception:
                log.exception("disconnect failed")

    # --- events out ---------------------------------------------------------------------


    def _on_item(self, item: Item) -> None:
        """Called by the subscription for every item, synchronously: no task per member on
        the fan-out path."""
        conn = self.conn
        if type(item) is Event:
            data = conn.deliverable(item)
            if data is not None:  # the common case: one frame, nothing ahead of it
                if not self._behind and self.transport.write_now(data):
                    self._frame_out()
                    return
                conn.send_encoded(data)  # the general way, as `item` would have queued it
                self.flush()
                return
        requests = conn.item(item, self.now_ms())
        self.flush()
        if requests:
            self._start(requests)

    def _start(self, requests: list[Request]) -> None:
        for request in requests:
            if isinstance(request, Admit):
                self._admitting = asyncio.ensure_future(self._admit())

    async def _admit(self) -> None:
        try:
            state: RoomState | None = await self.manager.load(self.circle_id)
            ended = False
        except NoSuchCircle:
            state, ended = None, True
        except (StoreError, CorruptState, Busy):
            state, ended = None, False
        requests = self.conn.admission_loaded(state, self.now_ms(), ended=ended)
        self.flush()
        self._start(requests)

    # --- commands in --------------------------------------------------------------------

    async def _reader(self) -> None:
        while not self.conn.closing:
            data = await self.transport.receive()
            if data is None:
                return
            self.observer.frame_in()
            requests = self.conn.receive(data, time.monotonic())
            self.flush()
            for request in requests:
                await self._do(request)

    async def _do(self, request: Request) -> None:
        assert self.here is not None
        if type(request) is Execute:  # the common request first
            started = time.perf_counter()
            circle_id = self.conn.circle_id
            try:
                state, _ = await self.manager.execute(circle_id, request.command,
                                                      fence=self.home.fence(circle_id))
            except (RoomError, *_REFUSALS) as exc:
                if isinstance(exc, StaleOwner):
                    self.home.recheck(circle_id)  # lost? then the circle's sessions move
                self.conn.failed(request.ref, exc)
            else:
                self.conn.executed(state.version)
            self.flush()
            self.observer.command_took(time.perf_counter() - started)
        elif isinstance(request, CloseMedia):
            await self.here.close_media(self.member_id)
        elif isinstance(request, Load):
            try:
                state = await self.manager.load(self.circle_id)
            except (RoomError, *_REFUSALS) as exc:
                self.conn.failed(request.ref, exc)
            else:
                self.conn.loaded(state, self.now_ms())
            self.flush()
        elif isinstance(request, AnswerOffer):
            try:
                sdp = await self.here.answer(self.member_id, request.sdp, listen_only=request.listen_only)
            except ValueError as err:
                self.conn.offer_refused(request.ref, str(err))
            else:
                self.conn.answered(request.ref, sdp, self.here.slots(self.member_id))
            self.flush()
        elif isinstance(request, Admit):
            self._start([request])

