"""One asyncio lock per circle that lasts only while it is used.

A dict of locks filled with `setdefault` keeps one lock for every circle ever touched, ended
ones included, and one for every id a client made up (issue 17). Popping a lock while others
wait on it is no better: the next caller gets a new lock and runs beside the waiters. Here
each lock counts who holds it or waits for it and goes when the count drops to zero.

    locks = KeyedLock()
    async with locks(circle_id):
        ...
"""

from __future__ import annotations

import asyncio
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

    def __contains__(self, key: object) -> bool:
        return key in self._gates

    def __len__(self) -> int:
        return len(self._gates)

    def _drop(self, gate: _Gate) -> None:
        if self._gates.get(gate.key) is gate:
            del self._gates[gate.key]


class _Gate:
    __slots__ = ("_owner", "key", "_lock", "_users")

    def __init__(self, owner: KeyedLock, key: str) -> None:
        self._owner = owner
        self.key = key
        self._lock = asyncio.Lock()
        self._users = 0  # holding it or waiting for it

    def locked(self) -> bool:
        return self._lock.locked()

    async def __aenter__(self) -> None:
        self._users += 1
        try:
            await self._lock.acquire()
        except BaseException:  # cancelled while waiting
            self._leave()
            raise

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self._lock.release()
        self._leave()

    def _leave(self) -> None:
        self._users -= 1
        if self._users == 0:
            self._owner._drop(self)
