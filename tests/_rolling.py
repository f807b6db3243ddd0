"""A rolling restart under load: chat-svc instances on one Redis behind a real HAProxy.

``Balancer`` is Debian's haproxy in TCP mode in front of the instances, health-checking each
one's ``/readyz`` on its chat port (``option httpchk``, ``http-check expect status 200``), so
an instance that starts draining (503 at once) gets no new connection within one check
interval, and a restarted one gets them again once it is ready. ``Fleet`` keeps the instances
on fixed ports, so one can be stopped with SIGTERM (the lame-duck drain) and started again on
the same port, as a Kubernetes rollout or ``docker compose up`` of a new image does.
"""

from __future__ import annotations

import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from _backplane import metrics, wait_ready
from _chat import ServerProcess, free_port, terminate, wait_for, wait_port
from _redis import RedisServer
from _require import require_binary

Start = Callable[..., ServerProcess]

CHECK_INTERVAL_MS = 200


class Balancer:
    """``haproxy -db`` on a free loopback port, round-robin over ``ports``, checking ``/readyz``."""

    def __init__(self, ports: list[int], directory: Path) -> None:
        exe = require_binary("haproxy")
        self.port = free_port()
        self.stats_port = free_port()
        servers = "\n".join(f"    server chat{i} 127.0.0.1:{port} check" for i, port in enumerate(ports))
        config = directory / "haproxy.cfg"
        config.write_text(
            f"""
global
    maxconn 4096
defaults
    mode tcp
    timeout connect 2s
    timeout client 120s
    timeout server 120s
    retries 3
    option redispatch
frontend chat
    bind 127.0.0.1:{self.port}
    default_backend chat
backend chat
    balance roundrobin
    option httpchk
    http-check send meth GET uri /readyz ver HTTP/1.1 hdr Host chat
    http-check expect status 200
    default-server inter {CHECK_INTERVAL_MS}ms fall 1 rise 1
{servers}
frontend stats
    mode http
    bind 127.0.0.1:{self.stats_port}
    http-request use-service prometheus-exporter if {{ path /metrics }}
    stats enable
    stats uri /stats
"""
        )
        self.proc = subprocess.Popen([exe, "-db", "-f", str(config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        wait_port("127.0.0.1", self.port, proc=self.proc)

    def servers_up(self) -> int:
        """How many backends HAProxy currently sends new connections to (its CSV stats)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.stats_port}/stats;csv", timeout=2) as resp:
            rows = resp.read().decode().splitlines()
        return sum(1 for row in rows if row.startswith("chat,chat") and row.split(",")[17] == "UP")

    def stop(self) -> None:
        terminate(self.proc)


class Fleet:
    """``count`` instances on one Redis, each restartable on its own port."""

    def __init__(self, chat_server: Start, redis: RedisServer, count: int, *args: str) -> None:
        self.chat_server = chat_server
        self.args = ("--redis-url", redis.url, "--flood-rate", "0", *args)
        self.servers = [chat_server(*self.args) for _ in range(count)]
        for srv in self.servers:
            self._ready(srv)

    @property
    def ports(self) -> list[int]:
        return [srv.port for srv in self.servers]

    def _ready(self, srv: ServerProcess) -> None:
        wait_ready(srv)
        wait_for(lambda: metrics(srv)["chat_backplane_up"] == 1, 10, f"backplane up on :{srv.port}")

    def restart(self, index: int, drain_timeout: float = 15.0) -> float:
        """SIGTERM instance ``index``, wait for its drain to end (exit 0), start it again on its port.

        Returns the seconds the drain took.
        """
        old = self.servers[index]
        t0 = time.monotonic()
        old.signal(signal.SIGTERM)
        old.proc.wait(drain_timeout)
        drained = time.monotonic() - t0
        assert old.proc.returncode == 0, f"instance :{old.port} exited {old.proc.returncode}\n{old.log_tail()}"
        new = self.chat_server(*self.args, port=old.port)
        self._ready(new)
        self.servers[index] = new
        return drained
