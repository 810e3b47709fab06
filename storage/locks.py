"""One asyncio lock per circle that lasts only while it is used.

A dict of locks filled with `setdefault` keeps one lock for every circle ever touched, ended
ones included, and one for every id a client made up (issue 17). Popping a lock while others
wait on it is no better: the next caller gets a new lock and runs beside the waiters. Here
each lock counts who holds it or waits for it and goes when the count drops to zero.

    locks = KeyedLock()
    async with locks(circle_id):
        ...

or, without a coroutine when the key is free (the common case), `gate = locks.take(circle_id)`
and `gate.give_back()`, falling back to `async with` when `take` answers None.
"""

from __future__ import annotations

import asyncio
from collections import deque
from types import TracebackType


class KeyedLock:
    __slots__ = ("_gates",)

    def __init__(self) -> None:
        self._gates: dict[str, _Gate] = {}

    def __call__(self, key: str) -> _Gate:
        """The lock of `key`, to be used at once with `async with` (it is counted from
        `__aenter__` on: one fetched and never entered stays until the key is next used)."""
        gate = self._gates.get(key)
        if gate is None:
            gate = self._gates[key] = _Gate(self, key)
        return gate

    def take(self, key: str) -> _Gate | None:
        """The lock of `key`, held at once if nobody holds it or waits for it (no await): give
        it back with `give_back()`. None: it is busy, wait for it with `async with`."""
        gate = self._gates.get(key)
        if gate is None:
            gate = self._gates[key] = _Gate(self, key)
        elif gate._held or gate._waiters:
            return None
        gate._users += 1
        gate._held = True
        return gate

    def __contains__(self, key: object) -> bool:
        return key in self._gates

    def __len__(self) -> int:
        return len(self._gates)

    def _drop(self, gate: _Gate) -> None:
        if self._gates.get(gate.key) is gate:
            del self._gates[gate.key]


class _Gate:
    """A lock handed over in order (like asyncio.Lock, first come first served) that counts
    who holds it or waits for it."""

    __slots__ = ("_owner", "key", "_held", "_waiters", "_users")

    def __init__(self, owner: KeyedLock, key: str) -> None:
        self._owner = owner
        self.key = key
        self._held = False
        self._waiters: deque[asyncio.Future[None]] | None = None  # their turn comes in order
        self._users = 0  # holding it or waiting for it

    def locked(self) -> bool:
        return self._held

    async def __aenter__(self) -> None:
        self._users += 1
        if not self._held and not self._waiters:
            self._held = True
            return
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = deque()
        self._waiters.append(turn)
        try:
            await turn  # handed over: `_held` stayed true for this holder
        except BaseException:  # cancelled while waiting (or just as its turn came)
            if turn in self._waiters:
                self._waiters.remove(turn)
            if turn.done() and not turn.cancelled():
                self._hand_over()  # it was this one's turn: the next one's now
            self._leave()
            raise

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.give_back()

    def give_back(self) -> None:
        """Release a lock held (taken with `take`, or entered)."""
        self._hand_over()
        self._leave()

    def _hand_over(self) -> None:
        waiters = self._waiters
        while waiters:
            turn = waiters.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self._held = False

    def _leave(self) -> None:
        self._users -= 1
        if self._users == 0:
            self._owner._drop(self)
