"""One UDP socket per address for all of the relay's ICE connections (a "UDP mux").

aioice binds a socket per connection; the relay then sends each forwarded packet with one
system call per listener, and every idle listener is one more socket for the event loop to
watch. Here every connection of the relay gathers on one shared socket per address (as
LiveKit's and Pion's UDP mux, and Janus's single-port mode, do), so that

- the copies of one incoming packet for all listeners leave in one ``sendmmsg`` per
  `CHUNK` listeners (`sendmmsg.Batch`): `fastpath.RtpOut` writes and protects each copy in
  place in the batch's arena, and the relay flushes the rest once the packet is forwarded
  (`flush`);
- the event loop watches one socket per address, however many members there are.

Demultiplexing (RFC 7983 first byte; RFC 8445 ICE):

- A STUN Binding request names its connection in USERNAME (``local-ufrag:remote-ufrag``).
  It goes to that connection (unknown ufrag: dropped, as by a port nobody listens on), and
  once its MESSAGE-INTEGRITY checks with that connection's password, its source address
  belongs to that connection: a forged request cannot take an address away.
- A STUN response goes to the connection that sent the request (by transaction id, for
  requests sent to addresses that belong to nobody yet: the first checks to a client's
  candidates), else to the address's connection.
- Everything else (DTLS, SRTP, SRTCP) goes to the connection its source address belongs to;
  from an address that belongs to nobody it is dropped.

Each connection gets a `MuxProtocol` (aioice's ``StunProtocol``, so aioice, `stunfast` and
`fastpath` see what they always saw) whose transport is a view on the shared socket;
closing it (``Connection.close``) gives back its addresses and transactions.

Private names used (aioice 0.13; `ports.check_supported` covers the gathering path):
``StunProtocol(receiver)``, its ``local_candidate``, ``connection_made``,
``connection_lost``, ``datagram_received``; ``Connection.local_username`` (read-only: a
taken one is replaced through ``._local_username``), ``.local_password``, ``._components``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
from typing import Any

from aioice import ice, turn
from aioice.candidate import Candidate, candidate_foundation, candidate_priority

from . import sendmmsg
from .stunfast import integrity_ok, parse_request

logger = logging.getLogger(__name__)

_BINDING_REQUEST = b"\x00\x01"
# Copies per sendmmsg: a packet's copies leave in chunks of this many as they are written,
# the last when the packet is forwarded. One call per packet for every listener would make
# the first listener wait for the last copy's SRTP (2 ms and more at 100 listeners, on a
# cold cache); at 32 the call's own cost is spread over 32 datagrams all the same, and the
# arena (32 × 1536 bytes) stays small.
CHUNK = 32
MAX_TRANSACTIONS = 64  # per connection: requests to addresses that belong to nobody yet


def host_candidate(component: int, host: str, port: int) -> Candidate:
    """The host candidate aioice announces for a socket (``get_component_candidates``)."""
    return Candidate(
        foundation=candidate_foundation("host", "udp", host),
        component=component,
        transport="udp",
        priority=candidate_priority(component, "host"),
        host=host,
        port=port,
        type="host",
    )


class MuxProtocol(ice.StunProtocol):
    """aioice's ``StunProtocol`` of one connection on a shared socket."""

    def __init__(self, receiver: ice.Connection, mux: MuxSocket) -> None:
        super().__init__(receiver)
        self.mux = mux
        self.addresses: set[tuple[str, int]] = set()  # remote addresses that belong to it
        self.pending: list[bytes] = []  # ids of its requests to addresses of nobody yet
        self.drop_rtcp = False  # a listen-only member's RTCP (`fastpath.ignore_rtcp`)


