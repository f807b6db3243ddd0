"""The benchmark's shards scenario: the arithmetic and the report, without running it.

Running the scenario at any size takes longer than the smoke may spend on it (a cluster's
creation alone is a few seconds, then two instances and ten generators per backend), so the
figures' arithmetic is checked here on hand-made runs: CPU over a window read off /proc
samples, the side-by-side table, and the extrapolation, which must say it is one. The cluster
the scenario starts comes from bench/rediscluster.py, which tests/_rediscluster.py (the
cluster tests' fixture) uses too.
"""

from __future__ import annotations

import sys

import pytest
from _chat import ROOT

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.report import table
from bench.shards import (
    HEADER,
    ShardCpu,
    ShardRun,
    Shards,
    cores_between,
    extrapolate,
    extrapolation_text,
    median_run,
    rows,
)


def run(backend: str, rate: float, shard_cpu: list[float], lost: int = 0) -> ShardRun:
    shards = [ShardCpu(7000 + i, [f"room-{i}"], cpu, 3.0) for i, cpu in enumerate(shard_cpu)]
    shards.sort(key=lambda s: -(s.cpu or 0))
    return ShardRun(
        backend=backend, rate=rate, members=1000, rooms=10, window_s=5.0, deliveries_per_s=rate * 99,
        expected=int(rate * 99 * 5), delivered=int(rate * 99 * 5) - lost, lost=lost,
        loss_ratio=lost / (rate * 99 * 5), p50_ms=4.0, p99_ms=20.0, sync_ok=True, correct=True, valid=True,
        gen_cpu=0.3, chat_svc_cpu=[0.4, 0.45], shards=shards, other_cpu=0.2, server_core_busy=0.9,
    )  # fmt: skip


def test_cpu_over_a_window_is_interpolated_between_the_samples_around_its_bounds() -> None:
    # a process using half a core from t=10 on, sampled every second
    samples = [(10.0 + i, 0.5 * i) for i in range(11)]
    assert cores_between(samples, 12.25, 17.75) == pytest.approx(0.5)
    # busy only in the second half: the window sees the share it covers
    samples = [(0.0, 0.0), (1.0, 0.0), (2.0, 1.0)]
    assert cores_between(samples, 0.5, 2.0) == pytest.approx(1.0 / 1.5)
    assert cores_between(samples, 0.5, 3.0) is None  # not covered: no figure rather than a wrong one
    assert cores_between(samples, 1.5, 1.5) is None


def test_the_extrapolation_takes_the_busiest_shard_and_scales_it_to_one_core() -> None:
    ex = extrapolate(run("cluster", 3000, [0.05, 0.15, 0.10]))
    assert ex is not None
    assert ex.busiest_cpu == 0.15 and ex.busiest_port == 7001 and ex.shards == 3
    assert ex.us_per_msg == pytest.approx(50.0)  # 0.15 core / 3000 msg/s
    assert ex.saturates_at == 20000  # 3000 / 0.15
    assert ex.even_saturates_at == 30000  # 3 shards x 3000 / 0.30 cores in all
    single = extrapolate(run("redis", 3000, [0.30]))
    assert single is not None and single.saturates_at == single.even_saturates_at == 10000
    text = extrapolation_text(ex, single)
    assert "on paper, not measured" in text
    assert "20,000 msg/s" in text and "30,000 msg/s" in text and "10,000 msg/s" in text
    assert extrapolate(run("cluster", 3000, [0.0, 0.0, 0.0])) is None  # no CPU seen: nothing to scale


def test_the_table_puts_both_backends_side_by_side_per_rate_with_every_shard() -> None:
    result = Shards(1000, 10, [1000, 3000])
    for backend, cpus in (("redis", [[0.1], [0.3]]), ("cluster", [[0.04, 0.03, 0.03], [0.12, 0.1, 0.08]])):
        result.points[backend] = {"1000": [run(backend, 1000, cpus[0])], "3000": [run(backend, 3000, cpus[1], 5)]}
    got = rows(result)
    assert [(r[0], r[1]) for r in got] == [("1000", "redis"), ("1000", "cluster"), ("3000", "redis"),
                                           ("3000", "cluster")]  # fmt: skip
    assert got[3][7] == "0.120 (1) / 0.100 (1) / 0.080 (1)"  # busiest shard first
    assert got[3][8] == "40.0"  # µs of the busiest shard per msg/s
    assert got[0][3] == "0" and got[2][3] == "5 (0.00%)"  # loss: none, and some
    assert got[3][11] == "0.90"  # the servers' core: full means latency is the core's, not Redis'
    rendered = table(got, HEADER)
    assert "Redis CPU per shard (rooms)" in rendered and len(rendered.splitlines()) == 6


def test_repeated_runs_report_the_run_with_the_median_busiest_shard() -> None:
    runs = [run("cluster", 3000, [c, 0.01, 0.01]) for c in (0.3, 0.1, 0.2)]
    assert median_run(runs).busiest == runs[2].busiest
