"""Capacity sweep: step users x per-user rate, one short headless swarm run per step.

    python -m loadtest._sweep                       # starts its own server (--flood-rate 0)
    python -m loadtest._sweep --host tcp://127.0.0.1:9009 --users 50,100,200 --rates 1,2

Each step is a separate ``locust -f loadtest --headless`` process whose ``--summary-json``
gives p50/p99 fan-out latency (every delivery), deliveries/s and loss; the server's CPU
and memory come from its Prometheus ``/metrics`` (``process_cpu_seconds_total`` and
``process_resident_memory_bytes``, read before and after the step). Results go to
``<out>.csv``, ``<out>.png`` and ``<out>.md``. Run it from the repository root: it shares the
benchmark's server wrapper and Prometheus parser (``bench.servers``); a server it starts fails
the sweep if it does not stop cleanly or logs a failure. The PNG is one page: latency against
load for the swarm and, from a benchmark results file (``--bench``), for the C generator in
bench/, which reaches the knee the swarm cannot; then server CPU, the swarm's own CPU and
event-loop lag, and loss.

Why separate processes per step: every step starts from a fresh swarm (no leftover
connections or rooms), and a step that breaks the server or the swarm cannot taint the
next one. The swarm's own CPU is recorded too: a step where it nears 100 % measured the
load generator, not the server, and is flagged in the table.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import BENCH
from bench.measure import P99_LIMIT_MS
from bench.servers import Scrape, ServerProcess, free_port, scrape
from loadtest._ledger import SWARM_LAG_WARN_MS

ROOT = Path(__file__).resolve().parent.parent
BENCH_RESULTS = BENCH / "results" / "full.json"

FIELDS = [
    "users",
    "msg_rate",
    "offered_lines_per_s",
    "deliveries_per_s",
    "server_deliveries_per_s",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "max_ms",
    "run_p99_ms",
    "server_fanout_p99_ms",
    "loss_ratio",
    "lost_deliveries",
    "expected_deliveries",
    "server_cpu_pct",
    "server_rss_mb",
    "swarm_cpu_max_pct",
    "swarm_lag_p99_ms",
    "host_load1",
    "passed",
]


def _host_port(host: str) -> tuple[str, int]:
    h = host.split("://", 1)[-1].rstrip("/")
    addr, _, port = h.rpartition(":")
    return addr.strip("[]") or "127.0.0.1", int(port or 9009)


def histogram_quantile(before: Scrape, after: Scrape, name: str, q: float) -> float | None:
    """Upper bucket bound holding quantile ``q`` of the observations made between scrapes."""
    earlier = before.buckets(name)
    buckets = sorted((le, count - earlier.get(le, 0.0)) for le, count in after.buckets(name).items())
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    for le, count in buckets:
        if count >= rank:
            return le
    return None


def run_step(opts: argparse.Namespace, host: str, metrics_url: str, users: int, rate: float) -> dict[str, Any]:
    """One swarm run; returns a CSV row."""
    with tempfile.TemporaryDirectory() as tmp:
        summary = Path(tmp) / "summary.json"
        cmd = [
            sys.executable,
            "-m",
            "locust",
            "-f",
            str(ROOT / "loadtest"),
            "--headless",
            "--host",
            host,
            "-u",
            str(users),
            "-r",
            str(opts.spawn_rate),
            "-t",
            f"{opts.duration}s",
            "--msg-rate",
            str(rate),
            "--room-size",
            str(opts.room_size),
            "--deadline",
            str(opts.deadline),
            "--summary-json",
            str(summary),
            "--only-summary",
            "--loglevel",
            "WARNING",
        ]
        if opts.processes:
            cmd += ["--processes", str(opts.processes)]
        if opts.max_p99_ms is not None:
            cmd += ["--max-p99-ms", str(opts.max_p99_ms)]
        before, t0 = scrape(metrics_url), time.monotonic()
        proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=opts.duration + 120)
        after, t1 = scrape(metrics_url), time.monotonic()
        if not summary.exists():
            sys.stderr.write(proc.stdout[-2000:] + proc.stderr[-2000:])
            raise RuntimeError(f"step users={users} rate={rate}: locust wrote no summary")
        s = json.loads(summary.read_text())
    t = s["totals"]
    wall = t1 - t0

    def delta(name: str) -> float:
        return after.value(name) - before.value(name)

    def r(v: float | None, nd: int = 2) -> float | str:
        return "" if v is None else round(v, nd)

    return {
        "users": users,
        "msg_rate": rate,
        "offered_lines_per_s": round(users * rate, 1),
        "deliveries_per_s": r(t["deliveries_per_s"], 1),
        "server_deliveries_per_s": r(delta("chat_deliveries_total") / wall, 1),
        "p50_ms": r(t["p50_ms"]),
        "p95_ms": r(t["p95_ms"]),
        "p99_ms": r(t["p99_ms"]),
        "max_ms": r(t["max_ms"]),
        "run_p99_ms": r(t["run_p99_ms"]),
        "server_fanout_p99_ms": r(_ms(histogram_quantile(before, after, "chat_fanout_latency_seconds", 0.99)), 3),
        "loss_ratio": round(t["loss_ratio"], 6),
        "lost_deliveries": t["lost_deliveries"],
        "expected_deliveries": t["expected_deliveries"],
        "server_cpu_pct": r(100.0 * delta("process_cpu_seconds_total") / wall, 1),
        "server_rss_mb": r(after.value("process_resident_memory_bytes") / 2**20, 1),
        "swarm_cpu_max_pct": r(t["swarm_cpu_max"], 0),
        "swarm_lag_p99_ms": r(t["swarm_lag_p99_ms"], 1),
        "host_load1": round(os.getloadavg()[0], 2),
        "passed": bool(s["passed"]),
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


def medians(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (users, rate): the median of each figure over its runs.

    Loss and lost deliveries take the worst run (one lossy run is a finding, not noise)
    and ``passed`` needs every run to pass. ``p99_best_ms`` is the least-disturbed run's
    p99: on a shared machine it is the closest estimate of what the server can do.
    """
    groups: dict[tuple[int, float], list[dict[str, Any]]] = {}
    for row in runs:
        groups.setdefault((row["users"], row["msg_rate"]), []).append(row)
    out = []
    for (users, rate), rows in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        merged: dict[str, Any] = {"users": users, "msg_rate": rate, "runs": len(rows)}
        best = [r["p99_ms"] for r in rows if r["p99_ms"] != ""]
        merged["p99_best_ms"] = min(best) if best else ""
        for key in FIELDS[2:]:
            values = [r[key] for r in rows if r[key] != ""]
            if key == "passed":
                merged[key] = all(r[key] for r in rows)
            elif not values:
                merged[key] = ""
            elif key in ("loss_ratio", "lost_deliveries"):
                merged[key] = max(values)
            else:
                merged[key] = round(statistics.median(values), 2)
        out.append(merged)
    return out


