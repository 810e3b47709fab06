"""`python -m loadtest.anchor`: one interleaved round at 2 circles × 8, Lingkar's side for
real and a stand-in for the anchor's directory (an ASGI app that only says it is ready, and a
client that reads its CPU window and reports fixed numbers). Timings are reported, never
asserted (§9): what must hold is that both sides run and are read the same way."""

from __future__ import annotations

import json
from pathlib import Path

from loadtest.anchor import main

APP = '''
print("app ready", flush=True)


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
'''

COMMON = '''
import os

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class CpuWindow:
    def __init__(self, pid):
        self.pid = pid

    def start(self):
        self.c0 = cpu_seconds(self.pid)

    def stop(self):
        return cpu_seconds(self.pid) - self.c0
'''

CLIENT = '''
import argparse
import json

from common import CpuWindow

parser = argparse.ArgumentParser()
parser.add_argument("--server-pid", type=int)
args, _ = parser.parse_known_args()
window = CpuWindow(args.server_pid)
window.start()
window.stop()
print("JSON", json.dumps({"received": 160, "deliveries_per_s": 160.0, "p99_us": 900.0, "loss": 0,
                          "cpu_server_pct": 1.0, "cpu_client_pct": 2.0}), flush=True)
'''


def test_one_round_side_by_side(tmp_path: Path) -> None:
    anchor = tmp_path / "anchor"
    anchor.mkdir()
    (anchor / "app.py").write_text(APP)
    (anchor / "common.py").write_text(COMMON)
    (anchor / "fanout_client.py").write_text(CLIENT)
    out = tmp_path / "rounds.jsonl"
    assert main(["--anchor", str(anchor), "--sizes", "2", "--rounds", "1", "--seconds", "1",
                 "--out", str(out), "--gate-wait", "0"]) == 0
    lingkar, stand_in = (json.loads(line) for line in out.read_text().splitlines())
    assert (lingkar["who"], stand_in["who"]) == ("lingkar", "anchor")
    assert lingkar["rooms"] == stand_in["rooms"] == 2 and lingkar["round"] == stand_in["round"] == 1
    assert lingkar["deliveries"] > 0 and lingkar["missing"] == 0
    assert stand_in["deliveries"] == 160 and stand_in["p99_ms"] == 0.9
    for side in (lingkar, stand_in):
        for key in ("per_cpu_second", "user_us", "system_us", "generator_sleeps_per_command",
                    "server_sleeps_per_command", "ratio"):
            assert side[key] >= 0, key
