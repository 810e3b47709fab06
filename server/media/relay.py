"""The media relay: one RTCPeerConnection per member, encoded Opus forwarded into slots.

It knows nothing of signaling or of the room rules: the caller says who may be heard
(`MediaRelay.set_audible`, on every room version change) and the relay drops every other
packet at the tap. Media is never decoded, written anywhere or logged.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCRtpReceiver,
    RTCRtpSender,
    RTCSessionDescription,
    sdp,
)
from aiortc.rtp import RtpPacket

from . import fastpath, gcpace, metrics, mux, ports, stunfast, tap
from .candidates import AddressKind, filter_candidates, own_address_kinds
from .circle import SILENT_LEVEL, Listener, MediaCircle, Slots
from .slot import Slot

logger = logging.getLogger(__name__)

LEVEL_INTERVAL = 0.25  # seconds: speaking levels reach on_levels at most 4 times a second per circle
OPUS = "audio/opus"

SlotsCallback = Callable[[str, str, Slots], None]
LevelsCallback = Callable[[str, dict[str, int]], None]


class OfferProblem(enum.StrEnum):
    MALFORMED = "malformed"  # not an SDP offer aiortc can take
    UNSUPPORTED = "unsupported"  # m-lines other than audio (video, data channels), or no Opus
    TOO_MANY_MEDIA = "too many m-lines"  # more than the microphone and the relay's slots
    CLOSED = "closed"  # the member was closed while the offer was being answered
    NO_PORT = "no media port free; try again later"  # LINGKAR_MEDIA_PORTS is used up


class OfferError(ValueError):
    """The offer was refused; nothing of it is left behind. Its message (the problem, and
    what about the offer caused it) goes to the client as ``offer refused: …``."""

    def __init__(self, problem: OfferProblem, detail: str | None = None) -> None:
        super().__init__(f"{problem.value}: {detail}" if detail else problem.value)
        self.problem = problem


@dataclass(eq=False)
class _Peer:
    circle_id: str
    member_id: str
    pc: RTCPeerConnection
    closed: bool = False
    outs: list[fastpath.RtpOut] = field(default_factory=list)
    tapped: RTCRtpReceiver | None = None

    def release(self) -> None:
        """Take back what the relay installed on the (closed) connection and drop the
        handlers that hold the peer, so none of it is kept by a reference cycle."""
        for out in self.outs:
            out.close()
        if self.tapped is not None:
            tap.remove_tap(self.tapped)
            self.tapped = None
        self.pc.remove_all_listeners()


@dataclass(frozen=True)
class _OfferShape:
    mic_mid: str | None
    slot_mids: tuple[str, ...]


def _check_media_lines(offer_sdp: str, max_slots: int) -> None:
    """Refuse, before any parsing, an offer with more m-lines than a microphone and the
    relay's slots, or with any m-line that is not audio (no camera yet). Lines are split
    as aiortc's parser splits them (str.splitlines), so it counts what aiortc would."""
    kinds = [line[2:].partition(" ")[0] for line in offer_sdp.splitlines() if line.startswith("m=")]
    if len(kinds) > 1 + max_slots:
        raise OfferError(
            OfferProblem.TOO_MANY_MEDIA,
            f"{len(kinds)}, at most {1 + max_slots} (a microphone and {max_slots} slots)",
        )
    for index, kind in enumerate(kinds):
        if kind != "audio":
            raise OfferError(OfferProblem.UNSUPPORTED, f"m-line {index} is not audio")


def _offer_shape(offer_sdp: str, max_slots: int, listen_only: bool) -> _OfferShape:
    """Which m-line is the microphone and which are slots (§7: mic first, then recvonly)."""
    try:
        description = sdp.SessionDescription.parse(offer_sdp)
    except Exception as exc:  # aiortc's parser raises whatever it trips on
        raise OfferError(OfferProblem.MALFORMED) from exc
    media = description.media
    if not media:
        raise OfferError(OfferProblem.MALFORMED)
    if any(m.kind != "audio" for m in media):  # _check_media_lines saw to that already
        raise OfferError(OfferProblem.UNSUPPORTED)
    audio = [m for m in media if m.kind == "audio"]
    mic_mid = None
    if audio and audio[0].direction in ("sendrecv", "sendonly"):
        mic_mid = audio[0].rtp.muxId
        audio = audio[1:]
    slots = [m.rtp.muxId for m in audio if m.direction in ("recvonly", "sendrecv")]
    return _OfferShape(None if listen_only else mic_mid, tuple(slots[:max_slots]))


