"""Turn the generators' raw records into the JSON report, the summary table and the plot."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from testkit.stats import summary

__all__ = ["plot", "room_summary", "summary", "table", "totals", "write_json"]

SIGNALING_TARGET_MS = 50.0
MEDIA_TARGET_MS = 20.0
LOSS_TARGET = 0.005


def _all(latency: dict[str, list[float]]) -> list[float]:
    """The steady phase's samples (not the burst of everyone joining at once)."""
    return [x for name, samples in latency.items() if not name.endswith("@join") for x in samples]


def room_summary(raw: dict[str, Any]) -> dict[str, Any]:
    """One room's JSON record (summaries only; raw samples stay in memory for the plot)."""
    latency: dict[str, list[float]] = raw.get("latency_ms", {})
    errors = sum(raw.get("errors", {}).values())
    missing = sum(raw.get("missing", {}).values())
    rec: dict[str, Any] = {
        "room": raw["room"], "kind": raw["kind"], "circle_id": raw["circle_id"], "members": raw["members"],
        "commands": raw.get("commands", 0),
        "fanout_ms": summary(_all(latency), errors + missing),
        "by_command_ms": {name: summary(s, raw.get("errors", {}).get(name, 0) + raw.get("missing", {}).get(name, 0))
                          for name, s in sorted(latency.items())},
        "errors": raw.get("errors", {}), "error_codes": raw.get("error_codes", {}),
        "missing_deliveries": raw.get("missing", {}),
        "join_ms": summary(raw.get("join_ms", [])), "admit_ms": summary(raw.get("admit_ms", [])),
        "lobby_notice_ms": summary(raw.get("lobby_notice_ms", [])), "ack_ms": summary(raw.get("ack_ms", [])),
    }
    if "join_failed" in raw:
        rec["join_failed"] = raw["join_failed"]
    media = raw.get("media")
    if media:
        listeners = []
        for lst in media["listeners"]:
            listeners.append({**{k: v for k, v in lst.items() if k not in ("latency_ms", "sent_s")},
                              "latency_ms": summary(lst["latency_ms"])})
        all_lat = [x for lst in media["listeners"] for x in lst["latency_ms"]]
        expected = sum(lst["expected"] for lst in media["listeners"])
        received = sum(lst["received"] - lst["duplicates"] for lst in media["listeners"])
        rec["media"] = {
            **{k: v for k, v in media.items() if k not in ("listeners", "offer_answer_ms", "media_connect_ms")},
            "relay_latency_ms": summary(all_lat),
            "loss": (1 - received / expected) if expected else None,
            "max_listener_loss": max((lst["loss"] or 0 for lst in media["listeners"]), default=None),
            "max_jitter_ms": max((lst["jitter_ms"] for lst in media["listeners"]), default=None),
            "offer_answer_ms": summary(media["offer_answer_ms"]),
            "media_connect_ms": summary(media["media_connect_ms"]),
            "listeners": listeners,
        }
    return rec


