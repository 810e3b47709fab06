"""The shared store: circles in Redis, so several server processes serve the same circles.

Every key of a circle carries the hash tag `{circle}`, so one circle lives in one hash slot and
its Lua scripts run atomically on Redis Cluster too. Each save and creation (re)sets the idle
TTL on every key of the circle; an ended circle's keys are deleted (we know their names, so
no SCAN). Any Redis or socket failure surfaces as `StoreUnavailable`; nothing else from redis-py
escapes. A key of the wrong type is `CorruptState`, like an unreadable blob.

Listing (`circle_ids`) uses one global set, `lk:circles`: it is written outside the scripts
(it lives in another slot), added to after a creation succeeds and removed from after a
deletion, and pruned on read of ids whose state key is gone (expired). Listing is only for
the organizer's dashboard, so a set read in one round trip beats a SCAN of the whole keyspace
(which on a cluster would have to visit every node); a circle created by a process that died
before its SADD is missing from the list until it ends, which the dashboard can live with.

Home (DESIGN §8): `lk:{circle}:home` is the circle's lease — the owning process's id, its
fencing token and its public URL — with a TTL of a few seconds that the owner keeps renewing.
Tokens come from INCR on `lk:{circle}:fence`, so every new holder has a larger one. Acquire,
renew and release are Lua scripts that act only if the lease is free or carries the caller's
id (and token); the save script, given a token, refuses the write ('stale') unless the lease
holds that token right now — a process that lost its lease cannot write, whatever it believes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import msgpack
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError

from storage.clock import RealClock
from storage.codec import CorruptState, state_version
from storage.layout import (
    CIRCLE_ID,
    CIRCLES_KEY,
    IDLE_SECONDS,
    KEEP_EVENTS_MS,
    MAX_VERSIONS,
    PROCESSES_KEY,
    circle_keys,
    circle_of_channel,
    replay_needed,
)
from storage.store import (
    CircleExists,
    Ephemeral,
    Lease,
    NoSuchCircle,
    Owner,
    StaleOwner,
    StoreUnavailable,
    Unsubscribe,
    VersionConflict,
    WakeUp,
)

log = logging.getLogger(__name__)

# The key names (`lk:{circle}:state`, …, and `lk:circles`) are in storage.layout.
WAKE, EPHEMERAL = b"w"[0], b"e"[0]
_WALL_CLOCK = RealClock()
HEARTBEAT_SECONDS = 5.0  # the subscriber connection pings when quiet this long

_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'blob', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""

# KEYS: state, events, home, fence. ARGV: expected, new, blob, ttl ms, maxlen, channel, wake,
# fencing token ('' = none: compare-and-set only), now ms, keep events ms, events...
_SAVE = """
local v = redis.call('HGET', KEYS[1], 'v')
if not v then return 'missing' end
-- a save retried after a lost reply finds its own write: it succeeded
if v == ARGV[2] and v ~= ARGV[1] and redis.call('HGET', KEYS[1], 'blob') == ARGV[3] then
  return 'ok'
end
if ARGV[8] ~= '' and redis.call('HGET', KEYS[3], 'token') ~= ARGV[8] then return 'stale' end
if v ~= ARGV[1] then return 'conflict' end
redis.call('HSET', KEYS[1], 'v', ARGV[2], 'blob', ARGV[3])
-- the entries saved `keep` ms ago or earlier go (a save adds one, so a few a save keep pace)
local cutoff = tonumber(ARGV[9]) - tonumber(ARGV[10])
local last_old = nil
for _, e in ipairs(redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 8)) do
  if e[2][3] == 't' and tonumber(e[2][4]) <= cutoff then last_old = e[1] else break end
end
if last_old then
  redis.call('XTRIM', KEYS[2], 'MINID', string.match(last_old, '^%d+') .. '-1')