def _ice_connection(transceiver: Any) -> Any:
    """The ``aioice.Connection`` under a transceiver (one for all of them: BUNDLE)."""
    return transceiver.receiver.transport.transport._connection


def _is_turn(server: RTCIceServer) -> bool:
    urls = [server.urls] if isinstance(server.urls, str) else server.urls
    return any(url.startswith(("turn:", "turns:")) for url in urls)


# Opus fmtp parameters that tell the *sender* how to encode (RFC 7587 §6.1): in an answer
# they are what the relay asks the browser to send with. aiortc answers with its own codec
# parameters (none), so the browser would send neither in-band FEC nor DTX.
OPUS_KEPT_PARAMETERS = ("useinbandfec", "usedtx")


def keep_opus_fec_dtx(offer_sdp: str, answer_sdp: str) -> str:
    """The answer with Opus in-band FEC and DTX as the offer has them, m-line by m-line
    (DESIGN §7: a listener conceals loss without retransmission; silence costs nothing)."""
    offer = sdp.SessionDescription.parse(offer_sdp)
    answer = sdp.SessionDescription.parse(answer_sdp)
    changed = False
    for offered, answered in zip(offer.media, answer.media, strict=False):
        wanted = {
            codec.payloadType: {k: v for k, v in codec.parameters.items() if k in OPUS_KEPT_PARAMETERS}
            for codec in offered.rtp.codecs
            if codec.mimeType.lower() == OPUS
        }
        for codec in answered.rtp.codecs:
            if codec.mimeType.lower() == OPUS and wanted.get(codec.payloadType):
                codec.parameters = {**codec.parameters, **wanted[codec.payloadType]}
                changed = True
    return str(answer) if changed else answer_sdp


