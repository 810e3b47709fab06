"""Client frames decode to typed structs or fail with a FrameError code, never anything else."""

from __future__ import annotations

from typing import Any

import msgpack
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from signaling.close import CloseCode
from signaling.frames import (
    CLIENT_FRAME_TYPES,
    MAX_FRAME_BYTES,
    Ack,
    Admitted,
    Answer,
    Error,
    ErrorCode,
    Event,
    ExtendTurn,
    FrameError,
    GiveFloor,
    Hello,
    LeaveQuietly,
    Lobby,
    LobbyCircle,
    Media,
    Offer,
    PrivateNote,
    RaiseHand,
    Redirect,
    SetMode,
    Snapshot,
    Welcome,
    clean_name,
    decode_client_frame,
    decode_server_frame,
    encode_client_frame,
    encode_server_frame,
)


def pack(value: Any) -> bytes:
    data: bytes = msgpack.packb(value)
    return data


def refused(data: bytes) -> FrameError:
    with pytest.raises(FrameError) as info:
        decode_client_frame(data)
    return info.value


# ---------------------------------------------------------------- valid frames


def test_hello_decodes_with_defaults_and_trimmed_name() -> None:
    frame = decode_client_frame(pack({"type": "hello", "token": "t", "name": "  Melati  "}))
    assert frame == Hello(token="t", name="Melati", listen_only=False, resume=None)


def test_hello_with_resume_and_listen_only() -> None:
    frame = decode_client_frame(
        pack({"type": "hello", "token": "t", "name": "A", "listen_only": True, "resume": "r"})
    )
    assert frame == Hello(token="t", name="A", listen_only=True, resume="r")


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        ({"type": "raise_hand"}, RaiseHand()),
        ({"type": "raise_hand", "ref": 7}, RaiseHand(ref=7)),
        ({"type": "give_floor", "member_id": "m1", "ref": 1}, GiveFloor(member_id="m1", ref=1)),
        ({"type": "extend_turn", "seconds": 600}, ExtendTurn(seconds=600)),
        ({"type": "set_mode", "mode": "round"}, SetMode(mode="round")),
        ({"type": "private_note", "text": "x" * 500}, PrivateNote(text="x" * 500)),
        ({"type": "leave_quietly", "need_support": True}, LeaveQuietly(need_support=True)),
        ({"type": "leave_quietly"}, LeaveQuietly(need_support=False)),
        ({"type": "offer", "sdp": "v=0"}, Offer(sdp="v=0")),
    ],
)
def test_commands_decode_to_their_struct(wire: dict[str, Any], expected: object) -> None:
    assert decode_client_frame(pack(wire)) == expected


def test_every_command_of_the_protocol_table_is_known() -> None:
    table = {
        "hello", "raise_hand", "lower_hand", "give_floor", "next", "release_floor", "pass",
        "extend_turn", "set_mode", "mute_self", "unmute_self", "mute", "mute_all", "ask_unmute",
        "admit", "decline", "remove", "lock", "unlock", "end", "private_note", "leave",
        "leave_quietly", "sync", "offer",
    }  # fmt: skip
    assert CLIENT_FRAME_TYPES == table


def test_client_frames_round_trip_through_the_encoder() -> None:
    frame = GiveFloor(member_id="m2", ref=3)
    assert decode_client_frame(encode_client_frame(frame)) == frame
    assert msgpack.unpackb(encode_client_frame(frame)) == {"type": "give_floor", "member_id": "m2", "ref": 3}


# ---------------------------------------------------------------- refused frames


@pytest.mark.parametrize(
    "value",
    [
        5,
        "hello",
        [1, 2],
        None,
        True,
        1.5,
        b"bytes",
        {"ref": 1},
        {"type": 3},
        {"type": "welcome"},
        {"type": ""},
    ],
)
def test_non_maps_and_unknown_types_are_unknown_type(value: Any) -> None:
    assert refused(pack(value)).code is ErrorCode.UNKNOWN_TYPE


