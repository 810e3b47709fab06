"""server/media/ticker.py: many periodic jobs on one timer."""

from __future__ import annotations

import asyncio

from server.media.ticker import SLICE, Ticker


async def test_jobs_due_together_run_on_one_wakeup_and_a_failing_one_stops_no_other() -> None:
    loop = asyncio.get_running_loop()
    ticker = Ticker(lambda: 0.01)
    ran: list[int] = []
    done = loop.create_future()

    def job(i: int) -> None:
        ran.append(i)
        if i == 3:
            raise RuntimeError("boom")
        if len(ran) == 50 and not done.done():
            done.set_result(None)

    start = loop.time()
    for i in range(50):
        ticker.at(start, lambda i=i: job(i))
    await done
    assert sorted(ran) == list(range(50))
    assert ticker.wakeups == 1 and len(ticker) == 0


async def test_a_job_is_never_run_before_its_time_and_may_reschedule_itself() -> None:
    loop = asyncio.get_running_loop()
    ticker = Ticker(lambda: 0.005)
    runs: list[tuple[float, float]] = []  # (due, ran at)
    done = loop.create_future()

    def again() -> None:
        due = runs_due[-1]
        runs.append((due, loop.time()))
        if len(runs) == 5:
            done.set_result(None)
            return
        runs_due.append(loop.time() + 0.01)
        ticker.at(runs_due[-1], again)

    runs_due = [loop.time() + 0.01]
    ticker.at(runs_due[0], again)
    other_due = loop.time() + 0.02
    ticker.at(other_due, lambda: runs.append((other_due, loop.time())))
    await done
    assert all(ran >= due for due, ran in runs)
    assert len(runs) >= 5


async def test_cancelled_jobs_do_not_run_and_an_empty_ticker_keeps_no_timer() -> None:
    loop = asyncio.get_running_loop()
    ticker = Ticker(lambda: 0.001)
    ran: list[str] = []

    def cancelled() -> None:
        ran.append("cancelled")

    ticker.at(loop.time(), cancelled)
    ticker.cancel(cancelled)
    assert len(ticker) == 0 and ticker._handle is None
    witness = loop.create_future()
    ticker.at(loop.time(), lambda: witness.set_result(None))
    await witness
    assert ran == []


async def test_jobs_due_together_run_a_slice_per_turn_of_the_loop_so_datagrams_are_read_between() -> None:
    """Twenty jobs due at once do not hold the loop for all twenty: a callback scheduled
    meanwhile (as a datagram's would be) runs after the first slice."""
    loop = asyncio.get_running_loop()
    ticker = Ticker(lambda: 0.001)
    order: list[str] = []
    done = loop.create_future()

    def job(i: int) -> None:
        order.append(f"job{i}")
        if i == 0:
            loop.call_soon(order.append, "datagram")
        if len(order) == 21:
            done.set_result(None)

    start = loop.time()
    for i in range(20):
        ticker.at(start, lambda i=i: job(i))
    await done
    assert order.index("datagram") == SLICE  # right after the first slice
    assert sorted(o for o in order if o != "datagram") == sorted(f"job{i}" for i in range(20))
    assert ticker.wakeups == 1 and len(ticker) == 0
