"""`python -m loadtest.anchor`: one interleaved round at 2 circles × 8, Lingkar's side for
real and a stand-in for the anchor's directory (an ASGI app that relays the anchor's `cmd`
frames as `ev` to its room, and a client that reads its CPU window and reports fixed numbers),
driven by that client and by Lingkar's generator. Timings are reported, never asserted (§9):
what must hold is that every side runs and is read the same way."""

from __future__ import annotations

import json
from pathlib import Path

from loadtest.anchor import main

APP = '''
import msgpack

print("app ready", flush=True)
ROOMS = {}


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    elif scope["type"] == "websocket":  # /room/{room}?m=…: the anchor's protocol, relayed
        await receive()
        await send({"type": "websocket.accept"})
        members = ROOMS.setdefault(scope["path"].rsplit("/", 1)[1], [])
        members.append(send)
        await send({"type": "websocket.send", "bytes": msgpack.packb({"op": "joined", "v": 0, "n": len(members)})})
        while True:
            message = await receive()
            if message["type"] != "websocket.receive":
                members.remove(send)
                return
            cmd = msgpack.unpackb(message["bytes"])
            ev = msgpack.packb({"op": "ev", "t": cmd["t"], "seq": cmd["seq"], "kind": cmd["kind"], "m": cmd["m"]})
            for member in list(members):
                await member({"type": "websocket.send", "bytes": ev})
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
                 "--out", str(out), "--gate-wait", "0", "--clients", "own,ours"]) == 0
    lingkar, stand_in, ours = (json.loads(line) for line in out.read_text().splitlines())
    assert (lingkar["who"], stand_in["who"], ours["who"]) == ("lingkar", "anchor", "anchor+ours")
    assert lingkar["rooms"] == stand_in["rooms"] == ours["rooms"] == 2
    assert lingkar["round"] == stand_in["round"] == ours["round"] == 1
    assert lingkar["deliveries"] > 0 and lingkar["missing"] == 0
    assert stand_in["deliveries"] == 160 and stand_in["p99_ms"] == 0.9
    # Lingkar's generator through the stand-in: every command of the window reached all 8
    assert ours["deliveries"] > 0 and ours["deliveries"] % 8 == 0 and ours["missing"] == 0
    assert lingkar["ratio"] == lingkar["per_cpu_second"] / stand_in["per_cpu_second"]
    for side in (lingkar, stand_in, ours):
        for key in ("per_cpu_second", "user_us", "system_us", "generator_sleeps_per_command",
                    "server_sleeps_per_command", "ratio"):
            assert side[key] >= 0, key
