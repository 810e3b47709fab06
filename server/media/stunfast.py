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

`install_consent` replaces the connection's consent freshness (RFC 7675) *requests* too:
aioice runs a task per connection that sleeps, builds a request (three serializations),
runs a STUN transaction (a future and a retransmission timer) and parses the response.
Here one timer for all connections (`ticker.Ticker`, no task) sends the same request,
byte for byte (built here), at the same randomised interval; the answer is recognised
by its transaction id in the fast receive path and authenticated as aioice does
(MESSAGE-INTEGRITY with the remote password, FINGERPRINT). A check not answered by the
next tick counts as a failure (aioice waits 500 ms: an answer that is a few seconds late
counts here, and RFC 7675 only asks that consent expire after 30 s without one);
`CONSENT_FAILURES` in a row close the connection, as aioice does.

Private names used (aioice 0.13; `check_supported` fails loudly if an upgrade moves any):
``StunProtocol.datagram_received``, ``.receiver``, ``.local_candidate``, ``.transport``;
``Connection._protocols``, ``._closing``, ``._early_checks_done``, ``.ice_controlling``,
``.local_password``, ``._valid_username``, ``._remote_candidates``, ``._find_pair``;
``Candidate._network_host``; ``CandidatePair.state``; for consent ``Connection.connect``
starting ``self.query_consent()`` as ``_query_consent_task``, ``.remote_username``,
``.local_username``, ``.remote_password``, ``._tie_breaker``, ``._nominated``.
"""

from __future__ import annotations

import asyncio
import binascii
import hmac
import inspect
import logging
import random
import secrets
import socket
import struct
import weakref
from typing import Any

from aioice import ice, stun
from aioice.candidate import candidate_priority

from .ticker import Ticker

logger = logging.getLogger(__name__)

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
_PRIORITY = 0x0024
_SUCCESS = b"\x01\x01"
_SUCCEEDED = ice.CandidatePair.State.SUCCEEDED
CONSENT_INTERVAL = ice.CONSENT_INTERVAL  # seconds, randomised ×0.8-1.2 (RFC 7675 §5.1)
CONSENT_FAILURES = ice.CONSENT_FAILURES  # checks in a row without an answer: consent expired
_HEAD = struct.Struct("!HHI12s")
_ATTR = struct.Struct("!HH")
_XOR_PORT = _COOKIE >> 16


class StunFastUnsupported(RuntimeError):
    """The installed aioice no longer receives the way this module expects."""


def _problem() -> str | None:
    """What of aioice's receive and consent paths is not where it was (None: all is)."""
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
        "Connection.connect starts query_consent through the instance": (
            ice.Connection.connect,
            ("self._query_consent_task = asyncio.create_task(self.query_consent())",),
        ),
        "Connection.query_consent sends build_request(nominate=False) to each nominated pair": (
            ice.Connection.query_consent,
            (
                "for pair in self._nominated.values():",
                "request = self.build_request(pair, nominate=False)",
                'integrity_key=self.remote_password.encode("utf8")',
                "retransmissions=0",
                "if failures >= CONSENT_FAILURES:",
                "self._query_consent_task = None",
                "return await self.close()",
            ),
        ),
        "Connection.build_request writes USERNAME, PRIORITY and the role": (
            ice.Connection.build_request,
            (
                'tx_username = f"{self.remote_username}:{self.local_username}"',
                'request.attributes["PRIORITY"] = candidate_priority(pair.component, "prflx")',
                'request.attributes["ICE-CONTROLLING"] = self._tie_breaker',
                'request.attributes["ICE-CONTROLLED"] = self._tie_breaker',
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
            return f"{what}: no source ({exc})"
        for needle in needles:
            if needle not in source:
                return f"{what}: {needle!r} not found"
    return None


# Checked once, at import: aioice as installed, not as a test may have wrapped it since.
_PROBLEM = _problem()


def check_supported() -> None:
    """Raise `StunFastUnsupported` unless aioice's receive and consent paths were where
    this module expects them when it was imported (source inspection only)."""
    if _PROBLEM is not None:
        raise StunFastUnsupported(_PROBLEM)


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
    return _sign(_HEAD.pack(_BINDING_RESPONSE, 0, _COOKIE, transaction_id), mapped, key)


def parse_request(data: bytes) -> tuple[bytes, int, bytes, list[int]] | None:
    """(USERNAME, offset of MESSAGE-INTEGRITY, its value, the attribute types before it) of
    a well-formed STUN message that has both (FINGERPRINT, if any, last and right); None
    otherwise. Used here for consent checks and by `mux` to tell connections apart."""
    parsed = _parse(data)
    if parsed is None or parsed[0] is None:
        return None
    return parsed[0], parsed[1], parsed[2], parsed[3]


def _parse(data: bytes) -> tuple[bytes | None, int, bytes, list[int]] | None:
    """`parse_request`'s walk over the attributes; USERNAME may be missing (a response)."""
    size = len(data)
    if size < 20 or data[4:8] != _COOKIE_BYTES or int.from_bytes(data[2:4], "big") + 20 != size:
        return None
    username = integrity = None
    integrity_at = 0
    kinds: list[int] = []
    pos = 20
    while pos <= size - 4:
        kind, length = _ATTR.unpack_from(data, pos)
        end = pos + 4 + length
        if end > size:
            return None
        if integrity is None:
            kinds.append(kind)
            if kind == _USERNAME:
                username = data[pos + 4 : end]
            elif kind == _INTEGRITY:
                integrity_at, integrity = pos, data[pos + 4 : end]
        elif kind == _FINGERPRINT:
            if length != 4 or end != size:
                return None
            check = data[:2] + (pos - 12).to_bytes(2, "big") + data[4:pos]
            if binascii.crc32(check) ^ _FINGERPRINT_XOR != int.from_bytes(data[pos + 4 : end], "big"):
                return None
        pos = end + (-length % 4)
    if pos != size or integrity is None:
        return None
    return username, integrity_at, integrity, kinds


def integrity_ok(data: bytes, integrity_at: int, integrity: bytes, key: bytes) -> bool:
    """MESSAGE-INTEGRITY (RFC 5389 §15.4) of `data` at `integrity_at` checks with `key`."""
    signed = data[:2] + (integrity_at + 4).to_bytes(2, "big") + data[4:integrity_at]
    return hmac.compare_digest(integrity, hmac.digest(key, signed, "sha1"))


def _answer_consent(protocol: Any, data: bytes, addr: tuple[str, int]) -> bool:
    """Answer `data` if it is a plain consent check (see the module's docstring); False
    to leave it to aioice."""
    connection = protocol.receiver
    if connection._closing or not connection._early_checks_done:
        return False
    parsed = parse_request(data)
    if parsed is None:
        return False
    username, integrity_at, integrity, kinds = parsed
    controlling = connection.ice_controlling
    if (not controlling and _USE_CANDIDATE in kinds) or (_CONTROLLING if controlling else _CONTROLLED) in kinds:
        return False  # a nomination (aioice acts on it) or a role conflict (aioice repairs it)
    try:
        valid = connection._valid_username(username.decode("utf8"))
    except UnicodeDecodeError:
        return False
    if not valid:
        return False
    key = connection.local_password.encode("utf8")
    if not integrity_ok(data, integrity_at, integrity, key):
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
        head = data[:2]
        if head == _BINDING_REQUEST:
            if _answer_consent(protocol, data, addr):
                stats[0] += 1
                return
        elif head == _SUCCESS and _waiting and _consent_answer(data):
            return
        original(protocol, data, addr)

    protocol.datagram_received = datagram_received  # type: ignore[method-assign]


stats = [0, 0, 0]
"""[consent checks answered here, consent requests sent here, their answers received]
(for tests)."""


def _sign(head: bytes, attributes: bytes, key: bytes) -> bytes:
    """A STUN message: `head` (type, then transaction id at [8:20]) and `attributes`,
    then MESSAGE-INTEGRITY with `key` and FINGERPRINT, as aioice's
    ``add_message_integrity`` writes them."""
    length = len(attributes)
    signed = head[:2] + (length + 24).to_bytes(2, "big") + head[4:20] + attributes
    data = signed + _ATTR.pack(_INTEGRITY, 20) + hmac.digest(key, signed, "sha1")
    check = head[:2] + (length + 32).to_bytes(2, "big") + data[4:]
    return check + struct.pack("!HHI", _FINGERPRINT, 4, binascii.crc32(check) ^ _FINGERPRINT_XOR)


def consent_request(connection: Any, component: int, transaction_id: bytes) -> bytes:
    """The consent request aioice's ``query_consent`` sends for a pair of `component`
    (``build_request(pair, nominate=False)`` signed with the remote password)."""
    username = f"{connection.remote_username}:{connection.local_username}".encode()
    attributes = (
        _ATTR.pack(_USERNAME, len(username))
        + username
        + bytes(-len(username) % 4)
        + struct.pack("!HHI", _PRIORITY, 4, candidate_priority(component, "prflx"))
        + struct.pack(
            "!HHQ", _CONTROLLING if connection.ice_controlling else _CONTROLLED, 8, connection._tie_breaker
        )
    )
    head = _HEAD.pack(0x0001, 0, _COOKIE, transaction_id)
    return _sign(head, attributes, connection.remote_password.encode("utf8"))


_waiting: dict[bytes, _Consent] = {}  # transaction id -> the consent clock that sent it
_expiring: set[asyncio.Future[None]] = set()  # connections closing: consent expired


# One timer for every connection's consent checks, waking at most every fifth of the interval.
_clock = Ticker(lambda: CONSENT_INTERVAL * 0.2)


class _Consent:
    """Consent freshness of one connection: no task, no timer of its own (see the
    module's docstring); its checks are due on the relay's one consent `Ticker`."""

    __slots__ = ("_ref", "_sent", "_failures")

    def __init__(self, connection: Any) -> None:
        self._ref = weakref.ref(connection)
        self._sent: list[bytes] = []  # transaction ids of the last tick's requests
        self._failures = 0

    def schedule(self) -> None:
        delay = CONSENT_INTERVAL * (0.8 + 0.4 * random.random())
        _clock.at(asyncio.get_running_loop().time() + delay, self._tick)

    def answered(self, transaction_id: bytes) -> None:
        if transaction_id in self._sent:
            self._sent.remove(transaction_id)
            self._failures = 0

    def _tick(self) -> None:
        connection = self._ref()
        for transaction_id in self._sent:  # not answered in time
            _waiting.pop(transaction_id, None)
            self._failures += 1
        self._sent = []
        if connection is None or connection._closing:
            return
        if self._failures >= CONSENT_FAILURES:
            logger.info("%s consent to send expired", connection)
            task = asyncio.ensure_future(_expire(connection))
            connection._query_consent_task = task
            _expiring.add(task)
            task.add_done_callback(_expiring.discard)
            return
        for pair in list(connection._nominated.values()):
            transaction_id = secrets.token_bytes(12)
            data = consent_request(connection, pair.component, transaction_id)
            _waiting[transaction_id] = self
            self._sent.append(transaction_id)
            pair.protocol.transport.sendto(data, pair.remote_addr)
            stats[1] += 1
        self.schedule()


async def _expire(connection: Any) -> None:
    connection._query_consent_task = None  # close() must not wait for this very task
    await connection.close()


def install_consent(connection: Any) -> bool:
    """Send `connection`'s consent checks from one timer (see the module's docstring);
    install before ``connect()`` (right after gathering). False if consent checks were
    running already (they are then aioice's)."""
    if connection._query_consent_task is not None:
        return False
    ref = weakref.ref(connection)

    async def query_consent() -> None:  # connect() runs it as a task: it returns at once
        connection = ref()
        if connection is not None and not connection._closing:
            _Consent(connection).schedule()

    connection.query_consent = query_consent
    return True


def _consent_answer(data: bytes) -> bool:
    """True if `data` is the authenticated answer to a consent request sent here (it is
    then taken); False to leave it to aioice (its own transactions, anything else)."""
    consent = _waiting.get(data[8:20])
    if consent is None:
        return False
    connection = consent._ref()
    if connection is None:
        return False
    parsed = _parse(data)
    if parsed is None:
        return False
    _, integrity_at, integrity, _ = parsed
    if not integrity_ok(data, integrity_at, integrity, connection.remote_password.encode("utf8")):
        return True  # not authenticated: dropped, as aioice's transaction drops it
    del _waiting[data[8:20]]
    consent.answered(data[8:20])
    stats[2] += 1
    return True
