"""Running a load generator or a bench: on uvloop when it is installed (the server runs on
it too), with its garbage collector kept quiet so that its own pauses are not reported as
the server's latency."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def quiet_gc() -> None:
    """Freeze what is alive now out of the collector and make collections rare (the
    settings `lingkar serve` runs with)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)


def run(main: Coroutine[Any, Any, T], *, uvloop: bool = True) -> T:
    """`asyncio.run(main)`, on uvloop unless `uvloop` is False or it is not installed."""
    if uvloop:
        try:
            import uvloop as uv
        except ImportError:
            pass
        else:
            return uv.run(main)
    return asyncio.run(main)
