"""`python -m tests.fuzz [--frames N] [--seconds S] [--seed K] [--role member|moderator]`:
fuzz in process (see tests/fuzz/engine.py) and print the rate and a summary; exit 1 on the
first broken promise, with the frame that broke it (kept as a regression test by hand)."""

from __future__ import annotations

from server import compiled

# First, as `lingkar serve` and the test suite do: the rules and the manager it fuzzes are the
# compiled ones where `make setup` built them (LINGKAR_COMPILED=off: the sources as Python).
SIGNALING_PATH = compiled.activate()

import argparse  # noqa: E402
import sys  # noqa: E402

import uvloop  # noqa: E402

from rooms.model import Role  # noqa: E402
from tests.fuzz.engine import Broken, Engine  # noqa: E402
from tests.fuzz.wire import run_wire  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m tests.fuzz")
    p.add_argument("--frames", type=int, default=1_000_000)
    p.add_argument("--seconds", type=float, default=600.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--role", choices=["member", "moderator"], default="member")
    p.add_argument("--socket", type=int, default=0, metavar="N",
                   help="then N frames over real sockets to uvicorn (tests/fuzz/wire.py)")
    args = p.parse_args()
    print(f"signaling path: {SIGNALING_PATH}", flush=True)
    if args.socket:
        try:
            wire = uvloop.run(run_wire(frames=args.socket, seconds=args.seconds, seed=args.seed))
        except Broken as broken:
            print(f"broken over a socket (seed {args.seed}): {broken}", file=sys.stderr)
            return 1
        print(wire.summary())
    if not args.frames:
        return 0
    engine = Engine(args.seed, fuzzer_role=Role(args.role))
    try:
        report = uvloop.run(engine.run(frames=args.frames, seconds=args.seconds))
    except Broken as broken:
        print(f"broken after {engine.report.frames} frames (seed {args.seed}): {broken}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