@pytest.mark.parametrize(
    "wire",
    [
        {"type": "give_floor"},
        {"type": "give_floor", "member_id": 5},
        {"type": "give_floor", "member_id": ""},
        {"type": "raise_hand", "extra": 1},
        {"type": "raise_hand", "ref": "one"},
        {"type": "extend_turn", "seconds": 0},
        {"type": "extend_turn", "seconds": 601},
        {"type": "extend_turn", "seconds": 1.5},
        {"type": "set_mode", "mode": "chaos"},
        {"type": "leave_quietly", "need_support": "yes"},
        {"type": "hello", "token": "t"},
        {"type": "hello", "token": "t", "name": "a", "ref": 1},
        {"type": "private_note", "text": 5},
    ],
)
def test_missing_wrong_or_extra_fields_are_bad_frame(wire: dict[str, Any]) -> None:
    assert refused(pack(wire)).code is ErrorCode.BAD_FRAME


def test_private_note_over_500_characters_is_too_long_and_echoes_ref() -> None:
    error = refused(pack({"type": "private_note", "text": "é" * 501, "ref": 9}))
    assert (error.code, error.ref) == (ErrorCode.TOO_LONG, 9)


def test_ref_is_echoed_when_the_rest_of_the_frame_is_bad() -> None:
    assert refused(pack({"type": "give_floor", "ref": 42})).ref == 42
    assert refused(pack({"type": "no_such_thing", "ref": 43})).ref == 43


def test_ref_of_wrong_type_is_not_echoed() -> None:
    assert refused(pack({"type": "give_floor", "ref": "x"})).ref is None


@pytest.mark.parametrize(
    "name", ["", "   ", "a" * 33, "bad\x00name", "tab\tname", "rtl\u202eeman", "line\u2028x"]
)
def test_bad_pseudonyms_are_bad_frame(name: str) -> None:
    error = refused(pack({"type": "hello", "token": "t", "name": name}))
    assert error.code is ErrorCode.BAD_FRAME


def test_pseudonym_limit_counts_characters_after_trimming() -> None:
    assert clean_name("  " + "ß" * 32 + "  ") == "ß" * 32
    assert clean_name("Budi 👨‍👩‍👧") == "Budi 👨‍👩‍👧"  # emoji joined with ZWJ are fine


def test_bad_utf8_is_bad_frame() -> None:
    assert refused(b"\x82\xa4type\xa4mute\xa9member_id\xa2\xff\xfe").code is ErrorCode.BAD_FRAME
    assert refused(b"\x81\xa4type\xa2\xff\xfe").code is ErrorCode.BAD_FRAME


def test_deep_nesting_is_bad_frame() -> None:
    deep_before_type = b"\x82\xa1z" + b"\x91" * 60_000 + b"\xc0" + b"\xa4type\xa4sync"
    deep_in_field = b"\x82\xa4type\xa4mute\xa9member_id" + b"\x91" * 60_000 + b"\xc0"
    assert refused(deep_before_type).code is ErrorCode.BAD_FRAME
    assert refused(deep_in_field).code is ErrorCode.BAD_FRAME


@pytest.mark.parametrize(
    "data",
    [
        b"\xdd\xff\xff\xff\xff",  # array of 4 G elements
        b"\xdf\xff\xff\xff\xff",  # map of 4 G pairs
        b"\xdb\xff\xff\xff\xff",  # string of 4 GiB
        b"\xc6\xff\xff\xff\xff",  # binary of 4 GiB
        b"\x82\xa1z\xdd\xff\xff\xff\xff\xa4type\xa4sync",  # huge array before the type
        b"\x81\xa4type\xdb\xff\xff\xff\xff",  # huge string as the type
    ],
)
def test_huge_declared_lengths_fail_without_allocating(data: bytes) -> None:
    assert refused(data).code in (ErrorCode.BAD_FRAME, ErrorCode.UNKNOWN_TYPE)


def test_truncated_and_trailing_bytes_are_bad_frame() -> None:
    whole = pack({"type": "sync"})
    assert refused(whole[:-1]).code is ErrorCode.BAD_FRAME
    assert refused(whole + b"\x00").code is ErrorCode.BAD_FRAME


