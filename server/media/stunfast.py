"""The one place that touches aioice's private *receive* path for the relay's sockets.

Every datagram reaching one of the relay's UDP sockets goes to aioice's
``StunProtocol.datagram_received``, which first tries to parse it as STUN: each RTP and
RTCP packet costs a failed parse and an exception before it reaches the DTLS transport.
And each ICE consent check (RFC 7675: every listener's browser sends one every ~5 s, and
the relay answers) costs two full parses, an integrity check and a response serialized
three times (aioice's ``Message.__bytes__`` with ``ipaddress`` for the mapped address) —
with hundreds of idle listeners that was the largest part of the relay's idle CPU
(``python -m server.media.bench``, ``LINGKAR_BENCH_IDLE_PROFILE``).

`install` replaces ``datagram_received`` of each of a connection's protocols (an
instance attribute: no other connection is touched) by one that

- hands what is not STUN (first byte above 3, RFC 7983 §7) straight to the connection, as
  aioice does after its parse fails;
- answers a Binding request that is a plain consent check — authenticated (USERNAME and
  MESSAGE-INTEGRITY, as aioice checks them), no role conflict, from a remote candidate whose
  pair already succeeded, and no nomination to act on — with a response built here, byte
  for byte the one aioice builds (XOR-MAPPED-ADDRESS, MESSAGE-INTEGRITY, FINGERPRINT;
  ``tests/media/test_stunfast.py`` compares them); for such a check aioice's
  ``check_incoming`` changes nothing;
- leaves everything else (responses to the relay's own checks, errors, any request that is
  not exactly such a check, anything malformed) to aioice's own ``datagram_received``.

Private names used (aioice 0.13; `check_supported` fails loudly if an upgrade moves any):
``StunProtocol.datagram_received``, ``.receiver``, ``.local_candidate``, ``.transport``;
``Connection._protocols``, ``._closing``, ``._early_checks_done``, ``.ice_controlling``,
``.local_password``, ``._valid_username``, ``._remote_candidates``, ``._find_pair``;
``Candidate._network_host``; ``CandidatePair.state``.
"""

from __future__ import annotations

import binascii
import hmac
import inspect
import socket
import struct
import weakref
from typing import Any

from aioice import ice, stun

_COOKIE = stun.COOKIE
_COOKIE_BYTES = struct.pack("!I", _COOKIE)
_FINGERPRINT_XOR = stun.FINGERPRINT_XOR
_BINDING_REQUEST = b"\x00\x01"
_BINDING_RESPONSE = 0x0101
_USERNAME = 0x0006
_INTEGRITY = 0x0008
_USE_CANDIDATE = 0x0025
_FINGERPRINT = 0x8028
_CONTROLLED = 0x8029
_CONTROLLING = 0x802A
_SUCCEEDED = ice.CandidatePair.State.SUCCEEDED
_HEAD = struct.Struct("!HHI12s")
_ATTR = struct.Struct("!HH")
_XOR_PORT = _COOKIE >> 16


class StunFastUnsupported(RuntimeError):
    """The installed aioice no longer receives the way this module expects."""


def check_supported() -> None:
    """Raise `StunFastUnsupported` unless aioice's receive path is where it was (cheap:
    source inspection only)."""
    checks = {
        "StunProtocol.datagram_received parses, else hands the data to its receiver": (
            ice.StunProtocol.datagram_received,
            (
                "message = stun.parse_message(data)",
                "self.receiver.data_received(data, self.local_candidate.component)",
                "self.receiver.request_received(message, addr, self)",
            ),
        ),
        "Connection.request_received answers a Binding request as this module does": (
            ice.Connection.request_received,
            (
                "if self._closing:",
                'self._valid_username(message.attributes["USERNAME"])',
                'message.check_message_integrity(self.local_password.encode("utf8"))',
                'if self.ice_controlling and "ICE-CONTROLLING" in message.attributes:',
                'elif not self.ice_controlling and "ICE-CONTROLLED" in message.attributes:',
                'response.attributes["XOR-MAPPED-ADDRESS"] = addr',
                'response.add_message_integrity(self.local_password.encode("utf8"))',
                "protocol.send_stun(response, addr)",
                "if not self._early_checks_done:",
                "self.check_incoming(message, addr, protocol)",
            ),
        ),
        "Connection.check_incoming finds the candidate and its pair": (
            ice.Connection.check_incoming,
            (
                "if c._network_host == addr[0] and c.port == addr[1]:",
                "pair = self._find_pair(protocol, remote_candidate)",
                "if pair.state in [CandidatePair.State.FROZEN, CandidatePair.State.FAILED]:",
                "if pair.state == CandidatePair.State.WAITING:",
                'if "USE-CANDIDATE" in message.attributes and not self.ice_controlling:',
            ),
        ),
        "Message.add_message_integrity adds MESSAGE-INTEGRITY then FINGERPRINT": (
            stun.Message.add_message_integrity,
            ("self.add_fingerprint()",),
        ),
    }
    for what, (function, needles) in checks.items():
        try:
            source = inspect.getsource(function)
        except (OSError, TypeError) as exc:
            raise StunFastUnsupported(f"{what}: no source ({exc})") from exc
        for needle in needles:
            if needle not in source:
                raise StunFastUnsupported(f"{what}: {needle!r} not found")


