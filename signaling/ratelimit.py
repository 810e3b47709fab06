"""Per-connection frame rate limit (DESIGN §5 "Limits").

Two token buckets, both pure (the caller passes ``now``, monotonic seconds):

- the **limit** bucket: 20 frames/s sustained, burst 40. A frame it cannot pay for is
  refused: the caller answers ``error rate_limited`` and drops the frame;
- the **flood** bucket: three times the limit (60 frames/s, burst 120), charged for *every*
  frame received, refused or not. When it runs dry the client is sending at more than 3×
  the limit and the caller closes the socket with 4429.

So a client that sends 121 frames at once gets 40 accepted, 80 refused and is closed on the
121st; a client sending steadily at 50/s is refused about 30 frames a second and never
closed; one sending at 70/s is closed after about 12 s (120 / (70 - 60)).
Once a limiter has said ``CLOSE`` it keeps saying so.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Final

RATE_PER_SECOND: Final = 20.0
BURST: Final = 40
FLOOD_FACTOR: Final = 3
# Float refills such as 0.05 s × 20/s must buy exactly one token.
_EPSILON: Final = 1e-9


class Verdict(enum.Enum):
    """What to do with one received frame."""

    ACCEPT = "accept"
    REFUSE = "refuse"
    """Answer ``error rate_limited``; do not process the frame."""
    CLOSE = "close"
    """Close the connection with 4429."""


@dataclass(slots=True)
class TokenBucket:
    """A token bucket that starts full at ``updated_at``."""

    rate: float
    capacity: float
    updated_at: float
    tokens: float = field(init=False)

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.capacity < 1:
            raise ValueError("a bucket needs a positive rate and room for one token")
        self.tokens = self.capacity

    def take(self, now: float) -> bool:
        """Refill for the time since the last call, then spend one token if there is one."""
        elapsed = now - self.updated_at
        tokens = self.tokens
        if elapsed > 0:  # a clock that goes backwards refills nothing
            tokens += elapsed * self.rate
            if tokens > self.capacity:
                tokens = self.capacity
            self.updated_at = now
        if tokens >= 1 - _EPSILON:
            tokens -= 1
            self.tokens = tokens if tokens > 0.0 else 0.0
            return True
        self.tokens = tokens
        return False


class RateLimiter:
    """The limit of one connection; call :meth:`check` once per received frame."""

    def __init__(
        self,
        now: float,
        *,
        rate: float = RATE_PER_SECOND,
        burst: int = BURST,
        flood_factor: int = FLOOD_FACTOR,
    ) -> None:
        self._limit = TokenBucket(rate=rate, capacity=burst, updated_at=now)
        self._flood = TokenBucket(rate=rate * flood_factor, capacity=burst * flood_factor, updated_at=now)
        self._closed = False

    def check(self, now: float) -> Verdict:
        """Judge one frame received at ``now``."""
        if self._closed or not self._flood.take(now):
            self._closed = True
            return Verdict.CLOSE
        return Verdict.ACCEPT if self._limit.take(now) else Verdict.REFUSE


class Window:
    """At most `limit` strikes per `seconds` for each key (an address, say), counted over a
    sliding window; pure like the buckets above (the caller passes ``now``). Keys whose
    strikes are all older than the window are forgotten, and at most `max_keys` are kept
    (the oldest go first), so a flood of addresses cannot grow it without bound."""

    def __init__(self, limit: int, seconds: float, max_keys: int = 10_000) -> None:
        self.limit = limit
        self.seconds = seconds
        self.max_keys = max_keys
        self._strikes: dict[str, list[float]] = {}

    def _recent(self, key: str, now: float) -> list[float]:
        strikes = [t for t in self._strikes.get(key, ()) if t > now - self.seconds]
        if strikes:
            self._strikes[key] = strikes
        else:
            self._strikes.pop(key, None)
        return strikes

    def exceeded(self, key: str, now: float) -> bool:
        """Has `key` used up its strikes of the last window?"""
        return len(self._recent(key, now)) >= self.limit

    def strike(self, key: str, now: float) -> None:
        strikes = self._recent(key, now)
        self._strikes.pop(key, None)  # re-inserted last: the dict is in order of last strike
        self._strikes[key] = [*strikes, now]
        while len(self._strikes) > self.max_keys:
            del self._strikes[next(iter(self._strikes))]
