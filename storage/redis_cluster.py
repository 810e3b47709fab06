"""The shared store on Redis Cluster (DESIGN §8): `LINGKAR_STORE=redis-cluster://host:port`,
any node; the others are discovered.

`RedisStore` with its Lua scripts and key layout, on redis-py's asyncio cluster client. Every
key of a circle carries the hash tag `{circle}`, so a circle lives in one slot and each of its
scripts runs whole on the master serving that slot; `lk:circles` and `lk:processes` (slots of
their own) only ever see single-key commands.

Acked means kept. A master replicates asynchronously, so one that fails over can take its
last writes with it. Every write a caller is told is done — a creation, a save, a deletion,
a lease taken — is therefore followed on its connection by ROLE and, when the master has a
replica attached, by `WAIT 1`; it is acknowledged only once a replica has it too (the
election promotes the most up-to-date replica). When none confirms within `wait_ms`, the
write is answered `NotReplicated` (a `StoreUnavailable`: the command gets `error
unavailable`, a hello is closed with 1013): fail closed, as when Redis is down, for a
failover now could lose it. Such a write may still be kept (the caller reloads instead of
trusting its copy), but none is acknowledged and then lost to a failover. A master with no
replica attached (the one just promoted, until its old master comes back as its replica)
acknowledges at once: nothing could be promoted in its place, so no failover can take its
writes; they are as durable as that master alone, as on one Redis (a warning says so when it
starts and ends). Renewals and releases go without WAIT: a lost renewal only shortens a
lease, a lost release lets it expire, and a fencing token never goes back (the INCR that made
it was waited for with its lease).

Routing. Acknowledged writes are batched per master, each on a connection of its own (as the
saves of one Redis are, `_Batches`), grouped by the slot map of the client; a MOVED answer
patches the map and sends the call again, and a broken connection asks the client for a
topology refresh, which the next command runs. Renewals go out per master the same way,
without WAIT. Everything else is the cluster client's: it routes by key and, on an error,
refreshes its topology and retries once before the store says `StoreUnavailable`. At most
`pool_size` of its commands run at once; a burst waits for a turn (as the blocking pool of one
Redis makes it) instead of failing on a full per-node pool.

Pub/sub is sharded: the scripts SPUBLISH a circle's wake-ups on its channel (in its slot), and
a reader per master SSUBSCRIBEs the channels of that master's slots, one command per channel.
When a reader's connection breaks or its node answers MOVED, the store refreshes the topology
and routes every subscribed circle to its slot's master again; a circle that changed readers is
subscribed on the new one, whose confirmation catches its subscribers up (they fetch what they
missed). redis-py 8.2 has sharded pub/sub for the asyncio cluster (`ClusterPubSub`), but it
reads its per-node connections by polling each in turn with a timeout (a blocking read of one
would starve the rest) and re-routes channels in background tasks the reader never hears of;
one blocking reader per master, and a confirmation per subscription, keep the promises of
`Store.subscribe` as on one Redis. The store needs no keyspace events.

A master killed: until its replica is promoted, commands for its slots — and while the
cluster says `cluster_state:fail`, every command — raise `StoreUnavailable`; afterwards the
next refresh finds the new master and everything carries on.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Sequence
from typing import Any, cast

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ConstantBackoff, NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ClusterDownError, MovedError, RedisClusterException, RedisError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError

from storage.layout import circle_keys
from storage.redis_scripts import resp_command
from storage.redis_store import Call, RedisStore, _Batches, _Reader
from storage.store import NotReplicated, StoreUnavailable

log = logging.getLogger(__name__)

SCHEME = "redis-cluster://"
WAIT_MS = 1000  # how long a write waits for a replica to confirm it
REFRESH_SECONDS = 0.2  # the least time between two topology refreshes that errors ask for


class RedisClusterStore(RedisStore):
    """`url`: `redis-cluster://[user:password@]host:port`, any node of the cluster. The
    options are `RedisStore`'s, and `wait_ms`."""

    PUBLISH = "SPUBLISH"

    def __init__(self, url: str, *, wait_ms: int = WAIT_MS, **options: Any) -> None:
        self._wait_ms = wait_ms
        self._writes: dict[str, _Batches] = {}  # per master (node name)
        self._alone: set[str] = set()  # masters that had no replica at their last write
        self._rerouting: asyncio.Task[None] | None = None
        self._reroute_again = False
        self._redirects: list[tuple[MovedError, ClusterNode | None]] = []  # heard by readers
        super().__init__(url, **options)

    def _connect(self, url: str, pool_size: int, pool_timeout: float,
                 options: dict[str, Any]) -> Any:
        if not url.startswith(SCHEME):
            raise ValueError(f"not a {SCHEME} URL")
        client = cast(_GatedCluster, _GatedCluster.from_url(
            "redis://" + url[len(SCHEME):], max_connections=pool_size,
            # One retry, once a refresh of the topology the error asked for is due (a command
            # after a failover would otherwise be sent to the dead master again).
            retry=Retry(ConstantBackoff(REFRESH_SECONDS), 1),
            topology_refresh_min_interval=REFRESH_SECONDS, **options))
        client.gate = asyncio.Semaphore(pool_size)
        client.gate_timeout = pool_timeout
        return client

    def _script(self, text: str) -> AsyncScript:
        # Wake-ups go to the subscribers of the channel's shard only (the channel is in the
        # circle's slot, as a script's keys must be).
        return super()._script(text.replace("'PUBLISH'", "'SPUBLISH'"))

    # ---- writes: batched per master, acknowledged once a replica has them -----------------

    async def _run(self, script: AsyncScript, keys: Sequence[str], args: Sequence[Any]) -> Any:
        return await self._write((script, keys, args))

    async def _save_call(self, call: Call) -> Any:
        return await self._write(call)

    async def _write(self, call: Call) -> Any:
        for _ in range(3):
            node = await self._node_of(call[1][0])
            try:
                return await self._batches_of(node).call(call)
            except MovedError as moved:  # the slot map was behind: patched, and sent again
                await self._moved_slot(moved, node)
        raise StoreUnavailable("write: its slot kept moving")

    async def _node_of(self, key: str) -> ClusterNode:
        await self._redis.initialize()  # runs a topology refresh that an error asked for, once due
        node: ClusterNode | None = self._redis.get_node_from_key(key)
        if node is None:
            raise StoreUnavailable("no master serves the slot")
        return node

    def _batches_of(self, node: ClusterNode) -> _Batches:
        batches = self._writes.get(node.name)
        if batches is None:
            batches = self._writes[node.name] = _Batches(
                functools.partial(self._replicated, node), self._spawn)
        return batches

    async def _replicated(self, node: ClusterNode, calls: list[Call]) -> list[Any]:
        """The calls on `node` and, if a replica is attached to it (ROLE, sent after them),
        WAIT for one: if none confirms in time, every write of the batch is answered
        NotReplicated instead. With no replica attached, no failover can take the writes
        away (nothing could be promoted): they are acknowledged as they are."""
        confirmed: Any = 0
        try:
            *answers, role = await self._evalsha_all("writes", calls, node, then=resp_command("ROLE"))
            replicas = _replicas(role)
            if replicas:
                wait = resp_command("WAIT", 1, self._wait_ms)
                confirmed = (await self._exchange("writes", wait, 1, node))[0]
        except (RedisError, OSError, TimeoutError):
            self._refresh_soon(node)
            raise
        self._note_errors(node, answers)
        if (replicas == 0) is not (node.name in self._alone):
            (self._alone.add if replicas == 0 else self._alone.discard)(node.name)
            log.warning("a master has no replica attached: its writes are acknowledged without waiting for one"
                        if replicas == 0 else
                        "a master has a replica again: its writes are acknowledged once it has them")
        if replicas == 0 or (isinstance(confirmed, int) and confirmed >= 1):
            return answers
        log.warning("no replica confirmed a write within %d ms: not acknowledged", self._wait_ms)
        unkept = NotReplicated(f"no replica confirmed the write within {self._wait_ms} ms")
        return [a if isinstance(a, BaseException) else unkept for a in answers]

    def _new_connection(self, node: ClusterNode) -> Any:
        return node.connection_class(**{**node.connection_kwargs, "socket_timeout": None,
                                        "retry": Retry(NoBackoff(), 0)})

    async def _renew_all(self, calls: list[Call]) -> list[Any]:
        await self._redis.initialize()
        groups: dict[str, tuple[ClusterNode, list[int]]] = {}
        for i, (_, keys, _) in enumerate(calls):
            node = await self._node_of(keys[0])
            groups.setdefault(node.name, (node, []))[1].append(i)
        answers: list[Any] = [None] * len(calls)

        async def on(node: ClusterNode, indexes: list[int]) -> None:
            try:
                got = await self._evalsha_all("renewals", [calls[i] for i in indexes], node)
            except (RedisError, OSError, TimeoutError) as exc:
                self._refresh_soon(node)
                got = [exc] * len(indexes)
            self._note_errors(node, got)
            for i, answer in zip(indexes, got, strict=True):
                if isinstance(answer, MovedError):
                    await self._moved_slot(answer, node)
                answers[i] = answer

        await asyncio.gather(*(on(node, indexes) for node, indexes in groups.values()))
        return answers

    def _note_errors(self, node: ClusterNode, answers: list[Any]) -> None:
        if any(isinstance(a, (ClusterDownError, TryAgainError)) for a in answers):
            self._refresh_soon(node)  # a failover under way: the map will change

    def _refresh_soon(self, node: ClusterNode | None = None) -> None:
        """Have the client refresh its topology before its next command (once due)."""
        self._redis._request_refresh(last_failed_node_name=None if node is None else node.name)

    async def _moved_slot(self, moved: MovedError, node: ClusterNode) -> None:
        if not moved.host:  # a redirect without a host is relative to the node that sent it
            moved.host = node.host
        try:
            await self._redis.nodes_manager.move_slot(moved)
        except (KeyError, IndexError, RedisClusterException):
            self._refresh_soon()

    async def ping(self) -> None:
        try:
            await self._redis.ping(target_nodes=RedisCluster.PRIMARIES)
        except (RedisError, RedisClusterException, OSError, TimeoutError) as exc:
            raise StoreUnavailable(f"ping: {type(exc).__name__}") from None

    # ---- subscriptions: a reader per master, routed by the slot map ------------------------

    def _route_circle(self, circle_id: str) -> None:
        reader = self._reader_for(circle_id)
        if reader is None:  # no slot map yet (nothing sent so far): route it once there is
            self._reroute_soon()
            return
        self._route[circle_id] = reader
        reader.subscribe(circle_id)

    def _reader_for(self, circle_id: str) -> _Reader | None:
        try:
            node: ClusterNode | None = self._redis.get_node_from_key(circle_keys(circle_id).wake)
        except (RedisClusterException, LookupError):
            return None
        if node is None:
            return None
        reader = self._readers.get(node.name)
        if reader is None:
            pool = ConnectionPool(connection_class=node.connection_class,
                                  **{**node.connection_kwargs, "retry": Retry(NoBackoff(), 0)})
            reader = self._readers[node.name] = _Reader(self, Redis.from_pool(pool), sharded=True)
        return reader

    def _moved(self, reader: _Reader, error: MovedError | None = None) -> None:
        if self._closed:
            return
        if error is not None:  # patched into the slot map before routing again
            self._redirects.append((error, self._node_named(reader)))
        else:
            self._refresh_soon()
        self._reroute_soon()

    def _node_named(self, reader: _Reader) -> ClusterNode | None:
        name = next((n for n, r in self._readers.items() if r is reader), None)
        return None if name is None else self._redis.get_node(node_name=name)

    def _reroute_soon(self) -> None:
        if self._rerouting is not None and not self._rerouting.done():
            self._reroute_again = True
            return
        task = self._rerouting = asyncio.get_running_loop().create_task(self._reroute())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reroute(self) -> None:
        """Refresh the slot map (once due) and route every subscribed circle to the reader of
        its slot's master; readers left without circles are closed. While a refresh asked for
        is not due yet, look again once it is: a reader that heard MOVED hears nothing more."""
        again, delay = True, REFRESH_SECONDS
        while again and not self._closed:
            self._reroute_again = False
            redirects, self._redirects = self._redirects, []
            for error, node in redirects:
                if node is not None:
                    await self._moved_slot(error, node)
            try:
                await self._redis.initialize()
            except (RedisError, RedisClusterException, OSError) as exc:
                log.warning("cluster topology not refreshed (%s)", type(exc).__name__)
            for circle_id in list(self._subs):
                old, new = self._route.get(circle_id), self._reader_for(circle_id)
                if new is None or new is old:
                    continue
                self._route[circle_id] = new
                if old is not None:
                    old.unsubscribe(circle_id)
                new.subscribe(circle_id)
            in_use = {id(r) for r in self._route.values()}
            for name, reader in list(self._readers.items()):
                if id(reader) not in in_use:
                    del self._readers[name]
                    self._spawn(reader.close())
            again = self._reroute_again
            if not again and (self._redis._initialize or len(self._route) < len(self._subs)):
                await asyncio.sleep(delay)  # a refresh not due yet, or a slot not covered
                again, delay = True, min(delay * 2, 1.0)

    async def close(self) -> None:
        for batches in self._writes.values():
            batches.closed = True
        await super().close()

    async def _close_clients(self) -> None:
        try:
            await self._redis.aclose()
        except (RedisError, RedisClusterException, OSError):
            pass


