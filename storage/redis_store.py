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
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import msgpack
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MovedError, NoScriptError, RedisClusterException, RedisError, ResponseError

from storage import redis_scripts as scripts
from storage.clock import RealClock
from storage.codec import CorruptState, state_version
from storage.layout import (
    CIRCLE_ID,
    CIRCLES_KEY,
    HANDOVER_KEEP_MS,
    IDLE_SECONDS,
    KEEP_EVENTS_MS,
    MAX_VERSIONS,
    PROCESSES_KEY,
    circle_keys,
    circle_of_channel,
    handover_key,
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



@contextmanager
def _mapped(what: str) -> Iterator[None]:
    """Turn Redis and socket failures into the store's own errors."""
    try:
        yield
    except ResponseError as exc:
        if str(exc).startswith("WRONGTYPE"):
            raise CorruptState(f"{what}: a key of the wrong type") from None
        raise StoreUnavailable(f"{what}: {type(exc).__name__}") from None
    except (RedisError, RedisClusterException, OSError, TimeoutError) as exc:
        # (redis-py's cluster client raises RedisClusterException, which is no RedisError)
        raise StoreUnavailable(f"{what}: {type(exc).__name__}") from None


@dataclass(eq=False)
class _Subscriber:
    on_wake: WakeUp
    on_ephemeral: Ephemeral


# One script call: the script, its keys, its arguments.
Call = tuple[AsyncScript, Sequence[str], Sequence[Any]]


class _Batches:
    """Script calls asked for while the previous batch is in flight go out as the next batch,
    in one write (members of many circles speaking at once): a quiet process sends each call
    alone, a busy one sends them by the dozen, so the cost per call shrinks when the process is
    busiest. `send` answers every call of a batch in order (an exception in the place of one
    that failed), or raises for the whole batch."""

    def __init__(self, send: Callable[[list[Call]], Awaitable[list[Any]]],
                 spawn: Callable[[Awaitable[None]], None]) -> None:
        self._send = send
        self._spawn = spawn
        self._queue: list[tuple[Call, asyncio.Future[Any]]] = []  # the next batch
        self._sending = False  # a batch is being sent (calls asked for meanwhile wait for the next)
        self.closed = False

    async def call(self, call: Call) -> Any:
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((call, answer))
        if not self._sending:
            self._sending = True
            self._spawn(self._loop())
        return await answer

    async def _loop(self) -> None:
        try:
            while self._queue and not self.closed:
                batch, self._queue = self._queue, []
                await self._send_batch(batch)
        finally:
            self._sending = False
            if self.closed:
                batch, self._queue = self._queue, []
                for _, answer in batch:
                    answer.cancel()

    async def _send_batch(self, batch: list[tuple[Call, asyncio.Future[Any]]]) -> None:
        try:
            results = await self._send([call for call, _ in batch])
        except asyncio.CancelledError:
            for _, answer in batch:
                answer.cancel()
            raise
        except Exception as exc:  # the connection failed: every call of the batch did
            for _, answer in batch:
                if not answer.done():
                    answer.set_exception(exc)
            return
        for (_, answer), result in zip(batch, results, strict=True):
            if answer.done():
                continue  # its caller gave up waiting (the call may still have happened)
            if isinstance(result, BaseException):
                answer.set_exception(result)
            else:
                answer.set_result(result)


class RedisStore:
    """`url` as redis-py takes it (`redis://host:port/db`). Commands share a blocking pool of
    `pool_size` connections (a burst waits up to `pool_timeout` s for one instead of failing);
    subscriptions use one more connection of their own, saves and renewals one each."""

    PUBLISH = "PUBLISH"  # how wake-ups are published (on a cluster: SPUBLISH, in the slot's shard)

    def __init__(self, url: str, *, pool_size: int = 32, pool_timeout: float = 5.0,
                 socket_timeout: float = 5.0, idle_seconds: float = IDLE_SECONDS,
                 max_versions: int = MAX_VERSIONS, keep_events_ms: int = KEEP_EVENTS_MS,
                 clock: Callable[[], int] = _WALL_CLOCK.now) -> None:
        self._ttl_ms = int(idle_seconds * 1000)
        self._keep_ms = keep_events_ms
        self._clock = clock  # stamps saved events, for trimming them
        self._socket_timeout = socket_timeout
        self._max_versions = max_versions
        self._redis: Any = self._connect(url, pool_size, pool_timeout, dict(
            socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout))
        self._create_script = self._script(scripts.CREATE)
        self._save_script = self._script(scripts.SAVE)
        self._delete_script = self._script(scripts.DELETE)
        self._acquire_script = self._script(scripts.ACQUIRE)
        self._renew_script = self._script(scripts.RENEW)
        self._release_script = self._script(scripts.RELEASE)
        self._announce_script = self._script(scripts.ANNOUNCE)
        self._take_all_script = self._script(scripts.TAKE_ALL)
        self._conns: dict[str, Any] = {}  # connections of saves and renewals (made, not pooled)
        self._subs: dict[str, list[_Subscriber]] = {}
        self._woken: dict[str, int] = {}  # newest version this process's subscribers heard, per circle
        self._route: dict[str, _Reader] = {}  # the reader subscribed to each circle's channel
        self._readers: dict[str, _Reader] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._saves = _Batches(lambda calls: self._evalsha_all("saves", calls), self._spawn)

    def _connect(self, url: str, pool_size: int, pool_timeout: float,
                 options: dict[str, Any]) -> Any:
        """The client of commands (and, here, the URL of the subscriber's)."""
        self._url, self._options = url, options
        # One quick retry on a broken connection (a pooled socket after a Redis restart);
        # never on a timeout, whose command may have run. Saves are idempotent anyway.
        self._pool = BlockingConnectionPool.from_url(
            url, max_connections=pool_size, timeout=pool_timeout,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)), **options)
        return Redis(connection_pool=self._pool)

    def _script(self, text: str) -> AsyncScript:
        return self._redis.register_script(text)  # type: ignore[no-any-return]

    # ---- state and events --------------------------------------------------------------

    async def _run(self, script: AsyncScript, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """One call of a script that writes what a caller is told is done (create, acquire,
        delete); on a cluster, it is answered only once a replica has it too."""
        return await script(keys=keys, args=args)

    async def _save_call(self, call: Call) -> Any:
        return await self._saves.call(call)

    async def create(self, circle_id: str, blob: bytes) -> None:
        version = state_version(blob)
        with _mapped("create"):
            k = circle_keys(circle_id)
            created = await self._run(self._create_script, [k.state, k.events],
                                      [version, blob, self._ttl_ms])
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
            outcome = await self._save_call((self._save_script, keys, args))
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

    # Saves (and on a cluster every acknowledged write) are pipelined on connections of their
    # own (`_Batches`). Commands are packed here (`resp_command`), answers parsed by redis-py's
    # connection, without the pool and client layers that cost more than the round trip.

    async def _evalsha_all(self, name: str, calls: Sequence[Call], node: Any = None,
                           then: bytes = b"") -> list[Any]:
        """Run each idempotent script call of `calls`, all in one write on the connection
        called `name` (to `node` of a cluster); the answers in order, an error answer in its
        place (and last, the answer of the one packed command `then`, sent after them). A
        broken connection (Redis restarted) is tried once more on a new one, never after a
        timeout (the calls may have run); a script Redis forgot is loaded again once on that
        connection and the calls that missed it are sent again."""

        def packed(items: Sequence[Call]) -> bytes:
            return b"".join([scripts.resp_command("EVALSHA", script.sha, len(keys), *keys, *args)
                             for script, keys, args in items])

        count = len(calls) + (1 if then else 0)
        try:
            answers = await self._exchange(name, packed(calls) + then, count, node)
        except TimeoutError:
            raise
        except (RedisConnectionError, OSError):
            answers = await self._exchange(name, packed(calls) + then, count, node)
        missing = [i for i, answer in enumerate(answers[:len(calls)]) if isinstance(answer, NoScriptError)]
        if missing:
            forgotten = {calls[i][0].sha: calls[i][0].script for i in missing}
            load = b"".join([scripts.resp_command("SCRIPT", "LOAD", bytes(text) if isinstance(text, memoryview) else text)
                             for text in forgotten.values()])
            again = await self._exchange(name, load + packed([calls[i] for i in missing]),
                                         len(forgotten) + len(missing), node)
            for i, answer in zip(missing, again[len(forgotten):], strict=True):
                answers[i] = answer
        return answers

    def _new_connection(self, node: Any) -> Any:
        # No per-read timeout (redis-py wraps each in a timer, each send in a task): the
        # whole exchange has one (`_exchange`).
        return self._pool.connection_class(**{**self._pool.connection_kwargs, "socket_timeout": None})

    async def _exchange(self, name: str, packed: bytes, count: int, node: Any = None) -> list[Any]:
        """Send `count` packed commands in one write on the connection called `name` (one of
        this store's own, made on first use; one per cluster node) and read their `count`
        answers in order; an error answer is returned in its place, a broken connection raises."""
        key = name if node is None else f"{name}@{node.name}"
        conn: Any = self._conns.get(key)
        if conn is None:
            conn = self._conns[key] = self._new_connection(node)
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
            if self._conns.get(key) is conn:
                del self._conns[key]
            await conn.disconnect(nowait=True)
            raise

    # ---- the circle's home (DESIGN §8) -------------------------------------------------

    async def acquire(self, circle_id: str, owner_id: str, url: str, ttl_ms: int
                      ) -> Lease | Owner:
        with _mapped("acquire"):
            k = circle_keys(circle_id)  # the lease scripts check that the circle exists
            answer = await self._run(self._acquire_script, [k.state, k.home, k.fence],
                                     [owner_id, url, ttl_ms, self._ttl_ms])
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
        calls: list[Call] = [
            (self._renew_script, [circle_keys(lease.circle_id).home],
             [lease.owner_id, lease.token, ttl_ms]) for lease in leases]
        with _mapped("renew"):
            answers = await self._renew_all(calls)
            for answer in answers:
                if isinstance(answer, BaseException):
                    raise answer
        return [answer == 1 for answer in answers]

    async def _renew_all(self, calls: list[Call]) -> list[Any]:
        return await self._evalsha_all("renewals", calls)

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

    async def ask_handover(self, home_url: str, circle_id: str, to_url: str) -> None:
        key = handover_key(home_url)
        with _mapped("handover"):
            await self._redis.hset(key, circle_id, to_url)
            await self._redis.pexpire(key, HANDOVER_KEEP_MS)

    async def handovers(self, home_url: str) -> dict[str, str]:
        with _mapped("handovers"):
            answer = await self._take_all_script(keys=[handover_key(home_url)])
        pairs = [x.decode() if isinstance(x, bytes) else str(x) for x in answer]
        return dict(zip(pairs[::2], pairs[1::2], strict=True))

    async def publish_ephemeral(self, circle_id: str, event: bytes) -> None:
        channel = circle_keys(circle_id).wake
        with _mapped("publish"):
            await self._redis.execute_command(self.PUBLISH, channel, bytes([EPHEMERAL]) + event)

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
            await self._run(self._delete_script, [k.state, k.events, k.home, k.fence], [k.wake, gone])
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
        return (circle_id in self._subs or circle_id in self._woken or circle_id in self._route
                or any(circle_id in r.confirmed for r in self._readers.values()))

    async def close(self) -> None:
        self._closed = True
        self._saves.closed = True
        await asyncio.gather(*(r.close() for r in self._readers.values()), return_exceptions=True)
        self._readers.clear()
        self._route.clear()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._subs.clear()
        for conn in list(self._conns.values()):
            await conn.disconnect(nowait=True)
        self._conns.clear()
        await self._close_clients()

    async def _close_clients(self) -> None:
        try:
            await self._redis.aclose()
        except (RedisError, OSError):
            pass
        await self._pool.aclose()

    # ---- subscriptions: a pub/sub connection and its reader task (`_Reader`) ------------

    def subscribe(self, circle_id: str, on_wake: WakeUp, on_ephemeral: Ephemeral) -> Unsubscribe:
        sub = _Subscriber(on_wake, on_ephemeral)
        subs = self._subs.setdefault(circle_id, [])
        subs.append(sub)
        reader = self._route.get(circle_id)
        if reader is None:  # the first subscriber here
            self._route_circle(circle_id)
        elif circle_id in reader.confirmed:
            self._spawn(self._catch_up(circle_id, [sub]))
        # otherwise its subscription is on the way, and its confirmation catches everyone up

        def unsubscribe() -> None:
            current = self._subs.get(circle_id, [])
            if sub in current:
                current.remove(sub)
            if current or circle_id not in self._subs:
                return
            del self._subs[circle_id]
            self._woken.pop(circle_id, None)
            reader = self._route.pop(circle_id, None)
            if reader is not None:
                reader.unsubscribe(circle_id)

        return unsubscribe

    def _route_circle(self, circle_id: str) -> None:
        """Have a reader subscribe to the circle's channel (on one Redis, the only reader)."""
        reader = self._readers.get("")
        if reader is None:
            client = Redis.from_url(self._url, retry=Retry(NoBackoff(), 0), **self._options)
            reader = self._readers[""] = _Reader(self, client, sharded=False)
        self._route[circle_id] = reader
        reader.subscribe(circle_id)

    def _routed_to(self, reader: _Reader) -> list[str]:
        return [circle_id for circle_id, r in self._route.items() if r is reader]

    def _moved(self, reader: _Reader, error: MovedError | None = None) -> None:
        """The reader's connection broke or its server named another owner of a channel's
        slot: on a cluster, the circles are routed anew (one Redis: it just reconnects)."""

    def _spawn(self, coro: Awaitable[None]) -> None:
        async def run() -> None:
            await coro

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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

    def _dispatch(self, reader: _Reader, message: dict[str, Any]) -> None:
        kind, channel, data = message["type"], message["channel"], message["data"]
        kind = _SHARDED.get(kind, kind)
        if not isinstance(channel, bytes):
            return
        circle_id = circle_of_channel(channel)
        ours = self._route.get(circle_id) is reader  # else a late answer of a former route
        subs = list(self._subs.get(circle_id, ())) if ours else []
        if kind == "subscribe":
            if subs:
                reader.confirmed.add(circle_id)
                self._spawn(self._catch_up(circle_id, subs))
        elif kind == "unsubscribe":
            reader.confirmed.discard(circle_id)
            if subs:  # subscribed again meanwhile (or, on a cluster, the slot moved away)
                reader.subscribe(circle_id)
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


_SHARDED = {"ssubscribe": "subscribe", "sunsubscribe": "unsubscribe", "smessage": "message"}


class _Reader:
    """One pub/sub connection and the task that reads it: the wake-up channels of the circles
    the store routes here (every circle, on one Redis; on a cluster, those whose slot one
    master serves, with SSUBSCRIBE, one command per channel as a command's channels must share
    a slot). On each (re)connection it subscribes everything routed to it; each confirmation
    makes the store catch that circle's subscribers up (they fetch what they missed)."""

    def __init__(self, store: RedisStore, client: Redis, *, sharded: bool) -> None:
        self.store = store
        self.client = client
        self.sharded = sharded
        self.pubsub: PubSub | None = None
        self.confirmed: set[str] = set()  # circles whose subscription this connection confirmed
        self.closed = False
        self._heard = 0.0  # loop time of the last thing read
        self.task = asyncio.get_running_loop().create_task(self._read_forever())

    def subscribe(self, circle_id: str) -> None:
        if self.pubsub is not None:  # else the (re)connecting reader subscribes it
            self.store._spawn(self._call(self.pubsub, True, [circle_id]))

    def unsubscribe(self, circle_id: str) -> None:
        self.confirmed.discard(circle_id)
        if self.pubsub is not None and not self.closed:
            self.store._spawn(self._call(self.pubsub, False, [circle_id]))

    async def _send(self, pubsub: PubSub, on: bool, circles: Iterable[str]) -> None:
        channels = [circle_keys(c).wake for c in circles]
        if not self.sharded:
            await (pubsub.subscribe(*channels) if on else pubsub.unsubscribe(*channels))
            return
        for channel in channels:
            await (pubsub.ssubscribe(channel) if on else pubsub.sunsubscribe(channel))

    async def _call(self, pubsub: PubSub, on: bool, circles: list[str]) -> None:
        try:
            await self._send(pubsub, on, circles)
        except (RedisError, OSError):
            pass  # the reader sees the broken connection too, reconnects and resubscribes

    async def close(self) -> None:
        self.closed = True
        if self.pubsub is not None and self.pubsub.connection is not None:
            await self.pubsub.connection.disconnect()  # ends the reader's blocking read
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        try:
            await self.client.aclose()
        except (RedisError, OSError):
            pass

    async def _read_forever(self) -> None:
        loop = asyncio.get_running_loop()
        delay = 0.05
        while not self.closed:
            pubsub = self.client.pubsub()
            watchdog: asyncio.Task[None] | None = None
            try:
                sent = set(self.store._routed_to(self))
                if sent:
                    await self._send(pubsub, True, sent)
                else:
                    await pubsub.connect()  # type: ignore[no-untyped-call]
                self.pubsub = pubsub
                late = set(self.store._routed_to(self)) - sent  # routed here while we connected
                if late:
                    await self._send(pubsub, True, late)
                self._heard = loop.time()
                watchdog = loop.create_task(self._watch(pubsub))
                while not self.closed:
                    # A blocking read (no timeout inside redis-py, so cancelling is clean);
                    # the watchdog notices a silent dead peer.
                    try:
                        message = await pubsub.get_message(timeout=None)
                    except MovedError as moved:  # a channel's slot is served elsewhere now
                        self.store._moved(self, moved)
                        message = None
                    self._heard = loop.time()
                    if message is not None:
                        delay = 0.05
                        self.store._dispatch(self, message)
            except (RedisError, OSError, TimeoutError) as exc:
                if not self.closed:
                    log.warning("redis subscriber connection lost (%s); reconnecting",
                                type(exc).__name__)
                    self.store._moved(self)
            finally:
                if watchdog is not None:
                    watchdog.cancel()
                self.pubsub = None
                self.confirmed.clear()
                try:
                    await pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]
                except (RedisError, OSError):
                    pass
            if not self.closed:
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


def _call(callback: Callable[..., None], *args: object) -> None:
    try:
        callback(*args)
    except Exception:  # one broken subscriber must not stop the reader or the others
        log.exception("store subscriber failed")
