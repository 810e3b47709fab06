"""The one place that touches aioice's private *gathering* path (issue 13).

aioice binds one UDP socket per interface address on an ephemeral port
(``Connection.get_component_candidates``: ``create_datagram_endpoint(…, local_addr=(address,
0))``) and announces each socket's own address. A server needs two things it has not:

- **A port range** (``LINGKAR_MEDIA_PORTS``): the firewall opens those ports and nothing else.
  Every socket of the relay is bound inside it; when a range is used up, the offer that needs a
  socket is refused (`NoFreePort`) and nothing else changes.
- **An announced address** (``LINGKAR_MEDIA_ADDRESS``): behind 1:1 NAT, as on most clouds, the
  public address is on no interface. The relay then listens on one socket per member, bound
  to the announced address if the host has it, otherwise to the wildcard (``0.0.0.0`` or
  ``::``): what the NAT forwards to the private address arrives there, whichever interface that
  is, and replies leave by the route to the client, from the address the NAT maps back. It
  announces that address only, as a host candidate on the socket's port (the NAT keeps the
  port), so the private addresses stay out of the answer; it asks no STUN server.

`Gathering.install` replaces ``get_component_candidates`` of each aioice ``Connection`` of a
``RTCPeerConnection`` (an instance attribute: no other connection is touched) after
``setRemoteDescription`` and before ``setLocalDescription``, which gathers.

Private names used (aioice 0.13, aiortc 1.16; `check_supported` fails loudly if an upgrade
moves any of them, and ``tests/media/test_ports.py`` runs it and the behaviour):

- ``Connection.get_component_candidates(component, addresses, timeout=5)``, called by
  ``gather_candidates`` with ``component=`` and ``addresses=`` (aioice's own
  ``get_host_addresses``); its host-candidate part is redone here;
- ``Connection._protocols`` (``Connection.close`` closes every protocol in it),
  ``._closing`` (set by ``close``), ``.stun_server``, ``.turn_server``;
- ``StunProtocol(connection)`` and its ``local_candidate``; ``server_reflexive_candidate``;
  ``Candidate``, ``candidate_foundation``, ``candidate_priority``,
  ``turn.UDP_SOCKET_BUFFER_SIZE``;
- aiortc: ``RTCIceGatherer._connection``, and ``RTCPeerConnection.setLocalDescription``
  gathering (``setRemoteDescription`` does not).

The port range is per socket *address*: two sockets on different addresses (an IPv4 and an
IPv6 one of the same member, say) may share a port number, so a range of N ports holds N
members however many addresses the host has.
"""

from __future__ import annotations

import asyncio
import errno
import inspect
import ipaddress
import logging
import socket
import weakref
from typing import Any

import aioice
from aioice import ice, turn
from aioice.candidate import Candidate
from aiortc import RTCPeerConnection, rtcicetransport, rtcpeerconnection

from .mux import UdpMux, host_candidate

logger = logging.getLogger(__name__)

AIOICE_VERSION = "0.13."
SRFLX_TIMEOUT = 5.0  # seconds, as aioice waits for its STUN servers


class PortsUnsupported(RuntimeError):
    """The installed aioice/aiortc no longer gather the way this module expects."""


class NoFreePort(RuntimeError):
    """Every port of the configured range is taken (on one of the addresses to bind)."""


