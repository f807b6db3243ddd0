"""The benchmark's smoke mode: a few seconds per server, correctness only (no performance bounds).

``python -m bench --smoke`` builds bench/chatload.c and bench/broadcaster.c with gcc, starts
chat-svc (driven over TCP and over WebSocket), the seed's server, the C broadcaster and (when
installed) ngircd on free loopback ports, and checks that every member receives every line
(0 loss; no torn, duplicated or reordered lines except from the seed, whose chunk relay tears
lines by design), that an idle room's broadcast reaches every member, and that every server
exited cleanly after SIGTERM with no failure in its log. The performance targets are checked
by the full run, not here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from _chat import ROOT
from _require import missing, require_binary

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.machine import Pinning, machine_info
from bench.report import SCHEMA, Results, check_targets
from bench.scenarios import Idle
from bench.servers import find_ngircd

SmokeRun = tuple[subprocess.CompletedProcess[str], dict[str, Any]]


def _smoke(results_dir: Path, *args: str) -> SmokeRun:
    require_binary("gcc")
    cmd = [sys.executable, "-m", "bench", "--smoke", "--results-dir", str(results_dir), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    return r, json.loads((results_dir / "smoke.json").read_text())


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> SmokeRun:
    return _smoke(tmp_path_factory.mktemp("bench"))


@pytest.mark.slow
def test_bench_smoke_every_member_gets_every_line(smoke: SmokeRun) -> None:
    r, results = smoke
    assert r.returncode == 0, f"bench smoke failed:\n{r.stdout}\n{r.stderr[-4000:]}"
    assert results["schema"] == 2 and results["mode"] == "smoke"
    assert results["smoke"]["problems"] == [] and results["server_problems"] == []
    runs = results["smoke"]["runs"]
    for kind in ("chat-svc", "c-epoll"):
        run = runs[kind]
        assert run["delivered"] > 0 and run["lost"] == 0 and run["sync_ok"], kind
        assert run["malformed"] == 0 and run["duplicates"] == 0 and run["out_of_order"] == 0, kind
    seed = runs["seed"]
    assert seed["delivered"] > 0 and seed["lost"] == 0
    idle = runs["idle"]["idle"]
    assert idle["probe_delivered"] == idle["probe_expected"] == runs["idle"]["members"] - 1
    ids = runs["chat-svc-ids"]
    assert ids["delivered"] > 0 and ids["lost"] == 0
    assert ids["id_missing"] == ids["id_errors"] == ids["id_mismatch"] == 0
    storm = results["smoke"]["storm"]
    assert storm["back"] == storm["complete"] == storm["members"] > 0, storm
    assert storm["run"]["lost"] == 0 and storm["run"]["duplicates"] == 0 and storm["run"]["out_of_order"] == 0
    assert len(results["runs"]) == len(runs) + 1  # the storm's run


@pytest.mark.slow
def test_bench_smoke_drives_ngircd_over_irc(smoke: SmokeRun) -> None:
    if find_ngircd() is None:
        missing("ngircd is not installed (Debian package ngircd)")
    _, results = smoke
    run = results["smoke"]["runs"]["ngircd"]
    assert run["protocol"] == "irc" and run["join_failed"] == 0 and run["sync_ok"]
    assert run["delivered"] == run["expected"] > 0 and run["lost"] == 0
    assert run["malformed"] == 0 and run["duplicates"] == 0 and run["out_of_order"] == 0


@pytest.mark.slow
def test_bench_smoke_drives_chat_svc_over_websocket(smoke: SmokeRun) -> None:
    _, results = smoke
    runs = results["smoke"]["runs"]
    run = runs["chat-svc-ws"]
    assert run["protocol"] == "ws" and run["join_failed"] == 0 and run["sync_ok"]
    assert run["delivered"] == run["expected"] > 0 and run["lost"] == 0
    assert run["malformed"] == 0 and run["duplicates"] == 0 and run["out_of_order"] == 0
    idle = runs["idle-chat-svc-ws"]["idle"]
    assert idle["probe_delivered"] == idle["probe_expected"] == runs["idle-chat-svc-ws"]["members"] - 1


@pytest.mark.slow
def test_bench_smoke_fails_when_a_server_logs_a_failure_or_exits_badly(tmp_path: Path) -> None:
    """Deliveries can be perfect while the server logs a bug and exits with the wrong code."""
    planted = (
        "import atexit, os, sys; "
        "atexit.register(lambda: (print('session_failed (planted by the test)', flush=True), os._exit(3))); "
        "from chat_svc.__main__ import main; main()"
    )
    r, results = _smoke(tmp_path, "--servers", "chat-svc", "--server-cmd", f'{sys.executable} -c "{planted}"')
    assert r.returncode == 1, r.stdout + r.stderr[-3000:]
    assert results["smoke"]["runs"]["chat-svc"]["lost"] == 0  # the lines all arrived
    problems = "\n".join(results["smoke"]["problems"])
    assert "exited with 3 after SIGTERM" in problems and "logged session_failed" in problems
    assert "smoke: FAILED" in r.stdout


def test_run_py_still_runs_the_benchmark() -> None:
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--help"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and "python -m bench" in r.stdout, r.stderr


def test_the_idle_verdict_counts_the_members_asked_for_not_those_that_got_in() -> None:
    """A run where 10,116 of 19,000 WebSocket members got in, all reached, printed PASS."""

    def verdict(delivered: int, got_in: int) -> str:
        idle = Idle("chat-svc-ws", 19000, 1, delivered, got_in, 2.77, 2.7, 9.6, 97.5, 45.0, 379.0, 0.3)
        results = Results(SCHEMA, "quick", machine_info(), Pinning(False), None, idle_ws=idle)  # type: ignore[arg-type]
        (target,) = [t for t in check_targets(results) if "members, every one reached" in t.target]
        return f"{target.status} {target.measured}"

    assert verdict(10116, 10116).startswith("FAIL 10,116/18,999 reached (10,116 got in)")
    assert verdict(18998, 18999).startswith("FAIL")
    assert verdict(18999, 18999).startswith("PASS 18,999/18,999 reached")