def write_csv(rows: list[dict[str, Any]], path: Path, fields: list[str] | None = None) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields or [*FIELDS[:2], "runs", *FIELDS[2:7], "p99_best_ms", *FIELDS[7:]])
        w.writeheader()
        w.writerows(rows)


@dataclass
class BenchRuns:
    """chatload's fan-out runs from a benchmark results file (``python -m bench``).

    Reads only keys that every schema of bench/results/*.json has: ``runs[]`` (server, tool,
    rate, deliveries_per_s, p99_ms, lost, valid), ``search["chat-svc"]`` (max_rate, at_max)
    and ``machine.date_utc``."""

    source: str
    runs: dict[str, list[tuple[float, float, bool]]]  # server -> (deliveries/s, p99 ms, lost any)
    # chat-svc at its largest rate within the target: deliveries/s, msg/s, members
    knee: tuple[float, float, int] | None

    @classmethod
    def read(cls, path: Path, servers: tuple[str, ...] = ("chat-svc", "c-epoll", "ngircd")) -> BenchRuns:
        data = json.loads(path.read_text())
        runs: dict[str, list[tuple[float, float, bool]]] = {}
        for run in data.get("runs", []):
            if (
                run.get("server") in servers
                and run.get("tool") == "chatload"
                and (run.get("rate") or 0) > 0
                and run.get("valid")
                and run.get("deliveries_per_s")
                and run.get("p99_ms") is not None
            ):
                runs.setdefault(run["server"], []).append(
                    (run["deliveries_per_s"], run["p99_ms"], bool(run.get("lost")))
                )
        found = (data.get("search") or {}).get("chat-svc") or {}
        at_max = found.get("at_max") or {}
        knee = None
        if found.get("max_rate") and at_max:
            knee = (at_max["deliveries_per_s"], found["max_rate"], found.get("members", 0))
        when = str(data.get("machine", {}).get("date_utc", ""))[:10]
        return cls(f"{path.name} ({when})", runs, knee)