end
local entry = {'v', ARGV[2], 't', ARGV[9]}
for i = 11, #ARGV do
  entry[#entry + 1] = tostring(i - 11)
  entry[#entry + 1] = ARGV[i]
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], ARGV[2] .. '-0', unpack(entry))
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[10])
redis.call('PEXPIRE', KEYS[4], ARGV[4])
-- a fenced save comes from the circle's home, where all its sessions live and hear it at once
if ARGV[8] == '' then redis.call('PUBLISH', ARGV[6], ARGV[7]) end
return 'ok'
"""

# KEYS: state, home, fence. ARGV: owner, url, lease ttl ms, idle ttl ms.
# -> {1, token} taken (it was free), {2, token} already ours, {0, url} another's, {-1} missing
_ACQUIRE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1} end
local h = redis.call('HMGET', KEYS[2], 'owner', 'token', 'url')
if h[1] and h[1] ~= ARGV[1] then return {0, h[3] or ''} end
local how, token = 2, h[2]
if not h[1] then
  how, token = 1, redis.call('INCR', KEYS[3])
  redis.call('HSET', KEYS[2], 'owner', ARGV[1], 'token', token, 'url', ARGV[2])
  redis.call('PEXPIRE', KEYS[3], ARGV[4])
end
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return {how, tonumber(token)}
"""

# KEYS: home. ARGV: owner, token, lease ttl ms (renew) -> 1 held and extended, 0 lost
_RENEW = """
local h = redis.call('HMGET', KEYS[1], 'owner', 'token')
if h[1] ~= ARGV[1] or h[2] ~= ARGV[2] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""

# KEYS: home. ARGV: owner, token -> 1 released, 0 not ours (any more)
_RELEASE = """
local h = redis.call('HMGET', KEYS[1], 'owner', 'token')
if h[1] ~= ARGV[1] or h[2] ~= ARGV[2] then return 0 end
return redis.call('DEL', KEYS[1])
"""

# KEYS[1] the live processes; ARGV: owner id, URL, ttl ms. Expired entries are pruned here,
# by the clock of Redis (one clock for every process).
_ANNOUNCE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], ARGV[1], (now + tonumber(ARGV[3])) .. '|' .. ARGV[2])
local all = redis.call('HGETALL', KEYS[1])
local alive = {}
for i = 1, #all, 2 do
  local sep = string.find(all[i + 1], '|', 1, true)
  if sep and tonumber(string.sub(all[i + 1], 1, sep - 1)) > now then
    alive[#alive + 1] = all[i]
    alive[#alive + 1] = string.sub(all[i + 1], sep + 1)
  else
    redis.call('HDEL', KEYS[1], all[i])
  end
end
return alive
"""

_DELETE = """
redis.call('DEL', KEYS[3], KEYS[4])
local n = redis.call('DEL', KEYS[1], KEYS[2])
if n > 0 then redis.call('PUBLISH', ARGV[1], ARGV[2]) end
return n
"""


def resp_command(*args: bytes | str | int) -> bytes:
    """One command in the Redis protocol (RESP: an array of bulk strings), for the save path:
    redis-py's general `pack_command` took half the CPU of a save (cProfile of 3000 saves);
    the arguments here are only bytes, str and int (tests compare it with redis-py's)."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


@contextmanager
def _mapped(what: str) -> Iterator[None]:
    """Turn Redis and socket failures into the store's own errors."""
    try:
        yield
    except ResponseError as exc:
        if str(exc).startswith("WRONGTYPE"):
            raise CorruptState(f"{what}: a key of the wrong type") from None
        raise StoreUnavailable(f"{what}: {type(exc).__name__}") from None
    except (RedisError, OSError, TimeoutError) as exc:
        raise StoreUnavailable(f"{what}: {type(exc).__name__}") from None


@dataclass(eq=False)
class _Subscriber:
    on_wake: WakeUp
    on_ephemeral: Ephemeral


