"""Missing components fail under CI and skip, with the reason, elsewhere."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import shutil
import subprocess
from types import ModuleType

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing(reason: str) -> None:
    """Fail in CI, where every component must be installed; skip on a laptop."""
    if IN_CI:
        pytest.fail(f"CI=true but {reason}", pytrace=False)
    pytest.skip(reason)


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        missing(f"{name} is not installed")
    assert path is not None
    return path


def require_module(name: str) -> ModuleType:
    """Import an optional Python module (e.g. kubernetes_validate from the dev extra)."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        missing(f"Python module {name} is not installed ({exc}); pip install -e '.[dev]'")
        raise


def require_installed(*names: str) -> None:
    """Check that modules of the loadtest extra are installed, without importing them here:
    Locust runs as a subprocess, and importing it would gevent-monkey-patch all of pytest."""
    for name in names:
        if importlib.util.find_spec(name) is None:
            missing(f"Python module {name} is not installed; pip install -e '.[loadtest]'")


# Debian's 20.10 client.  A newer /usr/local/bin/docker without buildx breaks BuildKit builds.
DOCKER = "/usr/bin/docker"
SETUP_HINT = "run `bash .ci/container-setup.sh` as root"


@functools.lru_cache(maxsize=1)
def _docker_problem() -> str | None:
    if not (os.path.isfile(DOCKER) and os.access(DOCKER, os.X_OK)):
        return f"container engine client {DOCKER} is not installed; {SETUP_HINT}"
    try:
        r = subprocess.run([DOCKER, "info"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return f"`{DOCKER} info` timed out; is dockerd healthy? {SETUP_HINT}"
    if r.returncode != 0:
        lines = (r.stdout + r.stderr).splitlines()
        errors = [ln.strip() for ln in lines if "error" in ln.lower() or "cannot" in ln.lower()]
        err = "; ".join(errors[:3]) or f"exit {r.returncode}"
        return f"container engine not reachable ({err}); {SETUP_HINT}"
    return None


def require_docker() -> str:
    """Path of a docker client (/usr/bin/docker) whose engine answers."""
    problem = _docker_problem()
    if problem:
        missing(problem)
    return DOCKER


def require_image(tag: str) -> str:
    """A local image, e.g. local/python-base:bookworm from deploy/offline/build-base-image.sh."""
    docker = require_docker()
    cmd = [docker, "image", "inspect", tag]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        script = "deploy/offline/build-base-image.sh all"
        missing(f"image {tag} is not built; run {script} ({SETUP_HINT})")
    return tag
