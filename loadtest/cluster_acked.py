"""`python -m loadtest.cluster acked`: acknowledged writes over SIGKILLs of Redis (AOF) or of a
Redis Cluster master; see loadtest.cluster."""

from __future__ import annotations

import asyncio
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtest.client import Closed
from loadtest.cluster_members import Member, members_of, new_circle
from loadtest.procs import AofRedis, ServerProcess
from testkit.redis_cluster import LocalRedisCluster

# ---- acked writes over a Redis kill ----------------------------------------------------------

@dataclass
class Writer:
    """A member toggling its hand as fast as the acks come, keeping every acked version, but
    never faster than WRITE_RATE a second: the server takes at most 20 frames a second from one
    connection (burst 40) and answers the rest `error rate_limited` with no `ref` (the frame is
    not read), which a client cannot tie to its command. Several writers write more often."""

    member: Member
    acked: list[tuple[int, bool]] = field(default_factory=list)  # (version, hand after)
    hand: bool = False  # what it believes (the next command follows it)
    since_ack: list[str] = field(default_factory=list)  # outcomes of commands after the last ack
    unavailable: int = 0
    other_errors: int = 0
    unknown: int = 0  # no answer (a close or a timeout): the outcome is not known
    resumes: int = 0
    last_answer: tuple[str, float] = ("", 0.0)  # the last command's outcome and when it came
    sent_at: float = 0.0
    go: asyncio.Event = field(default_factory=asyncio.Event)  # cleared: pause after the command in flight
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    acked_event: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        m = self.member
        while True:
            if not self.go.is_set():
                self.idle.set()
                await self.go.wait()
                self.idle.clear()
            if not m.connected.is_set():
                try:
                    welcome = await m.join(timeout=60)
                except TimeoutError:
                    continue
                self.resumes += 1
                me = next(x for x in welcome["state"]["members"] if x["id"] == m.member_id)
                self.hand = bool(me["hand"])
                continue
            kind = "lower_hand" if self.hand else "raise_hand"
            await asyncio.sleep(max(0.0, self.sent_at + 1 / WRITE_RATE - time.perf_counter()))
            self.sent_at = time.perf_counter()
            try:
                answer = await m.command(kind, timeout=COMMAND_TIMEOUT)
            except Closed:
                self.unknown += 1
                self.since_ack.append("unknown")
                self.last_answer = ("no answer", time.perf_counter())
                if m.client is not None and m.client.close_code is not None:
                    m.connected.clear()
                continue
            self.last_answer = (str(answer.get("code", answer["type"])), time.perf_counter())
            if answer["type"] == "ack":
                self.hand = not self.hand
                self.acked.append((int(answer["version"]), self.hand))
                self.since_ack = []
                self.acked_event.set()
            elif answer.get("code") == "unavailable":
                self.unavailable += 1
                self.since_ack.append("unavailable")
                await asyncio.sleep(0.05)
            else:  # not_allowed: the hand was not where it thought (after an unknown outcome)
                self.other_errors += 1
                self.since_ack.append(str(answer.get("code")))
                self.hand = not self.hand


COMMAND_TIMEOUT = 30.0
WRITE_RATE = 19.0  # commands a second per writer, under the server's 20 frames/s


async def synced(m: Member, timeout: float = 60.0) -> dict[str, Any]:
    """The state from the store (a `sync`), resuming first if the socket closed."""
    async def attempt() -> dict[str, Any]:
        while True:
            if m.client is None or m.client.close_code is not None:
                await m.join(timeout=60)
            try:
                return await m.sync(timeout=5)
            except Exception:  # noqa: BLE001 - closed, timed out, store unavailable: again
                await asyncio.sleep(0.1)

    return await asyncio.wait_for(attempt(), timeout)


