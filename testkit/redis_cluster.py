"""A throwaway Redis Cluster on loopback: three masters and a replica each, for the tests.

Six `redis-server --cluster-enabled yes` on free ports (each with its cluster bus on a free
port of its own too, `--cluster-port`, so no port + 10000 can clash or overflow), joined by
`redis-cli --cluster create … --cluster-replicas 1`. `start()` returns once every node says
`cluster_state:ok` and every replica's link to its master is up (so `WAIT 1` can succeed at
once). `kill(port)` SIGKILLs one node (the master of a circle's slot: `master_of(key)`);
`wait_failing(port)` awaits the cluster noticing (`cluster_state:fail`), `wait_promoted(port)`
its replica taking over and the cluster being whole again (all by polling CLUSTER INFO and
CLUSTER SLOTS: awaiting a state).
Nothing persists; `close()` (and `__exit__`) stops every node, also after a failed start.
"""

from __future__ import annotations

import shutil
import subprocess
import time

import redis

from testkit.ports import free_port
from testkit.redis_server import RedisServer

REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"
NODE_TIMEOUT_MS = 1000
POLL_SECONDS = 0.05  # between two looks at CLUSTER INFO / INFO while awaiting a state


class _Node(RedisServer):
    """One cluster node: a RedisServer (no persistence, stdout drained) in cluster mode."""

    def __init__(self) -> None:
        super().__init__()
        self.bus_port = free_port()

    def _listen(self) -> list[str]:
        return ["--port", str(self.port), "--cluster-enabled", "yes",
                "--cluster-port", str(self.bus_port),
                "--cluster-config-file", str(self.dir / "nodes.conf"),
                "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                # a replica's first sync at once, not after the default 5 s of waiting for others
                "--repl-diskless-sync-delay", "0",
                # CLUSTER SLOTS lists a replica once its offset moved: ping it every second, not 10
                "--repl-ping-replica-period", "1"]

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no shutdown, no goodbye to the cluster (a crashed host)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.kill()
            proc.wait()


class LocalRedisCluster:
    def __init__(self, masters: int = 3, replicas: int = 1) -> None:
        self.masters = masters
        self.nodes = [_Node() for _ in range(masters * (1 + replicas))]
        self.replicas = replicas
        self._served: dict[int, list[int]] = {}  # killed master -> first slot of each range

    @property
    def url(self) -> str:
        """What LINGKAR_STORE takes: any one node; the rest are discovered."""
        return f"redis-cluster://127.0.0.1:{self.nodes[0].port}"

    def node(self, port: int) -> _Node:
        return next(n for n in self.nodes if n.port == port)

    def live(self) -> list[_Node]:
        return [n for n in self.nodes if n.running]

    def client(self) -> redis.RedisCluster:
        """A blocking cluster client (the caller closes it)."""
        seeds = [redis.cluster.ClusterNode("127.0.0.1", n.port)  # type: ignore[no-untyped-call]
                 for n in self.live()]
        return redis.RedisCluster(startup_nodes=seeds, socket_timeout=5)

    def start(self, timeout: float = 30.0) -> None:
        try:
            for node in self.nodes:
                node.start()
            subprocess.run(
                [REDIS_CLI, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
                 "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                check=True, capture_output=True, timeout=timeout)
            self.wait_ok(timeout)
        except BaseException:
            self.close()
            raise

    def _ask(self, node: _Node, *command: str) -> str:
        with node.client() as c:
            raw = c.execute_command(*command)
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    @staticmethod
    def _link_up(replica: _Node) -> bool:
        with replica.client() as c:
            info: dict[str, object] = c.info("replication")
        return info.get("master_link_status") == "up"

    def _state_ok(self, node: _Node) -> bool:
        return "cluster_state:ok" in self._ask(node, "CLUSTER", "INFO").split()

    def _slots(self) -> list[tuple[int, int, int, list[int]]]:
        """CLUSTER SLOTS as a live node sees it: (first, last, master port, replica ports)."""
        with self.live()[0].client() as c:
            rows = c.execute_command("CLUSTER", "SLOTS")
        return [(int(r[0]), int(r[1]), int(r[2][1]), [int(x[1]) for x in r[3:]]) for r in rows]

    def _whole(self) -> bool:
        """Every live node says the cluster is ok, the masters asked for serve every slot,
        and each has its replicas, their links up."""
        try:
            if not all(self._state_ok(n) for n in self.live()):
                return False
            slots = self._slots()
            if len({master for _, _, master, _ in slots}) != self.masters:
                return False
            replicas = {p for *_, ports in slots for p in ports}
            if any(len(ports) < self.replicas for *_, ports in slots):
                return False
            return all(self._link_up(self.node(p)) for p in replicas)
        except redis.exceptions.RedisError:
            return False

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Await (by polling CLUSTER INFO, CLUSTER SLOTS and INFO replication) a whole
        cluster: state ok everywhere, every master with its replicas, their links up."""
        deadline = time.monotonic() + timeout
        while not self._whole():
            if time.monotonic() > deadline:
                raise RuntimeError("the Redis Cluster did not become ok in time")
            time.sleep(POLL_SECONDS)

    def master_of(self, key: str) -> int:
        """The port of the master that serves `key`'s slot now."""
        with self.client() as c:
            return int(c.get_node_from_key(key).port)

    def replicas_of(self, master: int) -> list[int]:
        """The ports of the replicas of the master at `master` (in sync: CLUSTER SLOTS)."""
        return sorted({p for *_, m, ports in self._slots() if m == master for p in ports})

    def kill(self, port: int) -> None:
        """SIGKILL the node at `port` (its slots remembered for `wait_promoted`)."""
        self._served[port] = [first for first, _, master, _ in self._slots() if master == port]
        self.node(port).kill()

    def wait_failing(self, old_master: int, timeout: float = 30.0) -> bool:
        """Await the cluster noticing that the master at `old_master` is gone: True once a
        live node says `cluster_state:fail` (commands are refused cluster-wide until its
        replica is promoted), False if the failover was over before a look saw it."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if not all(self._state_ok(n) for n in self.live()):
                    return True
                if self._promoted(old_master) is not None:
                    return False
            except redis.exceptions.RedisError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster did not notice 127.0.0.1:{old_master} failing in time")
            time.sleep(POLL_SECONDS)

    def wait_promoted(self, old_master: int, timeout: float = 30.0) -> int:
        """Await the failover of the killed master at `old_master`: another node serves every
        slot it served and every live node says `cluster_state:ok`. The new master's port."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                promoted = self._promoted(old_master)
                if promoted is not None:
                    return promoted
            except redis.exceptions.RedisError:
                pass  # a node busy failing over: look again
            if time.monotonic() > deadline:
                raise RuntimeError(f"no replica of 127.0.0.1:{old_master} was promoted in time")
            time.sleep(POLL_SECONDS)

    def _promoted(self, old_master: int) -> int | None:
        if not all(self._state_ok(n) for n in self.live()):
            return None
        owners = {first: master for first, _, master, _ in self._slots()}
        now = {owners.get(first) for first in self._served[old_master]}
        if old_master in now or None in now or len(now) != 1:
            return None
        return now.pop()

    def close(self) -> None:
        for node in self.nodes:
            try:
                node.close()
            except Exception:  # stop the others whatever happens to one
                node.kill()
                shutil.rmtree(node.dir, ignore_errors=True)

    def __enter__(self) -> LocalRedisCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