def binding_response(transaction_id: bytes, addr: tuple[str, int], key: bytes) -> bytes:
    """The Binding success response aioice's ``request_received`` sends: XOR-MAPPED-ADDRESS
    `addr`, MESSAGE-INTEGRITY with `key`, FINGERPRINT."""
    host, port = addr[0], addr[1]
    if ":" in host:
        packed = socket.inet_pton(socket.AF_INET6, host)
        pad = _COOKIE_BYTES + transaction_id
        xored = (int.from_bytes(packed, "big") ^ int.from_bytes(pad, "big")).to_bytes(16, "big")
        mapped = struct.pack("!HHBBH", 0x0020, 20, 0, 2, port ^ _XOR_PORT) + xored
    else:
        packed = socket.inet_aton(host)
        xored = (int.from_bytes(packed, "big") ^ _COOKIE).to_bytes(4, "big")
        mapped = struct.pack("!HHBBH", 0x0020, 8, 0, 1, port ^ _XOR_PORT) + xored
    length = len(mapped)
    signed = _HEAD.pack(_BINDING_RESPONSE, length + 24, _COOKIE, transaction_id) + mapped
    data = signed + _ATTR.pack(_INTEGRITY, 20) + hmac.digest(key, signed, "sha1")
    check = _HEAD.pack(_BINDING_RESPONSE, length + 32, _COOKIE, transaction_id) + data[20:]
    fingerprint = binascii.crc32(check) ^ _FINGERPRINT_XOR
    return check + struct.pack("!HHI", _FINGERPRINT, 4, fingerprint)


def _answer_consent(protocol: Any, data: bytes, addr: tuple[str, int]) -> bool:
    """Answer `data` if it is a plain consent check (see the module's docstring); False
    to leave it to aioice."""
    connection = protocol.receiver
    if connection._closing or not connection._early_checks_done:
        return False
    size = len(data)
    if size < 20 or data[4:8] != _COOKIE_BYTES or int.from_bytes(data[2:4], "big") + 20 != size:
        return False
    username = integrity = integrity_at = None
    controlling = connection.ice_controlling
    pos = 20
    while pos <= size - 4:
        kind, length = _ATTR.unpack_from(data, pos)
        end = pos + 4 + length
        if end > size:
            return False
        if integrity_at is None:
            if kind == _USERNAME:
                username = data[pos + 4 : end]
            elif kind == _INTEGRITY:
                integrity_at = pos
                integrity = data[pos + 4 : end]
            elif kind == _USE_CANDIDATE and not controlling:
                return False  # a nomination: aioice acts on it
            elif kind == (_CONTROLLING if controlling else _CONTROLLED):
                return False  # a role conflict: aioice repairs it
        elif kind == _FINGERPRINT:
            if length != 4 or end != size:
                return False
            check = data[:2] + (pos - 12).to_bytes(2, "big") + data[4:pos]
            if binascii.crc32(check) ^ _FINGERPRINT_XOR != int.from_bytes(data[pos + 4 : end], "big"):
                return False
        pos = end + (-length % 4)
    if pos != size or username is None or integrity_at is None:
        return False
    try:
        valid = connection._valid_username(username.decode("utf8"))
    except UnicodeDecodeError:
        return False
    if not valid:
        return False
    key = connection.local_password.encode("utf8")
    signed = data[:2] + (integrity_at + 4).to_bytes(2, "big") + data[4:integrity_at]
    if not hmac.compare_digest(integrity, hmac.digest(key, signed, "sha1")):
        return False
    host, port = addr[0], addr[1]
    for candidate in connection._remote_candidates:
        if candidate._network_host == host and candidate.port == port:
            pair = connection._find_pair(protocol, candidate)
            if pair is None or pair.state is not _SUCCEEDED:
                return False
            break
    else:
        return False
    try:
        response = binding_response(data[8:20], (host, port), key)
    except (OSError, ValueError):  # an address inet_pton does not take (scoped): aioice's way
        return False
    protocol.transport.sendto(response, (host, port))
    return True


def install(connection: Any) -> int:
    """Install the fast receive path on every ``StunProtocol`` of `connection` (an
    ``aioice.Connection``, after gathering); returns how many. The replacement holds its
    protocol weakly (it lives on it: a strong reference would make a cycle)."""
    count = 0
    for protocol in connection._protocols:
        if isinstance(protocol, ice.StunProtocol) and "datagram_received" not in vars(protocol):
            _install(protocol)
            count += 1
    return count


def _install(protocol: ice.StunProtocol) -> None:
    original = type(protocol).datagram_received
    ref = weakref.ref(protocol)

    def datagram_received(data: bytes, addr: tuple[Any, ...]) -> None:
        protocol = ref()
        if protocol is None:
            return
        if data and data[0] > 3:  # RTP, RTCP, DTLS (RFC 7983): never STUN
            protocol.receiver.data_received(data, protocol.local_candidate.component)
            return
        if data[:2] == _BINDING_REQUEST and _answer_consent(protocol, data, addr):
            stats[0] += 1
            return
        original(protocol, data, addr)

    protocol.datagram_received = datagram_received  # type: ignore[method-assign]


stats = [0]
"""Consent checks answered here (for tests)."""