def totals(raws: list[dict[str, Any]], cost: dict[str, Any]) -> dict[str, Any]:
    fan = [x for r in raws for x in _all(r.get("latency_ms", {}))]
    sig_only = [x for r in raws if r["kind"] == "signaling" for x in _all(r.get("latency_ms", {}))]
    errors = sum(sum(r.get("errors", {}).values()) + sum(r.get("missing", {}).values()) for r in raws)
    by_cmd: dict[str, list[float]] = {}
    for r in raws:
        for name, s in r.get("latency_ms", {}).items():
            by_cmd.setdefault(name, []).extend(s)
    out: dict[str, Any] = {
        "rooms": len(raws), "rooms_failed_to_join": sum(1 for r in raws if "join_failed" in r),
        "fanout_ms": summary(fan, errors), "fanout_signaling_rooms_ms": summary(sig_only),
        "by_command_ms": {k: summary(v) for k, v in sorted(by_cmd.items())},
        "join_ms": summary([x for r in raws for x in r.get("join_ms", [])]),
        "admit_ms": summary([x for r in raws for x in r.get("admit_ms", [])]),
        "lobby_notice_ms": summary([x for r in raws for x in r.get("lobby_notice_ms", [])]),
        "errors": errors,
        "error_codes": _merge([r.get("error_codes", {}) for r in raws]),
    }
    media_rooms = [r["media"] for r in raws if r.get("media")]
    if media_rooms:
        listeners = [lst for m in media_rooms for lst in m["listeners"]]
        expected = sum(lst["expected"] for lst in listeners)
        received = sum(lst["received"] - lst["duplicates"] for lst in listeners)
        streams = sum(m["forwarded_streams"] for m in media_rooms)
        out["media"] = {
            "rooms": len(media_rooms), "forwarded_streams": streams, "listeners": len(listeners),
            "relay_latency_ms": summary([x for lst in listeners for x in lst["latency_ms"]]),
            "loss": (1 - received / expected) if expected else None,
            "max_listener_loss": max((lst["loss"] or 0 for lst in listeners), default=None),
            "jitter_ms_mean": _mean([lst["jitter_ms"] for lst in listeners]),
            "jitter_ms_max": max((lst["jitter_ms"] for lst in listeners), default=None),
            "leaked_from_non_holder": sum(m["leaked_from_non_holder"] for m in media_rooms),
            "foreign_packets": sum(lst["foreign"] for lst in listeners),
        }
        window = cost.get("media_window") or {}
        cpu = window.get("server_cpu_s")
        seconds = window.get("seconds")
        if cpu is not None and seconds and streams:
            out["media"]["server_cpu_s_per_stream_s"] = cpu / (streams * seconds)
            out["media"]["server_cpu_share_of_one_core"] = cpu / seconds
    return out


