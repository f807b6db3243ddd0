"""A real Redis Cluster on loopback, from Debian's redis-server and redis-cli.

Each node listens on its port and its cluster bus on port + 10000, so ports
are taken below 55536 with both free.  Every node runs in a temp dir of its
own (its nodes.conf).  ``cluster-require-full-coverage no`` is what the
service documents for production: without it one dead master stops every
shard, and the service's "a dead shard costs only its rooms" cannot hold.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from _require import require_binary

# A master is failed (and its replica promoted) after this; small so failover tests stay short.
NODE_TIMEOUT_MS = 1000


def _free(port: int) -> bool:
    for candidate in (port, port + 10000):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", candidate))
            except OSError:
                return False
    return True


def cluster_ports(count: int) -> list[int]:
    """``count`` ports below 55536 whose cluster-bus ports (+10000) are free too."""
    ports: list[int] = []
    while len(ports) < count:
        port = random.randint(20000, 45000)
        if port not in ports and _free(port):
            ports.append(port)
    return ports


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
        argv = [self.exe, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.dir)]
        argv += ["--save", "", "--appendonly", "no", "--protected-mode", "no"]
        argv += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
        argv += ["--cluster-node-timeout", str(NODE_TIMEOUT_MS), "--cluster-require-full-coverage", "no"]
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
        self.nodes = [ClusterNode(self.exe, port, self._tmp) for port in cluster_ports(masters * (replicas + 1))]
        for node in self.nodes:
            node.start()
        for node in self.nodes:
            self._wait_answering(node)
        addresses = [node.name for node in self.nodes]
        subprocess.run(
            [self.cli, "--cluster", "create", *addresses, "--cluster-replicas", str(replicas), "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        self.wait_ok()

    @property
    def url(self) -> str:
        return f"redis://{self.nodes[0].name}/0"

    def urls(self) -> list[str]:
        return [f"redis://{node.name}/0" for node in self.nodes]

    def cmd(self, node: ClusterNode, *args: str, timeout: float = 10) -> str:
        done = subprocess.run(
            [self.cli, "-h", "127.0.0.1", "-p", str(node.port), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return done.stdout

    def _wait_answering(self, node: ClusterNode, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.cmd(node, "PING").strip() != "PONG":
            if not node.alive:
                raise RuntimeError(f"redis-server on {node.port} exited")
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis-server on {node.port} not answering")
            time.sleep(0.05)

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Every live node agrees the cluster is ok and knows every slot's master."""
        deadline = time.monotonic() + timeout
        while True:
            live = [node for node in self.nodes if node.alive]
            if all("cluster_state:ok" in self.cmd(node, "CLUSTER", "INFO") for node in live):
                return
            if time.monotonic() > deadline:
                raise TimeoutError("cluster not ok")
            time.sleep(0.1)

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
        slot = int(self.cmd(self.nodes[0], "CLUSTER", "KEYSLOT", key).strip())
        for node in self.masters():
            for row in self.cmd(node, "CLUSTER", "NODES").splitlines():
                fields = row.split()
                if "myself" not in fields[2]:
                    continue
                for span in fields[8:]:
                    low, _, high = span.partition("-")
                    if low.isdigit() and int(low) <= slot <= int(high or low):
                        return node
        raise LookupError(f"no live master holds slot {slot}")

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
