"""What both stores share: how long they keep a circle and its events, where Redis keeps
them (the key names), and which replays the kept events can still serve.

Pure: no I/O. `storage.memory_store.MemoryStore` and `storage.redis_store.RedisStore` both
take their defaults and the replay-gap rule from here, so the one test suite that runs over
both checks one set of promises.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from storage.store import ReplayGap

# ---- how long things are kept (the defaults of both stores) ------------------------------

IDLE_SECONDS = 12 * 3600  # a circle nobody saved for this long is gone
MAX_VERSIONS = 1000  # the event log keeps at most this many saved versions per circle


def events_horizon_ms(grace_seconds: int) -> int:
    """How long saved events are kept for replays: half the grace period (at least a second).
    An entry then lives at most twice that (trimmed on the first save after it is this old,
    or with the whole stream when no save comes), so nothing a departed member left in the
    log outlives the grace period after they leave. Clients never need older events: a
    resume is answered with a fresh snapshot; the log serves processes catching up."""
    return max(grace_seconds * 1000 // 2, 1000)


KEEP_EVENTS_MS = events_horizon_ms(30)

# ---- where Redis keeps a circle ----------------------------------------------------------

CIRCLE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # what `secrets.token_urlsafe` makes, bounded
CIRCLES_KEY = "lk:circles"  # set of circle ids, for listing only (see storage.redis_store)
PROCESSES_KEY = "lk:processes"  # the live processes: owner id -> "expiry ms|own URL" (DESIGN §8)
HANDOVER_KEEP_MS = 10_000  # a hand-over asked of a process that does not take it is dropped


def handover_key(url: str) -> str:
    """The hand-overs asked of the process at `url`: circle id -> the URL to hand it to."""
    return f"lk:handover:{url}"


class CircleKeys(NamedTuple):
    """The keys and the channel of one circle. Each carries the hash tag `{circle}`, so one
    circle lives in one hash slot and its Lua scripts run atomically on Redis Cluster too."""

    state: str  # hash: v = version (decimal), blob = msgpack RoomState
    events: str  # stream, one entry per saved version: id "<version>-0", fields v = version,
    #              t = saved at (epoch ms), then "0", "1", … = that version's events; entries
    #              `keep_events_ms` old are trimmed on each save, and the key expires that long
    #              after the last save (privacy at rest, DESIGN §12)
    wake: str  # pub/sub channel: b"w" + msgpack [version, [events]] after a save,
    #            b"w" + msgpack [-1, None] on deletion, b"e" + event (ephemeral)
    home: str  # hash: owner = process id, token = fencing token, url = its public URL;
    #            PX = lease TTL, renewed by the owner (DESIGN §8)
    fence: str  # counter: INCR gives each new lease holder its token


_PREFIX, _WAKE_SUFFIX = "lk:{", "}:wake"


def circle_keys(circle_id: str) -> CircleKeys:
    """Every key of the circle; ValueError for a string that is not a circle id (so that no
    key is ever made of one)."""
    if not CIRCLE_ID.fullmatch(circle_id):
        raise ValueError(f"not a circle id: {circle_id!r}")
    tag = f"{_PREFIX}{circle_id}}}:"
    return CircleKeys(tag + "state", tag + "events", tag + "wake", tag + "home", tag + "fence")


def circle_of_channel(channel: bytes) -> str:
    """The circle whose `wake` channel this is."""
    return channel.decode()[len(_PREFIX):-len(_WAKE_SUFFIX)]


# ---- which replays the kept events can serve ---------------------------------------------


def replay_needed(after: int, current: int, oldest_kept: int | None) -> bool:
    """Whether the events after version `after` are to be read from a circle's log, which is
    at version `current` and keeps every saved version from `oldest_kept` on (None: nothing
    kept). False when there are none (`after` is the current version or newer). Raises
    ReplayGap when some of them are no longer kept: the subscriber needs a snapshot."""
    if after >= current:
        return False
    lowest = current + 1 if oldest_kept is None else oldest_kept
    if after + 1 < lowest:
        raise ReplayGap(f"events after version {after} are no longer kept")
    return True
