"""The store interface: where a circle's state blob and its recent events live.

Two implementations pass one test suite: `storage.memory_store.MemoryStore` (embedded default)
and `storage.redis_store.RedisStore` (several processes share circles). Stores deal in bytes
(`storage.codec`); they never interpret the rules.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol


class StoreError(Exception):
    """Base of every store failure."""


class NoSuchCircle(StoreError):
    pass


class CircleExists(StoreError):
    pass


class VersionConflict(StoreError):
    """Someone saved first: reload and retry."""


class ReplayGap(StoreError):
    """The events asked for are no longer kept: send a snapshot instead."""


class StoreUnavailable(StoreError):
    """The store cannot be reached; nothing changed."""


class NotReplicated(StoreUnavailable):
    """A write reached a Redis Cluster master, but no replica confirmed having it in time
    (`WAIT`): a failover could lose it, so it is not acknowledged (signaling answers `error
    unavailable`). It may yet be kept: the caller reloads rather than trust its own copy."""


class StaleOwner(StoreError):
    """A fenced save from a process that no longer holds the circle's lease (DESIGN §8):
    refused, nothing changed. Signaling answers `error unavailable`."""


@dataclass(frozen=True, slots=True)
class Lease:
    """This process is the circle's home (DESIGN §8) until the lease expires unrenewed.
    `token` is the fencing token: a save carrying it is refused once another process has
    taken the lease. `taken_over`: the lease was free (new token), so members may still be
    marked connected by a process that died; false when it was already ours."""

    circle_id: str
    owner_id: str
    token: int
    taken_over: bool


@dataclass(frozen=True, slots=True)
class Owner:
    """Another live process holds the circle's lease; `url` is its public URL."""

    url: str


# Called with (circle_id, version, events) after every save, where `events` are the encoded
# events of that version (possibly none), and with (circle_id, -1, None) when the circle is
# deleted. When the store cannot tell which events a wake-up stands for (once a subscription is
# active, and again after every reconnect) it calls (circle_id, current version or -1, None)
# and the subscriber fetches what it missed with `events_since`. Carrying the events saves a
# round trip per wake-up and lets subscribers see the final events of a circle that is deleted
# right after them. Ephemeral events (private notes) arrive through `on_ephemeral` instead.
WakeUp = Callable[[str, int, Sequence[bytes] | None], None]
Ephemeral = Callable[[str, bytes], None]


class Unsubscribe(Protocol):
    def __call__(self) -> None: ...


class Store(Protocol):
    async def create(self, circle_id: str, blob: bytes) -> None:
        """Store a new circle at the blob's version. Raises CircleExists."""

    async def load(self, circle_id: str) -> bytes:
        """The current state blob. Raises NoSuchCircle."""

    async def save(self, circle_id: str, expected_version: int, blob: bytes,
                   events: Sequence[bytes], new_version: int, fence: int | None = None) -> None:
        """Compare-and-set: write `blob` (at `new_version`) only if the stored version is
        `expected_version`, append `events` (all of `new_version`) to the circle's capped event
        log and wake subscribers, atomically. Raises VersionConflict or NoSuchCircle. Saving
        the very blob that is already stored at `new_version` succeeds and does nothing, so a
        save retried after a lost reply is harmless.

        With `fence` (the token of this process's `Lease`), the save is also refused with
        StaleOwner unless the circle's current lease carries that very token (none at all
        counts as another's). Without it (the organizer API, timers, a disconnect) only the
        version is compared: those commands are valid from any process."""

    # ---- the circle's home (DESIGN §8) --------------------------------------------------

    async def acquire(self, circle_id: str, owner_id: str, url: str, ttl_ms: int
                      ) -> Lease | Owner:
        """Take the circle's lease for `ttl_ms` if it is free or already `owner_id`'s
        (atomically), announcing `url`; else say who holds it. Raises NoSuchCircle."""

    async def renew(self, leases: Sequence[Lease], ttl_ms: int) -> list[bool]:
        """Extend each lease still held with its token, in one round trip; False for each
        one lost (expired, or taken by another process)."""

    async def release(self, lease: Lease) -> None:
        """Give the lease up at once if it is still held with its token."""

    async def announce(self, owner_id: str, url: str, ttl_ms: int) -> dict[str, str]:
        """Say that this process (`owner_id`, reachable at `url`) is alive for `ttl_ms`; answer
        every process alive now, itself included (owner id -> URL). A draining process sends
        its circles to one of the others (DESIGN §8)."""

    async def withdraw(self, owner_id: str) -> None:
        """This process is going away: no longer among the live ones."""

    async def ask_handover(self, home_url: str, circle_id: str, to_url: str) -> None:
        """Ask the process at `home_url` to hand the circle over to the one at `to_url` (where a
        proxy sends the circle's hellos); kept a few seconds."""

    async def handovers(self, home_url: str) -> dict[str, str]:
        """The hand-overs asked of the process at `home_url` (circle id -> URL), taken: each
        is answered once."""

    async def publish_ephemeral(self, circle_id: str, event: bytes) -> None:
        """Deliver an event live to subscribers without keeping it anywhere."""

    async def events_since(self, circle_id: str, version: int) -> list[bytes]:
        """Every kept event with a version > `version`, in order. Raises ReplayGap when some
        of them are no longer kept, NoSuchCircle when the circle is gone."""

    async def delete(self, circle_id: str) -> None:
        """Delete every key of the circle and wake subscribers with version -1."""

    async def circle_ids(self) -> list[str]: ...

    async def ping(self) -> None:
        """Raise StoreUnavailable when the store cannot be reached."""

    def keeps(self, circle_id: str) -> bool:
        """Whether this process keeps anything of the circle (its state, subscribers,
        bookkeeping): for leak checks, issue 17. False for an ended circle once its
        subscribers are gone."""

    def subscribe(self, circle_id: str, on_wake: WakeUp, on_ephemeral: Ephemeral) -> Unsubscribe:
        """Call back on every save, deletion and ephemeral event of the circle (see `WakeUp`),
        from the event loop's thread, in the order they happened."""

    async def close(self) -> None: ...
