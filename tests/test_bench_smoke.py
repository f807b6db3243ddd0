"""The benchmark's smoke mode: a few seconds, correctness only (no performance bounds).

It builds bench/chatload.c with gcc, starts chat-svc and the seed's server on free
loopback ports and checks that every member receives every line (0 loss, no torn,
duplicated or reordered lines from chat-svc) and that an idle room's broadcast
reaches every member. The performance targets are checked by `python bench/run.py`,
not here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from _require import require_binary

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_smoke_every_member_gets_every_line(tmp_path: Path) -> None:
    require_binary("gcc")
    cmd = [sys.executable, str(ROOT / "bench" / "run.py"), "--smoke", "--results-dir", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert r.returncode == 0, f"bench smoke failed:\n{r.stdout}\n{r.stderr[-4000:]}"
    results = json.loads((tmp_path / "smoke.json").read_text())
    assert results["problems"] == []
    ours = results["smoke"]["chat-svc"]
    assert ours["delivered"] > 0 and ours["lost"] == 0 and ours["sync_ok"]
    assert ours["malformed"] == 0 and ours["duplicates"] == 0 and ours["out_of_order"] == 0
    seed = results["smoke"]["seed"]
    assert seed["delivered"] > 0 and seed["lost"] == 0
    idle = results["smoke"]["idle"]
    assert idle["probe_expected"] and idle["probe_delivered"] == idle["probe_expected"]
