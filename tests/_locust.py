"""Running the Locust swarm (loadtest/) as a real ``locust`` process, as a user would.

Shared by the swarm's own tests and by the tests that use the swarm as their load
(the rolling restart). ``target`` is a port on 127.0.0.1 or a whole ``--host`` value
(``tcp://a:1,tcp://b:2``). Every run is bounded by ``-t`` and a subprocess timeout.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from _chat import ROOT

LOCUST = [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest")]


def host_arg(target: int | str) -> str:
    return f"tcp://127.0.0.1:{target}" if isinstance(target, int) else target


def start_locust(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    """``locust -f loadtest ARGS`` in the background; its stdout and stderr in one pipe."""
    return subprocess.Popen([*LOCUST, *args], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def headless(tmp_path: Path, target: int | str) -> list[str]:
    """Flags of a headless run against ``target`` that writes tmp_path/summary.json."""
    summary = tmp_path / "summary.json"
    return ["--headless", "--host", host_arg(target), "--summary-json", str(summary), "--only-summary"]


def run_locust(tmp_path: Path, target: int | str, *args: str, timeout: float = 90) -> tuple[int, str, dict[str, Any]]:
    """A headless run to its end: (exit code, everything it printed, the verdict JSON)."""
    proc = start_locust(tmp_path, *headless(tmp_path, target), *args)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    summary = tmp_path / "summary.json"
    assert summary.exists(), out[-3000:]
    return proc.returncode, out, json.loads(summary.read_text())
