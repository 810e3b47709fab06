"""A circle lives on one process at a time (DESIGN §8): this process's leases.

`claim` makes this process a circle's home (or names the process that is); one renewal loop
extends every lease held, in one round trip, every `ttl_ms / 3`. A lease is *valid* here only
until `ttl_ms` after the last renewal that Redis confirmed (measured from when it was sent, so
the local view always ends before Redis's): `fence` answers None past that, and the session
refuses commands (`error unavailable`) rather than risk a split brain. The store's save script
is the real guard — it refuses any fenced write whose token is not the current lease's.

When a renewal finds the lease gone, the loop tries to take it again at once: if it is free
(Redis restarted, or a slow renewal let it expire) the circle carries on here with a new
token; if another process took it, `on_lost` closes the circle's sessions here so that their
clients reconnect and are redirected. While Redis cannot be reached the lease is kept and
retried on every round; the sessions stay open (nobody is dropped) but cannot write.

A lease is given up when no session of the circle is left here (`in_use`) for a whole TTL,
and all at once on drain (`release_all`), so another process can take the circles at once.
A deleted circle's lease went with its keys: `deleted` forgets it at once. Nothing is kept
per circle beyond its lease (locks last while used: `storage.locks`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from storage.codec import CorruptState
from storage.locks import KeyedLock
from storage.store import Lease, NoSuchCircle, Owner, Store, StoreError, StoreUnavailable

log = logging.getLogger(__name__)

LEASE_MS = 3000
HANDOVER_SETTLE_SECONDS = 30.0


class Homes:
    """The leases of one process. `owner_id` is unique per process start; `url` is its public
    URL (a redirect sends clients there)."""

    def __init__(self, store: Store, owner_id: str, url: str, *, ttl_ms: int = LEASE_MS,
                 in_use: Callable[[str], bool] = lambda circle_id: False,
                 on_takeover: Callable[[str], Awaitable[None]] | None = None,
                 on_lost: Callable[[str], None] = lambda circle_id: None,
                 on_handover: Callable[[str, str], None] = lambda circle_id, url: None,
                 settle_seconds: float = HANDOVER_SETTLE_SECONDS,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.owner_id = owner_id
        self.url = url
        self.ttl_ms = ttl_ms
        self._in_use = in_use
        self._on_takeover = on_takeover
        self._on_lost = on_lost
        self._on_handover = on_handover
        self.settle_seconds = settle_seconds  # a circle stays this long where it came before it moves on
        self._monotonic = monotonic
        self._leases: dict[str, Lease] = {}
        self._valid_until: dict[str, float] = {}  # monotonic s; 0: unconfirmed (retry)
        self._claimed_at: dict[str, float] = {}
        self._arrived_at: dict[str, float] = {}  # when the lease became ours (a hand-over waits)
        self._locks = KeyedLock()  # claims and releases of one circle in turn
        self._rechecking: set[str] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.closed = False  # stopped: no new claims
        self.peers: dict[str, str] = {}  # the other live processes (owner id -> URL), as last seen

    # ---- claiming ------------------------------------------------------------------------

    async def claim(self, circle_id: str) -> Lease | Owner:
        """Make this process the circle's home, or say which live process is. Raises
        NoSuchCircle, StoreUnavailable (also once stopped)."""
        if self.closed:
            raise StoreUnavailable("this process is shutting down")
        async with self._locks(circle_id):
            return await self._claim(circle_id)

    async def _claim(self, circle_id: str) -> Lease | Owner:
        sent = self._monotonic()
        self._claimed_at[circle_id] = sent
        try:
            got = await self.store.acquire(circle_id, self.owner_id, self.url, self.ttl_ms)
        except NoSuchCircle:
            self._forget(circle_id)
            raise
        if isinstance(got, Owner):
            self._forget(circle_id)
            return got
        if circle_id not in self._leases:
            self._arrived_at[circle_id] = sent
        self._leases[circle_id] = got
        self._valid_until[circle_id] = sent + self.ttl_ms / 1000
        self._start()
        if got.taken_over and self._on_takeover is not None:
            # Still under the circle's lock: no session here joins before this is done.
            try:
                await self._on_takeover(circle_id)
            except (StoreError, CorruptState) as exc:
                log.warning("taking a circle over: %s", type(exc).__name__)
        return got

    def fence(self, circle_id: str) -> int | None:
        """The fencing token while this process is the circle's valid home, else None (and
        a re-check starts, so a lease that can be had again is taken again soon)."""
        lease = self._leases.get(circle_id)
        if lease is not None and self._monotonic() < self._valid_until.get(circle_id, 0.0):
            return lease.token
        self.recheck(circle_id)
        return None

    def holds(self, circle_id: str) -> bool:
        return circle_id in self._leases

    def circles(self) -> list[str]:
        return list(self._leases)

    def recheck(self, circle_id: str) -> None:
        """Find out now whether the lease is still ours (a save was refused as stale, or
        the lease is no longer valid here); see `_reclaim`."""
        if self.closed or circle_id in self._rechecking or not self._in_use(circle_id):
            return
        self._rechecking.add(circle_id)
        self._spawn(self._reclaim(circle_id))

    async def _reclaim(self, circle_id: str) -> None:
        try:
            async with self._locks(circle_id):
                if self.closed:
                    return
                try:
                    got = await self._claim(circle_id)
                except NoSuchCircle:
                    return
                except (StoreError, CorruptState):
                    # Unreachable: keep the (unconfirmed) lease, the next round retries.
                    old = self._leases.get(circle_id)
                    if old is not None:
                        self._valid_until[circle_id] = min(
                            self._valid_until.get(circle_id, 0.0), self._monotonic())
                    return
            if isinstance(got, Owner):
                log.warning("lost a circle's lease to another process; its sessions move")
                self._on_lost(circle_id)
        finally:
            self._rechecking.discard(circle_id)

    def _forget(self, circle_id: str) -> None:
        """Nothing of the circle is kept here any more (its lock goes once unused)."""
        self._leases.pop(circle_id, None)
        self._valid_until.pop(circle_id, None)
        self._claimed_at.pop(circle_id, None)
        self._arrived_at.pop(circle_id, None)

    def deleted(self, circle_id: str) -> None:
        """The circle was deleted, and its lease with it: nothing to renew or release."""
        self._forget(circle_id)

    def keeps(self, circle_id: str) -> bool:
        """Whether anything of the circle is kept here (for leak checks, issue 17)."""
        return (circle_id in self._leases or circle_id in self._valid_until
                or circle_id in self._claimed_at or circle_id in self._arrived_at
                or circle_id in self._locks
                or circle_id in self._rechecking)

    # ---- renewing ------------------------------------------------------------------------

    async def start(self) -> None:
        """Announce this process among the live ones now, and every round from now on (a
        process with no lease is still where a draining one can send circles)."""
        await self._announce()
        self._start()

    async def _announce(self) -> None:
        try:
            alive = await self.store.announce(self.owner_id, self.url, self.ttl_ms)
        except (StoreError, CorruptState) as exc:
            log.warning("not announced: %s", type(exc).__name__)
            return
        self.peers = {owner: url for owner, url in alive.items() if owner != self.owner_id}

    def _start(self) -> None:
        if self._loop_task is None and not self.closed:
            self._loop_task = asyncio.get_running_loop().create_task(self._renew_forever())

    async def _renew_forever(self) -> None:
        # Stops on `closed`, not only on cancellation: on Python 3.11 a cancel that lands
        # as a Redis call completes can be swallowed (asyncio.wait_for inside redis-py
        # returns the result instead), and close() would then wait for this loop forever.
        while not self.closed:
            await asyncio.sleep(self.ttl_ms / 3000)
            if self.closed:
                return
            try:
                await self.renew_once()
            except Exception:  # the loop must outlive any one round
                log.exception("lease renewal failed")

    async def renew_once(self) -> None:
        """One round: announce this process, give up idle leases, extend the rest, re-check
        the lost ones."""
        await self._announce()
        await self._hand_over()
        now = self._monotonic()
        for circle_id in list(self._leases):
            idle = now - self._claimed_at.get(circle_id, now) > self.ttl_ms / 1000
            if idle and not self._in_use(circle_id):
                await self._release(circle_id)
        leases = list(self._leases.values())
        if not leases:
            return
        sent = self._monotonic()
        try:
            held = await self.store.renew(leases, self.ttl_ms)
        except StoreError as exc:
            log.warning("leases not renewed: %s", type(exc).__name__)
            return  # they stay valid here until their time is up, then `fence` says None
        for lease, ok in zip(leases, held, strict=True):
            if self._leases.get(lease.circle_id) is not lease:
                continue  # claimed again or released meanwhile
            if ok:
                self._valid_until[lease.circle_id] = sent + self.ttl_ms / 1000
            else:
                self._valid_until[lease.circle_id] = 0.0
                if self._in_use(lease.circle_id):
                    self.recheck(lease.circle_id)
                else:
                    self._forget(lease.circle_id)

    # ---- giving up -------------------------------------------------------------------------

    async def _release(self, circle_id: str) -> None:
        async with self._locks(circle_id):
            lease = self._leases.get(circle_id)
            if lease is None:
                return
            self._forget(circle_id)
            try:
                await self.store.release(lease)
            except StoreError:
                pass  # it expires on its own within the TTL

    # ---- hand-overs -------------------------------------------------------------------------

    async def ask_handover(self, home_url: str, circle_id: str) -> None:
        """A proxy sends the circle's hellos here while another live process is its home (it
        came back after a restart, or the circle moved during one): ask that process to hand
        the circle over, so that later hellos are not redirected. Best effort."""
        try:
            await self.store.ask_handover(home_url, circle_id, self.url)
        except StoreError:
            pass

    async def _hand_over(self) -> None:
        """Hand over the circles other processes asked for: given up here, then their members
        sent there (`on_handover`), unless the asker is not alive or the circle came here less
        than `settle_seconds` ago (no circle bounces between processes)."""
        try:
            asked = await self.store.handovers(self.url)
        except (StoreError, CorruptState):
            return
        alive = set(self.peers.values())
        now = self._monotonic()
        for circle_id, to_url in asked.items():
            arrived = self._arrived_at.get(circle_id)
            if (circle_id not in self._leases or to_url not in alive or arrived is None
                    or now - arrived < self.settle_seconds):
                continue
            await self._release(circle_id)
            log.info("a circle handed over to the process its hellos reach")
            self._on_handover(circle_id, to_url)

    async def release(self, circle_id: str) -> None:
        """Give the circle's lease up now (a drain sends its members to another process)."""
        await self._release(circle_id)

    async def release_all(self) -> None:
        """Drain: every lease given up now, so another process can take these circles at
        once (their sessions were closed with 1001 first, and the endpoint refuses new ones)."""
        await asyncio.gather(*(self._release(c) for c in list(self._leases)),
                             return_exceptions=True)

    async def close(self) -> None:
        if not self.closed:
            try:
                await self.store.withdraw(self.owner_id)
            except StoreError:
                pass  # it drops out of the live ones within a TTL
        self.closed = True
        tasks = [*self._tasks, *([self._loop_task] if self._loop_task else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
