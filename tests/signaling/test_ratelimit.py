"""The per-connection rate limit, with time stepped by hand."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from signaling.ratelimit import BURST, RateLimiter, TokenBucket, Verdict


def send(limiter: RateLimiter, count: int, now: float) -> list[Verdict]:
    return [limiter.check(now) for _ in range(count)]


def test_a_burst_of_40_is_accepted_and_the_41st_refused() -> None:
    limiter = RateLimiter(now=0.0)
    assert send(limiter, BURST, 0.0) == [Verdict.ACCEPT] * BURST
    assert limiter.check(0.0) is Verdict.REFUSE


def test_tokens_come_back_at_20_per_second() -> None:
    limiter = RateLimiter(now=0.0)
    send(limiter, BURST, 0.0)
    assert limiter.check(0.04) is Verdict.REFUSE
    assert limiter.check(0.05) is Verdict.ACCEPT
    assert send(limiter, 20, 1.05) == [Verdict.ACCEPT] * 20
    assert limiter.check(1.05) is Verdict.REFUSE


def test_steady_20_per_second_is_never_refused() -> None:
    limiter = RateLimiter(now=0.0)
    verdicts = [limiter.check(step / 20) for step in range(20 * 600)]
    assert set(verdicts) == {Verdict.ACCEPT}


def test_the_bucket_never_holds_more_than_the_burst() -> None:
    limiter = RateLimiter(now=0.0)
    assert send(limiter, BURST, 3600.0) == [Verdict.ACCEPT] * BURST
    assert limiter.check(3600.0) is Verdict.REFUSE


def test_121_frames_at_once_close_the_connection() -> None:
    limiter = RateLimiter(now=0.0)
    verdicts = send(limiter, 121, 0.0)
    assert verdicts[:40] == [Verdict.ACCEPT] * 40
    assert verdicts[40:120] == [Verdict.REFUSE] * 80
    assert verdicts[120] is Verdict.CLOSE


def test_once_closed_stays_closed() -> None:
    limiter = RateLimiter(now=0.0)
    send(limiter, 121, 0.0)
    assert limiter.check(1000.0) is Verdict.CLOSE


def test_sending_at_50_per_second_is_refused_but_never_closed() -> None:
    limiter = RateLimiter(now=0.0)
    verdicts = [limiter.check(step / 50) for step in range(50 * 120)]
    assert Verdict.CLOSE not in verdicts
    accepted = verdicts.count(Verdict.ACCEPT)
    assert 20 * 120 <= accepted <= 20 * 120 + BURST + 1


def test_sending_at_70_per_second_is_closed_after_about_12_seconds() -> None:
    limiter = RateLimiter(now=0.0)
    closed_at = next(step / 70 for step in range(70 * 60) if limiter.check(step / 70) is Verdict.CLOSE)
    assert 11.0 <= closed_at <= 13.0


def test_a_clock_going_backwards_refills_nothing() -> None:
    limiter = RateLimiter(now=10.0)
    send(limiter, BURST, 10.0)
    assert limiter.check(5.0) is Verdict.REFUSE
    assert limiter.check(10.0) is Verdict.REFUSE
    assert limiter.check(10.05) is Verdict.ACCEPT


def test_limits_are_configurable() -> None:
    limiter = RateLimiter(now=0.0, rate=1.0, burst=2, flood_factor=2)
    assert send(limiter, 5, 0.0) == [
        Verdict.ACCEPT,
        Verdict.ACCEPT,
        Verdict.REFUSE,
        Verdict.REFUSE,
        Verdict.CLOSE,
    ]


def test_a_bucket_needs_a_positive_rate_and_capacity() -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate=0, capacity=10, updated_at=0)
    with pytest.raises(ValueError):
        TokenBucket(rate=1, capacity=0, updated_at=0)


@given(st.lists(st.floats(0, 2, allow_nan=False), max_size=300))
def test_accepted_frames_never_exceed_burst_plus_rate_times_elapsed(gaps: list[float]) -> None:
    limiter = RateLimiter(now=0.0)
    now, accepted = 0.0, 0
    for gap in gaps:
        now += gap
        if limiter.check(now) is Verdict.ACCEPT:
            accepted += 1
    assert accepted <= BURST + 20 * now + 1e-6
