"""`lingkar loadtest`: many simultaneous circles against a real server, measured (F17, §9).

    lingkar loadtest --rooms 20 --members 8 --duration 30 --media-rooms 2 --out loadtest-out

Without `--url` it starts its own `lingkar serve` in a subprocess (and a `redis-server` with
`--store redis`) on free loopback ports and stops them at the end, also on Ctrl-C or an
error. The load comes from generator processes (one for signaling, one for media), never
from inside the server. Output: `loadtest.json` and `loadtest.png` in `--out`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import queue as queue_mod
import signal
import sys
import time
from pathlib import Path
from typing import Any

from loadtest import procs, report
from testkit.procs import cpu_seconds, machine_busy_seconds, rss_bytes

JOIN_TIMEOUT = 60.0
PROGRESS_WIDTH = 30


def parse(argv: list[str] | None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="lingkar loadtest", description=__doc__.split("\n\n")[0])
    p.add_argument("--rooms", type=int, default=20, help="simultaneous circles (N)")
    p.add_argument("--members", type=int, default=8, help="people per circle, moderator included (M ≥ 3)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of steady load")
    p.add_argument("--store", choices=("memory", "redis"), default="memory")
    p.add_argument("--media-rooms", type=int, default=0, help="of the N rooms, how many run real audio (K)")
    p.add_argument("--pace", type=float, default=0.5, help="seconds between commands in a room")
    p.add_argument("--url", help="an already running server (then --api-key or LINGKAR_API_KEY)")
    p.add_argument("--api-key", default=os.environ.get("LINGKAR_API_KEY"))
    p.add_argument("--server-pid", type=int, help="with --url: the server's pid, to read its CPU and memory")
    p.add_argument("--out", default="loadtest-out", help="directory for loadtest.json and loadtest.png")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    problems = []
    if not 1 <= args.rooms <= 500:
        problems.append("--rooms must be 1..500")
    if not 3 <= args.members <= 49:
        problems.append("--members must be 3..49 (a moderator, a holder and another member)")
    if not 0 <= args.media_rooms <= args.rooms:
        problems.append("--media-rooms must be 0..--rooms")
    if not 1 <= args.duration <= 600:
        problems.append("--duration must be 1..600 s")
    if not 0.05 <= args.pace <= 10:
        problems.append("--pace must be 0.05..10 s")
    if args.url and not args.api_key:
        problems.append("--url needs --api-key (or LINGKAR_API_KEY)")
    if problems:
        p.error("; ".join(problems))
    return args


class Progress:
    """A one-line bar on stderr: phase, elapsed/total, counts."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.counts: dict[str, dict[str, int]] = {}
        self._last = 0.0
        self._shown = False

    def show(self, phase: str, done: float, total: float, force: bool = False, unit: str = "s") -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self._last < 0.25):
            return
        self._last = now
        frac = max(0.0, min(1.0, done / total)) if total else 0.0
        filled = int(frac * PROGRESS_WIDTH)
        bar = "#" * filled + "." * (PROGRESS_WIDTH - filled)
        c = {k: sum(v.get(k, 0) for v in self.counts.values())
             for k in ("joined", "commands", "errors", "packets", "leaked")}
        text = (f"\r{phase:<8} [{bar}] {done:5.1f}/{total:.0f} {unit}  joined {c['joined']}  cmds {c['commands']}  "
                f"err {c['errors']}  media pkts {c['packets']}  leaked {c['leaked']} ")
        sys.stderr.write(text)
        sys.stderr.flush()
        self._shown = True

    def end(self) -> None:
        if self._shown:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self._shown = False


def machine_info() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cores": os.cpu_count(), "cpu": model, "python": sys.version.split()[0],
            "platform": platform.platform(), "loadavg_at_start": os.getloadavg(),
            "shared_machine": "the server, redis and the load generators all run on this machine",
            "generator_processes": "one for signaling rooms, one for media rooms"}


