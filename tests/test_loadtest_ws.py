"""The swarm over WebSocket: a mixed TCP + WebSocket run passes, a server that drops WebSocket lines fails.

Every room of a ``--ws-share`` run holds members of both transports, so each line is judged
for TCP and WebSocket members alike; the verdict's ``by_transport`` splits the expected
deliveries by the sender's and the member's transport. Locust runs as a subprocess against
real servers on loopback, bounded in time.
"""

from __future__ import annotations

import csv
import io
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from _chat import ROOT, free_port, wait_port
from _locust import run_locust
from _require import require_installed

PAIRS = {"tcp->tcp", "tcp->ws", "ws->tcp", "ws->ws"}


@pytest.mark.slow
def test_a_mixed_swarm_of_200_users_passes_with_zero_loss_across_transports(chat_server: Any, tmp_path: Path) -> None:
    require_installed("locust")
    srv = chat_server("--flood-rate", "0")
    rc, out, s = run_locust(
        tmp_path, srv.port, "-u", "200", "-r", "100", "-t", "15s", "--ws-share", "0.5", "--csv", "run", timeout=120
    )
    t = s["totals"]
    assert rc == 0, out[-3000:]
    assert s["passed"] is True and t["members"] == 200 and t["rooms"] == 10
    assert t["lost_deliveries"] == 0 and t["delivered_in_time"] == t["expected_deliveries"] > 20_000
    assert t["duplicates"] == t["out_of_order"] == t["disconnects"] == t["server_errors"] == 0
    assert set(t["by_transport"]) == PAIRS
    for pair, n in t["by_transport"].items():
        assert n["expected"] > 0.2 * t["expected_deliveries"] and n["lost"] == 0, pair
    assert "transports" in out and "tcp->ws" in out
    stats = {(r["Type"], r["Name"]): r for r in csv.DictReader(io.StringIO((tmp_path / "run_stats.csv").read_text()))}
    for transport in ("tcp", "ws"):
        assert int(stats[("join", transport)]["Request Count"]) == 100
        assert int(stats[("fanout", transport)]["Request Count"]) > 0


@pytest.mark.slow
def test_a_server_that_drops_websocket_lines_fails_the_swarm_and_only_ws_members_lost(tmp_path: Path) -> None:
    require_installed("locust")
    port = free_port()
    cmd = [sys.executable, str(ROOT / "tests" / "_ws_dropping_server.py"), "--drop-every", "25", "--",
           "--host", "127.0.0.1", "--port", str(port), "--flood-rate", "0", "--log-format", "json"]  # fmt: skip
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port("127.0.0.1", port, proc=server)
        rc, out, s = run_locust(tmp_path, port, "-u", "40", "-r", "40", "-t", "8s", "--ws-share", "0.5")
    finally:
        server.terminate()
        server.wait(10)
    t = s["totals"]
    assert rc != 0, out[-3000:]
    assert "RESULT: FAIL" in out and "fan-out loss ratio" in out
    assert t["lost_deliveries"] > 0 and t["disconnects"] == 0
    pairs = t["by_transport"]
    assert pairs["tcp->ws"]["lost"] > 0 and pairs["ws->ws"]["lost"] > 0
    assert pairs["tcp->tcp"]["lost"] == pairs["ws->tcp"]["lost"] == 0