class RedisStore:
    """`url` as redis-py takes it (`redis://host:port/db`). Commands share a blocking pool of
    `pool_size` connections (a burst waits up to `pool_timeout` s for one instead of failing);
    subscriptions use one more connection of their own."""

    def __init__(self, url: str, *, pool_size: int = 32, pool_timeout: float = 5.0,
                 socket_timeout: float = 5.0, idle_seconds: float = IDLE_SECONDS,
                 max_versions: int = MAX_VERSIONS, keep_events_ms: int = KEEP_EVENTS_MS,
                 clock: Callable[[], int] = _WALL_CLOCK.now) -> None:
        self._ttl_ms = int(idle_seconds * 1000)
        self._keep_ms = keep_events_ms
        self._clock = clock  # stamps saved events, for trimming them
        self._socket_timeout = socket_timeout
        self._max_versions = max_versions
        # One quick retry on a broken connection (a pooled socket after a Redis restart);
        # never on a timeout, whose command may have run. Saves are idempotent anyway.
        options: dict[str, Any] = dict(socket_timeout=socket_timeout,
                                       socket_connect_timeout=socket_timeout)
        self._pool = BlockingConnectionPool.from_url(
            url, max_connections=pool_size, timeout=pool_timeout,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)), **options)
        self._redis = Redis(connection_pool=self._pool)
        self._sub_redis = Redis.from_url(url, retry=Retry(NoBackoff(), 0), **options)
        self._create_script = self._redis.register_script(_CREATE)
        self._save_script = self._redis.register_script(_SAVE)
        self._delete_script = self._redis.register_script(_DELETE)
        self._acquire_script = self._redis.register_script(_ACQUIRE)
        self._renew_script = self._redis.register_script(_RENEW)
        self._release_script = self._redis.register_script(_RELEASE)
        self._announce_script = self._redis.register_script(_ANNOUNCE)
        self._saves: list[tuple[list[str], list[Any], asyncio.Future[Any]]] = []  # the next batch
        self._saving = False  # a batch is being sent (saves asked for meanwhile wait for the next)
        self._conns: dict[str, Any] = {}  # connections of saves and renewals (made, not pooled)
        self._subs: dict[str, list[_Subscriber]] = {}
        self._woken: dict[str, int] = {}  # newest version this process's subscribers heard, per circle
        self._pubsub: PubSub | None = None
        self._confirmed: set[str] = set()  # circles whose SUBSCRIBE the current connection confirmed
        self._reader: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._heard = 0.0  # loop time of the last thing read on the subscriber connection

    # ---- state and events --------------------------------------------------------------

    async def create(self, circle_id: str, blob: bytes) -> None:
        version = state_version(blob)
        with _mapped("create"):
            k = circle_keys(circle_id)
            created = await self._create_script(keys=[k.state, k.events],
                                                args=[version, blob, self._ttl_ms])
            if not created:
                raise CircleExists(circle_id)
            await self._redis.sadd(CIRCLES_KEY, circle_id)

    async def load(self, circle_id: str) -> bytes:
        with _mapped("load"):
            blob = await self._redis.hget(circle_keys(circle_id).state, "blob")
        if blob is None:
            raise NoSuchCircle(circle_id)
        if not isinstance(blob, bytes):
            raise CorruptState("state blob is not bytes")
        return blob

    async def save(self, circle_id: str, expected_version: int, blob: bytes,
                   events: Sequence[bytes], new_version: int, fence: int | None = None) -> None:
        # A fenced save is the home's own (DESIGN §8: a circle's sessions all live on its home
        # process, which wakes its subscribers below): no wake-up is published for it. Saves
        # without a lease (timers, the organizer API, any process) publish one.
        k = circle_keys(circle_id)
        wake = b"" if fence is not None else (
            bytes([WAKE]) + msgpack.packb([new_version, list(events)], use_bin_type=True))
        args = [expected_version, new_version, blob, self._ttl_ms, self._max_versions,
                k.wake, wake, "" if fence is None else fence,
                self._clock(), self._keep_ms, *events]
        keys = [k.state, k.events, k.home, k.fence]
        with _mapped("save"):
            outcome = await self._batched_save(keys, args)
        if outcome == b"missing":
            raise NoSuchCircle(circle_id)
        if outcome == b"conflict":
            raise VersionConflict(f"{circle_id}: not at version {expected_version}")
        if outcome == b"stale":
            raise StaleOwner(f"{circle_id}: fencing token {fence} no longer holds the lease")
        # This process's own subscribers hear of the save now, not after a round trip through
        # pub/sub: the circle's sessions live here (DESIGN §8), so that is the hot fan-out path.
        # Each version wakes them once: whichever of this and its published wake-up (an
        # unfenced save publishes one) comes second is skipped.
        # Only for circles someone here subscribes to: `_woken` must not outlive them.
        subs = self._subs.get(circle_id)
        if not subs or self._woken.get(circle_id, -1) >= new_version:
            return
        self._woken[circle_id] = new_version
        for sub in list(subs):
            _call(sub.on_wake, circle_id, new_version, list(events))

    # Saves are pipelined on one connection of their own: whatever was asked for while the
    # previous batch was in flight (members of many circles speaking at once) goes out as the
    # next batch, in one write, and its answers are read in order. A quiet process sends each
    # save alone; a busy one sends them by the dozen, so the cost per save shrinks when the
    # process is busiest. Commands are packed here (`resp_command`), answers parsed by
    # redis-py's connection, without the pool and client layers that cost more than the
    # round trip.

    async def _batched_save(self, keys: list[str], args: list[Any]) -> Any:
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._saves.append((keys, args, answer))
        if not self._saving:
            self._saving = True
            self._spawn(self._save_loop())
        return await answer

    async def _save_loop(self) -> None:
        try:
            while self._saves and not self._closed:
                batch, self._saves = self._saves, []
                await self._send_saves(batch)
        finally:
            self._saving = False
            if self._closed:
                batch, self._saves = self._saves, []
                for _, _, answer in batch:
                    answer.cancel()

    async def _send_saves(self, batch: list[tuple[list[str], list[Any], asyncio.Future[Any]]]) -> None:
        try:
            # Saves are idempotent (a save that finds its own write succeeded): a batch that
            # partly ran before a connection broke is safe to send again.
            results = await self._evalsha_all("saves", self._save_script,
                                              [(keys, args) for keys, args, _ in batch])
        except asyncio.CancelledError:
            for _, _, answer in batch:
                answer.cancel()
            raise
        except Exception as exc:  # the connection failed: every save of the batch did
            for _, _, answer in batch:
                if not answer.done():
                    answer.set_exception(exc)
            return
        for (_, _, answer), result in zip(batch, results, strict=True):
            if answer.done():
                continue  # its caller gave up waiting (the save may still have happened)
            if isinstance(result, BaseException):
                answer.set_exception(result)
            else:
                answer.set_result(result)

    async def _evalsha_all(self, name: str, script: Any,
                           calls: Sequence[tuple[Sequence[str], Sequence[Any]]]) -> list[Any]:
        """Run the idempotent `script` once per (keys, args) of `calls`, all in one write on
        the connection called `name`; the answers in order, an error answer in its place.
        A broken connection (Redis restarted) is tried once more on a new one, never after a
        timeout (the calls may have run); a script Redis forgot is loaded again once and the
        calls that missed it are sent again."""

        def packed(items: Sequence[tuple[Sequence[str], Sequence[Any]]]) -> bytes:
            return b"".join([resp_command("EVALSHA", script.sha, len(keys), *keys, *args)
                             for keys, args in items])

        try:
            answers = await self._exchange(name, packed(calls), len(calls))
        except TimeoutError:
            raise
        except (RedisConnectionError, OSError):
            answers = await self._exchange(name, packed(calls), len(calls))
        missing = [i for i, answer in enumerate(answers) if isinstance(answer, NoScriptError)]
        if missing:
            await self._redis.script_load(script.script)
            again = await self._exchange(name, packed([calls[i] for i in missing]), len(missing))
            for i, answer in zip(missing, again, strict=True):
                answers[i] = answer
        return answers

    async def _exchange(self, name: str, packed: bytes, count: int) -> list[Any]:
        """Send `count` packed commands in one write on the connection called `name` (one of
        this store's own, made on first use) and read their `count` answers in order; an
        error answer is returned in its place, a broken connection raises."""
        conn: Any = self._conns.get(name)
        if conn is None:
            # No per-read timeout (redis-py wraps each in a timer, each send in a task): the
            # whole exchange has one, below.
            options = {**self._pool.connection_kwargs, "socket_timeout": None}
            conn = self._conns[name] = self._pool.connection_class(**options)
        try:
            async with asyncio.timeout(self._socket_timeout):
                await conn.send_packed_command(packed, check_health=False)
                results: list[Any] = []
                for _ in range(count):
                    try:
                        results.append(await conn.read_response())
                    except ResponseError as exc:  # this command's own answer; the rest follow
                        results.append(exc)
            return results
        except BaseException:
            # Half the answers read (or none): the connection cannot be trusted any more.
            if self._conns.get(name) is conn:
                del self._conns[name]
            await conn.disconnect(nowait=True)
            raise

    # ---- the circle's home (DESIGN §8) -------------------------------------------------

    async def acquire(self, circle_id: str, owner_id: str, url: str, ttl_ms: int
                      ) -> Lease | Owner:
        with _mapped("acquire"):
            k = circle_keys(circle_id)  # the lease scripts check that the circle exists
            answer = await self._acquire_script(keys=[k.state, k.home, k.fence],
                                                args=[owner_id, url, ttl_ms, self._ttl_ms])
        try:
            how = int(answer[0])
            if how == -1:
                raise NoSuchCircle(circle_id)
            if how == 0:
                held_by = answer[1]
                return Owner(held_by.decode() if isinstance(held_by, bytes) else str(held_by))
            return Lease(circle_id, owner_id, int(answer[1]), taken_over=how == 1)
        except (ValueError, TypeError, IndexError):
            raise CorruptState("unreadable lease") from None

    async def renew(self, leases: Sequence[Lease], ttl_ms: int) -> list[bool]:
        """Every lease in one write on a connection of its own, packed here: with hundreds of
        circles, redis-py's pipeline (packing, and a SCRIPT EXISTS first) held the event
        loop for milliseconds every second."""
        if not leases:
            return []
        calls = [([circle_keys(lease.circle_id).home], [lease.owner_id, lease.token, ttl_ms])
                 for lease in leases]
        with _mapped("renew"):
            answers = await self._evalsha_all("renewals", self._renew_script, calls)
            for answer in answers:
                if isinstance(answer, ResponseError):
                    raise answer
        return [answer == 1 for answer in answers]

    async def release(self, lease: Lease) -> None:
        with _mapped("release"):
            await self._release_script(keys=[circle_keys(lease.circle_id).home],
                                       args=[lease.owner_id, lease.token])

    async def announce(self, owner_id: str, url: str, ttl_ms: int) -> dict[str, str]:
        with _mapped("announce"):
            answer = await self._announce_script(keys=[PROCESSES_KEY], args=[owner_id, url, ttl_ms])
        try:
            pairs = [x.decode() if isinstance(x, bytes) else str(x) for x in answer]
            return dict(zip(pairs[::2], pairs[1::2], strict=True))
        except (ValueError, TypeError):
            raise CorruptState("unreadable process list") from None

    async def withdraw(self, owner_id: str) -> None:
        with _mapped("withdraw"):
            await self._redis.hdel(PROCESSES_KEY, owner_id)

    async def publish_ephemeral(self, circle_id: str, event: bytes) -> None:
        channel = circle_keys(circle_id).wake
        with _mapped("publish"):
            await self._redis.publish(channel, bytes([EPHEMERAL]) + event)

    async def events_since(self, circle_id: str, version: int) -> list[bytes]:
        k = circle_keys(circle_id)
        with _mapped("events_since"):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hget(k.state, "v")
                pipe.xrange(k.events, "-", "+", count=1)
                pipe.xrange(k.events, str(max(version + 1, 0)), "+")
                current_raw, oldest, entries = await pipe.execute()
        if current_raw is None:
            raise NoSuchCircle(circle_id)
        try:
            if not replay_needed(version, int(current_raw),
                                 int(oldest[0][1][b"v"]) if oldest else None):
                return []
            out: list[bytes] = []
            for _id, fields in entries:
                count = len(fields) - (2 if b"t" in fields else 1)  # less v and t (older: no t)
                out.extend(fields[str(i).encode()] for i in range(count))
            return out
        except (ValueError, KeyError, IndexError, TypeError):
            raise CorruptState("unreadable event stream") from None

    async def delete(self, circle_id: str) -> None:
        gone = bytes([WAKE]) + msgpack.packb([-1, None])
        k = circle_keys(circle_id)
        with _mapped("delete"):
            await self._delete_script(keys=[k.state, k.events, k.home, k.fence],
                                      args=[k.wake, gone])
            await self._redis.srem(CIRCLES_KEY, circle_id)
        self._woken.pop(circle_id, None)

    async def circle_ids(self) -> list[str]:
        with _mapped("circle_ids"):
            raw = await self._redis.smembers(CIRCLES_KEY)
            members = sorted(m.decode() if isinstance(m, bytes) else m for m in raw)
            ids = [m for m in members if CIRCLE_ID.fullmatch(m)]
            if not ids:
                return []
            async with self._redis.pipeline(transaction=False) as pipe:
                for cid in ids:
                    pipe.exists(circle_keys(cid).state)
                alive = await pipe.execute()
            gone = [cid for cid, n in zip(ids, alive, strict=True) if not n]
            if gone:  # expired: forget them (the state key exists from creation on)
                await self._redis.srem(CIRCLES_KEY, *gone)
        return [cid for cid, n in zip(ids, alive, strict=True) if n]

    async def ping(self) -> None:
        with _mapped("ping"):
            await self._redis.ping()

    def keeps(self, circle_id: str) -> bool:
        """Whether this process keeps anything of the circle (for leak checks, issue 17)."""
        return circle_id in self._subs or circle_id in self._woken or circle_id in self._confirmed

    async def close(self) -> None:
        self._closed = True
        if self._pubsub is not None and self._pubsub.connection is not None:
            await self._pubsub.connection.disconnect()  # ends the reader's blocking read
        tasks = [*self._tasks, *([self._reader] if self._reader else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._subs.clear()
        for conn in list(self._conns.values()):
            await conn.disconnect(nowait=True)
        self._conns.clear()
        for client in (self._sub_redis, self._redis):
            try:
                await client.aclose()
            except (RedisError, OSError):
                pass
        await self._pool.aclose()

    # ---- subscriptions: one pub/sub connection, one reader task ------------------------

    def subscribe(self, circle_id: str, on_wake: WakeUp, on_ephemeral: Ephemeral) -> Unsubscribe:
        channel = circle_keys(circle_id).wake
        sub = _Subscriber(on_wake, on_ephemeral)
        subs = self._subs.setdefault(circle_id, [])
        subs.append(sub)
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read_forever())
        elif circle_id in self._confirmed:
            self._spawn(self._catch_up(circle_id, [sub]))
        elif len(subs) == 1 and self._pubsub is not None:
            self._spawn(self._pubsub_call(self._pubsub.subscribe, channel))
        # otherwise the (re)connecting reader subscribes it and catches up

        def unsubscribe() -> None:
            current = self._subs.get(circle_id, [])
            if sub in current:
                current.remove(sub)
            if current or circle_id not in self._subs:
                return
            del self._subs[circle_id]
            self._woken.pop(circle_id, None)
            self._confirmed.discard(circle_id)
            if self._pubsub is not None and not self._closed:
                self._spawn(self._pubsub_call(self._pubsub.unsubscribe, channel))

        return unsubscribe

    def _spawn(self, coro: Awaitable[None]) -> None:
        async def run() -> None:
            await coro

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _pubsub_call(self, method: Callable[..., Awaitable[Any]], channel: str) -> None:
        try:
            await method(channel)
        except (RedisError, OSError):
            pass  # the reader sees the broken connection too, reconnects and resubscribes

    async def _catch_up(self, circle_id: str, subs: list[_Subscriber]) -> None:
        """Tell subscribers the current version, so they fetch what they may have missed."""
        try:
            with _mapped("catch_up"):
                raw = await self._redis.hget(circle_keys(circle_id).state, "v")
        except (StoreUnavailable, CorruptState):
            return  # the next reconnect catches up again
        version = int(raw) if raw is not None else -1
        for sub in subs:
            if sub in self._subs.get(circle_id, ()):
                _call(sub.on_wake, circle_id, version, None)

    async def _read_forever(self) -> None:
        loop = asyncio.get_running_loop()
        delay = 0.05
        while not self._closed:
            pubsub = self._sub_redis.pubsub()
            watchdog: asyncio.Task[None] | None = None
            try:
                sent = set(self._subs)
                if sent:
                    await pubsub.subscribe(*(circle_keys(c).wake for c in sent))
                else:
                    await pubsub.connect()  # type: ignore[no-untyped-call]
                self._pubsub = pubsub
                late = set(self._subs) - sent  # subscribed while we were connecting
                if late:
                    await pubsub.subscribe(*(circle_keys(c).wake for c in late))
                self._heard = loop.time()
                watchdog = loop.create_task(self._watch(pubsub))
                while not self._closed:
                    # A blocking read (no timeout inside redis-py, so cancelling is clean);
                    # the watchdog notices a silent dead peer.
                    message = await pubsub.get_message(timeout=None)
                    self._heard = loop.time()
                    if message is not None:
                        delay = 0.05
                        self._dispatch(message)
            except (RedisError, OSError, TimeoutError) as exc:
                if not self._closed:
                    log.warning("redis subscriber connection lost (%s); reconnecting",
                                type(exc).__name__)
            finally:
                if watchdog is not None:
                    watchdog.cancel()
                self._pubsub = None
                self._confirmed.clear()
                try:
                    await pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]
                except (RedisError, OSError):
                    pass
            if not self._closed:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def _watch(self, pubsub: PubSub) -> None:
        """Ping when quiet; if nothing at all comes back, drop the connection to reconnect."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            quiet = loop.time() - self._heard
            try:
                if quiet > 2 * HEARTBEAT_SECONDS:
                    raise TimeoutError
                if quiet >= HEARTBEAT_SECONDS:
                    await pubsub.ping()
            except (RedisError, OSError, TimeoutError):
                if pubsub.connection is not None:
                    await pubsub.connection.disconnect()
                return

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind, channel, data = message["type"], message["channel"], message["data"]
        if not isinstance(channel, bytes):
            return
        circle_id = circle_of_channel(channel)
        subs = list(self._subs.get(circle_id, ()))
        if kind == "subscribe":
            if subs:
                self._confirmed.add(circle_id)
                self._spawn(self._catch_up(circle_id, subs))
        elif kind == "unsubscribe":
            self._confirmed.discard(circle_id)
            if subs and self._pubsub is not None:  # subscribed again meanwhile
                self._spawn(self._pubsub_call(self._pubsub.subscribe, channel.decode()))
        elif kind == "message" and isinstance(data, bytes) and data:
            if data[0] == EPHEMERAL:
                for sub in subs:
                    _call(sub.on_ephemeral, circle_id, data[1:])
            elif data[0] == WAKE:
                try:
                    version, events = msgpack.unpackb(data[1:], raw=False)
                    version = int(version)
                except (ValueError, TypeError, msgpack.UnpackException):
                    log.warning("unreadable wake-up on %s", channel)
                    return
                if version < 0:
                    self._woken.pop(circle_id, None)  # deleted (by any process)
                elif not subs:
                    return  # sent before we unsubscribed: nobody to wake, nothing to note
                elif version <= self._woken.get(circle_id, -1):
                    return  # heard already (saved by this process)
                else:
                    self._woken[circle_id] = version
                for sub in subs:
                    _call(sub.on_wake, circle_id, version, events)


def _call(callback: Callable[..., None], *args: object) -> None:
    try:
        callback(*args)
    except Exception:  # one broken subscriber must not stop the reader or the others
        log.exception("store subscriber failed")
