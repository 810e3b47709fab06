"""Slot placement and outgoing timestamps, without any network."""

from __future__ import annotations

from server.media.circle import Listener, MediaCircle, place
from server.media.slot import FRAME_SAMPLES, OPUS_SILENCE, SILENCE_FRAMES, SILENT_LEVEL, Slot


def test_members_still_heard_keep_their_slot_and_newcomers_fill_free_ones() -> None:
    assert place([None, None, None], ["a", "b"]) == ["a", "b", None]
    assert place(["a", "b", None], ["c", "b"]) == ["c", "b", None]
    assert place(["a", "b", "c"], ["d"]) == ["d", None, None]
    assert place(["a"], []) == [None]


def test_each_listener_gets_the_highest_priority_others_up_to_its_slots() -> None:
    circle = MediaCircle("c")
    for member, slots in (("mod", 3), ("m1", 3), ("m2", 1), ("m3", 2)):
        circle.speakers.add(member)
        circle.listeners[member] = _listener(slots)
    circle.set_audible(["m1", "mod", "m2", "m1"])

    changed = circle.reassign()

    assert changed == {
        "mod": ["m1", "m2", None],
        "m1": ["mod", "m2", None],
        "m2": ["m1"],
        "m3": ["m1", "mod"],
    }
    assert circle.reassign() == {}  # nothing changed, nobody told
    assert {source: len(tracks) for source, tracks in circle.routes.items()} == {"m1": 3, "mod": 2, "m2": 2}


def test_gated_packet_is_dropped_and_reaches_no_slot() -> None:
    circle = MediaCircle("c")
    circle.speakers |= {"a", "b"}
    circle.listeners["b"] = _listener(1)
    circle.set_audible(["b"])
    circle.reassign()

    sent: list[tuple[int, bytes, int | None, bool]] = []
    circle.listeners["b"].slots[0] = _recording_slot(sent)
    circle.reassign()

    assert circle.forward("a", 0, b"x", 10) == -1
    assert sent == []
    assert circle.levels == {}


def test_source_switch_keeps_timestamps_continuous_and_ends_with_silence() -> None:
    sent: list[tuple[int, bytes, int | None, bool]] = []
    slot = _recording_slot(sent)
    slot.set_source("a")
    for i in range(3):
        slot.push(1_000_000 + i * FRAME_SAMPLES, b"a%d" % i, 20, 0.0)
    slot.set_source("b")
    slot.push(4_294_967_000, b"b0", None, 0.0)  # b's own clock is anywhere, near the 32-bit wrap here
    slot.push((4_294_967_000 + FRAME_SAMPLES) % (1 << 32), b"b1", 40, 0.0)  # and wraps

    payloads = [payload for _, payload, _, _ in sent]
    pts = [p for p, _, _, _ in sent]
    assert payloads == [b"a0", b"a1", b"a2"] + [OPUS_SILENCE] * SILENCE_FRAMES + [b"b0", b"b1"]
    assert pts[:6] == [i * FRAME_SAMPLES for i in range(6)]
    assert pts[6] > pts[5] and pts[7] - pts[6] == FRAME_SAMPLES
    # audio levels go along (silence says so), the marker bit starts each source's talkspurt
    assert [level for _, _, level, _ in sent] == [20] * 3 + [SILENT_LEVEL] * SILENCE_FRAMES + [None, 40]
    assert [marker for _, _, _, marker in sent] == [True] + [False] * 5 + [True, False]


def test_stopped_slot_sends_nothing() -> None:
    sent: list[tuple[int, bytes, int | None, bool]] = []
    slot = _recording_slot(sent)
    slot.set_source("a")
    slot.push(0, b"a0", None, 0.0)
    slot.stop()
    slot.push(FRAME_SAMPLES, b"a1", None, 0.0)
    slot.set_source(None)
    assert [payload for _, payload, _, _ in sent] == [b"a0"]


def _recording_slot(sent: list[tuple[int, bytes, int | None, bool]]) -> Slot:
    def out(pts: int, payload: bytes, level: int | None, marker: bool, now: float) -> bool:
        sent.append((pts, payload, level, marker))
        return True

    return Slot(out)


def _listener(slots: int) -> Listener:
    return Listener([Slot() for _ in range(slots)], [None] * slots)