def check_supported() -> None:
    """Raise `PortsUnsupported` unless aioice is 0.13 and the gathering path is where it was
    (source inspection only: cheap)."""
    if not aioice.__version__.startswith(AIOICE_VERSION):
        raise PortsUnsupported(f"aioice {aioice.__version__}, written for {AIOICE_VERSION}x")
    signature = list(inspect.signature(ice.Connection.get_component_candidates).parameters)
    if signature != ["self", "component", "addresses", "timeout"]:
        raise PortsUnsupported(f"aioice Connection.get_component_candidates{signature} changed signature")
    checks: dict[str, tuple[Any, tuple[str, ...]]] = {
        "aioice gather_candidates binds through get_component_candidates": (
            ice.Connection.gather_candidates,
            (
                "get_host_addresses(",
                "self.get_component_candidates(component=component, addresses=addresses)",
                "self._local_candidates += candidates",
            ),
        ),
        "aioice get_component_candidates binds host sockets as this module does": (
            ice.Connection.get_component_candidates,
            (
                "lambda: StunProtocol(self), local_addr=(address, 0)",
                "socket.SOL_SOCKET, socket.SO_RCVBUF, turn.UDP_SOCKET_BUFFER_SIZE",
                "protocol.local_candidate = Candidate(",
                'candidate_priority(component, "host")',
                "self._protocols += host_protocols",
                "server_reflexive_candidate(protocol, self.stun_server)",
            ),
        ),
        "aioice Connection.close closes every protocol it holds": (
            ice.Connection.close,
            ("self._closing = True", "for protocol in self._protocols:", "await protocol.close()"),
        ),
        "aioice StunProtocol is made for its connection": (ice.StunProtocol.__init__, ("self.receiver = receiver",)),
        "aioice Connection keeps its ufrag in _local_username (the shared socket may redraw it)": (
            ice.Connection.__init__,
            ("self._local_username = local_username",),
        ),
        "aioice StunProtocol closes through its transport and connection_lost": (
            ice.StunProtocol.close,
            ("self.transport.close()", "await self.__closed"),
        ),
        "aioice server_reflexive_candidate asks from the protocol's socket": (
            ice.server_reflexive_candidate,
            ("await protocol.request(request, stun_server)", "protocol.local_candidate"),
        ),
        "aiortc RTCIceGatherer gathers through its aioice connection": (
            rtcicetransport.RTCIceGatherer.gather,
            ("await self._connection.gather_candidates()",),
        ),
        "aiortc gathers in setLocalDescription": (
            rtcpeerconnection.RTCPeerConnection.setLocalDescription,
            ("await self.__gather()",),
        ),
    }
    for what, (function, needles) in checks.items():
        try:
            source = inspect.getsource(function)
        except (OSError, TypeError) as exc:
            raise PortsUnsupported(f"{what}: no source ({exc})") from exc
        for needle in needles:
            if needle not in source:
                raise PortsUnsupported(f"{what}: {needle!r} not found")
    if "__gather()" in inspect.getsource(rtcpeerconnection.RTCPeerConnection.setRemoteDescription):
        raise PortsUnsupported("aiortc gathers in setRemoteDescription now: install() comes too late")
    if not isinstance(getattr(turn, "UDP_SOCKET_BUFFER_SIZE", None), int):
        raise PortsUnsupported("aioice turn.UDP_SOCKET_BUFFER_SIZE is gone")


