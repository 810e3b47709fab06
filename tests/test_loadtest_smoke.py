"""A tiny `lingkar loadtest` run: its own server subprocess, 2 rooms × 4 members for 6 s on
the memory store, one of them with real audio. Timings are reported, never asserted (§9);
what must hold is the shape of the report and that nobody without the floor was heard."""

from __future__ import annotations

import json
from pathlib import Path

from loadtest.main import main


def test_tiny_loadtest_run(tmp_path: Path) -> None:
    code = main(["--rooms", "2", "--members", "4", "--duration", "6", "--store", "memory",
                 "--media-rooms", "1", "--out", str(tmp_path), "--no-progress"])
    assert code == 0

    report = json.loads((tmp_path / "loadtest.json").read_text())
    assert report["parameters"]["rooms"] == 2
    assert report["machine"]["cores"] >= 1
    rooms = report["rooms"]
    assert [r["room"] for r in rooms] == [0, 1]
    assert {r["kind"] for r in rooms} == {"media", "signaling"}
    for room in rooms:
        assert "join_failed" not in room
        assert room["fanout_ms"]["count"] > 0
        assert room["join_ms"]["count"] >= 4
        assert room["admit_ms"]["count"] >= 3
    signaling = next(r for r in rooms if r["kind"] == "signaling")
    assert {"raise_hand", "give_floor", "next", "mute", "private_note"} <= set(signaling["by_command_ms"])

    media = report["totals"]["media"]
    assert media["forwarded_streams"] == 3
    assert media["relay_latency_ms"]["count"] > 0
    assert media["leaked_from_non_holder"] == 0
    media_room = next(r for r in rooms if r["kind"] == "media")["media"]
    assert media_room["leaker_sent"] > 0  # the member without the floor really did send
    assert all(lst["leaked_from_non_holder"] == 0 for lst in media_room["listeners"])

    png = tmp_path / "loadtest.png"
    assert png.exists() and png.stat().st_size > 10_000
