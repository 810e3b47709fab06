"""Batched UDP sends (``sendmmsg(2)``) through cffi in ABI mode.

    python -m server.media.sendmmsg [--listeners 100,300] [--rounds 300]

`Batch` is what the relay uses: the copies of one incoming packet for the listeners on one
shared socket (`mux`) are written and SRTP-protected in place in a fixed arena and leave in
one ``sendmmsg`` (32 at a time, `mux.CHUNK`). Its queue is an ``lk_batch`` struct
(`native`), so the compiled fan-out (``fanout.c``) writes into it and flushes it with the
same rules as `Batch.flush`. `SendBatch` queues ready-made datagrams (tests and the
measurement below).

``sendmmsg`` sends many datagrams in one system call, but through *one socket*; the
relay's listeners share one per address since the UDP mux (before it, aioice bound a socket
per member and nothing could be batched). Measured here (2 CPUs, loopback, 120-byte
datagrams, CPU time of the sending process, the receiver's softirq work included):
``sendto`` on one socket per listener 3.5-3.8 µs per datagram, ``sendto`` on one shared
socket 3.4-3.9 µs, ``sendmmsg`` with the message headers built once in advance 2.5-2.6 µs,
but 3.7-4.0 µs through `SendBatch`, which fills the headers in Python per datagram: the
saving only holds where the headers (addresses, buffers) stay in place from packet to
packet, as `Batch` keeps them.
"""

from __future__ import annotations

import argparse
import errno
import os
import socket
import struct
import time
from typing import Any

from . import native as _native


def _load() -> tuple[Any, Any] | None:
    ffi = _native.ffi  # one cffi module for the arena, its headers and the structs
    try:
        libc = ffi.dlopen(None)  # ABI mode: libc's own sendmmsg, no build step
        libc.sendmmsg  # noqa: B018 (raises AttributeError where libc has none)
    except (OSError, AttributeError):
        return None
    return ffi, libc


_LOADED = _load()
AVAILABLE = _LOADED is not None


def _sockaddr(addr: tuple[str, int]) -> bytes:
    host, port = addr[0], addr[1]
    if ":" in host:
        return struct.pack(
            "=HH4s16sI",
            socket.AF_INET6,
            socket.htons(port),
            b"\0" * 4,
            socket.inet_pton(socket.AF_INET6, host),
            0,
        )
    return struct.pack("=HH4s8x", socket.AF_INET, socket.htons(port), socket.inet_aton(host))


class SendBatch:
    """Datagrams for one UDP socket, sent with one ``sendmmsg`` (`flush`). Falls back to
    ``socket.sendto`` one by one where ``sendmmsg`` is not available."""

    def __init__(self, sock: socket.socket, capacity: int = 1024) -> None:
        self._sock = sock
        self._fd = sock.fileno()
        self._capacity = capacity
        self._queued: list[tuple[bytes, tuple[str, int]]] = []
        if _LOADED is not None:
            ffi, _ = _LOADED
            self._msgs = ffi.new("struct mmsghdr[]", capacity)
            self._iov = ffi.new("struct iovec[]", capacity)
            self._names: dict[tuple[str, int], Any] = {}

    def add(self, data: bytes, addr: tuple[str, int]) -> None:
        if len(self._queued) >= self._capacity:
            self.flush()
        self._queued.append((data, addr))

    def flush(self) -> int:
        """Send what is queued; returns how many datagrams the kernel took."""
        queued, self._queued = self._queued, []
        if not queued:
            return 0
        if _LOADED is None:
            for data, addr in queued:
                self._sock.sendto(data, addr)
            return len(queued)
        ffi, libc = _LOADED
        keep = []  # the cdata must outlive the call
        for i, (data, addr) in enumerate(queued):
            name = self._names.get(addr)
            if name is None:
                raw = _sockaddr(addr)
                name = self._names[addr] = (ffi.new("char[]", raw), len(raw))
            buffer = ffi.from_buffer(data)
            keep.append(buffer)
            self._iov[i].iov_base = buffer
            self._iov[i].iov_len = len(data)
            header = self._msgs[i].msg_hdr
            header.msg_name = name[0]
            header.msg_namelen = name[1]
            header.msg_iov = self._iov + i
            header.msg_iovlen = 1
        sent = libc.sendmmsg(self._fd, self._msgs, len(queued), 0)
        if sent < 0:
            raise OSError(ffi.errno, os.strerror(ffi.errno))
        for data, addr in queued[sent:]:  # the kernel took fewer (full buffer): the rest one by one
            self._sock.sendto(data, addr)
        return len(queued)


SLOT = 1536  # bytes of the arena per datagram: any RTP packet the relay forwards, plus SRTP's trailer


