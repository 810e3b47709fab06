"""Free loopback ports.

Never 6379 (a developer's own Redis may live there). A port found free can be taken by
someone else before it is used; where the code that listens accepts a socket, hand it
`listening_socket()` instead: that port is ours from the start.
"""

from __future__ import annotations

import random
import socket

REDIS_DEFAULT = 6379


def free_port(kind: str = "tcp") -> int:
    """A loopback port (`kind` "tcp" or "udp") that nothing held a moment ago."""
    sock_type = {"tcp": socket.SOCK_STREAM, "udp": socket.SOCK_DGRAM}[kind]
    while True:
        with socket.socket(socket.AF_INET, sock_type) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port != REDIS_DEFAULT:
            return port


def listening_socket() -> tuple[socket.socket, int]:
    """A TCP socket bound to a free loopback port and listening (connections wait in its
    backlog until a server accepts them: no start-up race), and that port. The caller
    closes it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock, int(sock.getsockname()[1])


def free_port_range(size: int) -> tuple[int, int]:
    """`size` consecutive UDP ports nothing on this host holds now, below the kernel's
    ephemeral range (32768 up on Linux), where the client peers' own sockets land."""
    for _ in range(100):
        low = random.randrange(20000, 32768 - size)
        if all(_free(port) for port in range(low, low + size)):
            return low, low + size - 1
    raise RuntimeError(f"no {size} free UDP ports in a row")


def _free(port: int) -> bool:
    for family, wildcard in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            try:
                if family == socket.AF_INET6:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                probe.bind((wildcard, port))
            except OSError:
                return False
    return True
