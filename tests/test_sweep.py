"""The capacity sweep (``python -m loadtest._sweep``): its arithmetic, and a real sweep on loopback.

The unit tests import ``loadtest._sweep`` directly (it imports neither Locust nor gevent);
the end-to-end test runs the sweep as a subprocess against the real server, as a user would.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from _chat import ROOT
from _require import require_installed

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def test_sweep_reads_server_histogram_quantiles_between_scrapes() -> None:
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from bench.servers import Scrape
    from loadtest._sweep import histogram_quantile

    name = "chat_fanout_latency_seconds"
    registry = CollectorRegistry()
    hist = Histogram(name, "fan-out latency", buckets=(0.001, 0.01), registry=registry)

    def page() -> Scrape:
        return Scrape.parse(generate_latest(registry).decode())

    for _ in range(50):
        hist.observe(0.0005)
    before = page()
    for value, times in ((0.0005, 90), (0.005, 9), (1.0, 1)):
        for _ in range(times):
            hist.observe(value)
    after = page()
    assert histogram_quantile(before, after, name, 0.5) == 0.001
    assert histogram_quantile(before, after, name, 0.99) == 0.01
    assert histogram_quantile(before, after, name, 0.999) == float("inf")
    assert histogram_quantile(after, after, name, 0.5) is None  # nothing observed


def test_sweep_medians_keep_the_worst_loss() -> None:
    from loadtest._sweep import FIELDS, medians

    def run(p99: float, loss: float) -> dict[str, Any]:
        row: dict[str, Any] = dict.fromkeys(FIELDS, 1.0)
        row.update(users=100, msg_rate=1.0, p99_ms=p99, loss_ratio=loss, passed=loss == 0)
        return row

    (row,) = medians([run(5.0, 0.0), run(900.0, 0.0), run(7.0, 0.01)])
    assert row["runs"] == 3 and row["p99_ms"] == 7.0
    assert row["loss_ratio"] == 0.01 and row["passed"] is False


@pytest.mark.slow
def test_capacity_sweep_writes_csv_png_and_table(chat_server: Any, tmp_path: Path) -> None:
    require_installed("locust", "matplotlib")
    srv = chat_server("--flood-rate", "0")
    env = {**os.environ, "MPLBACKEND": "Agg"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "loadtest._sweep",
            "--host",
            f"tcp://127.0.0.1:{srv.port}",
            "--users",
            "10,20",
            "--rates",
            "1",
            "--duration",
            "4",
            "--out",
            str(tmp_path / "cap"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    rows = (tmp_path / "cap.csv").read_text().splitlines()
    assert rows[0].startswith("users,msg_rate,")
    assert len(rows) == 3
    assert len((tmp_path / "cap.runs.csv").read_text().splitlines()) == 3
    assert (tmp_path / "cap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (tmp_path / "cap.md").read_text()
    assert "| users |" in table and table.count("\n| 10 |") + table.count("\n| 20 |") == 2


@pytest.mark.slow
def test_capacity_sweep_starts_its_own_server_and_checks_it_stopped_cleanly(tmp_path: Path) -> None:
    require_installed("locust", "matplotlib")
    proc = subprocess.run(
        [sys.executable, "-m", "loadtest._sweep", "--users", "10", "--rates", "1", "--duration", "4",
         "--out", str(tmp_path / "cap")],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "MPLBACKEND": "Agg"},
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "server problem" not in proc.stderr
    (row,) = list(csv.DictReader((tmp_path / "cap.csv").open()))
    assert row["users"] == "10" and float(row["deliveries_per_s"]) > 0 and float(row["server_cpu_pct"]) > 0


def test_capacity_page_renders_recorded_runs_beside_the_benchmark_runs(tmp_path: Path) -> None:
    """--from-runs re-renders docs/capacity.* from recorded runs, with the C generator's runs and knee."""
    require_installed("matplotlib")
    from loadtest._sweep import BenchRuns

    recorded = ROOT / "bench" / "results" / "full.json"
    bench = BenchRuns.read(recorded)
    assert bench.knee is not None and bench.runs["chat-svc"]
    assert any(p99 > 50 for _, p99, _ in bench.runs["chat-svc"])  # the search went past the knee
    proc = subprocess.run(
        [sys.executable, "-m", "loadtest._sweep", "--from-runs", str(ROOT / "docs" / "capacity.runs.csv"),
         "--bench", str(recorded), "--when", "2026-11-28", "--out", str(tmp_path / "cap")],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "MPLBACKEND": "Agg"},
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert (tmp_path / "cap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    steps = list(csv.DictReader((tmp_path / "cap.csv").open()))
    assert len(steps) == len({(r["users"], r["msg_rate"]) for r in csv.DictReader((tmp_path / "cap.runs.csv").open())})
    assert "Capacity sweep (2026-11-28;" in (tmp_path / "cap.md").read_text()
