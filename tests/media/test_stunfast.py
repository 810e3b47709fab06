"""The relay's fast STUN receive path (server/media/stunfast.py): consent checks answered
byte for byte as aioice answers them, media handed on without a STUN parse, and
everything else left to aioice."""

from __future__ import annotations

import os

import pytest
from aioice import ice, stun

from server.media import stunfast

from .conftest import Room
from .peers import wait_until


def test_private_receive_path_has_the_expected_shape() -> None:
    stunfast.check_supported()


@pytest.mark.parametrize(
    "addr",
    [
        ("127.0.0.1", 50000),
        ("192.0.2.7", 1),
        ("203.0.113.250", 65535),
        ("::1", 40000),
        ("2001:db8::5:1", 3478),
    ],
)
def test_binding_response_is_byte_for_byte_aioices(addr: tuple[str, int]) -> None:
    for _ in range(20):
        transaction_id = os.urandom(12)
        key = os.urandom(16).hex().encode()
        response = stun.Message(
            message_method=stun.Method.BINDING,
            message_class=stun.Class.RESPONSE,
            transaction_id=transaction_id,
        )
        response.attributes["XOR-MAPPED-ADDRESS"] = addr
        response.add_message_integrity(key)
        assert stunfast.binding_response(transaction_id, addr, key) == bytes(response)
        parsed = stun.parse_message(bytes(response))
        assert parsed.attributes["XOR-MAPPED-ADDRESS"] == addr and parsed.check_message_integrity(key)


def _client_ice(room: Room, name: str) -> tuple[ice.Connection, ice.CandidatePair]:
    (transceiver, *_) = room.peers[name].pc.getTransceivers()
    connection = transceiver.receiver.transport.transport._connection
    return connection, connection._nominated[1]


async def _check(connection: ice.Connection, pair: ice.CandidatePair, request: stun.Message) -> stun.Message:
    response, _ = await pair.protocol.request(
        request, pair.remote_addr, integrity_key=connection.remote_password.encode(), retransmissions=0
    )
    return response


async def test_consent_checks_are_answered_by_the_fast_path_and_the_rest_by_aioice(room: Room) -> None:
    await room.join("mod")
    listener = await room.join("l1", listen_only=True)
    room.relay.set_audible("circle-1", ["mod"])
    await wait_until(lambda: listener.received_from("mod") > 5)
    connection, pair = _client_ice(room, "l1")
    local = pair.local_candidate

    # a consent check (RFC 7675), as the client's browser sends them every ~5 s
    before = stunfast.stats[0]
    response = await _check(connection, pair, connection.build_request(pair, nominate=False))
    assert stunfast.stats[0] == before + 1
    assert response.message_class == stun.Class.RESPONSE
    assert response.attributes["XOR-MAPPED-ADDRESS"] == (local.host, local.port)

    # a nomination (the client is controlling): aioice's own path, still answered
    response = await _check(connection, pair, connection.build_request(pair, nominate=True))
    assert stunfast.stats[0] == before + 1
    assert response.message_class == stun.Class.RESPONSE

    # a role conflict (the client claims the controlled role too): aioice repairs it
    request = connection.build_request(pair, nominate=False)
    del request.attributes["ICE-CONTROLLING"]
    request.attributes["ICE-CONTROLLED"] = (1 << 64) - 1  # wins the tie: aioice answers 487
    with pytest.raises(stun.TransactionFailed) as failed:
        await _check(connection, pair, request)
    assert failed.value.response.error_code == 487
    assert stunfast.stats[0] == before + 1

    # a wrong password: aioice's (unsigned) 401, which the client's transaction ignores
    request = connection.build_request(pair, nominate=False)
    with pytest.raises(stun.TransactionError):
        await pair.protocol.request(request, pair.remote_addr, integrity_key=b"wrong", retransmissions=0)
    assert stunfast.stats[0] == before + 1

    # media still flows both ways through the fast path, and consent checks keep working
    listener.reset_counts()
    await wait_until(lambda: listener.received_from("mod") > 5)
    response = await _check(connection, pair, connection.build_request(pair, nominate=False))
    assert stunfast.stats[0] == before + 2
    assert room.peers["l1"].pc.connectionState == "connected"


async def test_every_socket_of_a_relay_connection_has_the_fast_path(room: Room) -> None:
    await room.join("mod")
    ((peer_key, peer),) = room.relay._peers.items()
    (transceiver, *_) = peer.pc.getTransceivers()
    connection = transceiver.receiver.transport.transport._connection
    protocols = [p for p in connection._protocols if isinstance(p, ice.StunProtocol)]
    assert protocols and all("datagram_received" in vars(p) for p in protocols)
    assert stunfast.install(connection) == 0  # installed once


async def test_consent_requests_are_byte_for_byte_aioices(room: Room) -> None:
    await room.join("mod")
    (peer,) = room.relay._peers.values()
    (transceiver, *_) = peer.pc.getTransceivers()
    connection = transceiver.receiver.transport.transport._connection
    await wait_until(lambda: bool(connection._nominated))
    pair = connection._nominated[1]
    for _ in range(5):
        request = connection.build_request(pair, nominate=False)
        request.add_message_integrity(connection.remote_password.encode("utf8"))
        assert stunfast.consent_request(connection, pair.component, request.transaction_id) == bytes(request)


async def test_the_relays_consent_checks_come_from_one_timer_and_expire(
    room: Room, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stunfast, "CONSENT_INTERVAL", 0.05)
    monkeypatch.setattr(stunfast, "CONSENT_FAILURES", 3)
    speaker = await room.join("mod")
    listener = await room.join("l1", listen_only=True)
    room.relay.set_audible("circle-1", ["mod"])
    await wait_until(lambda: listener.received_from("mod") > 5)
    relay_ice = [
        next(iter(p.pc.getTransceivers())).receiver.transport.transport._connection
        for p in room.relay._peers.values()
    ]
    # no task of aioice's: the clock runs on a timer
    assert all(c._query_consent_task is not None and c._query_consent_task.done() for c in relay_ice)
    sent, answered = stunfast.stats[1], stunfast.stats[2]
    await wait_until(lambda: stunfast.stats[2] >= answered + 10, limit=5)
    assert stunfast.stats[1] >= sent + 10
    assert all(p.pc.connectionState == "connected" for p in room.peers.values())

    # the listener stops answering: consent expires, the relay closes its connection
    client_ice, _ = _client_ice(room, "l1")
    for protocol in client_ice._protocols:
        protocol.datagram_received = lambda data, addr: None
    await wait_until(lambda: room.relay.stats()["peers"] == 1, limit=5)
    assert room.relay.slots("circle-1", "l1") is None
    assert speaker.pc.connectionState == "connected"