class MediaRelay:
    """Forwards members' Opus packets to each other's slots, gated per circle.

    Callbacks run synchronously on the event loop and must not block:
    ``on_slots(circle_id, member_id, slots)`` whenever a member's slot view changes after
    `answer` returned (the view right after `answer` is `slots()`), and
    ``on_levels(circle_id, {member_id: level})`` at most every 250 ms per circle with the
    loudest ``ssrc-audio-level`` seen per heard member (RFC 6464: 0 loudest, 127 silence).

    ``address_kinds``: the kinds of the relay's own addresses, which decide the client
    candidates it sends ICE checks to (`candidates`); by default those of the addresses
    aioice gathers on and ``media_address``. A host behind 1:1 NAT passes
    ``own_address_kinds([media_address])``; tests inject them.

    ``media_address``: the only address the answers announce (``LINGKAR_MEDIA_ADDRESS``:
    the public one of a host behind 1:1 NAT); ``media_ports``: (low, high), the UDP range
    every socket of the relay is bound in (``LINGKAR_MEDIA_PORTS``). See `ports`.
    """

    def __init__(
        self,
        *,
        slots: int = 3,
        ice_servers: list[dict[str, Any]] | None = None,
        on_slots: SlotsCallback | None = None,
        on_levels: LevelsCallback | None = None,
        address_kinds: Iterable[AddressKind] | None = None,
        media_address: str | None = None,
        media_ports: tuple[int, int] | None = None,
        full_collection_interval: float | None = gcpace.INTERVAL,
        udp_mux: bool = True,
    ) -> None:
        tap.check_supported()
        fastpath.check_supported()
        ports.check_supported()
        stunfast.check_supported()
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self._max_slots = slots
        self._ice_servers = [RTCIceServer(**server) for server in ice_servers or []]
        self._gathering: ports.Gathering | None = None
        turn_of_its_own = any(_is_turn(server) for server in self._ice_servers)
        if (media_address is not None or media_ports is not None) and turn_of_its_own:
            raise ValueError("the relay's own ICE servers must be STUN only with a media address or ports")
        # One shared socket per address for every member (`mux`): sends batched per packet.
        self._udp_mux = mux.UdpMux() if udp_mux and not turn_of_its_own else None
        if media_address is not None or media_ports is not None or self._udp_mux is not None:
            self._gathering = ports.Gathering(address=media_address, ports=media_ports, udp_mux=self._udp_mux)
        if media_address is not None:
            self._ice_servers = []  # the announced address is the reflexive one: no STUN
        if address_kinds is None:
            address_kinds = own_address_kinds([media_address] if media_address else [])
        self._address_kinds = frozenset(address_kinds)
        self._on_slots = on_slots
        self._on_levels = on_levels
        self._circles: dict[str, MediaCircle] = {}
        self._peers: dict[tuple[str, str], _Peer] = {}
        self._level_timers: dict[str, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._waiters: list[asyncio.Future[None]] = []  # `wait_until` callers
        self.full_collections = gcpace.FullCollections(full_collection_interval)
        self.packets_in = 0
        self.packets_forwarded = 0
        self.packets_dropped_gated = 0
        self.candidates_refused = 0
        self.offers_refused_no_port = 0

    # -- negotiation -------------------------------------------------------------------

    async def answer(self, circle_id: str, member_id: str, offer_sdp: str, *, listen_only: bool) -> str:
        """Answer a complete (non-trickle) offer; returns the complete answer SDP.

        A member's earlier PeerConnection, if any, is closed first. Raises `OfferError`.
        The client's candidates the relay cannot serve are left out (`candidates`).
        """
        _check_media_lines(offer_sdp, self._max_slots)
        shape = _offer_shape(offer_sdp, self._max_slots, listen_only)
        offer_sdp, refused = filter_candidates(offer_sdp, self._address_kinds)
        if refused:
            self.candidates_refused += refused
            metrics.CANDIDATES_REFUSED.inc(refused)
        await self.close_member(circle_id, member_id)
        # An empty list, not None: None would make aiortc contact Google's STUN server.
        pc = RTCPeerConnection(RTCConfiguration(iceServers=list(self._ice_servers)))
        peer = _Peer(circle_id, member_id, pc)
        self._peers[(circle_id, member_id)] = peer
        try:
            slots = await self._negotiate(peer, offer_sdp, shape)
        except BaseException:
            if self._peers.get((circle_id, member_id)) is peer:
                del self._peers[(circle_id, member_id)]
            peer.closed = True
            await pc.close()
            peer.release()
            self.full_collections.closed()
            self._changed()
            raise

        circle = self._circles.setdefault(circle_id, MediaCircle(circle_id))
        if shape.mic_mid is not None:
            circle.speakers.add(member_id)
        circle.listeners[member_id] = Listener(slots, [None] * len(slots))
        changed = circle.reassign()
        changed.pop(member_id, None)  # its first view is read with slots()
        self._notify_slots(circle_id, changed)
        self._changed()

        @pc.on("connectionstatechange")
        def _on_state() -> None:
            # failed: the client vanished; closed: it closed the connection (DTLS close_notify)
            if pc.connectionState in ("failed", "closed") and not peer.closed:
                self._spawn(self._close_peer(peer))

        return pc.localDescription.sdp

    async def _negotiate(self, peer: _Peer, offer_sdp: str, shape: _OfferShape) -> list[Slot]:
        pc = peer.pc
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
        except Exception as exc:
            raise OfferError(OfferProblem.MALFORMED) from exc
        if self._gathering is not None:
            self._gathering.install(pc)
        senders: dict[str, RTCRtpSender] = {}
        mic = None
        for transceiver in pc.getTransceivers():
            if transceiver.mid is not None and transceiver.mid == shape.mic_mid:
                mic = transceiver  # stays recvonly
            elif transceiver.mid in shape.slot_mids:
                # aiortc's sender only runs RTCP: RTP goes out through fastpath.RtpOut.
                transceiver.sender.replaceTrack(fastpath.IdleTrack())
                transceiver.direction = "sendonly"
                senders[transceiver.mid] = transceiver.sender
            else:
                transceiver.direction = "inactive"  # no media either way, ever
        answer_sdp = keep_opus_fec_dtx(offer_sdp, (await pc.createAnswer()).sdp)
        try:
            await pc.setLocalDescription(RTCSessionDescription(sdp=answer_sdp, type="answer"))
        except ports.NoFreePort as exc:
            self.offers_refused_no_port += 1
            metrics.OFFERS_REFUSED_NO_PORT.inc()
            logger.warning("media: an offer was refused: %s (LINGKAR_MEDIA_PORTS)", exc)
            raise OfferError(OfferProblem.NO_PORT) from exc
        if peer.closed:
            raise OfferError(OfferProblem.CLOSED)
        for connection in {id(c): c for c in map(_ice_connection, pc.getTransceivers())}.values():
            stunfast.install(connection)  # consent checks answered cheaply, no STUN parse of media
            stunfast.install_consent(connection)  # and sent from one timer, without a task

        answer = sdp.SessionDescription.parse(pc.localDescription.sdp)
        media = {m.rtp.muxId: m for m in answer.media if m.rtp.codecs}
        first_codec = {mid: m.rtp.codecs[0] for mid, m in media.items()}
        for mid in senders:
            codec = first_codec.get(mid)
            if codec is None or codec.mimeType.lower() != OPUS:
                raise OfferError(OfferProblem.UNSUPPORTED)
        if mic is not None:
            codec = first_codec.get(shape.mic_mid or "")
            if codec is None or codec.mimeType.lower() != OPUS:
                raise OfferError(OfferProblem.UNSUPPORTED)
            tap.install_tap(mic.receiver, self._sink(peer, codec.payloadType), at_once=True)
            peer.tapped = mic.receiver
        if mic is None and senders:  # listening only: its RTCP is about our slots only
            fastpath.ignore_rtcp(next(iter(senders.values())).transport.transport._connection)
        slots = []
        clock = fastpath.RtcpClock()  # one timer for the sender reports of all its slots
        for mid in shape.slot_mids:
            if mid in senders:
                out = fastpath.RtpOut(senders[mid], media[mid], first_codec[mid].payloadType, clock=clock)
                peer.outs.append(out)
                slots.append(Slot(out.send, out.close, out.c))
        return slots

    # -- the packet path ---------------------------------------------------------------

    def _sink(self, peer: _Peer, opus_pt: int) -> tap.PacketSink:
        member_id = peer.member_id
        circle_id = peer.circle_id

        def on_packet(packet: RtpPacket, arrival_time_ms: int) -> None:
            if peer.closed or packet.payload_type != opus_pt or not packet.payload:
                return
            circle = self._circles.get(circle_id)
            if circle is None:
                return
            self.packets_in += 1
            metrics.PACKETS_IN.inc()
            level = packet.extensions.audio_level
            sent = circle.forward(
                member_id, packet.timestamp, packet.payload, None if level is None else level[1]
            )
            if sent < 0:
                self.packets_dropped_gated += 1
                metrics.PACKETS_DROPPED.inc()
                return
            if sent:
                mux.flush()  # every listener's copy, in one sendmmsg per shared socket
                self.packets_forwarded += sent
                metrics.PACKETS_FORWARDED.inc(sent)
            if circle.levels and circle_id not in self._level_timers:
                self._schedule_levels(circle_id)

        return on_packet

    def _schedule_levels(self, circle_id: str) -> None:
        if self._on_levels is None:
            return
        loop = asyncio.get_running_loop()
        self._level_timers[circle_id] = loop.call_later(LEVEL_INTERVAL, self._flush_levels, circle_id)

    def _flush_levels(self, circle_id: str) -> None:
        self._level_timers.pop(circle_id, None)
        circle = self._circles.get(circle_id)
        if circle is None or self._on_levels is None:
            return
        report = circle.take_levels()
        if report is not None:
            try:
                self._on_levels(circle_id, report)
            except Exception:
                logger.exception("on_levels callback failed")
        # Keep reporting until everyone reported is silent, so indicators switch off.
        if circle.levels or any(level < SILENT_LEVEL for level in circle.reported.values()):
            self._schedule_levels(circle_id)

    # -- room changes ------------------------------------------------------------------

    def set_audible(self, circle_id: str, audible: Sequence[str]) -> None:
        """Who may be heard now, highest priority first (floor holder, moderators, …).

        Everything else from this circle is dropped from the next packet on; slots are
        reassigned and ``on_slots`` told about every member whose view changed.
        """
        circle = self._circles.setdefault(circle_id, MediaCircle(circle_id))
        circle.set_audible(audible)
        self._notify_slots(circle_id, circle.reassign())
        self._changed()

    def slots(self, circle_id: str, member_id: str) -> Slots | None:
        """The member's current slot view (None if the member has no PeerConnection)."""
        circle = self._circles.get(circle_id)
        listener = circle.listeners.get(member_id) if circle else None
        return list(listener.view) if listener else None

    def _notify_slots(self, circle_id: str, changed: dict[str, Slots]) -> None:
        if self._on_slots is None:
            return
        for member_id, view in changed.items():
            try:
                self._on_slots(circle_id, member_id, view)
            except Exception:
                logger.exception("on_slots callback failed")

    # -- closing -----------------------------------------------------------------------

    def close_member(self, circle_id: str, member_id: str) -> Coroutine[Any, Any, None]:
        """Take the member out of the circle's media at once: from this call on nothing is
        forwarded from or to it. The returned coroutine closes its PeerConnection (await or
        spawn it). Safe to call twice or for strangers."""
        peer = self._peers.get((circle_id, member_id))
        if peer is None or not self._detach(peer):
            return self._finish([])
        return self._finish([peer])

    def _detach(self, peer: _Peer) -> bool:
        """The synchronous half of closing a peer; False if it was closed already."""
        if self._peers.get((peer.circle_id, peer.member_id)) is peer:
            del self._peers[(peer.circle_id, peer.member_id)]
        if peer.closed:
            return False
        peer.closed = True
        circle = self._circles.get(peer.circle_id)
        if circle is not None:
            self._notify_slots(peer.circle_id, circle.remove(peer.member_id))
        return True

    async def _finish(self, peers: list[_Peer]) -> None:
        try:
            await asyncio.gather(*(peer.pc.close() for peer in peers))
        finally:
            for peer in peers:
                peer.release()
            if peers:
                self.full_collections.closed()
        self._changed()

    async def _close_peer(self, peer: _Peer) -> None:
        if self._detach(peer):
            await self._finish([peer])

    def close_circle(self, circle_id: str) -> Coroutine[Any, Any, None]:
        """Take every member of the circle out of its media at once and forget the circle;
        the returned coroutine closes their PeerConnections (await or spawn it)."""
        peers = [p for p in self._peers.values() if p.circle_id == circle_id]
        circle = self._circles.pop(circle_id, None)
        timer = self._level_timers.pop(circle_id, None)
        if timer is not None:
            timer.cancel()
        for peer in peers:
            peer.closed = True
            del self._peers[(peer.circle_id, peer.member_id)]
        if circle is not None:
            for listener in circle.listeners.values():
                for slot in listener.slots:
                    slot.stop()
        return self._finish(peers)

    async def close(self) -> None:
        """Close everything (graceful shutdown)."""
        for circle_id in list(self._circles.keys() | {c for c, _ in self._peers}):
            await self.close_circle(circle_id)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.full_collections.cancel()
        if self._udp_mux is not None:
            mux.flush()
            await self._udp_mux.close()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._changed()

    # -- waiting for the bookkeeping ---------------------------------------------------

    def _changed(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        """Return once `condition()` holds. It is checked again whenever peers, circles or
        the relay's own tasks change (an offer answered, audibility set, a close finished),
        so a caller awaits the relay's bookkeeping instead of polling it."""
        loop = asyncio.get_running_loop()
        while not condition():
            waiter = loop.create_future()
            self._waiters.append(waiter)
            await waiter

    # -- bookkeeping -------------------------------------------------------------------

    def local_addresses(self) -> list[tuple[str, int]]:
        """(address, port) of every UDP socket the relay's PeerConnections hold (a shared
        socket once per PeerConnection on it)."""
        return [a for peer in list(self._peers.values()) for a in ports.local_addresses(peer.pc)]

    def shared_sockets(self) -> list[mux.MuxSocket]:
        """The shared sockets (`mux`) bound so far; empty without the mux."""
        return [] if self._udp_mux is None else self._udp_mux.sockets()

    def stats(self) -> dict[str, int]:
        """Counts for tests and /metrics: nothing here names anyone."""
        circles = self._circles.values()
        return {
            "circles": len(self._circles),
            "peers": len(self._peers),
            "speakers": sum(len(c.speakers) for c in circles),
            "listeners": sum(len(c.listeners) for c in circles),
            "routes": sum(len(slots) for c in circles for slots in c.routes.values()),
            "level_timers": len(self._level_timers),
            "tasks": len(self._tasks),
            "packets_in": self.packets_in,
            "packets_forwarded": self.packets_forwarded,
            "packets_dropped_gated": self.packets_dropped_gated,
            "candidates_refused": self.candidates_refused,
            "offers_refused_no_port": self.offers_refused_no_port,
        }