def test_frame_over_64_kib_is_refused_before_unpacking() -> None:
    data = pack({"type": "offer", "sdp": "v" * MAX_FRAME_BYTES})
    assert refused(data).code is ErrorCode.TOO_LONG


def test_text_frames_are_bad_frame() -> None:
    assert refused("{'type': 'sync'}").code is ErrorCode.BAD_FRAME  # type: ignore[arg-type]


# ---------------------------------------------------------------- property tests

msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text() | st.binary(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)


def _decodes_or_fails_with_a_code(data: bytes) -> None:
    try:
        decode_client_frame(data)
    except FrameError as error:
        assert isinstance(error.code, ErrorCode)
        assert error.ref is None or isinstance(error.ref, int)


@settings(max_examples=400)
@given(st.binary(max_size=256))
def test_random_bytes_never_raise_anything_but_frame_error(data: bytes) -> None:
    _decodes_or_fails_with_a_code(data)


@settings(max_examples=400)
@given(msgpack_values)
def test_random_msgpack_values_never_raise_anything_but_frame_error(value: Any) -> None:
    _decodes_or_fails_with_a_code(pack(value))


@settings(max_examples=600)
@given(
    st.sampled_from(sorted(CLIENT_FRAME_TYPES)),
    st.dictionaries(
        st.sampled_from(
            ["ref", "member_id", "seconds", "mode", "text", "need_support", "sdp", "token", "name", "x"]
        ),
        msgpack_values,
        max_size=4,
    ),
)
def test_known_types_with_random_fields_never_raise_anything_but_frame_error(
    frame_type: str, fields: dict[str, Any]
) -> None:
    _decodes_or_fails_with_a_code(pack({"type": frame_type, **fields}))


@given(st.sampled_from(sorted(CLIENT_FRAME_TYPES - {"hello"})), st.integers(0, 2**53), st.text(max_size=5))
def test_unknown_field_on_any_command_is_bad_frame_with_ref(frame_type: str, ref: int, junk: str) -> None:
    error = refused(pack({"type": frame_type, "ref": ref, "unexpected_" + junk: 1}))
    assert (error.code, error.ref) == (ErrorCode.BAD_FRAME, ref)


# ---------------------------------------------------------------- server frames


@pytest.mark.parametrize(
    "frame",
    [
        Welcome(member_id="m", role="member", resume="r", now=1, state={"version": 1}),
        Lobby(member_id="m", resume="r", now=1, circle=LobbyCircle(title="t", language="id")),
        Admitted(state={"version": 2}),
        Redirect(url="https://b.example/ws"),
        Ack(ref=None, version=3),
        Error(ref=4, code=ErrorCode.RATE_LIMITED, message="slow down"),
        Event(version=5, name="hand_raised", data={"member_id": "m", "queue": ["m"]}),
        Snapshot(version=5, state={}),
        Answer(sdp="v=0", ref=6),
        Media(slots=["m", None, None]),
    ],
)
def test_server_frames_encode_as_tagged_maps_and_round_trip(frame: Any) -> None:
    data = encode_server_frame(frame)
    assert isinstance(msgpack.unpackb(data)["type"], str)
    assert decode_server_frame(data) == frame


def test_error_frame_wire_shape() -> None:
    data = encode_server_frame(Error(ref=1, code=ErrorCode.TOO_LONG, message="m"))
    assert msgpack.unpackb(data) == {"type": "error", "ref": 1, "code": "too_long", "message": "m"}


def test_error_codes_are_exactly_the_protocol_codes() -> None:
    assert {code.value for code in ErrorCode} == {
        "bad_frame", "unknown_type", "forbidden", "not_allowed", "no_such_member",
        "rate_limited", "too_long", "conflict", "unavailable",
    }  # fmt: skip


def test_close_codes_match_the_protocol() -> None:
    assert {code.value for code in CloseCode} == {
        1001, 1009, 1013, 4000, 4001, 4300, 4400, 4401, 4403, 4404, 4408, 4409, 4429,
    }  # fmt: skip


def test_decode_server_frame_rejects_client_frames() -> None:
    with pytest.raises(msgspec.ValidationError):
        decode_server_frame(pack({"type": "sync"}))