def write_plot(
    rows: list[dict[str, Any]],
    runs: list[dict[str, Any]],
    path: Path,
    title: str,
    p99_target_ms: float,
    bench: BenchRuns | None = None,
) -> None:
    """One page: latency against load for the swarm and for the C generator, then what explains it.

    Top: p99 against deliveries/s on log axes, the swarm's steps (labelled with their user
    counts) beside chatload's runs from ``bench``, the p99 target and the knee (the largest
    rate the benchmark confirmed within the target). Bottom: server and swarm CPU with the
    swarm's event-loop lag (a starved swarm reads late, which a p99 rise may be), and loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(12, 9.5))
    grid = fig.add_gridspec(2, 2, height_ratios=[1.35, 1], hspace=0.32, wspace=0.35)
    lat, cpu, loss = fig.add_subplot(grid[0, :]), fig.add_subplot(grid[1, 0]), fig.add_subplot(grid[1, 1])
    rates = sorted({row["msg_rate"] for row in rows})
    colors = {rate: f"C{i}" for i, rate in enumerate(rates)}
    for i, rate in enumerate(rates):
        pts = sorted((r for r in rows if r["msg_rate"] == rate and r["p99_ms"] != ""), key=_dps)
        x = [_dps(r) for r in pts]
        c = colors[rate]
        lat.plot(x, [r["p99_ms"] for r in pts], "o-", color=c, label=f"swarm p99, {rate:g} line/s per user")
        lat.plot(x, [r["p50_ms"] for r in pts], "s--", color=c, alpha=0.6, ms=4, label=f"swarm p50, {rate:g} line/s")
        for r in pts:  # one rate's labels above its points, the next one's below: equal loads do not collide
            dy = 9 if i % 2 == 0 else -14
            lat.annotate(f"{r['users']}u", (_dps(r), r["p99_ms"]), textcoords="offset points", xytext=(0, dy),
                         ha="center", fontsize=7, color=c)  # fmt: skip
        cpu.plot(x, [r["server_cpu_pct"] for r in pts], "o-", color=c, label=f"server CPU, {rate:g} line/s")
        cpu.plot(x, [r["swarm_cpu_max_pct"] for r in pts], "^:", color=c, label=f"swarm CPU (max), {rate:g} line/s")
        loss.plot(x, [r["lost_deliveries"] for r in pts], "o", color=c, label=f"{rate:g} line/s per user")
    if bench:
        for j, (server, points) in enumerate(sorted(bench.runs.items())):
            c = f"C{len(rates) + j}"
            for lossy in (False, True):
                marks = [(d, p) for d, p, lost in points if lost == lossy]
                if marks:
                    label = f"{server}: runs that lost lines" if lossy else f"C generator, {server}: p99 per run"
                    lat.scatter([d for d, _ in marks], [p for _, p in marks], s=22 if lossy else 14, color=c,
                                marker="x" if lossy else "o", alpha=0.7, label=label)  # fmt: skip
        if bench.knee:
            dps, msg_rate, members = bench.knee
            lat.axvline(dps, color="black", lw=1.2)
            lat.annotate(f"knee: {dps / 1e6:.1f}M deliveries/s\n({msg_rate:,.0f} msg/s to {members:,} members):\n"
                         "the largest rate the benchmark\nconfirmed within the target, 0 loss",
                         (dps, 0.03), xycoords=("data", "axes fraction"), xytext=(-6, 0), textcoords="offset points",
                         ha="right", va="bottom", fontsize=8)  # fmt: skip
    top = max(rows, key=_dps) if rows else None
    if top:
        edge = _dps(top) * 1.15
        lat.axvspan(edge, lat.get_xlim()[1] if bench else edge * 3, color="0.92", lw=0, zorder=0)
        lat.annotate(f"beyond the Python swarm: it tops out\nnear {_dps(top) / 1000:.0f}k deliveries/s on this host\n"
                     f"(swarm CPU {float(top['swarm_cpu_max_pct']):.0f} % of a core, its event-loop\n"
                     f"lag p99 {float(top['swarm_lag_p99_ms']):.0f} ms); only the C generator\nreaches the knee",
                     (edge, 0.97), xycoords=("data", "axes fraction"), xytext=(6, 0), textcoords="offset points",
                     va="top", fontsize=8, color="0.3")  # fmt: skip
    lat.axhline(p99_target_ms, color="red", ls="--", lw=1, label=f"p99 target {p99_target_ms:g} ms")
    lat.set_xscale("log")
    lat.set_yscale("log")
    lat.set_xlabel("deliveries/s (log)")
    lat.set_ylabel("send-to-receipt latency, ms (log)")
    lat.set_title("latency against load: the Locust swarm (labels: users) and the C generator (bench/)", fontsize=10)
    lat.grid(True, which="both", alpha=0.25)
    lat.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    lag = cpu.twinx()
    for rate in rates:
        pts = sorted((r for r in rows if r["msg_rate"] == rate and r["swarm_lag_p99_ms"] != ""), key=_dps)
        lag.plot([_dps(r) for r in pts], [r["swarm_lag_p99_ms"] for r in pts], "x-.", color=colors[rate], alpha=0.6,
                 label=f"swarm loop lag p99, {rate:g} line/s")  # fmt: skip
    lag.axhline(SWARM_LAG_WARN_MS, color="0.4", ls=":", lw=1, label=f"swarm starved above {SWARM_LAG_WARN_MS:g} ms")
    lag.set_ylabel("swarm event-loop lag p99 (ms)")
    lag.set_ylim(0, max(SWARM_LAG_WARN_MS * 1.5, *(float(r["swarm_lag_p99_ms"] or 0) for r in rows)))
    cpu.set_ylim(0, 105)
    cpu.set_xlabel("deliveries/s (swarm)")
    cpu.set_ylabel("CPU, % of one core")
    cpu.set_title("what the swarm steps cost: server CPU, swarm CPU and lag", fontsize=10)
    cpu.grid(True, alpha=0.25)
    handles = cpu.get_legend_handles_labels()
    more = lag.get_legend_handles_labels()
    cpu.legend(handles[0] + more[0], handles[1] + more[1], fontsize=7, loc="upper center",
               bbox_to_anchor=(0.5, -0.2), ncol=2)  # fmt: skip
    lost = sum(float(r["lost_deliveries"] or 0) for r in runs)
    expected = sum(float(r["expected_deliveries"] or 0) for r in runs)
    loss.set_ylim(-0.5, max(5.0, *(float(r["lost_deliveries"] or 0) * 1.2 for r in rows)))
    loss.set_xlabel("deliveries/s (swarm)")
    loss.set_ylabel("lost deliveries (worst run of the step)")
    loss.set_title(f"loss: {lost:,.0f} of {expected:,.0f} deliveries lost over {len(runs)} runs", fontsize=10)
    loss.grid(True, alpha=0.25)
    loss.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    fig.suptitle(title + (f"; C generator runs from {bench.source}" if bench else ""), fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _dps(row: dict[str, Any]) -> float:
    return float(row["deliveries_per_s"])


def markdown_table(rows: list[dict[str, Any]], header: str) -> str:
    cols = [
        ("users", "users"),
        ("msg_rate", "lines/s/user"),
        ("runs", "runs"),
        ("deliveries_per_s", "deliveries/s"),
        ("p50_ms", "p50 ms"),
        ("p99_ms", "p99 ms"),
        ("p99_best_ms", "p99 ms (best run)"),
        ("max_ms", "max ms"),
        ("run_p99_ms", "p99 ms incl. ramp-up"),
        ("server_fanout_p99_ms", "server-side fan-out p99 ms (bucket)"),
        ("loss_ratio", "loss"),
        ("server_cpu_pct", "server CPU %"),
        ("server_rss_mb", "server RSS MB"),
        ("swarm_cpu_max_pct", "swarm CPU % (max)"),
        ("swarm_lag_p99_ms", "swarm loop lag p99 ms"),
        ("host_load1", "host load (1 min)"),
        ("passed", "checks"),
    ]
    lines = [header, "", "| " + " | ".join(c[1] for c in cols) + " |"]
    lines.append("|" + "|".join("---:" for _ in cols) + "|")
    for row in rows:
        cells = []
        for key, _ in cols:
            v = row[key]
            if key == "passed":
                v = "pass" if v else "FAIL"
            elif key == "swarm_lag_p99_ms" and v != "" and float(v) >= SWARM_LAG_WARN_MS:
                v = f"**{v}** (swarm starved)"
            cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the sweep and write the CSV, PNG and markdown table."""
    ap = argparse.ArgumentParser(prog="python -m loadtest._sweep", description=__doc__)
    ap.add_argument("--host", help="target tcp://H:P (default: start chat-svc on a free port)")
    ap.add_argument("--metrics-url", help="default: http://H:P/metrics on the chat port")
    ap.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra flag for the server the sweep starts (repeatable)",
    )
    ap.add_argument("--users", default="50,100,200,400")
    ap.add_argument("--rates", default="1,2", help="chat lines per second per user")
    ap.add_argument("--duration", type=int, default=20, help="seconds per step (incl. ramp-up)")
    ap.add_argument("--spawn-rate", type=float, default=100)
    ap.add_argument("--room-size", type=int, default=20)
    ap.add_argument("--deadline", type=float, default=5.0)
    ap.add_argument("--processes", type=int, default=0, help="locust --processes per step")
    ap.add_argument("--server-desc", default="", help="with --from-runs: how the server ran")
    ap.add_argument("--repeat", type=int, default=1, help="runs per step; the table shows medians")
    ap.add_argument("--max-p99-ms", type=float, default=None)
    ap.add_argument(
        "--stop-p99-ms",
        type=float,
        default=2000.0,
        help="skip larger user counts for a rate once p99 exceeds this, or on loss",
    )
    ap.add_argument(
        "--out",
        default=str(ROOT / "docs" / "capacity"),
        help="output path without extension (.csv, .png, .md are written)",
    )
    ap.add_argument("--from-runs", help="re-render the report from a *.runs.csv, run nothing")
    ap.add_argument("--when", default="", help="with --from-runs: the date the runs were taken")
    ap.add_argument(
        "--bench",
        default=str(BENCH_RESULTS),
        help="benchmark results whose chatload runs the plot shows beside the swarm's ('' = none; "
        "default %(default)s when it exists)",
    )
    opts = ap.parse_args(argv)
    if opts.from_runs:
        return render(opts, read_runs(Path(opts.from_runs)), opts.server_desc or "see runs")
    with tempfile.TemporaryDirectory(prefix="chat-sweep-") as logs:
        return sweep(opts, Path(logs))


