"""A real Redis Cluster on loopback for the tests, from Debian's redis-server and redis-cli.

The node command line, the port choice (each node's cluster bus listens on its port + 10000,
so ports stay below 55536 with both free) and the cluster's creation live in
bench/rediscluster.py, shared with the benchmark's ``shards`` scenario. Every node runs in a
temp dir of its own (its nodes.conf).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from _chat import ROOT
from _require import require_binary

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import rediscluster

# A master is failed (and its replica promoted) after this; small so failover tests stay short.
NODE_TIMEOUT_MS = 1000


class ClusterNode:
    def __init__(self, exe: str, port: int, workdir: Path) -> None:
        self.exe = exe
        self.port = port
        self.dir = workdir / str(port)
        self.dir.mkdir()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def name(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        argv = rediscluster.node_argv(self.exe, self.port, self.dir, NODE_TIMEOUT_MS)
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class RedisCluster:
    """``masters`` masters with ``replicas`` replicas each, created by ``redis-cli --cluster create``."""

    def __init__(self, masters: int = 3, replicas: int = 0) -> None:
        self.exe = require_binary("redis-server")
        self.cli = require_binary("redis-cli")
        self._tmp = Path(tempfile.mkdtemp(prefix="chat-rediscluster-"))
        ports = rediscluster.cluster_ports(masters * (replicas + 1))
        self.nodes = [ClusterNode(self.exe, port, self._tmp) for port in ports]
        for node in self.nodes:
            node.start()
        for node in self.nodes:
            rediscluster.wait_answering(self.cli, node.port, lambda n=node: n.alive)
        rediscluster.create(self.cli, ports, replicas)
        self.wait_ok()

    @property
    def url(self) -> str:
        return f"redis://{self.nodes[0].name}/0"

    def urls(self) -> list[str]:
        return [f"redis://{node.name}/0" for node in self.nodes]

    def cmd(self, node: ClusterNode, *args: str, timeout: float = 10) -> str:
        return rediscluster.cli(self.cli, node.port, *args, timeout=timeout)

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Every live node agrees the cluster is ok and knows every slot's master."""
        rediscluster.wait_ok(self.cli, [node.port for node in self.nodes if node.alive], timeout)

    def masters(self) -> list[ClusterNode]:
        """Live nodes that are masters holding slots, as the first live node sees them."""
        live = [node for node in self.nodes if node.alive]
        text = self.cmd(live[0], "CLUSTER", "NODES")
        ports = set()
        for row in text.splitlines():
            fields = row.split()
            if "master" in fields[2] and "fail" not in fields[2] and len(fields) > 8:
                ports.add(int(fields[1].split("@")[0].rsplit(":", 1)[1]))
        return [node for node in live if node.port in ports]

    def node_of(self, key: str) -> ClusterNode:
        """The master that holds ``key``'s slot now."""
        node = self.holder(key)
        if node is None:
            raise LookupError(f"no live master holds the slot of {key}")
        return node

    def holder(self, key: str) -> ClusterNode | None:
        """The master that holds ``key``'s slot now; None while none claims it (during a failover)."""
        slot = rediscluster.key_slot(self.cli, self.nodes[0].port, key)
        for node in self.masters():
            if any(low <= slot <= high for low, high in rediscluster.own_slots(self.cli, node.port)):
                return node
        return None

    def shard_channels(self, node: ClusterNode) -> list[str]:
        return self.cmd(node, "PUBSUB", "SHARDCHANNELS").split()

    def stop(self) -> None:
        for node in self.nodes:
            if node.alive:
                assert node.proc is not None
                node.proc.send_signal(signal.SIGTERM)
        for node in self.nodes:
            if node.proc is not None:
                try:
                    node.proc.wait(10)
                except subprocess.TimeoutExpired:
                    node.proc.kill()
                    node.proc.wait()
        shutil.rmtree(self._tmp, ignore_errors=True)
        if os.path.exists(self._tmp):
            raise RuntimeError(f"could not remove {self._tmp}")
