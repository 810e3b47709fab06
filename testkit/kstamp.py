"""Kernel receive timestamps and send times of aiortc peers in this process (the relay bench's
listeners and speakers), as the Janus anchor's harness takes them (`../shared/anchors/janus`,
`bench.py`), so that both benches report relay-added latency the same way.

* **Arrival**: aioice hands every non-STUN datagram to ``Connection.data_received`` straight from
  the asyncio datagram callback and queues it; the DTLS transport pops that queue in order. Right
  after ``recvfrom`` (in ``StunProtocol.datagram_received``) ``ioctl(SIOCGSTAMPNS)`` gives the
  kernel's receive timestamp of that datagram; a FIFO beside aioice's queue carries it to the
  moment the DTLS transport takes the datagram, and `arrival(receiver)` reads it while the
  receiver handles the packet. The time a datagram waited in the socket buffer while the
  listeners' (busy) event loop did something else is thus not counted. The first datagram on a
  socket has no timestamp (the ioctl switches timestamping on): it gets the user-space time.
* **Send**: ``RTCDtlsTransport._send_rtp`` gets the clear RTP packet right before SRTP protect
  and ``sendto``; for a transport given to `log_sends`, the time there is recorded per marked
  payload (`testkit.opus.mark`), keyed by (source, seq).

Both are **CLOCK_REALTIME** (``time.time()``), the clock of kernel socket timestamps. The mark's
own send time (``time.monotonic_ns()``, taken when the track made the packet, before aiortc
packetizes it) is on another clock and a little earlier; it is not used here. Taking the send
time at ``_send_rtp`` is the anchor's choice, so the two benches measure the same span.

Standard asyncio loop only (uvloop's datagram path is not patched here); Linux only.
"""

from __future__ import annotations

import collections
import fcntl
import struct
import time
from typing import Any

import aioice.ice
from aiortc.rtcdtlstransport import RTCDtlsTransport
from aiortc.rtp import is_rtcp

from testkit.opus import unmark

SIOCGSTAMPNS = 0x8907
_TS_BUF = bytes(16)
_TS = struct.Struct("qq")
_FIFO = "_kstamp_fifo"
_LAST = "_kstamp_last"
_FD = "_kstamp_fd"
_SENT = "_kstamp_sent"

_last_kts: list[float | None] = [None]
_installed = False


def _rtp_payload(data: bytes) -> bytes:
    b0 = data[0]
    off = 12 + 4 * (b0 & 0x0F)
    if b0 & 0x10:
        off += 4 + 4 * int.from_bytes(data[off + 2 : off + 4], "big")
    end = len(data) - (data[-1] if b0 & 0x20 else 0)
    return bytes(data[off:end])


def install() -> None:
    """Patch aioice and aiortc in this process (once; harmless for peers nobody asks about)."""
    global _installed
    if _installed:
        return
    _installed = True
    datagram_received = aioice.ice.StunProtocol.datagram_received
    data_received = aioice.ice.Connection.data_received
    recvfrom = aioice.ice.Connection.recvfrom
    send_rtp = RTCDtlsTransport._send_rtp

    def _datagram_received(self: Any, data: bytes, addr: Any) -> None:
        _last_kts[0] = None
        fd = self.__dict__.get(_FD)
        if fd is None:
            fd = self.__dict__[_FD] = self.transport.get_extra_info("socket").fileno()
        try:
            sec, nsec = _TS.unpack(fcntl.ioctl(fd, SIOCGSTAMPNS, _TS_BUF))
            _last_kts[0] = sec + nsec * 1e-9
        except OSError:  # the first datagram on a socket: timestamping is only switched on now
            pass
        datagram_received(self, data, addr)

    def _data_received(self: Any, data: bytes, component: int) -> None:
        fifo = self.__dict__.get(_FIFO)
        if fifo is None:
            fifo = self.__dict__[_FIFO] = collections.deque(maxlen=100000)
        kts = _last_kts[0]
        fifo.append(kts if kts is not None else time.time())
        data_received(self, data, component)

    async def _recvfrom(self: Any) -> Any:
        result = await recvfrom(self)
        fifo = self.__dict__.get(_FIFO)
        if fifo:
            self.__dict__[_LAST] = fifo.popleft()
        return result

    async def _send_rtp(self: Any, data: bytes) -> None:
        sent = self.__dict__.get(_SENT)
        if sent is not None and not is_rtcp(data):
            now = time.time()
            marked = unmark(_rtp_payload(data))
            if marked is not None:
                sent.setdefault((marked.source, marked.seq), now)
        await send_rtp(self, data)

    aioice.ice.StunProtocol.datagram_received = _datagram_received  # type: ignore[method-assign]
    aioice.ice.Connection.data_received = _data_received  # type: ignore[method-assign]
    aioice.ice.Connection.recvfrom = _recvfrom  # type: ignore[method-assign]
    RTCDtlsTransport._send_rtp = _send_rtp  # type: ignore[method-assign]


def arrival(receiver: Any) -> float | None:
    """The kernel receive time (CLOCK_REALTIME, s) of the datagram `receiver` (an aiortc
    ``RTCRtpReceiver``) is handling now; None before `install` or without a connection."""
    try:
        connection = receiver.transport.transport._connection
    except AttributeError:
        return None
    return connection.__dict__.get(_LAST)  # type: ignore[no-any-return]


def log_sends(sender: Any) -> dict[tuple[str, int], float]:
    """From now on, the send time (CLOCK_REALTIME, s) of every marked RTP packet `sender`
    (an aiortc ``RTCRtpSender``) sends, by (source, seq); the dict returned fills up."""
    return sender.transport.__dict__.setdefault(_SENT, {})  # type: ignore[no-any-return]


def pct(xs: list[float], p: float) -> float:
    """The anchor's percentile (nearest rank, rounded), so both benches compute alike."""
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, int(round(p / 100.0 * (len(xs) - 1)))))
    return xs[k]
