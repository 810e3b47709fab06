"""storage.layout: the replay-gap rule and the key names both stores rely on, alone."""

from __future__ import annotations

import pytest

from storage.layout import CircleKeys, circle_keys, circle_of_channel, events_horizon_ms, replay_needed
from storage.store import ReplayGap


@pytest.mark.parametrize(("after", "current", "oldest_kept", "needed"), [
    (5, 5, 1, False),  # up to date
    (7, 5, 1, False),  # ahead (a version not saved yet): nothing to read
    (5, 5, None, False),  # up to date, nothing kept
    (4, 5, 5, True),  # the next version is the oldest kept
    (0, 5, 1, True),  # everything is kept
    (-1, 5, 0, True),
])
def test_a_replay_is_read_when_the_log_still_reaches_back(after: int, current: int,
                                                          oldest_kept: int | None, needed: bool) -> None:
    assert replay_needed(after, current, oldest_kept) is needed


@pytest.mark.parametrize(("after", "current", "oldest_kept"), [
    (3, 5, 5),  # version 4 was trimmed
    (0, 5, 2),
    (4, 5, None),  # nothing kept, one version missed
])
def test_a_replay_the_log_no_longer_reaches_is_a_gap(after: int, current: int, oldest_kept: int | None) -> None:
    with pytest.raises(ReplayGap):
        replay_needed(after, current, oldest_kept)


def test_every_key_of_a_circle_carries_its_hash_tag() -> None:
    assert circle_keys("a-B_9") == CircleKeys("lk:{a-B_9}:state", "lk:{a-B_9}:events", "lk:{a-B_9}:wake",
                                              "lk:{a-B_9}:home", "lk:{a-B_9}:fence")
    assert circle_of_channel(circle_keys("a-B_9").wake.encode()) == "a-B_9"


@pytest.mark.parametrize("bad", ["", "a}b", "a b", "x" * 65, "lk:{x}"])
def test_no_key_is_made_of_what_is_not_a_circle_id(bad: str) -> None:
    with pytest.raises(ValueError):
        circle_keys(bad)


def test_events_are_kept_for_half_the_grace_period_and_at_least_a_second() -> None:
    assert events_horizon_ms(30) == 15_000
    assert events_horizon_ms(1) == 1000