def sweep(opts: argparse.Namespace, logs: Path) -> int:
    """The grid of steps against ``--host``, or against a chat-svc started here and checked when it stops."""
    users = [int(u) for u in opts.users.split(",")]
    rates = [float(r) for r in opts.rates.split(",")]
    server = None
    if opts.host:
        host = opts.host
        server_desc = f"external server at {host}"
    else:
        args = ["--flood-rate", "0", "--log-level", "warning", *opts.server_arg]
        port = free_port()
        argv = [sys.executable, "-m", "chat_svc", "--host", "127.0.0.1", "--port", str(port), *args]
        server = ServerProcess("chat-svc", argv, port, logs)
        host = f"tcp://127.0.0.1:{port}"
        server_desc = "chat-svc " + " ".join(args)
    h, p = _host_port(host)
    metrics_url = opts.metrics_url or f"http://{h}:{p}/metrics"
    runs: list[dict[str, Any]] = []
    ceiling: dict[float, int] = {}  # per rate: first user count that broke the stop rule
    try:
        if server is not None:
            server.wait_ready(timeout=15)
        # whole grid per repetition, so repeats of a step sample different moments of a
        # shared machine instead of one burst of someone else's load
        for rep in range(1, opts.repeat + 1):
            for rate in rates:
                for u in users:
                    if u > ceiling.get(rate, u):
                        continue
                    print(f"run {rep}/{opts.repeat}: {u} users x {rate:g} lines/s ...", flush=True)
                    row = run_step(opts, host, metrics_url, u, rate)
                    runs.append({"run": rep, **row})
                    print("  " + ", ".join(f"{k}={row[k]}" for k in FIELDS[3:]), flush=True)
                    p99 = row["p99_ms"]
                    if row["loss_ratio"] > 0 or (p99 != "" and p99 > opts.stop_p99_ms):
                        print(f"  larger steps at this rate skipped: p99 {p99} ms, loss {row['loss_ratio']}")
                        ceiling[rate] = min(u, ceiling.get(rate, u))
                        break
    finally:
        problems = server.stop() if server is not None else []
    for problem in problems:
        print(f"server problem: {problem}", file=sys.stderr)
    rc = render(opts, runs, server_desc)
    return 1 if problems else rc


