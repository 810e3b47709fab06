"""The relay bench side by side with Janus in one run (`python -m server.media.bench --janus DIR`).

For each size, K rounds, each Lingkar's relay (`bench.measure`) then Janus 1.1.2's VideoRoom
tuned (``--event-loops 2 --no-decode``) driven by the anchor's own harness (DIR, a copy of
``../shared/anchors/janus``; it is copied again to a scratch directory, as it writes next to
itself) as a subprocess, with the same window length and listener count. Its JSON line is
parsed; the table per round gives both µs of CPU per forwarded packet (the whole process's
user+sys over the window ÷ packets), the relay-added latency p50/p99 (both from kernel receive
timestamps minus a direct aiortc pair, percentile by percentile) and the ratio Lingkar/Janus.

The anchor needs aiohttp, numpy and psutil besides aiortc; when this interpreter lacks them,
a venv of its own is made under /tmp (they are not Lingkar's dependencies).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from typing import Any

ANCHOR_VENV = "/tmp/lingkar-janus-venv"
ANCHOR_NEEDS = ("aiortc", "aiohttp", "numpy", "psutil")


def _has_modules(python: str) -> bool:
    probe = "import " + ", ".join(ANCHOR_NEEDS)
    return subprocess.run([python, "-c", probe], capture_output=True).returncode == 0


def anchor_python(explicit: str | None = None) -> str:
    """An interpreter that can run the anchor: `explicit`, this one, or a venv under /tmp
    (made here on first use with pip)."""
    if explicit:
        return explicit
    if _has_modules(sys.executable):
        return sys.executable
    python = os.path.join(ANCHOR_VENV, "bin", "python")
    if not (os.path.exists(python) and _has_modules(python)):
        print(f"making {ANCHOR_VENV} for the Janus anchor ({', '.join(ANCHOR_NEEDS)})", flush=True)
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", ANCHOR_VENV], check=True)
        subprocess.run([python, "-m", "pip", "install", "-q", *ANCHOR_NEEDS], check=True)
    return python


def append_jsonl(path: str, *rows: dict[str, Any]) -> None:
    """Append `rows` to `path`, one JSON object a line."""
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def scratch_copy(anchor: str) -> str:
    """A copy of the anchor's folder in a fresh scratch directory (it writes beside itself)."""
    if not os.path.exists(os.path.join(anchor, "bench.py")):
        raise SystemExit(f"--janus {anchor}: no bench.py there (a copy of ../shared/anchors/janus)")
    scratch = tempfile.mkdtemp(prefix="lingkar-janus-")
    dest = os.path.join(scratch, "janus")
    shutil.copytree(anchor, dest)
    return dest


