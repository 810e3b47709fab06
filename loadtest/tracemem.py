"""`lingkar serve` under tracemalloc, for finding what outlives a circle (`loadtest.soak
--tracemalloc DIR`): `python -m loadtest.tracemem serve` runs `python -m server.cli serve`
with tracemalloc on in the same process (loaded by module name with `runpy`: the load test
imports no server code), and every SIGUSR1 writes `LINGKAR_TRACEMALLOC_DIR/growth-<n>.txt`
(renamed into place when complete, so the reader never sees half a report) with

- the cyclic garbage a full collection finds, by type: what the server's rare full
  collections (`server.gctune`) leave lying around until then, and what RSS that costs;
- then, with tracing on, the growth of what is still reachable after that collection since
  the previous signal, by traceback (the first signal only takes the base snapshot).

`LINGKAR_TRACEMALLOC_FRAMES` (default 16) frames per traceback; 0: no tracing, the census of
garbage only (cheap enough for full-size rounds).

A diagnostic, never for production: tracing costs CPU and memory on every allocation, and
the snapshot holds the event loop for a second or more.

    LINGKAR_TRACEMALLOC_DIR=/tmp/tm python -m loadtest.tracemem serve
    kill -USR1 <pid>   # after each round
"""

from __future__ import annotations

import gc
import linecache
import os
import runpy
import signal
import sys
import time
import tracemalloc
from collections import Counter
from pathlib import Path
from types import FrameType

from testkit.procs import rss_bytes

FRAMES = int(os.environ.get("LINGKAR_TRACEMALLOC_FRAMES", "16"))
TOP = int(os.environ.get("LINGKAR_TRACEMALLOC_TOP", "25"))
CYCLES = os.environ.get("LINGKAR_TRACEMALLOC_CYCLES", "1") != "0"  # name the cycles too
_IGNORED = [
    tracemalloc.Filter(False, tracemalloc.__file__),
    tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
    tracemalloc.Filter(False, "<frozen importlib._bootstrap_external>"),
    tracemalloc.Filter(False, "<unknown>"),
    tracemalloc.Filter(False, linecache.__file__),  # this report's own source lines
]


class _Tracer:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.previous: tracemalloc.Snapshot | None = None
        self.count = 0

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        lines = [_garbage_census()]
        if tracemalloc.is_tracing():
            lines.append(self._growth())
        self._write("\n".join(lines))

    def _growth(self) -> str:
        snapshot = tracemalloc.take_snapshot().filter_traces(_IGNORED)
        previous, self.previous = self.previous, snapshot
        if previous is None:
            return f"base snapshot: {_total(snapshot)} B traced\n"
        stats = snapshot.compare_to(previous, "traceback")
        grown = sum(s.size_diff for s in stats)
        lines = [f"traced {_total(snapshot)} B, {grown:+d} B since the last snapshot; "
                 f"top {TOP} by growth:\n"]
        for stat in stats[:TOP]:
            lines.append(f"\n{stat.size_diff:+d} B ({stat.count_diff:+d} blocks), "
                         f"now {stat.size} B in {stat.count} blocks\n")
            lines.extend(f"    {line}\n" for line in stat.traceback.format(most_recent_first=True))
        return "".join(lines)

    def _write(self, text: str) -> None:
        self.count += 1
        final = self.out / f"growth-{self.count}.txt"
        partial = final.with_suffix(".part")
        partial.write_text(text)
        partial.rename(final)


def _garbage_census() -> str:
    """Collect every generation, keeping what was found in `gc.garbage` to count it by
    type, then free it; the RSS before and after."""
    before = rss_bytes()
    counts = gc.get_count()
    gc.set_debug(gc.DEBUG_SAVEALL)
    started = time.perf_counter()
    try:
        found = gc.collect()
    finally:
        took = time.perf_counter() - started
        gc.set_debug(0)
    by_type = Counter(_name(o) for o in gc.garbage)
    size = sum(sys.getsizeof(o) for o in gc.garbage)
    cycles = _cycles(gc.garbage) if CYCLES else []
    gc.garbage.clear()
    gc.collect()
    lines = [f"gc: {found} unreachable objects in cycles ({size} B shallow) awaited a full "
             f"collection (counts before {counts}; it took {took * 1000:.1f} ms with "
             f"{len(gc.get_objects())} objects tracked); RSS {before} B -> {rss_bytes()} B after "
             f"freeing them\n"]
    lines.extend(f"    {n:7d} {name}\n" for name, n in by_type.most_common(TOP))
    if cycles:
        lines.append("the cycles themselves (strongly connected parts of that garbage), by the "
                     "types in them:\n")
        lines.extend(f"    {n:7d} x {signature}\n" for signature, n in cycles)
    return "".join(lines)


def _name(o: object) -> str:
    return f"{type(o).__module__}.{type(o).__qualname__}"


def _cycles(objects: list[object]) -> list[tuple[str, int]]:
    """The strongly connected components (Tarjan, iterative) of the garbage with more than
    one object, or one that refers to itself, counted by the sorted types of their members."""
    index_of = {id(o): i for i, o in enumerate(objects)}
    edges = [[index_of[id(r)] for r in gc.get_referents(o) if id(r) in index_of] for o in objects]
    order = [-1] * len(objects)
    low = [0] * len(objects)
    on_stack = [False] * len(objects)
    stack: list[int] = []
    found: Counter[str] = Counter()
    counter = 0
    for root in range(len(objects)):
        if order[root] >= 0:
            continue
        work = [(root, 0)]
        while work:
            v, i = work.pop()
            if i == 0:
                order[v] = low[v] = counter
                counter += 1
                stack.append(v)
                on_stack[v] = True
            if i < len(edges[v]):
                work.append((v, i + 1))
                w = edges[v][i]
                if order[w] < 0:
                    work.append((w, 0))
                elif on_stack[w]:
                    low[v] = min(low[v], order[w])
                continue
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[v])
            if low[v] == order[v]:
                members = []
                while True:
                    w = stack.pop()
                    on_stack[w] = False
                    members.append(w)
                    if w == v:
                        break
                if len(members) > 1 or v in edges[v]:
                    kinds = Counter(_name(objects[m]) for m in members)
                    found[", ".join(f"{n} {k}" if n > 1 else k for k, n in sorted(kinds.items()))] += 1
    return found.most_common(TOP)


def _total(snapshot: tracemalloc.Snapshot) -> int:
    return sum(stat.size for stat in snapshot.statistics("filename"))


def main() -> int:
    out = Path(os.environ.get("LINGKAR_TRACEMALLOC_DIR", "."))
    out.mkdir(parents=True, exist_ok=True)
    if FRAMES > 0:
        tracemalloc.start(FRAMES)
    signal.signal(signal.SIGUSR1, _Tracer(out).on_signal)
    # As `python -m server.cli serve` (its `__main__` reads sys.argv and exits with the code).
    runpy.run_module("server.cli", run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