def read_runs(path: Path) -> list[dict[str, Any]]:
    """Rows of a *.runs.csv with their numbers parsed back."""
    out = []
    with path.open() as f:
        for row in csv.DictReader(f):
            parsed: dict[str, Any] = {}
            for k, v in row.items():
                if k == "passed":
                    parsed[k] = v == "True"
                elif v == "":
                    parsed[k] = ""
                else:
                    parsed[k] = float(v) if "." in v or "e" in v else int(v)
            out.append(parsed)
    return out


def render(opts: argparse.Namespace, runs: list[dict[str, Any]], server_desc: str) -> int:
    """Write <out>.csv (medians), <out>.runs.csv, <out>.png and <out>.md."""
    rows = medians(runs)

    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    when = opts.when or time.strftime("%Y-%m-%d")
    machine = f"{os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}"
    title = (
        f"chat-svc capacity sweep {when}: {machine}; server and swarm on the same host; "
        f"rooms of {opts.room_size}, {opts.duration}s per step"
    )
    write_csv(rows, out.with_suffix(".csv"))
    write_csv(runs, out.parent / f"{out.name}.runs.csv", ["run", *FIELDS])
    bench = BenchRuns.read(Path(opts.bench)) if opts.bench and Path(opts.bench).exists() else None
    write_plot(rows, runs, out.with_suffix(".png"), title, opts.max_p99_ms or P99_LIMIT_MS, bench)
    swarm = f"--processes {opts.processes}" if opts.processes else "1 process"
    header = " ".join(
        [
            f"Capacity sweep ({when}; {machine}; {server_desc}; swarm {swarm};",
            f"rooms of {opts.room_size}; {opts.duration} s per step incl. ramp-up at",
            f"{opts.spawn_rate:g} users/s; latency = send to receipt over every delivery",
            "after ramp-up; deliveries/s after ramp-up; each figure is the median of",
            f"{max((r['runs'] for r in rows), default=0)} run(s) of the step, loss the worst",
            "run; raw runs in",
            f"{out.name}.runs.csv).",
        ]
    )
    out.with_suffix(".md").write_text(markdown_table(rows, header))
    print(f"wrote {out.with_suffix('.csv')}, {out.with_suffix('.png')}, {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
