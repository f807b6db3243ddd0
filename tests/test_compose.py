"""deploy/compose.yaml brought up for real with the offline images, then torn down.

Two chat-svc instances behind HAProxy (every port published on a free 127.0.0.1 port, the
network on a free 10.209.N.0/24) share the Redis backplane; Prometheus scrapes both through
their chat ports, and HAProxy.  Grafana stays off (its profile is not enabled: it has no
offline image).  Needs the container engine, Debian's docker-compose and the images from
deploy/offline/build-base-image.sh: fails under CI=true when one is missing, skips elsewhere.
"""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from _chat import ROOT, LineClient, free_port, get, prometheus_api, scrape
from _docker import TEST_PREFIX, build_image, docker, free_net_prefix, member, report, wait_chat_ready
from _require import DOCKER, require_binary, require_docker, require_image

pytestmark = [pytest.mark.container, pytest.mark.slow]

COMPOSE_FILE = ROOT / "deploy" / "compose.yaml"
REDIS_IMAGE = os.environ.get("CHAT_TEST_REDIS_IMAGE", "local/redis:bookworm")
PROMETHEUS_IMAGE = os.environ.get("CHAT_TEST_PROMETHEUS_IMAGE", "local/prometheus:bookworm")
HAPROXY_IMAGE = os.environ.get("CHAT_TEST_HAPROXY_IMAGE", "local/haproxy:bookworm")


