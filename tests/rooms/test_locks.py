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