class Batch:
    """Datagrams written *in place* into a fixed arena and sent on one socket with one
    ``sendmmsg`` (`flush`): the fan-out of one incoming packet to every listener.

    The message headers point into the arena once and for all (slot i is bytes
    ``[i*SLOT, (i+1)*SLOT)``); a datagram is written by its sender straight into
    `buffer` at ``i*SLOT`` (`fastpath.RtpOut` writes the RTP packet there and SRTP-protects
    it there, through `slots[i]`), then `commit` sets its length and address. Nothing is
    copied in Python and nothing is allocated per datagram. Only where `AVAILABLE`.
    """

    def __init__(self, sock: socket.socket, capacity: int = 256) -> None:
        if _LOADED is None:
            raise RuntimeError("sendmmsg is not available here")
        ffi, libc = _LOADED
        self._sock = sock
        self._fd = sock.fileno()
        self._sendmmsg = libc.sendmmsg
        self._ffi = ffi
        self.capacity = capacity
        self.arena = ffi.new("char[]", capacity * SLOT)
        self.buffer = ffi.buffer(self.arena)
        self._msgs = ffi.new("struct mmsghdr[]", capacity)
        self._iov = ffi.new("struct iovec[]", capacity)
        self.slots = [self.arena + i * SLOT for i in range(capacity)]
        self._iovs = [self._iov[i] for i in range(capacity)]
        self._headers = [self._msgs[i].msg_hdr for i in range(capacity)]
        for i in range(capacity):
            self._iovs[i].iov_base = self.slots[i]
            self._headers[i].msg_iov = self._iov + i
            self._headers[i].msg_iovlen = 1
        # The queue's state, where `native`'s compiled fan-out writes too.
        self.c = ffi.new("struct lk_batch *")
        self.c.fd = self._fd
        self.c.capacity = capacity
        self.c.slot = SLOT
        self.c.arena = self.arena
        self.c.msgs = self._msgs
        self._names: dict[tuple[str, int], tuple[Any, int]] = {}

    @property
    def count(self) -> int:
        return int(self.c.count)

    @count.setter
    def count(self, value: int) -> None:
        self.c.count = value

    @property
    def sent(self) -> int:
        """Datagrams the kernel took."""
        return int(self.c.sent)

    @property
    def dropped(self) -> int:
        """Datagrams it refused (full buffer, unreachable address family…) or that were
        queued for a socket that closed since."""
        return int(self.c.dropped)

    @property
    def calls(self) -> int:
        """``sendmmsg`` system calls made."""
        return int(self.c.calls)

    def close(self) -> None:
        """Its socket is closing: what is queued, and will be, is dropped (its file number
        may soon be another socket's)."""
        self.c.fd = -1

    def name(self, addr: tuple[str, int]) -> tuple[Any, int]:
        """The socket address `addr` as ``sendmmsg`` takes it (kept until `forget`)."""
        name = self._names.get(addr)
        if name is None:
            raw = _sockaddr(addr)
            name = self._names[addr] = (self._ffi.new("char[]", raw), len(raw))
        return name

    def forget(self, addr: tuple[str, int]) -> None:
        self._names.pop(addr, None)

    def commit(self, index: int, length: int, name: tuple[Any, int]) -> None:
        """Datagram `index` (written at ``index*SLOT``) is `length` bytes for `name`."""
        self._iovs[index].iov_len = length
        header = self._headers[index]
        if header.msg_name != name[0]:  # a fan-out puts each listener at the same index
            header.msg_name = name[0]
            header.msg_namelen = name[1]
        self.c.count = index + 1

    def add(self, data: bytes, addr: tuple[str, int]) -> None:
        """Queue a copy of `data` (tests, and writes that are not made in place)."""
        if self.count == self.capacity:
            self.flush()
        index = self.count
        self.buffer[index * SLOT : index * SLOT + len(data)] = data
        self.commit(index, len(data), self.name(addr))

    def flush(self) -> int:
        """Send what is queued; returns how many datagrams the kernel took. A datagram it
        refuses is dropped (and counted), as a full socket buffer drops UDP anyway."""
        c = self.c
        if self._sock.fileno() != self._fd:  # closed since (its number may be another socket's now)
            c.fd = -1
        if _native.LIB is not None:
            _native.LIB.lk_flush(c)  # the same, compiled (it is also called from the fan-out)
            return self.sent
        count, c.count = c.count, 0
        if c.fd < 0:
            c.dropped += count
            return self.sent
        start = 0
        while start < count:
            sent = self._sendmmsg(self._fd, self._msgs + start, count - start, 0)
            c.calls += 1
            if sent < 0:
                error = self._ffi.errno
                if error == errno.EINTR:
                    continue
                if error in (errno.EAGAIN, errno.ENOBUFS):
                    c.dropped += count - start
                    break
                c.dropped += 1  # this one cannot go (its address): the others still do
                start += 1
                continue
            start += sent
            c.sent += sent
        return self.sent


def _measure(listeners: int, rounds: int) -> dict[str, float]:
    receivers = []
    for _ in range(listeners):
        r = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        r.bind(("127.0.0.1", 0))
        r.setblocking(False)
        r.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        receivers.append(r)
    addrs = [r.getsockname() for r in receivers]
    senders = []
    for _ in range(listeners):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        senders.append(s)
    payload = os.urandom(120)
    batch = SendBatch(senders[0], capacity=listeners)

    def drain() -> None:
        for r in receivers:
            try:
                while True:
                    r.recv(2048)
            except BlockingIOError:
                pass

    def per_socket() -> None:
        for s, a in zip(senders, addrs, strict=True):
            s.sendto(payload, a)

    def shared() -> None:
        for a in addrs:
            senders[0].sendto(payload, a)

    def batched() -> None:
        for a in addrs:
            batch.add(payload, a)
        batch.flush()

    results = {}
    try:
        for name, send in (
            ("sendto per socket", per_socket),
            ("sendto shared", shared),
            ("sendmmsg shared", batched),
        ):
            drain()
            cpu = 0.0
            for k in range(rounds):
                started = time.process_time()
                send()
                cpu += time.process_time() - started
                if k % 20 == 19:
                    drain()
            results[name] = cpu / (rounds * listeners) * 1e6
    finally:
        for s in senders + receivers:
            s.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--listeners", default="100,300")
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args()
    print(f"sendmmsg available: {AVAILABLE}; µs of CPU per datagram (loopback, 120 bytes)")
    for n in (int(x) for x in args.listeners.split(",")):
        row = _measure(n, args.rounds)
        print(f"{n:>5} listeners: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()), flush=True)


if __name__ == "__main__":
    main()