def _family(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET


def _bind_address(announced: str) -> str:
    """Where to listen for an announced address: on it if the host has it, else on the
    wildcard of its family (1:1 NAT: the public address is on no interface)."""
    family = _family(announced)
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((announced, 0))
        except OSError:
            return "::" if family == socket.AF_INET6 else "0.0.0.0"
    return announced


class Gathering:
    """Where a relay's PeerConnections listen and what their candidates say.

    ``address``: the address announced in every answer (None: aioice's, one per interface).
    ``ports``: (low, high), both included, the range every socket is bound in (None: any).
    """

    def __init__(
        self,
        *,
        address: str | None = None,
        ports: tuple[int, int] | None = None,
        udp_mux: UdpMux | None = None,
    ) -> None:
        if ports is not None and not 1 <= ports[0] <= ports[1] <= 65535:
            raise ValueError(f"bad port range {ports}")
        self.address = address
        self.ports = ports
        self.bind_address = None if address is None else _bind_address(address)
        self.udp_mux = udp_mux
        self._next = 0  # where the next search through the range starts (round robin)

    def install(self, pc: RTCPeerConnection) -> None:
        """Make every ICE connection of `pc` gather here. Call after ``setRemoteDescription``
        (the transports exist, bundled) and before ``setLocalDescription`` (it gathers)."""
        connections = {id(c): c for c in (_connection(t) for t in pc.getTransceivers()) if c is not None}
        for connection in connections.values():
            self._install(connection)

    def _install(self, connection: ice.Connection) -> None:
        # held weakly: a closure on the connection holding it would be a reference cycle
        ref = weakref.ref(connection)

        async def get_component_candidates(
            component: int, addresses: list[str], timeout: int = 5
        ) -> list[Candidate]:
            connection = ref()
            if connection is None:
                return []
            return await self._gather(connection, component, addresses)

        connection.get_component_candidates = get_component_candidates  # type: ignore[method-assign]

    async def _gather(self, connection: ice.Connection, component: int, addresses: list[str]) -> list[Candidate]:
        """aioice's ``get_component_candidates``, with our ports and announced address."""
        if connection.turn_server is not None:
            raise PortsUnsupported("the relay's own ICE servers are STUN only with a media address or ports")
        if self.bind_address is not None:
            addresses = [self.bind_address]
        if self.udp_mux is not None and list(connection._components) == [component]:
            return await self._gather_shared(connection, component, addresses, self.udp_mux)
        loop = asyncio.get_running_loop()
        protocols: list[ice.StunProtocol] = []
        try:
            for address in addresses:
                sock = self._socket(address)
                if sock is None:
                    continue
                _, protocol = await loop.create_datagram_endpoint(lambda: ice.StunProtocol(connection), sock=sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, turn.UDP_SOCKET_BUFFER_SIZE)
                host, port = sock.getsockname()[:2]
                protocol.local_candidate = host_candidate(component, self.address or host, port)
                protocols.append(protocol)
        except BaseException:
            await _close(protocols)
            raise
        if connection._closing:  # closed while we bound: it will not close these
            await _close(protocols)
            return []
        connection._protocols += protocols
        candidates = [p.local_candidate for p in protocols]
        if connection.stun_server is not None and self.address is None:
            candidates += await _server_reflexive(protocols, connection.stun_server)
        return candidates

    async def _gather_shared(
        self, connection: ice.Connection, component: int, addresses: list[str], udp_mux: UdpMux
    ) -> list[Candidate]:
        """The host candidates of `connection` on the relay's shared sockets (`mux`): one
        socket per address for every connection, bound in the range the first time."""
        protocols: list[ice.StunProtocol] = []
        sockets = []
        for address in addresses:
            shared = await udp_mux.socket_for(address, self._socket)
            if shared is not None:
                sockets.append(shared)
        if connection._closing:  # closed while we bound: nothing to attach
            return []
        udp_mux.claim_ufrag(connection)  # nothing awaits from here on
        for shared in sockets:
            protocols.append(shared.attach(connection, component, self.address or shared.sockname[0]))
        connection._protocols += protocols
        candidates = [p.local_candidate for p in protocols]
        if connection.stun_server is not None and self.address is None:
            candidates += await _server_reflexive(protocols, connection.stun_server)
        return candidates

    def _socket(self, address: str) -> socket.socket | None:
        """A UDP socket bound on `address`, in the range; None if the address cannot be
        bound at all (aioice skips those too). Raises `NoFreePort`."""
        family = _family(address)
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if self.ports is None:
                sock.bind((address, 0))
                return sock
            low, high = self.ports
            size = high - low + 1
            for step in range(size):
                offset = (self._next + step) % size
                try:
                    sock.bind((address, low + offset))
                except OSError as exc:
                    if exc.errno == errno.EADDRINUSE:
                        continue  # a failed bind leaves the socket unbound: try the next port
                    raise
                self._next = (offset + 1) % size
                return sock
            raise NoFreePort(f"no UDP port free in {low}-{high}")
        except NoFreePort:
            sock.close()
            raise
        except OSError as exc:
            sock.close()
            logger.info("media: cannot bind a socket on an address of this host (%s)", exc.strerror)
            return None


def _connection(transceiver: Any) -> ice.Connection | None:
    connection = getattr(transceiver.receiver.transport.transport.iceGatherer, "_connection", None)
    return connection if isinstance(connection, ice.Connection) else None


async def _close(protocols: list[ice.StunProtocol]) -> None:
    for protocol in protocols:
        await protocol.close()


async def _server_reflexive(protocols: list[ice.StunProtocol], stun_server: tuple[str, int]) -> list[Candidate]:
    """Server-reflexive candidates of the IPv4 sockets, as aioice asks for them."""
    tasks = [
        asyncio.create_task(ice.server_reflexive_candidate(p, stun_server))
        for p in protocols
        if ipaddress.ip_address(p.local_candidate.host).version == 4
    ]
    if not tasks:
        return []
    done, pending = await asyncio.wait(tasks, timeout=SRFLX_TIMEOUT)
    for task in pending:
        task.cancel()
    return [task.result()[0] for task in done if task.exception() is None]


def local_addresses(pc: RTCPeerConnection) -> list[tuple[str, int]]:
    """(address, port) of every UDP socket the PeerConnection's ICE holds (tests, stats)."""
    found = []
    connections = {id(c): c for c in (_connection(t) for t in pc.getTransceivers()) if c is not None}
    for connection in connections.values():
        for protocol in connection._protocols:
            sockname = protocol.transport.get_extra_info("sockname")
            found.append((sockname[0], sockname[1]))
    return found