def check_writer(w: Writer, state: dict[str, Any], acked_now: list[tuple[int, bool]],
                 since_ack: list[str]) -> dict[str, Any]:
    """What the state after the restart says of one writer's acked writes."""
    me = next(x for x in state["members"] if x["id"] == w.member.member_id)
    last_hand = acked_now[-1][1] if acked_now else False
    visible = bool(me["hand"]) == last_hand
    return {"acked": len(acked_now), "last_acked_version": acked_now[-1][0] if acked_now else 0,
            "missing": sum(1 for v, _ in acked_now if v > state["version"]),
            "last_change_visible": visible, "after_last_ack": since_ack,
            # a command with no answer may have landed; one answered `unavailable` must not have
            "explained": visible or "unknown" in since_ack,
            "unavailable_yet_applied": not visible and bool(since_ack) and "unknown" not in since_ack}


class StandaloneOutage:
    """One redis-server with AOF: killed with SIGKILL, started again on its port and files."""

    label = "redis-server (appendonly yes, appendfsync everysec), one lingkar serve"

    def __init__(self, tmp: Path, down: float) -> None:
        self.redis = AofRedis(tmp / "redis")
        self.down = down
        self.killed = 0.0

    @property
    def url(self) -> str:
        return self.redis.url

    def start(self) -> None:
        self.redis.start()

    def fail(self, circle_id: str) -> dict[str, Any]:
        self.redis.kill()
        self.killed = time.perf_counter()
        return {}

    def recover(self) -> dict[str, Any]:
        time.sleep(max(0.0, self.down - (time.perf_counter() - self.killed)))
        load = self.redis.start()
        return {"redis_down_s": round(time.perf_counter() - self.killed, 2), "aof_load_s": round(load, 2)}

    def close(self) -> None:
        self.redis.stop()


class ClusterOutage:
    """testkit's Redis Cluster (3 masters, a replica each, nothing persisted): the master of
    the circle's slot killed with SIGKILL; recovered once its replica is promoted, then the
    killed node started again (it comes back as the new master's replica: `WAIT 1`, which
    every acknowledged write waits for, can succeed again) and the cluster whole."""

    label = "Redis Cluster (3 masters + 3 replicas, WAIT 1 per acked write), one lingkar serve"

    def __init__(self, tmp: Path, down: float) -> None:
        self.cluster = LocalRedisCluster()
        self.master = 0
        self.killed = 0.0

    @property
    def url(self) -> str:
        return self.cluster.url

    def start(self) -> None:
        self.cluster.start()

    def fail(self, circle_id: str) -> dict[str, Any]:
        self.master = self.cluster.master_of(f"lk:{{{circle_id}}}:home")
        self.cluster.kill(self.master)
        self.killed = time.perf_counter()
        return {"killed_master": self.master}

    def recover(self) -> dict[str, Any]:
        new = self.cluster.wait_promoted(self.master, timeout=60)
        promoted = time.perf_counter() - self.killed
        self.cluster.node(self.master).start()
        self.cluster.wait_ok(timeout=60)
        return {"new_master": new, "promoted_s": round(promoted, 2),
                "whole_again_s": round(time.perf_counter() - self.killed, 2)}

    def close(self) -> None:
        self.cluster.close()