def _replicas(role: Any) -> int:
    """How many replicas ROLE says are attached to a master (0 if it is no master now: its
    answers are MOVED, and the calls go again to the one that is)."""
    if isinstance(role, list) and len(role) > 2 and role[0] in (b"master", "master"):
        return len(role[2])
    return 0


async def _turn(client: _GatedCluster) -> None:
    try:
        async with asyncio.timeout(client.gate_timeout):
            await client.gate.acquire()
    except TimeoutError:
        raise RedisConnectionError("no connection free in time") from None


class _GatedCluster(RedisCluster):
    """At most `gate`'s count of commands (and pipelines) at once: a node's pool of
    connections fails at once when it is full, so a burst waits here for a turn instead."""

    gate: asyncio.Semaphore
    gate_timeout: float

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        await _turn(self)
        try:
            return await super().execute_command(*args, **kwargs)
        finally:
            self.gate.release()

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> ClusterPipeline:
        if shard_hint:
            raise RedisClusterException("shard_hint is deprecated in cluster mode")
        return _GatedPipeline(self, transaction)  # type: ignore[abstract]


class _GatedPipeline(ClusterPipeline):
    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> list[Any]:
        client = cast(_GatedCluster, self.cluster_client)
        await _turn(client)
        try:
            return await super().execute(raise_on_error, allow_redirections)
        finally:
            client.gate.release()
