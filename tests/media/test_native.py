"""The compiled fan-out (server/media/fanout.c through native.py) against the Python it
replaces: the same outgoing timestamps, markers and silences for any sequence of packets
and source changes; it is built where a C compiler is, and the relay still works where it
is not. (The bytes on the wire, SRTP included, are compared with aiortc's own in
``test_mux.py::test_forwarded_packets_are_on_the_wire_byte_for_byte_what_aiortc_would_send``
for both paths.)"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.media import native
from server.media.slot import FRAME_SAMPLES, Route, Slot

Sent = list[tuple[int, bytes, "int | None", bool]]

needs_lib = pytest.mark.skipif(native.LIB is None, reason="the fan-out library is not built here")


def _slot(sent: Sent) -> Slot:
    def out(pts: int, payload: bytes, level: int | None, marker: bool, now: float) -> bool:
        sent.append((pts, payload, level, marker))
        return True

    return Slot(out)


_step = st.one_of(
    st.tuples(
        st.just("packet"), st.integers(0, (1 << 32) - 1), st.sampled_from([None, 0, 33, 127]), st.floats(0, 5)
    ),
    st.tuples(st.just("advance"), st.integers(-3, 200), st.sampled_from([None, 12]), st.floats(0, 0.1)),
    st.tuples(st.just("switch"), st.sampled_from([None, "a", "b"]), st.none(), st.floats(0, 3)),
    st.tuples(st.just("stop"), st.none(), st.none(), st.just(0.0)),
)


@needs_lib
@settings(max_examples=150, deadline=None)
@given(st.lists(_step, max_size=40), st.integers(1, 4))
def test_the_compiled_loop_sends_what_the_python_slots_send(steps: list[tuple], width: int) -> None:
    """Slots whose outputs are plain Python: the compiled loop does each slot's timestamps
    and marker and leaves the copy to the output, which must see what `Slot.push` gives it."""
    python_sent: list[Sent] = [[] for _ in range(width)]
    native_sent: list[Sent] = [[] for _ in range(width)]
    python = [_slot(s) for s in python_sent]
    compiled = [_slot(s) for s in native_sent]
    route = Route(compiled)
    timestamp, now = 1000, 100.0
    for i, (kind, value, level, dt) in enumerate(steps):
        now += dt
        if kind == "packet":
            timestamp = value
        elif kind == "advance":
            timestamp = (timestamp + value * FRAME_SAMPLES) % (1 << 32)
        if kind in ("packet", "advance"):
            payload = b"p%d" % i
            for slot in python:
                slot.push(timestamp, payload, level, now)
            route.push(timestamp, payload, level, now)
        elif kind == "switch":
            for slot in python + compiled:
                slot.set_source(value)
        else:
            python[0].stop()
            compiled[0].stop()
    assert native_sent == python_sent


@needs_lib
def test_a_new_source_continues_after_the_real_gap() -> None:
    sent: Sent = []
    route = Route([_slot(sent)])
    started = time.time()
    route.slots[0].set_source("a")
    route.push(5000, b"a0", None, started)
    route.slots[0].set_source("b")  # three silence frames after a0, now
    route.push(123, b"b0", None, started + 0.5)  # b starts 25 frames after a0's last silence frame
    assert [p for p, *_ in sent] == [
        0,
        FRAME_SAMPLES,
        2 * FRAME_SAMPLES,
        3 * FRAME_SAMPLES,
        28 * FRAME_SAMPLES,
    ]
    assert [m for *_, m in sent] == [True, False, False, False, True]


def test_it_builds_once_into_its_cache_and_the_relay_runs_without_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LINGKAR_MEDIA_NATIVE_DIR", str(tmp_path / "cache"))
    if subprocess.run(["sh", "-c", "command -v cc"], capture_output=True).returncode == 0:
        built = native.build()
        assert built is not None and built.parent == tmp_path / "cache"
        stamp = built.stat().st_mtime_ns
        assert native.build() == built and built.stat().st_mtime_ns == stamp  # not built again
    monkeypatch.setenv("LINGKAR_MEDIA_NATIVE_DIR", str(tmp_path / "other"))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    assert native.build() is None  # a warning, and the Python path
    monkeypatch.setattr(native, "LIB", None)
    sent: Sent = []
    route = Route([_slot(sent)])
    route.slots[0].set_source("a")
    route.push(77, b"x", 5, 1.0)
    assert sent == [(0, b"x", 5, True)]