def _drain(q: Any, timeout: float) -> list[tuple[Any, ...]]:
    out = []
    try:
        out.append(q.get(timeout=timeout))
        while True:
            out.append(q.get_nowait())
    except queue_mod.Empty:
        pass
    return out


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    old_term = None
    try:
        old_term = signal.signal(signal.SIGTERM, _sigterm)
    except ValueError:
        pass  # not the main thread
    progress = Progress(not args.no_progress)
    server: procs.ServerProcess | None = None
    children: list[Any] = []
    circles: list[dict[str, Any]] = []
    base_url = args.url.rstrip("/") if args.url else ""
    api_key = args.api_key or ""
    try:
        if not args.url:
            server = procs.ServerProcess(args.store, out / "server.log")
            server.start()
            base_url, api_key = server.url, server.api_key
        pid = server.pid if server else args.server_pid
        result = run(args, base_url, api_key, pid, progress, circles, children)
    except KeyboardInterrupt:
        progress.end()
        print("lingkar loadtest: interrupted; cleaning up", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - one clear line, then clean up
        progress.end()
        print(f"lingkar loadtest: {err}", file=sys.stderr)
        return 1
    finally:
        for child in children:
            if child.is_alive():
                child.terminate()
        for child in children:
            child.join(5)
            if child.is_alive():
                child.kill()
                child.join(2)
        if args.url:
            for circle in circles:
                procs.end_circle(base_url, api_key, circle["id"])
        if server is not None:
            server.stop()
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    return result


def run(args: argparse.Namespace, base_url: str, api_key: str, pid: int | None, progress: Progress,
        circles: list[dict[str, Any]], children: list[Any]) -> int:
    out = Path(args.out)
    ws_url = base_url.replace("http://", "ws://").replace("https://", "wss://") + "/ws"
    rss: dict[str, int] = {}
    if pid:
        rss["before_circles"] = rss_bytes(pid)
    for i in range(args.rooms):
        circle = procs.create_circle(base_url, api_key, f"Lingkar beban {i}", args.members + 1)
        circles.append(circle)
    if pid:
        rss["after_circles"] = rss_bytes(pid)
    specs = [{"index": i, "circle_id": c["id"], "moderator": c["links"]["moderator"].split("#t=", 1)[1],
              "member": c["links"]["member"].split("#t=", 1)[1]} for i, c in enumerate(circles)]
    common = {"ws_url": ws_url, "members": args.members, "duration": args.duration, "pace": args.pace,
              "join_timeout": JOIN_TIMEOUT, "server_pid": pid}
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    go = ctx.Event()
    from loadtest import media, signaling

    kinds = []
    if args.media_rooms:
        kinds.append("media")
        children.append(ctx.Process(target=media.run_process, name="loadtest-media",
                                    args=({**common, "rooms": specs[: args.media_rooms]}, q, go), daemon=True))
    if args.rooms > args.media_rooms:
        kinds.append("signaling")
        children.append(ctx.Process(target=signaling.run_process, name="loadtest-signaling",
                                    args=({**common, "rooms": specs[args.media_rooms :]}, q, go), daemon=True))
    for child in children:
        child.start()

    joined: dict[str, Any] = {}
    results: dict[str, Any] = {}
    windows: dict[str, float] = {}
    failures: dict[str, str] = {}
    expected_people = args.rooms * args.members

    def pump(timeout: float) -> None:
        for msg in _drain(q, timeout):
            tag, kind = msg[0], msg[1]
            if tag == "progress":
                progress.counts[kind] = msg[2]
            elif tag == "joined":
                joined[kind] = msg[2]
            elif tag == "result":
                results[kind] = msg[2]
            elif tag == "failed":
                failures[kind] = msg[2]
            elif tag == "media_window":
                windows[kind] = msg[2]
                if pid and kind == "end":
                    windows["server_cpu_end"] = cpu_seconds(pid)

    t_join = time.monotonic()
    while len(joined) + len(failures) < len(kinds):
        if time.monotonic() - t_join > JOIN_TIMEOUT + 30:
            raise RuntimeError("the generators did not finish joining in time")
        if not any(c.is_alive() for c in children) and q.empty():
            raise RuntimeError(f"the generators exited: {failures or 'no reason given'}")
        pump(0.1)
        done = sum(v.get("joined", 0) for v in progress.counts.values())
        progress.show("joining", done, expected_people, unit="people")
    if failures:
        raise RuntimeError(f"generator failed: {failures}")
    join_seconds = time.monotonic() - t_join
    if pid:
        rss["after_join"] = rss_bytes(pid)
        cpu0 = cpu_seconds(pid)
    busy0 = machine_busy_seconds()
    t0 = time.monotonic()
    go.set()
    limit = args.duration + 60 + (30 if args.media_rooms else 0)
    while len(results) + len(failures) < len(kinds):
        elapsed = time.monotonic() - t0
        if elapsed > limit:
            raise RuntimeError("the generators did not finish in time")
        if not any(c.is_alive() for c in children) and q.empty() and len(results) + len(failures) < len(kinds):
            pump(0.5)
            if len(results) + len(failures) < len(kinds):
                raise RuntimeError(f"the generators exited: {failures or 'no reason given'}")
        pump(0.1)
        progress.show("running", min(elapsed, args.duration), args.duration)
    steady = time.monotonic() - t0
    busy = machine_busy_seconds() - busy0
    progress.show("done", args.duration, args.duration, force=True)
    progress.end()
    if failures:
        raise RuntimeError(f"generator failed: {failures}")
    cost: dict[str, Any] = {"steady_seconds": steady, "join_seconds": join_seconds,
                            "generator_cpu_s": sum(r["generator_cpu_s"] for r in results.values()),
                            "machine_busy_cpu_s": busy, "machine_cpu_capacity_s": steady * (os.cpu_count() or 1),
                            "loadavg_at_end": os.getloadavg()}
    if pid:
        cpu1 = cpu_seconds(pid)
        rss["end"] = rss_bytes(pid)
        cost.update(server_pid=pid, server_cpu_s=cpu1 - cpu0, server_cpu_share_of_one_core=(cpu1 - cpu0) / steady,
                    server_rss_bytes=rss,
                    memory_per_room_kib=(rss["after_circles"] - rss["before_circles"]) / 1024 / args.rooms,
                    memory_per_member_kib=(rss["after_join"] - rss["after_circles"]) / 1024 / expected_people,
                    other_processes_cpu_s=max(0.0, busy - (cpu1 - cpu0) - cost["generator_cpu_s"]))
    cost["generator_loop_lag_ms"] = {kind: report.summary(res.get("loop_lag_ms", [])) for kind, res in results.items()}
    if "media" in results:
        cost["media_window"] = results["media"].get("server_window")
        cost["media_start_errors"] = results["media"].get("errors")

    raws = sorted([r for res in results.values() for r in res["rooms"]], key=lambda r: r["room"])
    for raw in raws:  # the timeline is for the plot; the JSON keeps summaries
        raw.setdefault("timeline", [])
    rep: dict[str, Any] = {
        "parameters": {"rooms": args.rooms, "members": args.members, "duration": args.duration,
                       "store": args.store, "media_rooms": args.media_rooms, "pace": args.pace,
                       "url": args.url or "own subprocess", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
        "machine": machine_info(),
        "totals": {},
        "cost": cost,
        "rooms": [report.room_summary(r) for r in raws],
    }
    rep["totals"] = report.totals(raws, cost)
    if "media" in results and "media" in rep["totals"]:
        base = report.summary(results["media"].get("direct_baseline_ms", []))
        rep["totals"]["media"]["direct_path_without_relay_ms"] = base
        relay = rep["totals"]["media"]["relay_latency_ms"]
        if base["p50"] is not None and relay["p50"] is not None:
            rep["totals"]["media"]["relay_share_p50_ms"] = round(relay["p50"] - base["p50"], 3)
            rep["totals"]["media"]["relay_share_p99_ms"] = round(relay["p99"] - base["p99"], 3)
    history_path = out / "history.jsonl"
    media_tot = rep["totals"].get("media") or {}
    entry = {"rooms": args.rooms, "members": args.members, "store": args.store, "media_rooms": args.media_rooms,
             "streams": media_tot.get("forwarded_streams"),
             "cpu_ms_per_stream_s": (media_tot["server_cpu_s_per_stream_s"] * 1000
                                     if "server_cpu_s_per_stream_s" in media_tot else None),
             "fanout_p99_ms": rep["totals"]["fanout_ms"]["p99"]}
    with history_path.open("a") as fh:
        fh.write(json.dumps(entry) + "\n")
    history = [json.loads(line) for line in history_path.read_text().splitlines() if line.strip()]
    json_path, png_path = out / "loadtest.json", out / "loadtest.png"
    report.write_json(rep, json_path)
    report.plot(rep, raws, history, png_path, t0)
    print(report.table(rep))
    print(f"\nreport: {json_path}\nplot:   {png_path}")
    leaked = media_tot.get("leaked_from_non_holder", 0)
    if leaked:
        print(f"FAIL: {leaked} packets of a member without the floor reached a listener", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
