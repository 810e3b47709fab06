"""Free loopback ports.

Never 6379 (a developer's own Redis may live there). A port found free can be taken by
someone else before it is used; where the code that listens accepts a socket, hand it
`listening_socket()` instead: that port is ours from the start.
"""

from __future__ import annotations

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