def _merge(counters: list[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in counters:
        for k, v in c.items():
            out[k] = out.get(k, 0) + v
    return out


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _f(x: Any, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}"


def table(report: dict[str, Any]) -> str:
    lines = []
    head = (f"{'room':>4} {'kind':<9} {'mem':>3} {'cmds':>5} {'deliv':>6} {'p50':>6} {'p95':>6} {'p99':>6} "
            f"{'max':>7} {'err':>4} {'join99':>7} {'admit99':>8}")
    lines.append("signaling fan-out latency (ms), command → event at each member")
    lines.append(head)
    for r in report["rooms"]:
        f = r["fanout_ms"]
        lines.append(f"{r['room']:>4} {r['kind']:<9} {r['members']:>3} {r['commands']:>5} {f['count']:>6} "
                     f"{_f(f['p50']):>6} {_f(f['p95']):>6} {_f(f['p99']):>6} {_f(f['max']):>7} {f['errors']:>4} "
                     f"{_f(r['join_ms']['p99']):>7} {_f(r['admit_ms']['p99']):>8}")
    t = report["totals"]
    f = t["fanout_ms"]
    lines.append(f"{'all':>4} {'':<9} {'':>3} {'':>5} {f['count']:>6} {_f(f['p50']):>6} {_f(f['p95']):>6} "
                 f"{_f(f['p99']):>6} {_f(f['max']):>7} {f['errors']:>4} {_f(t['join_ms']['p99']):>7} "
                 f"{_f(t['admit_ms']['p99']):>8}")
    media = [r for r in report["rooms"] if r.get("media")]
    if media:
        base = t["media"].get("direct_path_without_relay_ms") or {}
        lines.append("")
        lines.append("media relay latency (ms) per listener: speaker's send → listener's receive")
        lines.append(f"{'room':>4} {'lis':>3} {'role':<9} {'pkts':>6} {'p50':>6} {'p95':>6} {'p99':>6} {'max':>7} "
                     f"{'loss%':>6} {'jit':>5} {'leaked':>6}")
        for r in media:
            for lst in r["media"]["listeners"]:
                lat = lst["latency_ms"]
                loss = None if lst["loss"] is None else 100 * lst["loss"]
                lines.append(f"{r['room']:>4} {lst['listener']:>3} {lst['role']:<9} {lst['received']:>6} "
                             f"{_f(lat['p50']):>6} {_f(lat['p95']):>6} {_f(lat['p99']):>6} {_f(lat['max']):>7} "
                             f"{_f(loss, 2):>6} {_f(lst['jitter_ms'], 2):>5} {lst['leaked_from_non_holder']:>6}")
        m = t["media"]
        lat = m["relay_latency_ms"]
        loss = None if m["loss"] is None else 100 * m["loss"]
        lines.append(f"{'all':>4} {m['listeners']:>3} {'':<9} {lat['count']:>6} {_f(lat['p50']):>6} {_f(lat['p95']):>6} "
                     f"{_f(lat['p99']):>6} {_f(lat['max']):>7} {_f(loss, 2):>6} {_f(m['jitter_ms_max'], 2):>5} "
                     f"{m['leaked_from_non_holder']:>6}")
        if base.get("count"):
            lines.append(f"same path without the relay (peer to peer in the generator): p50/p95/p99 "
                         f"{_f(base['p50'])}/{_f(base['p95'])}/{_f(base['p99'])} ms, n={base['count']}")
    c = report["cost"]
    lines.append("")
    lines.append(f"server: CPU {_f(c.get('server_cpu_s'), 2)} s over {_f(c.get('steady_seconds'))} s "
                 f"({_f(c.get('server_cpu_share_of_one_core', 0) * 100 if c.get('server_cpu_share_of_one_core') is not None else None)} % of a core); "
                 f"memory {_f((c.get('server_rss_bytes') or {}).get('after_join', 0) / 2**20)} MiB, "
                 f"{_f(c.get('memory_per_room_kib'))} KiB per room, {_f(c.get('memory_per_member_kib'))} KiB per member")
    if media and "server_cpu_s_per_stream_s" in t["media"]:
        lines.append(f"relay: {t['media']['forwarded_streams']} forwarded streams, "
                     f"{t['media']['server_cpu_s_per_stream_s'] * 1000:.2f} ms of server CPU per stream-second "
                     f"(includes the concurrent signaling load)")
    lines.append(f"generators: CPU {_f(c.get('generator_cpu_s'), 2)} s; whole machine busy "
                 f"{_f(c.get('machine_busy_cpu_s'), 1)} of {_f(c.get('machine_cpu_capacity_s'), 1)} CPU-s "
                 f"(other processes {_f(c.get('other_processes_cpu_s'), 1)} s; {report['machine']['cores']} cores, shared)")
    for kind, lag in (c.get("generator_loop_lag_ms") or {}).items():
        lines.append(f"{kind} generator event loop late by p50/p99/max {_f(lag['p50'])}/{_f(lag['p99'])}/"
                     f"{_f(lag['max'])} ms (its timestamps are late by as much)")
    other, capacity = c.get("other_processes_cpu_s"), c.get("machine_cpu_capacity_s")
    if other is not None and capacity and other > 0.1 * capacity:
        lines.append(f"WARNING: other processes used {100 * other / capacity:.0f} % of the machine during the run; "
                     f"latencies include their interference")
    return "\n".join(lines)


def plot(report: dict[str, Any], raws: list[dict[str, Any]], history: list[dict[str, Any]], path: Path,
         t0: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    media_raws = [r for r in raws if r.get("media")]
    fig, axes = plt.subplots(3, 2, figsize=(12, 11), dpi=72)
    p = report["parameters"]
    fig.suptitle(f"Lingkar load test — {p['rooms']} rooms × {p['members']} members, {p['duration']:.0f} s, "
                 f"store {p['store']}, {p['media_rooms']} media rooms ({report['machine']['cores']} cores, "
                 f"server and generators on one machine)", fontsize=10)

    ax = axes[0][0]
    data = [_all(r.get("latency_ms", {})) or [math.nan] for r in raws]
    labels = [str(r["room"]) for r in raws]
    ax.boxplot(data, whis=(1, 99), showfliers=False)
    ax.set_xticks(range(1, len(labels) + 1), labels, fontsize=7 if len(labels) < 30 else 5)
    ax.axhline(SIGNALING_TARGET_MS, color="tab:red", lw=0.8, ls="--", label=f"{SIGNALING_TARGET_MS:.0f} ms")
    ax.set_title("signaling fan-out latency per room (box: p25–p75, whiskers p1–p99)", fontsize=9)
    ax.set_xlabel("room")
    ax.set_ylabel("ms")
    ax.legend(fontsize=7)

    ax = axes[0][1]
    for label, samples in (
        ("fan-out (command → each member)", [x for r in raws for x in _all(r.get("latency_ms", {}))]),
        ("join (hello → lobby/welcome)", [x for r in raws for x in r.get("join_ms", [])]),
        ("admit (admit → admitted)", [x for r in raws for x in r.get("admit_ms", [])]),
        ("media relay (send → each listener)",
         [x for r in media_raws for lst in r["media"]["listeners"] for x in lst["latency_ms"]]),
    ):
        if samples:
            xs = sorted(samples)
            ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=f"{label}, n={len(xs)}")
    ax.set_xscale("log")
    ax.set_title("latency CDF, all rooms (fan-out: steady phase)", fontsize=9)
    ax.set_xlabel("ms (log)")
    ax.set_ylabel("fraction")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)

    _timeline(axes[1][0], raws, media_raws, t0)

    ax = axes[1][1]
    if media_raws:
        data, labels = [], []
        for r in media_raws:
            for lst in r["media"]["listeners"]:
                data.append(lst["latency_ms"] or [math.nan])
                labels.append(f"{r['room']}.{lst['listener']}")
        ax.boxplot(data, whis=(1, 99), showfliers=False)
        ax.set_xticks(range(1, len(labels) + 1), labels, fontsize=7 if len(labels) < 30 else 4, rotation=90)
        ax.axhline(MEDIA_TARGET_MS, color="tab:red", lw=0.8, ls="--", label=f"{MEDIA_TARGET_MS:.0f} ms")
        ax.legend(fontsize=7)
        m = report["totals"]["media"]
        loss = "-" if m["loss"] is None else f"{100 * m['loss']:.2f} %"
        ax.set_title(f"media relay latency per listener (room.listener); loss {loss}, "
                     f"leaked {m['leaked_from_non_holder']}", fontsize=9)
        ax.set_xlabel("listener")
        ax.set_ylabel("ms")
    else:
        ax.text(0.5, 0.5, "no media rooms in this run", ha="center", va="center")
        ax.set_axis_off()

    ax = axes[2][0]
    points = sorted({(h["streams"], h["cpu_ms_per_stream_s"]) for h in history
                     if h.get("streams") and h.get("cpu_ms_per_stream_s") is not None})
    sizes = {s for s, _ in points}
    if len(sizes) > 1:
        ax.plot([s for s, _ in points], [s * c / 10 for s, c in points], "o-")
        ax.set_title("server CPU vs forwarded streams (runs in this --out dir)", fontsize=9)
        ax.set_xlabel("forwarded audio streams")
        ax.set_ylabel("% of one core (incl. signaling)")
        ax.grid(alpha=0.3)
    elif report["totals"].get("media", {}).get("server_cpu_s_per_stream_s") is not None:
        m = report["totals"]["media"]
        per = m["server_cpu_s_per_stream_s"] * 1000
        ax.bar(["server CPU per\nforwarded stream-second"], [per], color="tab:blue")
        ax.text(0, per, f"{per:.2f} ms", ha="center", va="bottom")
        ax.set_ylabel("ms of CPU per stream-second")
        ax.set_title(f"relay cost, {m['forwarded_streams']} streams "
                     f"({100 * m['server_cpu_share_of_one_core']:.0f} % of a core)", fontsize=9)
    else:
        c = report["cost"]
        share = c.get("server_cpu_share_of_one_core")
        ax.bar(["server CPU", "generators CPU"],
               [100 * (share or 0), 100 * (c.get("generator_cpu_s") or 0) / max(c.get("steady_seconds") or 1, 1)],
               color=["tab:blue", "tab:gray"])
        ax.set_ylabel("% of one core during the run")
        ax.set_title("CPU during the steady phase", fontsize=9)
    _numbers(axes[2][1], report)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _timeline(ax: Any, raws: list[dict[str, Any]], media_raws: list[dict[str, Any]], t0: float) -> None:
    """Latency against time since the steady phase began: pauses shared by every room
    (the server's or the machine's) line up as columns."""
    pts = [(t - t0, ms) for r in raws for t, ms in r.get("timeline", [])]
    step = max(1, len(pts) // 15000)
    if pts:
        ax.scatter([x for x, _ in pts[::step]], [y for _, y in pts[::step]], s=2, alpha=0.4,
                   label="signaling fan-out", color="tab:blue")
    mpts = [(t - t0, ms) for r in media_raws for lst in r["media"]["listeners"]
            for t, ms in zip(lst["sent_s"], lst["latency_ms"], strict=False)]
    mstep = max(1, len(mpts) // 15000)
    if mpts:
        ax.scatter([x for x, _ in mpts[::mstep]], [y for _, y in mpts[::mstep]], s=2, alpha=0.3,
                   label="media relay", color="tab:orange")
    ax.set_yscale("log")
    ax.set_xlabel("seconds since the steady phase began")
    ax.set_ylabel("ms (log)")
    ax.set_title("latency over time (shared pauses line up vertically)", fontsize=9)
    ax.grid(alpha=0.3)
    if pts or mpts:
        ax.legend(fontsize=7, markerscale=4)


def _numbers(ax: Any, report: dict[str, Any]) -> None:
    t, c = report["totals"], report["cost"]
    f = t["fanout_ms"]
    lines = [f"fan-out p50/p95/p99/max: {_f(f['p50'])} / {_f(f['p95'])} / {_f(f['p99'])} / {_f(f['max'])} ms",
             f"  deliveries {f['count']}, errors {f['errors']}",
             f"join p50/p99 {_f(t['join_ms']['p50'])}/{_f(t['join_ms']['p99'])} ms; "
             f"admit p50/p99 {_f(t['admit_ms']['p50'])}/{_f(t['admit_ms']['p99'])} ms"]
    m = t.get("media")
    if m:
        lat = m["relay_latency_ms"]
        loss = "-" if m["loss"] is None else f"{100 * m['loss']:.2f} %"
        lines += [f"media: {m['forwarded_streams']} streams, p50/p95/p99 {_f(lat['p50'])}/{_f(lat['p95'])}/"
                  f"{_f(lat['p99'])} ms", f"  loss {loss}, jitter max {_f(m['jitter_ms_max'], 2)} ms, "
                  f"leaked from non-holders {m['leaked_from_non_holder']}"]
        base = m.get("direct_path_without_relay_ms") or {}
        if base.get("count"):
            lines.append(f"  without relay p50/p99 {_f(base['p50'])}/{_f(base['p99'])} ms")
        if "server_cpu_s_per_stream_s" in m:
            lines.append(f"  {m['server_cpu_s_per_stream_s'] * 1000:.2f} ms server CPU per stream-second")
    if c.get("server_cpu_s") is not None:
        lines += [f"server CPU {100 * c['server_cpu_share_of_one_core']:.0f} % of a core; "
                  f"{_f(c['memory_per_member_kib'])} KiB/member, {_f(c['memory_per_room_kib'])} KiB/room"]
    for kind, lag in (c.get("generator_loop_lag_ms") or {}).items():
        lines.append(f"{kind} generator loop lag p99 {_f(lag['p99'])} ms, max {_f(lag['max'])} ms")
    lines.append(f"machine busy {_f(c.get('machine_busy_cpu_s'))} of {_f(c.get('machine_cpu_capacity_s'))} CPU-s "
                 f"(other processes {_f(c.get('other_processes_cpu_s'))} s)")
    ax.text(0.02, 0.95, "\n".join(lines), va="top", ha="left", family="monospace", fontsize=8,
            transform=ax.transAxes)
    ax.set_axis_off()


def write_json(report: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(report, indent=1, default=_nan_safe))


def _nan_safe(x: Any) -> Any:
    return None
