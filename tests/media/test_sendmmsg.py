"""sendmmsg (server/media/sendmmsg.py): the same datagrams, byte for byte, as sendto."""

from __future__ import annotations

import os
import socket

import pytest

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


def test_a_batch_of_a_closed_socket_sends_nothing_on_a_socket_that_took_its_number() -> None:
    if not sendmmsg.AVAILABLE:
        pytest.skip("no sendmmsg in this libc")
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(0.2)
    closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    batch = sendmmsg.Batch(closed, 4)
    batch.add(b"stale", receiver.getsockname())
    closed.close()
    reused = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # most likely the same number
    try:
        batch.flush()
        assert batch.dropped == 1 and batch.sent == 0
        reused.sendto(b"witness", receiver.getsockname())
        assert receiver.recv(100) == b"witness"  # the stale datagram never went out before it
    finally:
        reused.close()
        receiver.close()