@dataclass
class Stack:
    project: str
    lb: int
    a: int
    b: int
    stats: int
    prometheus: int
    net: str
    compose: list[str]
    env: dict[str, str]

    def run(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.compose, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
            cwd=ROOT,
        )

    def logs(self) -> str:
        r = self.run("logs", "--no-color", "--tail", "40", timeout=60)
        return r.stdout + r.stderr

    def prom(self, path: str, **params: str) -> Any:
        return prometheus_api(self.prometheus, path, **params)

    def balancer(self) -> dict[str, tuple[str, int]]:
        """HAProxy's view of each instance: (status, current sessions), from its CSV stats."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.stats}/stats;csv", timeout=2) as resp:
            rows = [row.split(",") for row in resp.read().decode().splitlines()]
        return {row[1]: (row[17], int(row[4])) for row in rows if row[0] == "chat" and row[1].startswith("chat-")}


@pytest.fixture(scope="module")
def stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    exe = require_binary("docker-compose")
    require_docker()
    require_image(REDIS_IMAGE)
    require_image(PROMETHEUS_IMAGE)
    require_image(HAPROXY_IMAGE)
    tag, _ = build_image()
    s = Stack(
        project=f"{TEST_PREFIX}{uuid.uuid4().hex[:8]}",
        lb=free_port(),
        a=free_port(),
        b=free_port(),
        stats=free_port(),
        prometheus=free_port(),
        net=free_net_prefix(),
        compose=[],
        env={},
    )
    s.compose = [exe, "-p", s.project, "-f", str(COMPOSE_FILE)]
    s.env = {
        **os.environ,
        "PATH": "/usr/bin:/bin:/usr/sbin:/sbin:" + os.environ.get("PATH", ""),
        "COMPOSE_DOCKER_CLI_BUILD": "0",
        "CHAT_IMAGE": tag,
        "REDIS_IMAGE": REDIS_IMAGE,
        "PROMETHEUS_IMAGE": PROMETHEUS_IMAGE,
        "HAPROXY_IMAGE": HAPROXY_IMAGE,
        "CHAT_BIND_ADDR": "127.0.0.1",
        "CHAT_PORT": str(s.lb),
        "CHAT_A_PORT": str(s.a),
        "CHAT_B_PORT": str(s.b),
        "HAPROXY_STATS_PORT": str(s.stats),
        "PROMETHEUS_PORT": str(s.prometheus),
        "CHAT_NET_PREFIX": s.net,
    }
    t0 = time.monotonic()
    up = s.run("up", "-d", "--no-build")
    try:
        assert up.returncode == 0, f"compose up failed:\n{up.stdout}\n{up.stderr}"
        for port, name in ((s.a, "chat-a"), (s.b, "chat-b"), (s.lb, "haproxy")):
            wait_chat_ready(port, timeout=60, what=f"compose service {name}")
        report(request, f"compose stack up and chatting in {time.monotonic() - t0:.1f} s")
    except BaseException as exc:
        logs = s.logs()
        s.run("down", "-v", "--remove-orphans", "-t", "5")
        raise AssertionError(f"{exc}\n--- compose logs ---\n{logs[-5000:]}") from exc
    yield s
    down = s.run("down", "-v", "--remove-orphans", "-t", "5")
    assert down.returncode == 0, down.stderr
    left = docker("ps", "-aq", "--filter", f"label=com.docker.compose.project={s.project}").stdout.strip()
    assert not left, f"containers left behind: {left}"


def test_services_running_without_grafana(stack: Stack) -> None:
    out = docker(
        "ps", "--filter", f"label=com.docker.compose.project={stack.project}",
        "--format", '{{.Label "com.docker.compose.service"}}',
    ).stdout  # fmt: skip
    assert sorted(out.split()) == ["chat-a", "chat-b", "haproxy", "prometheus", "redis"]


def test_both_instances_serve_metrics_on_the_chat_port(stack: Stack) -> None:
    for port in (stack.a, stack.b):
        assert scrape(port)["chat_max_clients"] > 0


UP_TARGETS = {"chat-a:9009": "up", "chat-b:9009": "up", "haproxy:8404": "up"}


def test_prometheus_reports_both_targets_up(stack: Stack) -> None:
    deadline = time.monotonic() + 60
    health: dict[str, str] = {}
    while time.monotonic() < deadline:
        try:
            targets = stack.prom("targets")["activeTargets"]
            health = {t["labels"]["instance"]: t["health"] for t in targets if t["labels"]["job"] != "prometheus"}
            if health == UP_TARGETS:
                break
        except OSError:
            pass
        time.sleep(1)
    assert health == UP_TARGETS, f"{health}\n{stack.logs()[-3000:]}"
    up = stack.prom("query", query='up{job="chat-svc"}')["result"]
    assert sorted((r["metric"]["instance"], r["value"][1]) for r in up) == [
        ("chat-a:9009", "1"),
        ("chat-b:9009", "1"),
    ]
    assert [r["value"][1] for r in stack.prom("query", query='up{job="haproxy"}')["result"]] == ["1"]
    rules = {r["name"] for g in stack.prom("rules")["groups"] for r in g["rules"]}
    assert "ChatSvcInstanceDown" in rules


def test_prometheus_targets_page(stack: Stack) -> None:
    """The page the docs name: Debian's Prometheus 2.42 (the offline image) has only the
    classic UI, so /targets is a 404 there and /classic/targets lists both instances."""
    served: dict[str, str] = {}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the page lists targets once discovery has run
        pages = {path: get(stack.prometheus, path) for path in ("/targets", "/classic/targets")}
        served = {path: body for path, (code, body, _) in pages.items() if code == 200}
        assert served, {path: code for path, (code, _, _) in pages.items()}
        if all("chat-a:9009" in body and "chat-b:9009" in body for body in served.values()):
            return
        time.sleep(1)
    raise AssertionError(f"targets missing from {sorted(served)}: {next(iter(served.values()))[-2000:]}")


def wait_backplane(stack: Stack) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if all(scrape(p)["chat_backplane_up"] == 1 for p in (stack.a, stack.b)):
            return
        time.sleep(0.5)
    raise AssertionError(f"backplane never came up on both instances\n{stack.logs()[-3000:]}")


def test_chat_across_instances(stack: Stack) -> None:
    """A member on chat-a and one on chat-b share the lobby through Redis."""
    wait_backplane(stack)
    alice = member(stack.a, "alice")
    bob = member(stack.b, "bob")
    try:
        # the first line may race bob's room subscription on chat-b: resend until it lands
        got = None
        for i in range(20):
            alice.send(f"ping {i}")
            try:
                got = bob.expect_re(r"^\[alice\] ping \d+$", timeout=0.5)
                break
            except AssertionError:
                continue
        assert got, f"no line crossed from chat-a to chat-b\n{stack.logs()[-3000:]}"
        for i in range(5):
            alice.send(f"in order {i}")
        for i in range(5):
            bob.expect_re(rf"^\[alice\] in order {i}$", timeout=5)
        bob.send("hello from chat-b")
        alice.expect_re(r"^\[bob\] hello from chat-b$", timeout=5)
    finally:
        alice.close()
        bob.close()
    # Prometheus scrapes every 5 s: wait until it has seen both instances' backplane up.
    deadline = time.monotonic() + 30
    seen: list[tuple[str, str]] = []
    while time.monotonic() < deadline:
        result = stack.prom("query", query="chat_backplane_up")["result"]
        seen = sorted((r["metric"]["instance"], r["value"][1]) for r in result)
        if seen == [("chat-a:9009", "1"), ("chat-b:9009", "1")]:
            break
        time.sleep(1)
    assert seen == [("chat-a:9009", "1"), ("chat-b:9009", "1")], seen


def test_balancer_passes_the_real_client(stack: Stack) -> None:
    """Through HAProxy a member chats with one on chat-a's own port, and the server sees the
    client's address from the PROXY v2 header (docker-proxy's, the network's gateway: this
    client is on 127.0.0.1), not HAProxy's .9.  The health checks carry a header too: no
    connection of HAProxy's was refused, and both instances are in rotation."""
    wait_backplane(stack)
    gateway, balancer = f"{stack.net}.1", f"{stack.net}.9"
    assert stack.balancer() == {"chat-a": ("UP", 0), "chat-b": ("UP", 0)}
    carol = LineClient("127.0.0.1", stack.lb)
    alice = member(stack.a, "alice")
    try:
        welcome = carol.expect("* welcome to chat-svc")
        assert welcome.startswith(f"* welcome to chat-svc, you are {gateway}:"), (welcome, balancer)
        carol.send("/nick carol")
        carol.expect_re(r"is now known as carol$")
        got = None
        for i in range(20):  # the first lines may race the room subscription on the other instance
            carol.send(f"via haproxy {i}")
            try:
                got = alice.expect_re(r"^\[carol\] via haproxy \d+$", timeout=0.5)
                break
            except AssertionError:
                continue
        assert got, f"no line crossed from the balancer's member to chat-a\n{stack.logs()[-3000:]}"
        alice.send("hello carol")
        carol.expect_re(r"^\[alice\] hello carol$", timeout=5)
    finally:
        carol.close()
        alice.close()
    for port in (stack.a, stack.b):
        assert scrape(port)["chat_connections_refused_total{reason=proxy_header}"] == 0
    assert {status for status, _ in stack.balancer().values()} == {"UP"}


