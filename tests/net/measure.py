"""Timings and costs on real (namespaced) networks — measured and printed, never asserted.

    sudo .venv/bin/python -m tests.net.measure [--tries 10] [--seconds 20] [--json out.json]

Same topology and processes as tests/net (world.py): members in namespaces of their own,
`lingkar serve` in the public namespace, coturn for TURN. It prints:

1. join → hearing the floor holder, for a member behind NAT whose link adds 40 ms each way
   (80 ms RTT, the userspace delay line, no jitter): from the member's connecting for its
   `hello` to the first packet of the floor holder at its end; on the way, connect + hello →
   welcome, and offer → ICE and DTLS connected (a fresh member process each try);
2. packets received under 5 % loss (nft numgen) and 40 ± 30 ms jitter on the floor holder's
   link, at a clean listener and at her own end, over `--seconds` of speech;
3. time to audio after an address change (Wi-Fi → mobile, swapping routers), `--tries`
   times: from the switch of interfaces to the first packet of her new stream at a listener
   (the member is told at once, as a browser's network change event would);
4. CPU of the Lingkar server and of coturn (utime + stime from /proc/<pid>/stat) over
   `--seconds` with one speaker and a direct listener, then with a TURN-relayed listener
   (UDP dropped at its router, TURN over TCP) next to it;
5. the same address change with the floor holder in real Chromium inside her namespace
   (tests/net/browser.py), `--tries` times, in two ways: `browser_address_change` (the old
   interface goes and the new one comes in one `ip` batch, as in the tests) and
   `browser_address_change_overlap` (the new one is up first, then the old one goes: a phone
   whose mobile data was up all along; Chromium then fires no online/offline event). Nothing
   tells the page. Printed: from the switch to the first packet of her voice after the gap at a
   listener (aiortc, public side), and what the page did: its first "reconnecting audio" and
   its "connected" again after the switch, what media.js rebuilt for, which browser events came,
   new WebSockets and PeerConnections. A try with no audio back within `--limit` seconds counts
   as such, and the next one starts from a new page (a new member given the floor).
   `--client-file js/room.js=/path/room.js` (repeatable) serves a file in place of the client's
   own: a proposed change measured without touching web/.

    sudo .venv/bin/python -m tests.net.measure --only browser_address_change \
        --only browser_address_change_overlap [--tries 10] [--limit 30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from testkit.stats import percentile

from . import browser, netlab
from .browser import ENOUGH, VOICE, speaker_in_chromium
from .world import Member, World

STEPS = ["join_over_nat_80ms_rtt", "loss_5pct_jitter_40pm30ms", "address_change", "relay_cpu",
         "browser_address_change", "browser_address_change_overlap"]


def spread(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50": round(percentile(sorted(values), 50), 3),
            "min": round(min(values), 3), "max": round(max(values), 3)}


async def circle_with_speaker(world: World, speaker_ns: str, *, speaker_name: str = "Melati") -> tuple[Member, Member]:
    """The moderator (public side) and a member holding the floor, unmuted."""
    mod_ns = world.net.direct("moderator")
    mod, speaker = await asyncio.gather(world.member("Pendamping", mod_ns),
                                        world.member(speaker_name, speaker_ns))
    await world.create_circle(mod)
    await mod.join(world.link("moderator"))
    await mod.media()
    await speaker.join(world.link("member"))
    await speaker.media()
    await mod.ack("give_floor", member_id=speaker.member_id)
    await speaker.ack("unmute_self")
    return mod, speaker


async def join_over_nat_with_rtt(logs: Path, tries: int) -> dict[str, Any]:
    world = World(logs / "join")
    try:
        net = world.net
        home = net.home("listener")
        router = net.router()
        line_ns = world.lab.netns("line")
        a, b = net.line_uplink(home, router, line_ns)
        net.use(home, 0)
        await world.start_server()
        await world.start_delay_line(line_ns, a, b, delay_ms=40, jitter_ms=0)
        _, speaker = await circle_with_speaker(world, net.direct("speaker"))
        totals, welcomed, connected = [], [], []
        for attempt in range(tries):
            ear = await world.member(f"Kenanga{attempt}", home.ns)
            welcome = await ear.call("join", link=world.link("member"), name=ear.name)
            ear.member_id = welcome["member_id"]
            media = await ear.media()
            heard = await ear.wait_heard(speaker.source, 1)
            totals.append(heard["first_at"] - welcome["joined_at"])
            welcomed.append(welcome["took"])
            connected.append(media["took"])
            await ear.call("cmd", type="leave")
            await ear.exit()
        return {"join_to_first_packet_s": spread(totals), "hello_to_welcome_s": spread(welcomed),
                "offer_to_connected_s": spread(connected)}
    finally:
        await world.close()


async def loss_and_jitter(logs: Path, seconds: float) -> dict[str, Any]:
    world = World(logs / "loss")
    try:
        net = world.net
        home = net.home("melati")
        router = net.router(loss_percent=5)
        line_ns = world.lab.netns("line")
        a, b = net.line_uplink(home, router, line_ns)
        net.use(home, 0)
        await world.start_server()
        line = await world.start_delay_line(line_ns, a, b, delay_ms=40, jitter_ms=30)
        mod, melati = await circle_with_speaker(world, home.ns)
        ear = await world.member("Kenanga", net.direct("kenanga"))
        await ear.join(world.link("member"))
        await ear.media()
        packets = int(seconds * 50)
        clean, hers = await asyncio.gather(ear.wait_heard("Melati", packets, limit=seconds * 3),
                                           melati.wait_heard("Pendamping", packets, limit=seconds * 3))
        return {"listener_heard_speaker": {k: clean[k] for k in ("distinct", "span", "longest_gap")},
                "speaker_heard_moderator": {k: hers[k] for k in ("distinct", "span", "longest_gap")},
                "delivered_listener": round(clean["distinct"] / clean["span"], 4),
                "delivered_speaker_end": round(hers["distinct"] / hers["span"], 4),
                "router": net.counters(router), "delay_line": await world.line_stats(line)}
    finally:
        await world.close()


async def address_changes(logs: Path, tries: int) -> dict[str, Any]:
    world = World(logs / "move")
    try:
        net = world.net
        home = net.home("melati")
        wifi, mobile = net.router(), net.router()
        net.uplink(home, wifi)
        net.uplink(home, mobile)
        net.use(home, 0)
        await world.start_server()
        mod, melati = await circle_with_speaker(world, home.ns)
        ear = await world.member("Kenanga", net.direct("kenanga"))
        await ear.join(world.link("member"))
        await ear.media()
        await ear.wait_heard(melati.source, 50)
        to_audio, resumed, connected, floor_kept = [], [], [], 0
        for attempt in range(tries):
            started = time.monotonic()
            net.use(home, (attempt + 1) % 2)
            moved = await melati.call("moved")
            heard = await ear.wait_heard(moved["source"], 1)
            to_audio.append(heard["first_at"] - started)
            resumed.append(moved["resume_took"])
            connected.append(moved["took"])
            floor_kept += moved["welcome"]["state"]["floor"]["holder"] == melati.member_id
        return {"switch_to_first_packet_s": spread(to_audio), "resume_s": spread(resumed),
                "offer_to_connected_s": spread(connected), "floor_kept": f"{floor_kept}/{tries}"}
    finally:
        await world.close()


async def relay_cpu(logs: Path, seconds: float) -> dict[str, Any]:
    world = World(logs / "cpu")
    try:
        net = world.net
        home = net.home("udp-blocked")
        router = net.router(drop_udp=True)
        net.uplink(home, router)
        net.use(home, 0)
        await world.start_coturn()
        server = await world.start_server(turn=True)
        assert world.coturn is not None
        coturn = world.coturn
        _, speaker = await circle_with_speaker(world, net.direct("speaker"))

        async def window(label: str) -> dict[str, Any]:
            cpu = server.cpu_seconds(), coturn.cpu_seconds()
            started = time.monotonic()
            await asyncio.sleep(seconds)  # a measurement window, not a wait for anything
            elapsed = time.monotonic() - started
            server_s = server.cpu_seconds() - cpu[0]
            coturn_s = coturn.cpu_seconds() - cpu[1]
            return {"phase": label, "seconds": round(elapsed, 1),
                    "lingkar_cpu_percent": round(100 * server_s / elapsed, 2),
                    "coturn_cpu_percent": round(100 * coturn_s / elapsed, 2)}

        direct = await world.member("Kenanga", net.direct("kenanga"))
        await direct.join(world.link("member"), listen_only=True)
        await direct.media()
        await direct.wait_heard(speaker.source, 50)
        first = await window("speaker + direct listener")
        relayed = await world.member("Anggrek", home.ns)
        await relayed.join(world.link("member"), listen_only=True)
        media = await relayed.media()
        await relayed.wait_heard(speaker.source, 50)
        second = await window("speaker + direct listener + TURN-relayed listener")
        return {"relayed_pair": media["pair"], "windows": [first, second]}
    finally:
        await world.close()


def back_after_gap(packets: list[tuple[float, int]], moved_at: float) -> float | None:
    """When her voice came back: the first voice packet after the longest silence that began
    after `moved_at` (packets in flight at the switch still arrive just after it); None when
    the voice never stopped for as long as 100 ms (no gap at all)."""
    voice = [at for at, size in packets if size >= VOICE]
    best, back = 0.1, None
    for before, after in zip(voice, voice[1:], strict=False):
        if after > moved_at and after - max(before, moved_at) > best:
            best, back = after - max(before, moved_at), after
    return None if back is None else back - moved_at


async def browser_address_changes(logs: Path, tries: int, limit: float, files: dict[str, Path],
                                  *, overlap: bool = False) -> dict[str, Any]:
    world = World(logs / f"browser-move{'-overlap' if overlap else ''}")
    try:
        net = world.net
        home = net.home("melati")
        wifi, mobile = net.router(), net.router()
        net.uplink(home, wifi)
        net.uplink(home, mobile)
        net.use(home, 0)
        await world.start_server()
        mod = await world.moderator(net.direct("moderator"))
        async with browser.browsers(world.logs, world.server_url) as chromium:
            page, speaker = await speaker_in_chromium(world, chromium, home.ns, mod, files=files)
            tries_out: list[dict[str, Any]] = []
            for attempt in range(tries):
                seen = len(await page.evaluate("window.__netlog"))
                sockets = await page.evaluate("window.__sockets.length")
                pcs = await page.evaluate("window.__pcs.length")
                wall, moved_at = time.time(), time.monotonic()
                net.use(home, 1 - (home.current or 0), overlap=overlap)
                try:
                    await mod.call("wait_member", member_id=speaker, n=ENOUGH, since=moved_at,
                                   min_size=VOICE, within=limit, limit=limit + 10)
                    recovered = True
                except AssertionError:
                    recovered = False
                log = await mod.call("slot_log", member_id=speaker, since=moved_at - 2)
                netlog = (await page.evaluate("window.__netlog"))[seen:]
                reconnecting = [at for what, at in netlog if what == "media:reconnecting"]
                connected = [at for what, at in netlog if what == "media:connected"]
                rebuilt = [what.split(":", 1)[1] for what, _ in netlog if what.startswith("recover:")]
                back = (back_after_gap(log["packets"], moved_at) or 0.0) if recovered else None
                tries_out.append({
                    "back_s": None if back is None else round(back, 3),
                    "page_reconnecting_s": round(reconnecting[0] / 1000 - wall, 3) if reconnecting else None,
                    "page_connected_s": round(connected[-1] / 1000 - wall, 3) if connected else None,
                    "rebuilt_for": rebuilt, "browser_events": sorted(
                        {what for what, _ in netlog if what in ("online", "offline", "change")}),
                    "new_sockets": await page.evaluate("window.__sockets.length") - sockets,
                    "new_peer_connections": await page.evaluate("window.__pcs.length") - pcs})
                print(f"  try {attempt + 1}: {json.dumps(tries_out[-1])}", flush=True)
                if not recovered:  # a page that is stuck: the next try starts from a new member
                    await page.context.browser.close()
                    page, speaker = await speaker_in_chromium(world, chromium, home.ns, mod,
                                                              name=f"Melati{attempt + 1}", files=files)
        backs = [t["back_s"] for t in tries_out if t["back_s"] is not None]
        detected = [t["page_reconnecting_s"] for t in tries_out if t["page_reconnecting_s"] is not None]
        reasons: dict[str, int] = {}  # the first reason of each try
        for t in tries_out:
            first = t["rebuilt_for"][0] if t["rebuilt_for"] else "none"
            reasons[first] = reasons.get(first, 0) + 1
        return {"switch_to_voice_back_s": spread(backs) if backs else None,
                "no_audio_within_limit": f"{tries - len(backs)}/{tries} (limit {limit:g} s)",
                "switch_to_page_reconnecting_s": spread(detected) if detected else None,
                "first_rebuilt_for": reasons,
                "online_event": f"{sum(1 for t in tries_out if 'online' in t['browser_events'])}/{tries}",
                "client_files": {name: str(path) for name, path in files.items()}, "tries": tries_out}
    finally:
        await world.close()


async def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.net.measure")
    parser.add_argument("--tries", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--limit", type=float, default=30.0,
                        help="seconds a Chromium try may take to have audio back")
    parser.add_argument("--only", action="append", choices=STEPS,
                        help="run only this step (repeatable)")
    parser.add_argument("--client-file", action="append", default=[], metavar="PATH=FILE",
                        help="serve FILE in place of the client's /static/PATH (Chromium step)")
    args = parser.parse_args(argv)
    files = {name: Path(path) for name, _, path in (item.partition("=") for item in args.client_file)}
    reason = netlab.unavailable()
    if reason is not None:
        print(f"cannot measure: {reason}", file=sys.stderr)
        return 2
    netlab.sweep_leftovers()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="lknet-measure-") as tmp:
        logs = Path(tmp)
        steps = [("join_over_nat_80ms_rtt", lambda: join_over_nat_with_rtt(logs, args.tries)),
                 ("loss_5pct_jitter_40pm30ms", lambda: loss_and_jitter(logs, args.seconds)),
                 ("address_change", lambda: address_changes(logs, args.tries)),
                 ("relay_cpu", lambda: relay_cpu(logs, args.seconds)),
                 ("browser_address_change",
                  lambda: browser_address_changes(logs, args.tries, args.limit, files)),
                 ("browser_address_change_overlap",
                  lambda: browser_address_changes(logs, args.tries, args.limit, files, overlap=True))]
        for name, step in steps:
            if args.only and name not in args.only:
                continue
            if name.startswith("browser_") and (reason := browser.unavailable()):
                print(f"{name}: skipped ({reason})", flush=True)
                continue
            results[name] = await step()
            print(f"{name}: {json.dumps(results[name])}", flush=True)
    netlab.sweep_own()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
