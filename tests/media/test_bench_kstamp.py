"""Smoke test of the media bench's latency from kernel receive timestamps and of its side-by-side
mode, at 3 listeners with a stand-in for the Janus anchor (Janus is not needed). Timings are
printed by the bench, never asserted here."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

FAKE_ANCHOR = textwrap.dedent(
    """
    import argparse, json
    ap = argparse.ArgumentParser()
    for a in ("--n", "--event-loops", "--window", "--port", "--workdir", "--out"):
        ap.add_argument(a)
    ap.add_argument("--no-decode", action="store_true")
    args = ap.parse_args()
    assert args.no_decode and args.event_loops == "2", args
    print(f"[N={args.n}] fake anchor", flush=True)
    print(json.dumps({"N": int(args.n), "window_s": float(args.window), "us_cpu_per_fwd_pkt": 40.0,
                      "janus_cpu_pct_of_core": 1.0, "loss_mean_pct": 0.0, "relay_added_ms_p50": 0.5,
                      "client_cpu_pct_of_core": 20.0,
                      "lat_janus_sock_ms": [1.0, 2.0, 3.0], "lat_base_sock_ms": [0.5, 0.6, 0.7]}))
    """
)


def test_bench_kernel_latency_and_side_by_side(tmp_path: Path) -> None:
    anchor = tmp_path / "anchor"
    anchor.mkdir()
    (anchor / "bench.py").write_text(FAKE_ANCHOR)
    out = tmp_path / "runs.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "server.media.bench", "--sizes", "3", "--seconds", "2",
         "--quiet-seconds", "0", "--janus", str(anchor), "--rounds", "1",
         "--janus-python", sys.executable, "--out", str(out)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["bench"] for r in rows] == ["lingkar", "janus"]
    lingkar, janus = rows
    assert lingkar["listeners"] == 3 and lingkar["forwarded"] > 0
    assert lingkar["lean_listeners"] is True  # side by side: the anchor's client, no RTP statistics
    assert lingkar["udp_rcvbuf_drops"] >= 0 and 0 <= lingkar["client_share"]
    # every listener's packets got a kernel timestamp and a send time, as did the direct pair's
    assert lingkar["kernel_samples"] > 0 and lingkar["direct_samples"] > 0
    assert all(math.isfinite(v) for v in (*lingkar["path_ms"], *lingkar["direct_ms"]))
    assert lingkar["added_p99_ms"] == lingkar["path_ms"][2] - lingkar["direct_ms"][2]
    assert janus["relay_added_ms_p99"] == 2.3
    assert "L/J µs" in done.stdout and "idle cost per 100 listeners" in done.stdout
