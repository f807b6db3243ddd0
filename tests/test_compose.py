"""deploy/compose.yaml brought up for real with the offline images, then torn down.

Two chat-svc instances (published on free 127.0.0.1 ports in place of 9009/9010) share the
Redis backplane; Prometheus scrapes both through their chat ports.  Grafana stays off (its
profile is not enabled: it has no offline image).  Needs the container engine, Debian's
docker-compose and the images from deploy/offline/build-base-image.sh: fails under CI=true
when one is missing, skips elsewhere.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from _chat import ROOT, free_port, get, prometheus_api, scrape
from _docker import TEST_PREFIX, build_image, docker, member, report, wait_chat_ready
from _require import require_binary, require_docker, require_image

pytestmark = [pytest.mark.container, pytest.mark.slow]

COMPOSE_FILE = ROOT / "deploy" / "compose.yaml"
REDIS_IMAGE = os.environ.get("CHAT_TEST_REDIS_IMAGE", "local/redis:bookworm")
PROMETHEUS_IMAGE = os.environ.get("CHAT_TEST_PROMETHEUS_IMAGE", "local/prometheus:bookworm")


@dataclass
class Stack:
    project: str
    a: int
    b: int
    prometheus: int
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


@pytest.fixture(scope="module")
def stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    exe = require_binary("docker-compose")
    require_docker()
    require_image(REDIS_IMAGE)
    require_image(PROMETHEUS_IMAGE)
    tag, _ = build_image()
    s = Stack(
        project=f"{TEST_PREFIX}{uuid.uuid4().hex[:8]}",
        a=free_port(),
        b=free_port(),
        prometheus=free_port(),
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
        "CHAT_BIND_ADDR": "127.0.0.1",
        "CHAT_A_PORT": str(s.a),
        "CHAT_B_PORT": str(s.b),
        "PROMETHEUS_PORT": str(s.prometheus),
    }
    t0 = time.monotonic()
    up = s.run("up", "-d", "--no-build")
    try:
        assert up.returncode == 0, f"compose up failed:\n{up.stdout}\n{up.stderr}"
        for port, name in ((s.a, "chat-a"), (s.b, "chat-b")):
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
    assert sorted(out.split()) == ["chat-a", "chat-b", "prometheus", "redis"]


def test_both_instances_serve_metrics_on_the_chat_port(stack: Stack) -> None:
    for port in (stack.a, stack.b):
        assert scrape(port)["chat_max_clients"] > 0


def test_prometheus_reports_both_targets_up(stack: Stack) -> None:
    deadline = time.monotonic() + 60
    health: dict[str, str] = {}
    while time.monotonic() < deadline:
        try:
            targets = stack.prom("targets")["activeTargets"]
            health = {t["labels"]["instance"]: t["health"] for t in targets if t["labels"]["job"] == "chat-svc"}
            if health == {"chat-a:9009": "up", "chat-b:9009": "up"}:
                break
        except OSError:
            pass
        time.sleep(1)
    assert health == {"chat-a:9009": "up", "chat-b:9009": "up"}, f"{health}\n{stack.logs()[-3000:]}"
    up = stack.prom("query", query='up{job="chat-svc"}')["result"]
    assert sorted((r["metric"]["instance"], r["value"][1]) for r in up) == [
        ("chat-a:9009", "1"),
        ("chat-b:9009", "1"),
    ]
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


def test_chat_across_instances(stack: Stack) -> None:
    """A member on chat-a and one on chat-b share the lobby through Redis."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if all(scrape(p)["chat_backplane_up"] == 1 for p in (stack.a, stack.b)):
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"backplane never came up on both instances\n{stack.logs()[-3000:]}")
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
