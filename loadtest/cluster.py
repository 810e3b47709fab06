"""The numbers of a multi-process deployment (DESIGN §8): reported, never asserted.

    python -m loadtest.cluster failover  [--kills 20] [--client fixed|web]
    python -m loadtest.cluster redirects [--circles 100] [--members 4]
    python -m loadtest.cluster acked     [--restarts 5]
    python -m loadtest.cluster fanout    [--processes 1,2,4] [--rooms 400,800] [--members 8] [--seconds 10]
    (each also takes --out FILE.json)

Each subcommand starts what it measures and stops it at the end (also on an error or Ctrl-C):
`lingkar cluster` (`python -m server.cli cluster -n K --port <free> --data-dir <tmp>`, as `make
cluster` runs it: K `lingkar serve`, Caddy, a redis-server with AOF), ready once it printed its
organizer link, stopped with SIGINT, after which nothing it started may be left (named in the
output when something was). `acked` runs one `lingkar serve` on a redis-server with AOF of its
own (or on testkit's Redis Cluster) instead, so that it can kill Redis.

- failover: per round a circle with a moderator and three members, all joined through the
  proxy as the web client does (`/ws?c=`, `redirect` followed, resume with the secret on a
  close); the floor given to one member, another in the queue; the circle's home (its lease in
  Redis, `lk:{circle}:home`) killed with SIGKILL; the failover time is from the kill until every
  member has a `welcome` again and a command (`raise_hand` by the third member) is acked. Then
  the seats, the floor holder and the queue are compared with before (a round where anything
  differs counts as lost), and the killed process is started again by `lingkar cluster restart`
  (the supervisor restarts no dead process by itself; the rolling restart starts the dead one
  and restarts the others one by one: that is the only way it has).
- redirects: circles × members joined through the proxy with `?c=` and without; the share of
  hellos answered `redirect` in each case; then a rolling restart while the `?c=` members stay
  (following the draining processes' `redirect`), and the share again for new members at once
  after it.
- acked: a writer member alternating raise_hand/lower_hand as fast as the acks come; Redis
  (appendonly yes, appendfsync everysec) killed with SIGKILL mid-stream, started again on the
  same port and directory; then the state (a moderator's `sync`, read from the store) must hold
  every acked version (version ≥ the last acked one, the last acked change visible), and the
  writer's next ack must carry a higher version.
- fanout: loadtest.fanout's loop (a command per circle every 200 ms, the time to every member)
  through the proxy with `?c=`, for K processes on one Redis, and on testkit's Redis Cluster
  (`lingkar cluster --store redis-cluster://…`), as ratios to K=1; with the processes',
  Caddy's, Redis's and the generator's CPU, and how late the generator ran its schedule.

The machine is shared: the numbers move with whatever else runs (the load average before and
after each subcommand is in the JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loadtest.cluster_acked import acked, acked_summary
from loadtest.cluster_members import (
    RETRY,
    SETTLE,
    Cluster,
    Member,
    api,
    machine,
    members_of,
    new_circle,
    pcts,
    seats,
)
from loadtest.fanout import Target, measure
from loadtest.procs import ClusterProcess, pids_working_in
from testkit.loop import run as run_loop
from testkit.redis_cluster import LocalRedisCluster

# ---- failover ----------------------------------------------------------------------------------

async def failover_round(cl: ClusterProcess, i: int, backoff: str) -> dict[str, Any]:
    circle = await new_circle(cl.url, cl.api_key, f"failover {i}")
    mod, holder, waiting, actor = everyone = members_of(
        cl.url, circle, ["Pendamping", "Melati", "Anggrek", "Kenanga"], backoff=backoff)
    out: dict[str, Any] = {"round": i, "circle": circle["id"]}
    try:
        for m in everyone:
            await m.join()
        assert (await mod.command("give_floor", member_id=holder.member_id))["type"] == "ack"
        assert (await waiting.command("raise_hand"))["type"] == "ack"
        before = seats(await mod.sync())
        home = cl.home_of(circle["id"])
        pid = cl.pid_of(home) if home else None
        if home is None or pid is None:
            raise RuntimeError(f"no live home for circle {circle['id']} (lease on {home}, pid {pid})")
        out.update(home=home, redirects_at_join=sum(m.redirected for m in everyone))
        failed_before = sum(m.failed for m in everyone)

        killed = time.perf_counter()
        os.kill(pid, signal.SIGKILL)

        async def back(m: Member) -> dict[str, float]:
            moved_to = await m.gone(timeout=30)
            if m.client is not None and m.client.close_code is None:
                raise RuntimeError(f"{m.name}'s socket stayed open 30 s after the kill")
            closed = time.perf_counter() - killed
            await m.back_in(moved_to)
            times = {"closed": closed, "welcome": time.perf_counter() - killed}
            if m is actor:
                answer = await m.command("raise_hand")
                if answer["type"] != "ack":
                    raise RuntimeError(f"raise_hand after the failover answered {answer}")
                times["acked"] = time.perf_counter() - killed
            return times

        times = await asyncio.gather(*(back(m) for m in everyone))
        failover = max(max(t.values()) for t in times)
        state = await mod.sync()
        new_home = cl.home_of(circle["id"])
        checks = {
            "same_member_ids": all(w["member_id"] == m.member_id for m in everyone for w in m.welcomes),
            "seats_kept": seats(state) == before,
            "floor_holder_kept": state["floor"]["holder"] == holder.member_id,
            "queue_kept": state["queue"] == [waiting.member_id, actor.member_id],
            "moved_home": new_home not in (None, home),
        }
        out.update(failover_s=round(failover, 3),
                   all_closed_s=round(max(t["closed"] for t in times), 3),
                   first_welcome_s=round(min(t["welcome"] for t in times), 3),
                   last_welcome_s=round(max(t["welcome"] for t in times), 3),
                   acked_s=round(times[3]["acked"], 3),
                   failed_attempts=sum(m.failed for m in everyone) - failed_before,
                   new_home=new_home, checks=checks, lost=not all(checks.values()))
    except (Exception, TimeoutError) as err:  # noqa: BLE001 - a round that failed is reported
        out.update(error=f"{type(err).__name__}: {err}", lost=True)
    finally:
        await asyncio.gather(*(m.close() for m in everyone), return_exceptions=True)
        try:
            await api(cl.url, cl.api_key, "DELETE", f"/api/circles/{circle['id']}")
        except OSError:
            pass
    return out


async def failover(kills: int, backoff: str) -> dict[str, Any]:
    rounds: list[dict[str, Any]] = []
    restarts: list[float] = []
    cluster = Cluster(3)
    async with cluster as cl:
        print(f"cluster of 3 up in {cl.started_seconds:.1f} s at {cl.url}", flush=True)
        for i in range(1, kills + 1):
            r = await failover_round(cl, i, backoff)
            rc, took, text = await cl.rolling_restart()
            revived = r.get("home") is not None and f"process {r['home']}: was not running" in text
            r.update(restart_ok=rc == 0, restart_s=round(took, 1), restart_started_the_dead_one=revived)
            if rc != 0:
                r["restart_output"] = text[-2000:]
            restarts.append(took)
            rounds.append(r)
            print(f"  round {i}: " + (f"failover {r['failover_s']:.2f} s (all closed {r['all_closed_s']:.2f}, "
                                      f"welcomes {r['first_welcome_s']:.2f}–{r['last_welcome_s']:.2f}, "
                                      f"ack {r['acked_s']:.2f}); lost {r['lost']}"
                                      if "failover_s" in r else f"ERROR {r.get('error')}")
                  + f"; rolling restart {took:.1f} s ({'ok' if rc == 0 else 'FAILED'})", flush=True)
            if rc != 0:
                break
            await asyncio.sleep(SETTLE)
    times = [r["failover_s"] for r in rounds if "failover_s" in r]
    return {"kills": kills, "client": backoff, "rounds": rounds,
            "failover_s": pcts(times), "acked_s": pcts([r["acked_s"] for r in rounds if "acked_s" in r]),
            "rounds_lost": sum(1 for r in rounds if r["lost"]),
            "rounds_failed": sum(1 for r in rounds if "error" in r),
            "rolling_restart_s": pcts(restarts),
            "restart_started_the_dead_one": all(r["restart_started_the_dead_one"] for r in rounds),
            "left_behind": cluster.left}


def failover_summary(r: dict[str, Any]) -> str:
    f = r["failover_s"]
    return (f"failover ({r['client']} client retries), {f['n']} kills of the home: p50 {f['p50']:.2f} s, "
            f"p95 {f['p95']:.2f} s, max {f['max']:.2f} s; rounds where seat, floor or queue was lost: "
            f"{r['rounds_lost']} (of them failed outright: {r['rounds_failed']}); each kill followed by "
            f"`lingkar cluster restart` ({r['rolling_restart_s']['p50']:.1f} s median; it started the "
            f"dead one every time: {r['restart_started_the_dead_one']})")


# ---- redirects ---------------------------------------------------------------------------------

async def join_all(members: list[Member], concurrency: int = 32) -> None:
    limit = asyncio.Semaphore(concurrency)

    async def one(m: Member) -> None:
        async with limit:
            await m.join()

    await asyncio.gather(*(one(m) for m in members))


def share(members: list[Member]) -> dict[str, Any]:
    hellos = sum(m.hellos for m in members)
    redirected = sum(m.redirected for m in members)
    return {"hellos": hellos, "redirected": redirected,
            "share": round(redirected / hellos, 4) if hellos else math.nan,
            "failed_attempts": sum(m.failed for m in members)}


async def redirects(circles_n: int, members_n: int, later: float) -> dict[str, Any]:
    out: dict[str, Any] = {"circles": circles_n, "members": members_n}
    cluster = Cluster(3, env={"LINGKAR_MAX_CONNECTIONS_PER_ADDRESS": "0"})
    async with cluster as cl:
        print(f"cluster of 3 up in {cl.started_seconds:.1f} s at {cl.url}", flush=True)
        circles = await asyncio.gather(*(new_circle(cl.url, cl.api_key, f"redirects {i}", 4 * members_n + 2)
                                         for i in range(circles_n)))
        names = [f"m{k}" for k in range(members_n)]
        with_c = [m for c in circles for m in members_of(cl.url, c, names)]
        await join_all(with_c)
        out["with_c"] = share(with_c)
        print(f"  ?c=: {out['with_c']}", flush=True)
        without = [m for c in circles
                   for m in members_of(cl.url, c, ["x" + n for n in names], moderator=False, with_c=False)]
        await join_all(without)
        out["without_c"] = share(without)
        print(f"  without ?c=: {out['without_c']}", flush=True)
        await asyncio.gather(*(m.close() for m in without))

        # a rolling restart while the ?c= members stay in (following the drains' redirects)
        for m in with_c:
            m.hellos = m.redirected = m.failed = 0
        keepers = [asyncio.create_task(m.keep()) for m in with_c]
        try:
            rc, took, text = await cl.rolling_restart()
            out["rolling_restart"] = {"ok": rc == 0, "seconds": round(took, 1)}
            await asyncio.wait_for(asyncio.gather(*(m.connected.wait() for m in with_c)), 60)
        finally:
            for task in keepers:
                task.cancel()
            await asyncio.gather(*keepers, return_exceptions=True)
        out["during_restart_resumes"] = {**share(with_c), "moved_by_drain": sum(m.moved for m in with_c),
                                         "still_connected": sum(m.connected.is_set() for m in with_c)}
        print(f"  resumes during the rolling restart: {out['during_restart_resumes']}", flush=True)
        after = [m for c in circles for m in members_of(cl.url, c, ["y" + n for n in names], moderator=False)]
        await join_all(after)
        out["with_c_after_restart"] = share(after)
        print(f"  ?c= right after the rolling restart: {out['with_c_after_restart']}", flush=True)
        homes = [cl.home_of(c["id"]) for c in circles]
        out["homes_after_restart"] = {str(k): homes.count(k) for k in sorted(set(homes), key=str)}
        await asyncio.sleep(later)  # does it settle while the circles stay in use?
        again = [m for c in circles for m in members_of(cl.url, c, ["z" + n for n in names], moderator=False)]
        await join_all(again)
        out["with_c_later"] = {**share(again), "seconds_after_restart": later}
        print(f"  ?c= {later:.0f} s later, the circles still in use: {out['with_c_later']}", flush=True)
        await asyncio.gather(*(m.close() for m in with_c + after + again))
    out["left_behind"] = cluster.left
    return out


def redirects_summary(r: dict[str, Any]) -> str:
    def pct(s: dict[str, Any]) -> str:
        return f"{100 * s['share']:.1f} % of {s['hellos']}"

    return (f"redirects, {r['circles']} circles × {r['members']}: hellos answered `redirect` with ?c= "
            f"{pct(r['with_c'])}, without ?c= {pct(r['without_c'])}; resumes during a rolling restart "
            f"{pct(r['during_restart_resumes'])} ({r['during_restart_resumes']['moved_by_drain']} moved by a "
            f"drain's redirect); with ?c= right after it {pct(r['with_c_after_restart'])}, "
            f"{r['with_c_later']['seconds_after_restart']:.0f} s later {pct(r['with_c_later'])}")


# ---- fan-out over K processes ----------------------------------------------------------------

async def fanout_one(label: str, k: int, url: str, key: str, pids: dict[str, list[int]], rooms: list[int],
                     members: int, seconds: float) -> list[dict[str, Any]]:
    results = []
    for n in rooms:
        target = Target(label, url, key, by_circle=True, pids=pids)
        before = machine()
        try:
            r = await measure(target, n, members, seconds)
        except Exception as err:  # noqa: BLE001 - what happened is the result
            r = {"store": label, "rooms": n, "members": members, "error": f"{type(err).__name__}: {err}"}
        r.pop("per_room", None)
        r.update(processes=k, machine_before=before, machine_after=machine())
        results.append(r)
        print("  " + fanout_line(r), flush=True)
        await asyncio.sleep(2)  # the previous circles' sockets closed, their leases let go
    return results


async def fanout(processes: list[int], rooms: list[int], members: int, seconds: float,
                 stores: list[str]) -> dict[str, Any]:
    results: list[dict[str, Any]] = []
    left: list[str] = []
    if "redis" in stores:
        for k in processes:
            cluster = Cluster(k, env={"LINGKAR_MAX_CONNECTIONS_PER_ADDRESS": "0"})
            async with cluster as cl:
                print(f"lingkar cluster -n {k} up in {cl.started_seconds:.1f} s at {cl.url}", flush=True)
                pids = {"server": cl.pids("processes"), "proxy": cl.pids("caddy"), "redis": cl.pids("redis")}
                results += await fanout_one("redis", k, cl.url, cl.api_key, pids, rooms, members, seconds)
            left += cluster.left
    if "redis-cluster" in stores:
        rc = LocalRedisCluster()
        try:
            await asyncio.to_thread(rc.start)
            redis_pids = pids_working_in([node.dir for node in rc.nodes])
            for k in processes:
                cluster = Cluster(k, env={"LINGKAR_MAX_CONNECTIONS_PER_ADDRESS": "0"}, store=rc.url)
                async with cluster as cl:
                    print(f"lingkar cluster -n {k} --store {rc.url} up in {cl.started_seconds:.1f} s at {cl.url}",
                          flush=True)
                    pids = {"server": cl.pids("processes"), "proxy": cl.pids("caddy"), "redis": redis_pids}
                    results += await fanout_one("redis-cluster", k, cl.url, cl.api_key, pids, rooms, members, seconds)
                left += cluster.left
        finally:
            await asyncio.to_thread(rc.close)
    for store in stores:
        mine = [r for r in results if r["store"] == store]
        base = {r["rooms"]: r for r in mine if r["processes"] == processes[0] and "overall" in r}
        for r in mine:
            b = base.get(r["rooms"])
            if b is None or "overall" not in r:
                continue
            r["ratio_to_first"] = {
                key: round(r["overall"][key] / b["overall"][key], 2) if b["overall"][key] else math.nan
                for key in ("p50_ms", "p95_ms", "p99_ms")}
            r["ratio_to_first"]["deliveries_per_second"] = round(
                r["deliveries_per_second"] / b["deliveries_per_second"], 2) if b["deliveries_per_second"] else math.nan
    return {"processes": processes, "rooms": rooms, "members": members, "seconds": seconds, "stores": stores,
            "results": results, "left_behind": left}


def fanout_line(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"{r['store']} K={r['processes']} {r['rooms']}×{r['members']}: ERROR {r['error']}"
    o, cpu = r["overall"], r["cpu_percent_of_one_core"]
    return (f"{r['store']} K={r['processes']} {r['rooms']}×{r['members']}: p50 {o['p50_ms']:.2f} / p95 {o['p95_ms']:.2f} / "
            f"p99 {o['p99_ms']:.2f} ms, {r['deliveries_per_second']:.0f} deliveries/s of "
            f"{r['events_per_second']:.0f}, missing {r['missing_deliveries']}, errors {r['command_errors']}, "
            f"redirects {r['redirects_at_join']}; CPU % of a core: processes {cpu.get('server')}, "
            f"caddy {cpu.get('proxy')}, redis {cpu.get('redis')}, generator {r['client_cpu_percent_of_one_core']} "
            f"(its schedule {r['generator_lag_seconds']:.1f} s late)")


def fanout_summary(r: dict[str, Any]) -> str:
    lines = ["fan-out through the proxy (?c=), K processes on one Redis (redis) or a Redis Cluster (redis-cluster):"]
    for x in r["results"]:
        ratio = x.get("ratio_to_first")
        tail = (f"  [×K={r['processes'][0]}: p50 {ratio['p50_ms']}, p95 {ratio['p95_ms']}, p99 {ratio['p99_ms']}, "
                f"deliveries/s {ratio['deliveries_per_second']}]") if ratio else ""
        lines.append("  " + fanout_line(x) + tail)
    return "\n".join(lines)


# ---- the command line --------------------------------------------------------------------------

def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtest.cluster", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    f = sub.add_parser("failover", help="SIGKILL of a circle's home: time until everyone is back and acked")
    f.add_argument("--kills", type=int, default=20)
    f.add_argument("--client", choices=("fixed", "web"), default="fixed",
                   help=f"retry every {RETRY} s (fixed), or with the web client's backoff (0.5 s × 2^n)")
    r = sub.add_parser("redirects", help="share of hellos answered `redirect`, with ?c= and without")
    r.add_argument("--circles", type=int, default=100)
    r.add_argument("--members", type=int, default=4)
    r.add_argument("--later", type=float, default=10.0, help="seconds after the restart for the last look")
    a = sub.add_parser("acked", help="acked writes over SIGKILLs of Redis (AOF everysec)")
    a.add_argument("--restarts", type=int, default=5)
    a.add_argument("--interval", type=float, default=3.0, help="seconds of writing before each kill (±25 %%)")
    a.add_argument("--down", type=float, default=1.0, help="seconds Redis stays down (at least)")
    a.add_argument("--writers", type=int, default=4, help="members writing at once (each ≤ 20 frames/s)")
    a.add_argument("--store", choices=("redis", "redis-cluster"), default="redis",
                   help="one redis-server with AOF (killed and restarted), or a Redis Cluster (a master killed)")
    o = sub.add_parser("fanout", help="signaling fan-out through the proxy for K processes")
    o.add_argument("--processes", type=_ints, default=[1, 2, 4])
    o.add_argument("--rooms", type=_ints, default=[400, 800])
    o.add_argument("--members", type=int, default=8)
    o.add_argument("--seconds", type=float, default=10.0)
    o.add_argument("--stores", type=lambda t: [x for x in t.split(",") if x], default=["redis", "redis-cluster"],
                   help="redis (lingkar cluster's own redis-server), redis-cluster (testkit's, given to "
                        "`lingkar cluster --store`), or both, comma-separated")
    for s in (f, r, a, o):
        s.add_argument("--out", type=Path, help="write the JSON report here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    jobs: dict[str, tuple[Callable[[], Any], Callable[[dict[str, Any]], str]]] = {
        "failover": (lambda: failover(args.kills, args.client), failover_summary),
        "redirects": (lambda: redirects(args.circles, args.members, args.later), redirects_summary),
        "acked": (lambda: acked(args.restarts, args.interval, args.down, args.writers, args.store), acked_summary),
        "fanout": (lambda: fanout(args.processes, args.rooms, args.members, args.seconds, args.stores), fanout_summary),
    }
    job, summarize = jobs[args.what]
    before, began = machine(), time.monotonic()
    result = run_loop(job())
    after = machine()
    result.update(what=args.what, wall_seconds=round(time.monotonic() - began, 1),
                  machine_before=before, machine_after=after,
                  machine_busy_share=round((after["busy_seconds"] - before["busy_seconds"])
                                           / max(1e-9, (time.monotonic() - began) * (os.cpu_count() or 1)), 2),
                  note="a shared, noisy machine: numbers move with whatever else runs")
    print(summarize(result), flush=True)
    print(f"({result['wall_seconds']} s; load average {before['loadavg_1m']} → {after['loadavg_1m']} on "
          f"{after['cores']} cores)", flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