async def acked(restarts: int, interval: float, down: float, writers_n: int, store: str) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="lk-acked-"))
    outage: StandaloneOutage | ClusterOutage = (ClusterOutage if store == "redis-cluster" else StandaloneOutage)(tmp, down)
    server: ServerProcess | None = None
    rounds: list[dict[str, Any]] = []
    tasks: list[asyncio.Task[None]] = []
    everyone: list[Member] = []
    try:
        await asyncio.to_thread(outage.start)
        server = ServerProcess(outage.url, tmp / "serve.log")
        await asyncio.to_thread(server.start)
        circle = await new_circle(server.url, server.api_key, "acked", capacity=writers_n + 2)
        everyone = members_of(server.url, circle, ["Pendamping", *(f"Penulis {k}" for k in range(writers_n))],
                              with_c=False)
        mod = everyone[0]
        for m in everyone:
            await m.join()
        writers = [Writer(m) for m in everyone[1:]]
        for w in writers:
            w.go.set()
        tasks = [asyncio.create_task(w.run()) for w in writers]
        for i in range(1, restarts + 1):
            await asyncio.sleep(interval * (0.75 + random.random() / 2))  # mid-stream, anywhere
            info = await asyncio.to_thread(outage.fail, circle["id"])
            killed = time.perf_counter()
            for w in writers:
                w.go.clear()
            await asyncio.wait_for(asyncio.gather(*(w.idle.wait() for w in writers)), COMMAND_TIMEOUT + 10)
            in_flight = [(w.last_answer[0], round(w.last_answer[1] - killed, 2)) for w in writers]
            info.update(await asyncio.to_thread(outage.recover))
            up = time.perf_counter()
            snapshot = [(list(w.acked), list(w.since_ack)) for w in writers]
            state = await synced(mod)
            per_writer = [check_writer(w, state, a, s) for w, (a, s) in zip(writers, snapshot, strict=True)]
            last_version = max((p["last_acked_version"] for p in per_writer), default=0)
            counts = [len(w.acked) for w in writers]
            for w in writers:
                w.acked_event.clear()
                w.go.set()
            await asyncio.wait_for(asyncio.gather(*(w.acked_event.wait() for w in writers)), 60)
            next_versions = [w.acked[c][0] for w, c in zip(writers, counts, strict=True)]
            missing = sum(p["missing"] for p in per_writer)
            r = {"restart": i, "acked_so_far": sum(counts), "last_acked_version": last_version,
                 "version_after": state["version"], "acked_versions_missing": missing,
                 "last_changes_visible": all(p["last_change_visible"] for p in per_writer),
                 "unexplained": sum(not p["explained"] for p in per_writer),
                 "unavailable_yet_applied": sum(p["unavailable_yet_applied"] for p in per_writer),
                 "in_flight_at_kill": in_flight, "next_ack_versions": next_versions,
                 "next_acks_higher": all(v > last_version for v in next_versions),
                 **info, "writers_back_s": round(time.perf_counter() - up, 2), "writers": per_writer}
            r["lost"] = missing + r["unexplained"] + (0 if r["next_acks_higher"] else 1)
            rounds.append(r)
            print(f"  outage {i}: {sum(counts)} acked so far, last acked v{last_version}, state after "
                  f"v{state['version']}: acked versions missing {missing}, last changes visible "
                  f"{r['last_changes_visible']}; in flight at the kill (answer, s after it): {in_flight}; "
                  f"{ {k: v for k, v in info.items() if k.endswith('_s')} }; writers acked again "
                  f"{r['writers_back_s']:.2f} s after that", flush=True)
        for w in writers:
            w.go.clear()
        await asyncio.wait_for(asyncio.gather(*(w.idle.wait() for w in writers)), COMMAND_TIMEOUT + 10)
        return {"restarts": restarts, "store": store, "writers_n": writers_n, "rounds": rounds,
                "acked_total": sum(len(w.acked) for w in writers),
                "acked_writes_lost": sum(r["acked_versions_missing"] for r in rounds),
                "rounds_with_a_loss": sum(1 for r in rounds if r["lost"]),
                "unavailable_yet_applied": sum(r["unavailable_yet_applied"] for r in rounds),
                "writer": {"unavailable": sum(w.unavailable for w in writers),
                           "no_answer": sum(w.unknown for w in writers),
                           "other_errors": sum(w.other_errors for w in writers),
                           "resumes": sum(w.resumes for w in writers)},
                "setup": outage.label}
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(m.close() for m in everyone), return_exceptions=True)
        if server is not None:
            await asyncio.to_thread(server.stop)
        await asyncio.to_thread(outage.close)
        shutil.rmtree(tmp, ignore_errors=True)


def acked_summary(r: dict[str, Any]) -> str:
    what = ("SIGKILLs of the slot's master of a Redis Cluster" if r["store"] == "redis-cluster"
            else "SIGKILLs of Redis (AOF everysec)")
    return (f"acked writes over {r['restarts']} {what}, {r['writers_n']} writers: "
            f"{r['acked_total']} acked, "
            f"lost {r['acked_writes_lost']}; restarts with anything wrong {r['rounds_with_a_loss']}; "
            f"writer saw {r['writer']['unavailable']} `unavailable`, {r['writer']['no_answer']} unanswered, "
            f"{r['writer']['resumes']} resumes")
