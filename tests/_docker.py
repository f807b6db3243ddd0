"""Helpers for the container and compose tests (tests/test_container.py, tests/test_compose.py).

Everything goes through Debian's /usr/bin/docker (see tests/_require.py) and talks to
containers only through ports published on 127.0.0.1.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import re
import subprocess
import time

import pytest
from _chat import ROOT, LineClient
from _require import DOCKER, require_docker, require_image

# Offline base from deploy/offline/build-base-image.sh; override to test another base.
BASE_IMAGE = os.environ.get("CHAT_TEST_BASE_IMAGE", "local/python-base:bookworm")
IMAGE_TAG = os.environ.get("CHAT_TEST_IMAGE", "chat-svc:ci-test")
LABEL = "chat-svc-test=1"
# Every container the tests start, alone or through compose, has a name with this prefix.
TEST_PREFIX = "chatsvc-test-"

STAGE_LABEL = "chat-svc.build-stage"

_built: dict[str, float] = {}
_stages: dict[str, set[str]] = {}


def docker(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = [DOCKER, *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {r.returncode}:\n{r.stderr[-3000:]}")
    return r


def report(request: pytest.FixtureRequest, line: str) -> None:
    """Show a measurement in the pytest output, past output capturing."""
    text = f"[measured] {line}"
    capman = request.config.pluginmanager.getplugin("capturemanager")
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    if capman is None or reporter is None:
        print(text)
        return
    with capman.global_and_fixture_disabled():
        reporter.ensure_newline()
        reporter.write_line(text)


def build_image() -> tuple[str, float]:
    """Build the top-level Dockerfile on BASE_IMAGE with the classic builder, once per session.

    Returns (tag, seconds the build took).  The classic builder is the stricter case: the
    Dockerfile must not need BuildKit features or a registry.
    """
    require_docker()
    require_image(BASE_IMAGE)
    if IMAGE_TAG not in _built:
        t0 = time.monotonic()
        env = {**os.environ, "DOCKER_BUILDKIT": "0"}
        cmd = [
            DOCKER,
            "build",
            "--force-rm",
            "--build-arg",
            f"BASE_IMAGE={BASE_IMAGE}",
            "-t",
            IMAGE_TAG,
            str(ROOT),
        ]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
        if r.returncode != 0:
            raise AssertionError(f"docker build failed ({r.returncode}):\n{(r.stdout + r.stderr)[-5000:]}")
        _built[IMAGE_TAG] = time.monotonic() - t0
        _stages[IMAGE_TAG] = stage_images(r.stdout)
        prune_stale_images(_stages[IMAGE_TAG])
    return IMAGE_TAG, _built[IMAGE_TAG]


def stage_images(build_output: str) -> set[str]:
    """Short ids of the earlier stages' final images in a classic `docker build` log.

    Each stage ends with the ` ---> <id>` line just before the next `Step n/N : FROM`.
    """
    stages, last = set(), None
    for line in build_output.splitlines():
        if re.match(r"Step \d+/\d+ : FROM ", line) and last:
            stages.add(last)
        if m := re.fullmatch(r" ---> ([0-9a-f]{12})", line):
            last = m.group(1)
    return stages


def built_stages(tag: str) -> set[str]:
    """The stage images of this session's build of `tag` (see build_image)."""
    return _stages[tag]


def untagged_images() -> set[str]:
    """Untagged chat-svc images: build stages, and final images whose tag moved to a newer build."""
    found: set[str] = set()
    for label in (STAGE_LABEL, "org.opencontainers.image.title=chat-svc"):
        r = docker("images", "-q", "--filter", "dangling=true", "--filter", f"label={label}")
        found.update(r.stdout.split())
    return found


def prune_stale_images(keep: set[str]) -> None:
    """Remove untagged chat-svc images other than `keep`, the current build's stage images.

    The classic builder keeps every earlier stage as an untagged image, and a rebuild leaves
    the previous final image untagged. The current build's stages are its layer cache and
    stay; the rest are left over from older source trees and would pile up with every change.
    A test run that was killed can leave its containers behind (all named chatsvc-test-*),
    and a container pins its image, so those go first; images that other containers still
    use are left alone (see foreign_images).
    """
    assert keep, "no stage images found in the build log: has its format changed?"
    stale = sorted(untagged_images() - keep)
    for image in stale:
        for cid, name in _containers_of(image):
            if name.startswith(TEST_PREFIX):
                docker("rm", "-f", "-v", cid, check=False)
    if stale:
        docker("rmi", *stale, check=False)


def foreign_images() -> set[str]:
    """Untagged chat-svc images that containers not made by these tests still use."""
    return {
        image
        for image in untagged_images()
        if any(not name.startswith(TEST_PREFIX) for _, name in _containers_of(image))
    }


def _containers_of(image: str) -> list[tuple[str, str]]:
    """(id, name) of every container, running or not, made from `image`."""
    out = docker("ps", "-a", "--filter", f"ancestor={image}", "--format", "{{.ID}} {{.Names}}")
    pairs = (line.split(maxsplit=1) for line in out.stdout.splitlines())
    return [(cid, name) for cid, name in pairs]


def image_size(tag: str) -> int:
    return int(docker("image", "inspect", "-f", "{{.Size}}", tag).stdout.strip())


def inspect(name: str) -> dict:
    return json.loads(docker("inspect", name).stdout)[0]


def member(port: int, nick: str) -> LineClient:
    """Connect, read the welcome and take a nick."""
    c = LineClient("127.0.0.1", port)
    c.expect("* welcome to chat-svc")
    c.send(f"/nick {nick}")
    c.expect_re(rf"is now known as {re.escape(nick)}$")
    return c


def wait_chat_ready(port: int, timeout: float = 30.0, what: str = "container") -> None:
    """Until a connection to 127.0.0.1:port gets the welcome line.

    docker-proxy accepts on the host port before the server listens in the container, so a
    successful connect is not enough: wait for the first protocol line.
    """
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            c = LineClient("127.0.0.1", port, timeout=2)
            try:
                c.expect("* welcome", timeout=2)
                return
            finally:
                c.close()
        except (OSError, AssertionError) as exc:
            last = exc
            time.sleep(0.25)
    raise AssertionError(f"{what} on 127.0.0.1:{port} never sent the welcome line: {last}")


def free_net_prefix() -> str:
    """A random ``10.209.N`` whose /24 no docker network uses, for compose's CHAT_NET_PREFIX.

    The compose network has a fixed subnet (HAProxy's address is the one the instances trust
    with PROXY headers); a stack of another test run may hold the default one.
    """
    ids = docker("network", "ls", "-q").stdout.split()
    out = docker("network", "inspect", "-f", "{{range .IPAM.Config}}{{.Subnet}} {{end}}", *ids).stdout
    used = [ipaddress.ip_network(cidr, strict=False) for cidr in out.split() if "." in cidr]
    free = [n for n in range(256) if not any(ipaddress.ip_network(f"10.209.{n}.0/24").overlaps(u) for u in used)]
    return f"10.209.{random.choice(free)}"
