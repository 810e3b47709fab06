"""CI's slice of `make fuzz` (about a minute): in process as a member and as a moderator, then
over real sockets. A failure names its seed; `python -m tests.fuzz --seed K` replays it."""

from __future__ import annotations

import os
import random

import pytest

from rooms.model import Role
from tests.fuzz.engine import Engine
from tests.fuzz.wire import run_wire

SEED = int(os.environ.get("LINGKAR_FUZZ_SEED", random.randrange(1 << 30)))


@pytest.mark.parametrize(("role", "seconds"), [(Role.MEMBER, 25.0), (Role.MODERATOR, 15.0)])
async def test_fuzzed_frames_in_process_break_no_promise(role: Role, seconds: float) -> None:
    report = await Engine(SEED, fuzzer_role=role).run(frames=10**9, seconds=seconds)
    print(f"seed {SEED} as {role.value}:", report.summary())
    assert report.frames > 1000
    assert report.answers["error"] and report.answers["ack"]  # both refusals and changes were reached


async def test_fuzzed_frames_over_sockets_break_no_promise() -> None:
    report = await run_wire(frames=10**9, seconds=15.0, seed=SEED)
    print(f"seed {SEED} over sockets:", report.summary())
    assert report.frames > 1000 and sum(report.framing.values()) > 0
