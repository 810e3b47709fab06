"""sendmmsg (server/media/sendmmsg.py): the same datagrams, byte for byte, as sendto."""

from __future__ import annotations

import os
import socket

from server.media import sendmmsg


def _receivers(n: int) -> list[socket.socket]:
    sockets = []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        s.settimeout(2)
        sockets.append(s)
    return sockets


def test_a_batch_delivers_the_datagrams_sendto_delivers() -> None:
    assert sendmmsg.AVAILABLE  # Linux, cffi (pylibsrtp's dependency)
    receivers = _receivers(5)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.bind(("127.0.0.1", 0))
    try:
        datagrams = [os.urandom(size) for size in (1, 79, 120, 1200, 1500)]
        for data, r in zip(datagrams, receivers, strict=True):
            sender.sendto(data, r.getsockname())
        by_sendto = [(r.recvfrom(2048)) for r in receivers]

        batch = sendmmsg.SendBatch(sender, capacity=3)  # more than capacity: two calls
        for data, r in zip(datagrams, receivers, strict=True):
            batch.add(data, r.getsockname())
        assert batch.flush() == 2  # the first three went when the fourth was added
        by_batch = [(r.recvfrom(2048)) for r in receivers]
        assert by_batch == by_sendto  # same bytes, from the same address and port
        assert [data for data, _ in by_batch] == datagrams
    finally:
        sender.close()
        for r in receivers:
            r.close()