def test_balancer_reload_keeps_members(stack: Stack) -> None:
    """The documented reload (SIGUSR2 to HAProxy's master, e.g. after adding an instance): a
    member connected through it stays connected and chatting, and new connections are served."""
    before = LineClient("127.0.0.1", stack.lb)
    try:
        before.join("dora")
        r = stack.run("kill", "-s", "USR2", "haproxy", timeout=60)
        assert r.returncode == 0, r.stderr
        deadline = time.monotonic() + 10
        while "Reloading HAProxy" not in stack.run("logs", "--no-color", "haproxy", timeout=60).stdout:
            assert time.monotonic() < deadline, stack.logs()[-3000:]
            time.sleep(0.2)
        after = member(stack.lb, "ed")
        try:
            before.send("still here")
            after.expect_re(r"^\[dora\] still here$", timeout=5)
        finally:
            after.close()
    finally:
        before.close()


def test_docker_stop_moves_balanced_members(stack: Stack, request: pytest.FixtureRequest) -> None:
    """``docker stop`` of chat-a (SIGTERM, the lame-duck drain): /readyz turns 503 and
    HAProxy's checks take chat-a out of rotation before its members are told to reconnect
    (CHAT_DRAIN_DELAY 2 s); a member's reconnect through HAProxy lands on chat-b; chat-a
    exits 0.  The last test of the module: it leaves chat-a stopped."""
    members: dict[str, LineClient] = {}
    try:
        for _ in range(2):  # leastconn puts one on each instance
            c = LineClient("127.0.0.1", stack.lb, timeout=10)
            c.expect("* welcome to chat-svc")
            on = [name for name, (_, sessions) in stack.balancer().items() if sessions == 1 and name not in members]
            assert len(on) == 1, stack.balancer()
            members[on[0]] = c
        assert stack.balancer() == {"chat-a": ("UP", 1), "chat-b": ("UP", 1)}
        container = stack.run("ps", "-q", "chat-a").stdout.strip()
        t0 = time.monotonic()
        stop = subprocess.Popen(
            [DOCKER, "stop", "-t", "15", container], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        status = "UP"
        while not status.startswith("DOWN"):
            assert time.monotonic() - t0 < 10, f"HAProxy still has chat-a {status}\n{stack.logs()[-3000:]}"
            time.sleep(0.05)
            status = stack.balancer()["chat-a"][0]
        out_of_rotation = time.monotonic() - t0
        drained = members["chat-a"]
        early = [line for line in drained.lines_for(0.05) if line.startswith("* server restarting")]
        assert not early, "told to reconnect before HAProxy took chat-a out"
        drained.expect("* server restarting, reconnect", timeout=10)
        told = time.monotonic() - t0
        again = LineClient("127.0.0.1", stack.lb, timeout=10)
        members["again"] = again
        again.expect("* welcome to chat-svc")
        moved = time.monotonic() - t0
        state = stack.balancer()
        assert state["chat-b"] == ("UP", 2), state
        out, _ = stop.communicate(timeout=30)
        assert stop.returncode == 0, out
        stopped = time.monotonic() - t0
        assert docker("inspect", "-f", "{{.State.ExitCode}}", container).stdout.strip() == "0"
        report(
            request,
            f"docker stop chat-a: out of HAProxy's rotation after {out_of_rotation:.2f} s, member told to "
            f"reconnect at {told:.2f} s, back through HAProxy on chat-b at {moved:.2f} s, exited 0 at {stopped:.1f} s",
        )
    finally:
        for c in members.values():
            c.close()