class _View(asyncio.DatagramTransport):
    """The transport a `MuxProtocol` sees: the shared socket, closed for it alone."""

    def __init__(self, mux: MuxSocket, protocol: MuxProtocol) -> None:
        super().__init__({"sockname": mux.sockname, "socket": mux.sock})
        self._mux: MuxSocket | None = mux
        self._protocol: MuxProtocol | None = protocol

    def sendto(self, data: Any, addr: Any = None) -> None:
        mux, protocol = self._mux, self._protocol
        if mux is not None and protocol is not None:
            mux.send_from(protocol, data, addr)

    def is_closing(self) -> bool:
        return self._mux is None

    def close(self) -> None:
        mux, protocol = self._mux, self._protocol
        if mux is None or protocol is None:
            return
        self._mux = self._protocol = None
        mux.detach(protocol)
        asyncio.get_running_loop().call_soon(protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def get_write_buffer_size(self) -> int:
        return 0


class MuxSocket(asyncio.DatagramProtocol):
    """One bound UDP socket shared by the relay's connections (see the module's docstring)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sockname: tuple[str, int] = sock.getsockname()[:2]
        self._v6 = sock.family == socket.AF_INET6
        self.transport: asyncio.DatagramTransport | None = None
        self._by_address: dict[tuple[str, int], MuxProtocol] = {}
        self._by_ufrag: dict[str, MuxProtocol] = {}
        self._transactions: dict[bytes, MuxProtocol] = {}
        self.batch = sendmmsg.Batch(sock, CHUNK) if sendmmsg.AVAILABLE else None
        self.dropped = 0  # datagrams from addresses (or for ufrags) that belong to nobody
        self.refused = 0  # valid checks from an address another open connection holds
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # -- connections ----------------------------------------------------------------------

    def attach(self, connection: ice.Connection, component: int, protocol_host: str) -> MuxProtocol:
        """A protocol of `connection` on this socket, announcing `protocol_host`."""
        ufrag = connection.local_username
        if ufrag in self._by_ufrag:
            raise ValueError("a connection with this ICE ufrag is on this socket already")
        protocol = MuxProtocol(connection, self)
        protocol.connection_made(_View(self, protocol))
        protocol.local_candidate = host_candidate(component, protocol_host, self.sockname[1])
        self._by_ufrag[ufrag] = protocol
        return protocol

    def detach(self, protocol: MuxProtocol) -> None:
        ufrag = protocol.receiver.local_username
        if self._by_ufrag.get(ufrag) is protocol:
            del self._by_ufrag[ufrag]
        for address in protocol.addresses:
            if self._by_address.get(address) is protocol:
                del self._by_address[address]
                if self.batch is not None:
                    self.batch.forget(address)
        protocol.addresses.clear()
        for transaction_id in protocol.pending:
            if self._transactions.get(transaction_id) is protocol:
                del self._transactions[transaction_id]
        protocol.pending.clear()

    @property
    def connections(self) -> int:
        return len(self._by_ufrag)

    def _claim(self, protocol: MuxProtocol, address: tuple[str, int]) -> None:
        previous = self._by_address.get(address)
        if previous is protocol:
            return
        if previous is not None:
            if not previous.receiver._closing:
                # Taken by a connection still open: keep it there. A member's own valid check
                # sent from another member's address (a forged source) must not take that
                # member's media; a client whose new connection reuses its old port waits for
                # the old one to close (its offer closes it, or its consent runs out).
                self.refused += 1
                return
            previous.addresses.discard(address)
        self._by_address[address] = protocol
        protocol.addresses.add(address)

    # -- sending --------------------------------------------------------------------------

    def send_from(self, protocol: MuxProtocol, data: bytes, address: tuple[str, int]) -> None:
        if data[:2] == _BINDING_REQUEST and address not in protocol.addresses and len(data) >= 20:
            transaction_id = bytes(data[8:20])
            if transaction_id not in self._transactions:
                pending = protocol.pending
                if len(pending) >= MAX_TRANSACTIONS:
                    old = pending.pop(0)
                    if self._transactions.get(old) is protocol:
                        del self._transactions[old]
                pending.append(transaction_id)
                self._transactions[transaction_id] = protocol
        transport = self.transport
        if transport is not None:
            transport.sendto(data, address)

    # -- receiving ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if self._v6:
            addr = (addr[0], addr[1])
        protocol = self._by_address.get(addr)  # type: ignore[call-overload]
        if data and data[0] > 3:  # DTLS, SRTP, SRTCP (RFC 7983)
            if protocol is not None:
                if protocol.drop_rtcp and 127 < data[0] < 192 and len(data) > 1 and 191 < data[1] < 224:
                    return  # RTCP (RFC 5761 §4) of a listen-only member: nothing reads it
                protocol.datagram_received(data, addr)
            else:
                self.dropped += 1
            return
        head = data[:2]
        if head == _BINDING_REQUEST:
            target = self._request_target(data, addr, protocol)
            if target is None:
                self.dropped += 1
                return
            protocol = target
        elif head[:1] == b"\x01" and len(data) >= 20:  # a response or an error response
            target = self._transactions.pop(data[8:20], None)
            if target is not None:
                if data[8:20] in target.pending:
                    target.pending.remove(data[8:20])
                protocol = target
        if protocol is not None:
            protocol.datagram_received(data, addr)
        else:
            self.dropped += 1

    def _request_target(
        self, data: bytes, addr: tuple[str, int], known: MuxProtocol | None
    ) -> MuxProtocol | None:
        parsed = parse_request(data)
        if parsed is None:
            return known  # malformed: aioice answers it (or not) as it would on its own socket
        username, integrity_at, integrity, _ = parsed
        ufrag = username.split(b":", 1)[0]
        try:
            target = self._by_ufrag.get(ufrag.decode("utf8"))
        except UnicodeDecodeError:
            return None
        if target is None:
            return None
        if target is not known and integrity_ok(
            data, integrity_at, integrity, target.receiver.local_password.encode("utf8")
        ):
            self._claim(target, addr)
        return target

    def error_received(self, exc: Exception) -> None:
        logger.debug("media: the shared socket reported %s", type(exc).__name__)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.batch is not None:
            self.batch.close()
        if not self.closed.done():
            self.closed.set_result(None)

    def close(self) -> None:
        if self.batch is not None:
            self.batch.close()  # nothing more leaves through it, from Python or the compiled fan-out
        if self.transport is not None:
            self.transport.close()
            self.transport = None


# A classic BPF socket filter (SO_ATTACH_FILTER; run with the packet at its UDP header, so
# the payload starts at offset 8) that drops, in the kernel, the RTCP compound packets that
# begin with a receiver report: SRTCP leaves the first RTCP header in the clear (RFC 3711
# §3.4), first byte 128-191 and packet type 201 (RFC 5761 §4 keeps RTP payload types off
# 192-223). A member that sends no media (every listen-only member, a speaker without the
# floor) sends only those, every second or few, about the slots it receives: the relay reads
# none of it (`fastpath.ignore_rtcp`), and each one woke the event loop for nothing. Sender
# reports (a speaker's, for lip-sync), RTP, DTLS and STUN all pass.
_SO_ATTACH_FILTER = 26
_RR_FILTER = (
    (0x30, 0, 0, 8),  # ldb [8]: first byte of the payload
    (0x35, 0, 4, 128),  # jge #128 ? next : accept
    (0x35, 3, 0, 192),  # jge #192 ? accept : next
    (0x30, 0, 0, 9),  # ldb [9]: RTCP packet type
    (0x15, 0, 1, 201),  # jeq #201 ? drop : accept
    (0x06, 0, 0, 0),  # drop
    (0x06, 0, 0, 0xFFFFFFFF),  # accept, whole
)


def drop_receiver_reports(sock: socket.socket) -> bool:
    """Attach the filter above to `sock`; False (and nothing changed) where it cannot be."""
    import ctypes

    class Instruction(ctypes.Structure):
        _fields_ = (("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32))

    class Program(ctypes.Structure):
        _fields_ = (("len", ctypes.c_uint16), ("filter", ctypes.POINTER(Instruction)))

    instructions = (Instruction * len(_RR_FILTER))(*(Instruction(*i) for i in _RR_FILTER))
    program = Program(len(_RR_FILTER), ctypes.cast(instructions, ctypes.POINTER(Instruction)))
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, bytes(program))  # the kernel copies it
    except OSError as exc:
        logger.info("media: no socket filter for receiver reports (%s)", exc.strerror)
        return False
    return True


class UdpMux:
    """The relay's shared sockets, one per bound address (made on first use)."""

    def __init__(self) -> None:
        self._sockets: dict[str, MuxSocket] = {}
        self._binding: dict[str, asyncio.Future[None]] = {}  # addresses being bound now

    async def socket_for(self, address: str, bind: Any) -> MuxSocket | None:
        """The shared socket on `address`, bound by ``bind(address)`` (a bound
        ``socket.socket``, or None if the address cannot be bound) the first time. Offers
        answered at once wait for the one binding it, and get the same socket."""
        while True:
            shared = self._sockets.get(address)
            if shared is not None and shared.transport is not None:
                return shared
            binding = self._binding.get(address)
            if binding is None:
                break
            await asyncio.shield(binding)
        binding = self._binding[address] = asyncio.get_running_loop().create_future()
        try:
            sock = bind(address)
            if sock is None:
                return None
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, max(turn.UDP_SOCKET_BUFFER_SIZE, 1 << 21))
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 21)
                drop_receiver_reports(sock)
                shared = MuxSocket(sock)
                await asyncio.get_running_loop().create_datagram_endpoint(lambda: shared, sock=sock)
            except BaseException:
                sock.close()
                raise
            self._sockets[address] = shared
            return shared
        finally:
            del self._binding[address]
            binding.set_result(None)

    def claim_ufrag(self, connection: ice.Connection) -> None:
        """Make `connection`'s ICE ufrag unique among the connections on the shared sockets
        (they are told apart by it). aioice draws 4 characters (62⁴): among a few hundred
        members two may draw the same one, so a taken one is drawn again, longer. Called
        while gathering, before the answer's ``a=ice-ufrag`` is written from it."""
        while any(connection.local_username in shared._by_ufrag for shared in self._sockets.values()):
            connection._local_username = secrets.token_urlsafe(6).replace("-", "a").replace("_", "b")

    def sockets(self) -> list[MuxSocket]:
        return list(self._sockets.values())

    async def close(self) -> None:
        """Close every shared socket (their connections are closed already)."""
        sockets = list(self._sockets.values())
        self._sockets.clear()
        for shared in sockets:
            shared.close()
        await asyncio.gather(*(shared.closed for shared in sockets))


_dirty: list[sendmmsg.Batch] = []


def flush() -> None:
    """Send every batch written since the last flush (the relay calls this once a packet
    is forwarded; `queued` also schedules it, for the writes outside the packet path)."""
    while _dirty:
        _dirty.pop().flush()


def queued(batch: sendmmsg.Batch) -> None:
    """`batch` got its first datagram since its last flush."""
    if not _dirty:
        asyncio.get_running_loop().call_soon(flush)
    _dirty.append(batch)