async def run_janus(
    python: str, folder: str, listeners: int, seconds: float, tag: str, port: int
) -> dict[str, Any]:
    """One anchor run at `listeners`, Janus tuned; its result line plus `relay_added_ms_p99`."""
    out = os.path.join(folder, f"result-{tag}.jsonl")
    proc = await asyncio.create_subprocess_exec(
        python,
        "bench.py",
        "--n",
        str(listeners),
        "--no-decode",
        "--event-loops",
        "2",
        "--window",
        str(seconds),
        "--port",
        str(port),
        "--workdir",
        "work",
        "--out",
        out,
        cwd=folder,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    assert proc.stdout is not None
    result: dict[str, Any] | None = None
    try:
        while line := await proc.stdout.readline():
            text = line.decode(errors="replace").rstrip()
            if text.startswith("{"):
                result = json.loads(text)
            elif text.startswith("[N="):
                print(f"       janus: {text}", flush=True)
        await proc.wait()
    except BaseException:
        if proc.returncode is None:
            proc.terminate()  # the anchor stops its Janus (by its PID) on the way out
            await proc.wait()
        raise
    if result is None:
        raise RuntimeError(f"the Janus anchor gave no result (exit {proc.returncode}); see {folder}/work")
    sock, base = result["lat_janus_sock_ms"], result["lat_base_sock_ms"]
    result["relay_added_ms_p99"] = round(sock[2] - base[2], 3)
    return result


HEADER = (
    f"{'round':>5} {'L µs/pkt':>8} {'marg.':>6} {'idle':>6} {'idle/100':>8} {'L +p50':>7} {'L +p99':>7}"
    f" {'J µs/pkt':>8} {'J +p50':>7} {'J +p99':>7} {'L/J µs':>7} {'L/J p99':>7}"
    f" {'L loss':>6} {'J loss':>6} {'L cli':>5} {'J cli':>5}"
)


def _row(k: int, lk: dict[str, Any], jn: dict[str, Any]) -> str:
    ratio = lk["cpu_us_per_packet"] / jn["us_cpu_per_fwd_pkt"]
    p99 = lk["added_p99_ms"] / jn["relay_added_ms_p99"] if jn["relay_added_ms_p99"] > 0 else float("nan")
    return (
        f"{k:>5} {lk['cpu_us_per_packet']:>8.1f} {lk['marginal_us_per_packet']:>6.1f} {lk['idle_share']:>6.1%}"
        f" {lk['quiet_share_per_100']:>8.2%} {lk['added_p50_ms']:>7.2f} {lk['added_p99_ms']:>7.2f}"
        f" {jn['us_cpu_per_fwd_pkt']:>8.1f} {jn['relay_added_ms_p50']:>7.2f} {jn['relay_added_ms_p99']:>7.2f}"
        f" {ratio:>7.2f} {p99:>7.2f}"
        f" {lk['loss_pct']:>5.1f}% {jn['loss_mean_pct']:>5.1f}%"
        f" {lk['client_share']:>5.0%} {jn['client_cpu_pct_of_core'] / 100:>5.0%}"
    )


def summary(size: int, pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> str:
    """Every round's range at one size and the ratio of the means (Lingkar/Janus)."""

    def span(values: list[float], fmt: str) -> str:
        return f"{min(values):{fmt}}–{max(values):{fmt}}"

    lk_us = [lk["cpu_us_per_packet"] for lk, _ in pairs]
    jn_us = [jn["us_cpu_per_fwd_pkt"] for _, jn in pairs]
    return (
        f"{size} listeners, {len(pairs)} rounds: Lingkar {span(lk_us, '.1f')} µs/pkt (marginal "
        f"{span([lk['marginal_us_per_packet'] for lk, _ in pairs], '.1f')}), Janus {span(jn_us, '.1f')}, "
        f"ratio of means {sum(lk_us) / sum(jn_us):.2f}; relay-added p99 Lingkar "
        f"{span([lk['added_p99_ms'] for lk, _ in pairs], '.2f')} ms, Janus "
        f"{span([jn['relay_added_ms_p99'] for _, jn in pairs], '.2f')} ms; Lingkar idle cost per 100 "
        f"listeners {span([lk['quiet_share_per_100'] for lk, _ in pairs], '.2%')} of a core"
    )


async def side_by_side(
    measure: Callable[[int], Awaitable[dict[str, Any]]],
    print_row: Callable[[dict[str, Any]], None],
    *,
    anchor: str,
    sizes: list[int],
    rounds: int,
    seconds: float,
    out: str | None,
    python: str | None = None,
    port: int = 8188,
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Interleaved rounds, Lingkar then Janus, per size; a table per size as it goes."""
    interpreter = anchor_python(python)
    folder = scratch_copy(anchor)
    print(f"Janus anchor: {folder} (python {interpreter})", flush=True)
    pairs: list[tuple[dict[str, Any], dict[str, Any]]] = []
    for size in sizes:
        lines = []
        for k in range(1, rounds + 1):
            print(f"-- {size} listeners, round {k}/{rounds}: Lingkar", flush=True)
            lk = await measure(size)
            print_row(lk)
            print(f"-- {size} listeners, round {k}/{rounds}: Janus tuned (event_loops 2)", flush=True)
            jn = await run_janus(interpreter, folder, size, seconds, f"N{size}-r{k}", port)
            print(
                f"       Janus: {jn['us_cpu_per_fwd_pkt']:.1f} µs/pkt, {jn['janus_cpu_pct_of_core']}% of a core, "
                f"relay-added p50 {jn['relay_added_ms_p50']:.2f} ms, p99 {jn['relay_added_ms_p99']:.2f} ms, "
                f"loss {jn['loss_mean_pct']} %",
                flush=True,
            )
            pairs.append((lk, jn))
            lines.append(_row(k, lk, jn))
            print(
                f"\n{size} listeners, {seconds:.0f} s windows\n{HEADER}\n" + "\n".join(lines) + "\n",
                flush=True,
            )
            if out:
                append_jsonl(
                    out, {"bench": "lingkar", "round": k, **lk}, {"bench": "janus", "round": k, **jn}
                )
    for size in sizes:
        print(summary(size, [(lk, jn) for lk, jn in pairs if lk["listeners"] == size]))
    print(
        "L: Lingkar, J: Janus tuned. µs/pkt: the relay process's user+sys ÷ forwarded packets; marg.: "
        "Lingkar's minus its idle (gated) CPU; idle/100: Lingkar's quiet share per 100 listeners; "
        "+p50/+p99: relay-added latency (ms), kernel receive timestamps − a direct pair's; loss: at the "
        "listeners; cli: the listeners' process's CPU (near 100 %: the client, not the relay, is the limit)."
    )
    return pairs
