"""A Redis Cluster on loopback from Debian's redis-server and redis-cli, for the benchmark's
``shards`` scenario and the tests' fixture (tests/_rediscluster.py) alike.

Each node listens on its port and its cluster bus on port + 10000, so ports are taken below
55536 with both free. Every node needs a directory of its own (its nodes.conf). Nodes run with
``cluster-require-full-coverage no``, what the service documents for production: without it
one dead master stops every shard, and "a dead shard costs only its rooms" cannot hold.
"""

from __future__ import annotations

import random
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

BUS_OFFSET = 10000
HIGHEST_PORT = 65535 - BUS_OFFSET


def ports_free(port: int) -> bool:
    """Both the node's port and its cluster-bus port can be bound on loopback now."""
    for candidate in (port, port + BUS_OFFSET):
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
        if port not in ports and ports_free(port):
            ports.append(port)
    return ports


def node_argv(exe: str, port: int, directory: Path, node_timeout_ms: int | None = None) -> list[str]:
    """redis-server as one cluster node on loopback, nothing persisted but its nodes.conf."""
    argv = [exe, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(directory)]
    argv += ["--save", "", "--appendonly", "no", "--protected-mode", "no"]
    argv += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-require-full-coverage", "no"]
    if node_timeout_ms is not None:
        argv += ["--cluster-node-timeout", str(node_timeout_ms)]
    return argv


def cli(exe: str, port: int, *args: str, timeout: float = 10) -> str:
    """One redis-cli command against the node on ``port``; its stdout."""
    done = subprocess.run(
        [exe, "-h", "127.0.0.1", "-p", str(port), *args], capture_output=True, text=True, timeout=timeout
    )
    return done.stdout


def wait_answering(exe: str, port: int, alive: Callable[[], bool], timeout: float = 10.0) -> None:
    """Until the node answers PING; fails at once if its process is gone."""
    deadline = time.monotonic() + timeout
    while cli(exe, port, "PING").strip() != "PONG":
        if not alive():
            raise RuntimeError(f"redis-server on {port} exited")
        if time.monotonic() > deadline:
            raise TimeoutError(f"redis-server on {port} not answering")
        time.sleep(0.05)


def create(exe: str, ports: Sequence[int], replicas: int = 0) -> None:
    """``redis-cli --cluster create``: the slots split evenly over the masters (the first
    ``len(ports) / (replicas + 1)`` nodes), ``replicas`` replicas each."""
    addresses = [f"127.0.0.1:{port}" for port in ports]
    subprocess.run(
        [exe, "--cluster", "create", *addresses, "--cluster-replicas", str(replicas), "--cluster-yes"],
        check=True,
        capture_output=True,
        timeout=60,
    )


def wait_ok(exe: str, ports: Sequence[int], timeout: float = 30.0) -> None:
    """Until every node on ``ports`` says ``cluster_state:ok``."""
    deadline = time.monotonic() + timeout
    while not all("cluster_state:ok" in cli(exe, port, "CLUSTER", "INFO") for port in ports):
        if time.monotonic() > deadline:
            raise TimeoutError("cluster not ok")
        time.sleep(0.1)


def own_slots(exe: str, port: int) -> list[tuple[int, int]]:
    """The slot ranges the node on ``port`` holds, as it sees itself (``myself`` in CLUSTER NODES)."""
    for row in cli(exe, port, "CLUSTER", "NODES").splitlines():
        fields = row.split()
        if len(fields) < 3 or "myself" not in fields[2]:
            continue
        spans = []
        for span in fields[8:]:
            low, _, high = span.partition("-")
            if low.isdigit():
                spans.append((int(low), int(high or low)))
        return spans
    return []


def key_slot(exe: str, port: int, key: str) -> int:
    return int(cli(exe, port, "CLUSTER", "KEYSLOT", key).strip())
