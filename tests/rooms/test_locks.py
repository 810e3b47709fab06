"""`storage.locks.KeyedLock`: one writer per key at a time, and no lock kept for a key once
nobody holds it or waits for it (issue 17)."""

from __future__ import annotations

import asyncio

from storage.locks import KeyedLock


async def test_holders_of_one_key_take_turns_and_the_lock_goes_with_the_last() -> None:
    locks = KeyedLock()
    order: list[str] = []
    first_in = asyncio.Event()
    release_first = asyncio.Event()

    async def first() -> None:
        async with locks("c1"):
            order.append("first in")
            first_in.set()
            await release_first.wait()
            order.append("first out")

    async def second() -> None:
        async with locks("c1"):
            order.append("second in")

    a = asyncio.create_task(first())
    await first_in.wait()
    b = asyncio.create_task(second())
    waiting = asyncio.Event()
    asyncio.get_running_loop().call_soon(waiting.set)
    await waiting.wait()  # the second is queued behind the first now
    assert "c1" in locks and len(locks) == 1
    release_first.set()
    await asyncio.gather(a, b)
    # The first's release did not drop the lock the second waited on: it came in after.
    assert order == ["first in", "first out", "second in"]
    assert "c1" not in locks and len(locks) == 0


async def test_other_keys_do_not_wait() -> None:
    locks = KeyedLock()
    async with locks("c1"):
        async with locks("c2"):
            assert len(locks) == 2
    assert len(locks) == 0


async def test_a_waiter_cancelled_before_its_turn_leaves_nothing_behind() -> None:
    locks = KeyedLock()
    held = asyncio.Event()
    release = asyncio.Event()

    async def holder() -> None:
        async with locks("c1"):
            held.set()
            await release.wait()

    async def waiter() -> None:
        async with locks("c1"):
            raise AssertionError("never gets the lock")

    h = asyncio.create_task(holder())
    await held.wait()
    w = asyncio.create_task(waiter())
    queued = asyncio.Event()
    asyncio.get_running_loop().call_soon(queued.set)
    await queued.wait()
    w.cancel()
    await asyncio.gather(w, return_exceptions=True)
    assert "c1" in locks  # still held
    release.set()
    await h
    assert "c1" not in locks


async def test_an_error_inside_releases_and_forgets() -> None:
    locks = KeyedLock()
    try:
        async with locks("c1"):
            raise ValueError("refused")
    except ValueError:
        pass
    assert len(locks) == 0
    async with locks("c1"):  # and it can be taken again
        pass


async def test_take_holds_a_free_key_at_once_and_answers_none_while_it_is_busy() -> None:
    locks = KeyedLock()
    gate = locks.take("c1")
    assert gate is not None and gate.locked() and "c1" in locks
    assert locks.take("c1") is None  # held: wait with `async with`
    entered = asyncio.Event()

    async def waiter() -> None:
        async with locks("c1"):
            entered.set()

    w = asyncio.create_task(waiter())
    queued = asyncio.Event()
    asyncio.get_running_loop().call_soon(queued.set)
    await queued.wait()
    assert not entered.is_set()
    gate.give_back()  # handed to the waiter, in order
    await w
    assert entered.is_set() and "c1" not in locks and len(locks) == 0


async def test_a_waiter_cancelled_just_as_its_turn_came_hands_the_lock_on() -> None:
    locks = KeyedLock()
    gate = locks.take("c1")
    assert gate is not None
    order: list[str] = []

    async def waiter(name: str) -> None:
        async with locks("c1"):
            order.append(name)

    first, second = asyncio.create_task(waiter("first")), asyncio.create_task(waiter("second"))
    queued = asyncio.Event()
    asyncio.get_running_loop().call_soon(queued.set)
    await queued.wait()
    gate.give_back()  # the first's turn: set, but it has not run yet
    first.cancel()
    await asyncio.gather(first, second, return_exceptions=True)
    assert order == ["second"] and len(locks) == 0
