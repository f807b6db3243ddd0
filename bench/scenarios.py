"""What the benchmark measures: each scenario runs its measurements and returns a typed result."""

from __future__ import annotations

import re
import shutil
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import log
from bench.generator import run_pinned
from bench.machine import proc_cpu, proc_rss_kb
from bench.measure import P99_LIMIT_MS, Bench, Point, RedisUse, Run, measure, med, ratio
from bench.servers import free_port, redis_argv, wait_backplane


def rate_key(rate: float) -> str:
    """Rates key the points in the results file as they are written on the command line ("2000")."""
    return f"{rate:g}"


# ----------------------------------------------------------------------------- fan-out


@dataclass
class Fanout:
    members: int
    rates: list[float]
    points: dict[str, dict[str, Point]]  # server -> rate_key(rate) -> Point
    skipped: dict[str, str] = field(default_factory=dict)  # server -> why it was not measured


def available(bench: Bench, servers: Sequence[str], skipped: dict[str, str]) -> list[str]:
    """The servers that can run here; the others go to ``skipped`` with the reason, logged."""
    out = []
    for kind in servers:
        why = bench.kinds[kind].missing
        if why:
            log(f"  {kind}: not measured: {why}")
            skipped[kind] = why
        else:
            out.append(kind)
    return out


def fanout(bench: Bench, servers: Sequence[str], rates: Sequence[float], members: int, repeat: int) -> Fanout:
    log(f"== fan-out: {members} members all sending, rates {list(rates)} msg/s, {repeat} run(s) each")
    result = Fanout(members, list(rates), {})
    kinds = available(bench, servers, result.skipped)
    runs: dict[str, dict[float, list[Run]]] = {s: {r: [] for r in rates} for s in kinds}
    for rep in range(repeat):
        for rate in rates:
            for kind in kinds:
                runs[kind][rate].append(measure(bench, kind, members, rate, f"fanout-{kind}-{rate:g}-{rep}"))
    result.points = {kind: {rate_key(rate): Point.of(runs[kind][rate]) for rate in rates} for kind in kinds}
    return result


# ----------------------------------------------------------------------------- rate search


@dataclass
class Probe:
    rate: float
    passed: bool
    valid: bool
    p99_ms: float | None
    lost: int | None
    deliveries_per_s: float | None


@dataclass
class Search:
    """Largest rate with p99 <= P99_LIMIT_MS and 0 loss, confirmed by repeated runs.

    ``generator_bound``: the lowest failing rate failed because chatload could not keep up, so
    the server's own limit lies higher than ``max_rate`` shows."""

    server: str
    members: int
    max_rate: float | None
    at_max: Point | None
    upper_bound_failed: float | None
    generator_bound: bool
    probes: list[Probe]
    note: str


def search(bench: Bench, kind: str, members: int, max_probes: int, confirm: int) -> Search:
    """Ladder x1.5 from the kind's start rate until it brackets, then bisect; confirm the best."""
    start, lo_bound, hi_bound = bench.kinds[kind].search
    log(f"== rate search for {kind}: largest rate with p99 <= {P99_LIMIT_MS:g} ms and 0 loss")
    probes: list[Probe] = []
    lo: float | None = None
    hi: float | None = None
    hi_valid = True
    rate = start

    def rnd(r: float) -> float:
        return float(round(r)) if r >= 20 else round(r, 1)

    while len(probes) < max_probes:
        rate = rnd(rate)
        run = measure(bench, kind, members, rate, f"search-{kind}-{rate:g}")
        ok = run.passes()
        probes.append(Probe(rate, ok, run.valid, run.p99_ms, run.lost, run.deliveries_per_s))
        if ok:
            lo = rate
        elif hi is None or rate < hi:
            hi, hi_valid = rate, run.valid
        if lo is not None and hi is not None:
            if hi / lo <= 1.07:
                break
            rate = (lo + hi) / 2
        elif lo is not None:
            if lo >= hi_bound:
                break
            rate = min(lo * 1.5, hi_bound)
        else:
            assert hi is not None
            if hi <= lo_bound:
                break
            rate = max(hi / 1.5, lo_bound)
    confirmed: Point | None = None
    confirmed_rate: float | None = None
    candidate = lo
    for _ in range(3):
        if candidate is None:
            break
        agg = Point.of(
            [measure(bench, kind, members, candidate, f"confirm-{kind}-{candidate:g}-{i}") for i in range(confirm)]
        )
        if agg.passes():
            confirmed, confirmed_rate = agg, candidate
            break
        candidate = rnd(candidate * 0.93)
        if candidate < lo_bound:
            break
    return Search(
        server=kind,
        members=members,
        max_rate=confirmed_rate,
        at_max=confirmed,
        upper_bound_failed=hi,
        generator_bound=hi is not None and not hi_valid,
        probes=probes,
        note="" if confirmed else f"no rate >= {lo_bound:g} msg/s met the target",
    )


# ----------------------------------------------------------------------------- idle members


@dataclass
class Idle:
    server: str
    members: int
    runs: int
    probe_delivered_min: int
    probe_expected: int | None
    rss_kb_per_member: float | None
    rss_kb_per_member_hold: float | None
    rss_kb_total_per_member: float | None
    server_rss_mb: float | None
    server_rss_mb_before: float | None
    probe_last_ms: float | None
    gen_cpu: float | None
    seed: str = "not measured: select() cannot watch descriptors >= 1024 (FD_SETSIZE)"

    @property
    def others(self) -> int:
        """Whom the probe must reach: every member asked for but the one that sends it."""
        return self.members - 1

    @property
    def reached_all(self) -> bool:
        """Every member asked for was there and heard the probe, in every run (not merely every one
        that got in: ``probe_expected`` counts only those)."""
        return self.probe_delivered_min >= self.others


def idle(bench: Bench, members: int, repeat: int, kind: str = "chat-svc") -> Idle:
    log(f"== idle: {members} {kind} members connected at once, one broadcast must reach every one")
    runs = [
        measure(bench, kind, members, 0, f"idle-{kind}-{members}-{i}", idle=True,
                extra=["--max-clients", str(members + 1000)])
        for i in range(repeat)
    ]  # fmt: skip
    clean = [r for r in runs if not r.noisy] or runs
    probes = [r.idle for r in clean if r.idle]
    return Idle(
        server=kind,
        members=members,
        runs=len(runs),
        probe_delivered_min=min((r.idle.probe_delivered or 0) if r.idle else 0 for r in runs),
        probe_expected=runs[0].idle.probe_expected if runs[0].idle else None,
        rss_kb_per_member=med([p.rss_kb_per_member for p in probes]),
        rss_kb_per_member_hold=med([p.rss_kb_per_member_hold for p in probes]),
        rss_kb_total_per_member=med([p.rss_kb_total_per_member for p in probes]),
        server_rss_mb=med([r.server_rss_mb for r in clean]),
        server_rss_mb_before=med([p.server_rss_mb_before for p in probes]),
        probe_last_ms=med([p.probe_last_ms for p in probes]),
        gen_cpu=med([r.gen_cpu for r in clean]),
    )


# ----------------------------------------------------------------------------- redis backplane


@dataclass
class Redis:
    members: int
    points: dict[str, Point] = field(default_factory=dict)  # rate_key(rate) -> Point
    skipped: str = ""


def redis(bench: Bench, members: int, rates: Sequence[float], repeat: int) -> Redis:
    """Two chat-svc instances (one room) joined by a redis-server on a free port."""
    log(f"== redis backplane: two instances, {members} members split over both, rates {list(rates)}")
    result = Redis(members)
    if shutil.which("redis-server") is None:
        result.skipped = "redis-server is not installed"
        return result
    for rate in rates:
        runs = []
        for rep in range(repeat):
            bench.quiet()
            rport = free_port()
            rsrv = bench.start("redis-server", redis_argv(rport), rport)
            try:
                rsrv.wait_ready(timeout=10)
                extra = ["--redis-url", f"redis://127.0.0.1:{rport}/0"]
                with bench.server("chat-svc", extra) as a, bench.server("chat-svc", extra) as b:
                    ok, why = wait_backplane([a.port, b.port])
                    if not ok:
                        result.skipped = f"backplane not up: {why}"
                        return result
                    r_cpu0 = proc_cpu(rsrv.pid)
                    raw = bench.chatload.run(
                        [a.port, b.port], [a.pid, b.pid], members, rate, f"redis-{rate:g}-{rep}", connect_rate=2000
                    )
                    use = RedisUse(round(proc_cpu(rsrv.pid) - r_cpu0, 2), round(proc_rss_kb(rsrv.pid) / 1024, 1))
                run = Run.from_chatload(raw, "chat-svc x2 + redis")
                run.redis = use
                bench.record(run)
                runs.append(run)
            finally:
                bench.stop(rsrv)
        result.points[rate_key(rate)] = Point.of(runs)
    return result


# ----------------------------------------------------------------------------- reconnect storm

STORM_SENDERS = 10


@dataclass
class Storm:
    """Members of one instance drop at once and resume on another (two instances + Redis).

    ``all_back_s``: from the drop until the last member had its resume's answer; ``plain_connect_s``:
    the same number of plain connects (no resume) to one fresh instance, all at once, until every
    member heard a broadcast: the reference measured in the same run."""

    members: int
    rate: float
    all_back_s: float | None = None
    p50_s: float | None = None
    p99_s: float | None = None
    back: int | None = None
    complete: int | None = None
    incomplete: int | None = None
    connect_failed: int | None = None
    replayed_lines: int | None = None
    run: Run | None = None
    plain_connect_s: float | None = None
    skipped: str = ""

    @property
    def problems(self) -> list[str]:
        """What makes the storm a failure whatever its timing: lost, repeated or reordered lines, incomplete."""
        out = []
        run = self.run
        if run is None:
            return [self.skipped or "not run"]
        if self.back != self.members:
            out.append(f"{self.back} of {self.members} members back")
        if self.incomplete:
            out.append(f"{self.incomplete} resumes incomplete")
        if run.lost:
            out.append(f"lost {run.lost} of {run.expected} deliveries")
        for key in ("duplicates", "out_of_order", "malformed", "id_missing", "id_errors", "id_mismatch"):
            if getattr(run, key):
                out.append(f"{key} = {getattr(run, key)}")
        return out


def storm(bench: Bench, members: int, rate: float, after: float = 3.0) -> Storm:
    """``members`` on instance a with ids; ``after`` s into sending (STORM_SENDERS senders on b) they
    all drop and reconnect to b with /resume; then the plain-connect reference on a fresh instance."""
    log(f"== reconnect storm: {members} members of one instance resume on another, {rate:g} msg/s flowing")
    result = Storm(members, rate)
    if shutil.which("redis-server") is None:
        result.skipped = "redis-server is not installed"
        return result
    bench.quiet()
    rport = free_port()
    rsrv = bench.start("redis-server", redis_argv(rport), rport)
    try:
        rsrv.wait_ready(timeout=10)
        extra = ["--redis-url", f"redis://127.0.0.1:{rport}/0", "--max-clients", str(members + 1000)]
        with bench.server("chat-svc", extra) as a, bench.server("chat-svc", extra) as b:
            ok, why = wait_backplane([a.port, b.port])
            if not ok:
                result.skipped = f"backplane not up: {why}"
                return result
            raw = bench.chatload.run(
                [a.port, b.port], [a.pid, b.pid], members + STORM_SENDERS, rate, f"storm-{members}",
                connect_rate=2000, ids=True, senders=STORM_SENDERS, storm_after=after, duration=after + 8,
            )  # fmt: skip
    finally:
        bench.stop(rsrv)
    run = Run.from_chatload(raw, "chat-svc x2 + redis (storm)")
    bench.record(run)
    result.run = run

    def seconds(key: str) -> float | None:
        value = raw.get(key)
        return None if value is None or value < 0 else float(value)

    result.all_back_s, result.p50_s, result.p99_s = seconds("storm_all_back_s"), seconds("storm_p50_s"), seconds(
        "storm_p99_s"
    )
    result.back, result.complete = raw.get("storm_back"), raw.get("storm_complete")
    result.incomplete, result.connect_failed = raw.get("storm_incomplete"), raw.get("storm_connect_failed")
    result.replayed_lines = raw.get("storm_replayed_lines")
    with bench.server("chat-svc", ["--max-clients", str(members + 1000)]) as plain:
        ref = bench.chatload.run(
            [plain.port], [plain.pid], members, 0, f"plain-connects-{members}", idle=True, connect_rate=1e9,
            duration=0.5, drain=10.0,
        )  # fmt: skip
    if ref.get("ramp_s", -1) >= 0 and ref.get("sync_s", -1) >= 0 and ref.get("sync_ok"):
        result.plain_connect_s = round(ref["ramp_s"] + ref["sync_s"], 3)
    return result


# ----------------------------------------------------------------------------- cross-check

OBSERVERS = 20
COMPARED = ("deliveries_per_s", "p50_ms", "p99_ms", "p999_ms", "server_us_per_delivery", "gen_cpu",
            "observer_p50_ms", "observer_p99_ms")  # fmt: skip


@dataclass
class CrosscheckPoint:
    server: str
    rate: float
    chatload: Point
    external: Point
    relative_diff: dict[str, float | None]  # chatload / external - 1, per COMPARED figure


@dataclass
class Crosscheck:
    tool: str
    members: int
    observers: int
    points: list[CrosscheckPoint]


def crosscheck(bench: Bench, points: Sequence[tuple[str, float]], members: int, repeat: int) -> Crosscheck:
    """The same points driven alternately by chatload and by the external generator.

    In every run OBSERVERS of the members are passive clients of a separate chatload --observe
    process, identical for both tools: each tool's latency can be checked against what these
    lightly loaded clients saw in the same run."""
    assert bench.external is not None
    log(
        f"== cross-check against {bench.external.path}: {list(points)}, alternating, {repeat} run(s) each, "
        f"{OBSERVERS} of the {members} members are passive observers"
    )
    out = Crosscheck(str(bench.external.path), members, OBSERVERS, [])
    for kind, rate in points:
        own: list[Run] = []
        ext: list[Run] = []
        for rep in range(repeat):
            own.append(measure(bench, kind, members, rate, f"xcheck-own-{kind}-{rate:g}-{rep}", observers=OBSERVERS))
            ext.append(
                measure(bench, kind, members, rate, f"xcheck-ext-{kind}-{rate:g}-{rep}", tool="external",
                        observers=OBSERVERS)
            )  # fmt: skip
        a, b = Point.of(own), Point.of(ext)
        diff = {}
        for key in COMPARED:
            r = ratio(getattr(a, key), getattr(b, key))
            diff[key] = None if r is None else round(r - 1, 3)
        out.points.append(CrosscheckPoint(kind, rate, a, b, diff))
    return out


# ----------------------------------------------------------------------------- profile


@dataclass
class Profile:
    members: int
    rate: float
    samples: int = 0
    top_self_pct: list[tuple[str, float]] = field(default_factory=list)
    top_inclusive_pct: list[tuple[str, float]] = field(default_factory=list)
    server_cpu_util: float | None = None
    server_user_share: float | None = None
    run: Run | None = None
    skipped: str = ""


def profile(bench: Bench, members: int, rate: float, seconds: float) -> Profile:
    """py-spy on chat-svc during a fan-out run: where the server's Python time goes."""
    result = Profile(members, rate)
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(pyspy).exists():
        result.skipped = "py-spy is not installed (pip install py-spy)"
        return result
    log(f"== profile: py-spy on chat-svc, {members} members at {rate:g} msg/s")
    out_file = bench.workdir / "profile.txt"
    loaded: dict[str, Any] = {}
    with bench.server("chat-svc") as srv:

        def load() -> None:
            try:
                loaded["raw"] = bench.chatload.run(
                    [srv.port], [srv.pid], members, rate, "profile", connect_rate=2000, duration=seconds + 3
                )
            except Exception as exc:
                loaded["error"] = str(exc)

        t = threading.Thread(target=load)
        t.start()
        time.sleep(members / 2000 + bench.chatload.timing.warmup + 2.5)  # ramp + barrier + warmup
        cmd = [pyspy, "record", "--pid", str(srv.pid), "--duration", f"{int(seconds)}", "--rate", "200",
               "--format", "raw", "--function", "--nonblocking", "--output", str(out_file)]  # fmt: skip
        pr = run_pinned(bench.pin, cmd, seconds + 60)
        t.join(timeout=120)
    if pr.returncode != 0 or not out_file.exists():
        result.skipped = f"py-spy failed: {(pr.stderr or pr.stdout).strip()[-400:]}"
        return result
    result.samples, result.top_self_pct, result.top_inclusive_pct = analyse_profile(out_file.read_text())
    if "raw" in loaded:
        run = Run.from_chatload(loaded["raw"], "chat-svc")
        result.run = run
        result.server_cpu_util = run.server_cpu_util
        result.server_user_share = run.server_user_share
    return result


def analyse_profile(text: str) -> tuple[int, list[tuple[str, float]], list[tuple[str, float]]]:
    """Samples, and the self and inclusive shares (%) per function, from py-spy's raw output."""
    total = 0
    self_c: dict[str, int] = {}
    incl: dict[str, int] = {}
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [f for f in stack.split(";") if not f.startswith("process ") and not f.startswith("thread ")]
        frames = [re.sub(r"\s*\((.*?)/([^/]+\.py)(:\d+)?\)$", r" (\2)", f) for f in frames]
        if not frames:
            continue
        self_c[frames[-1]] = self_c.get(frames[-1], 0) + n
        for f in set(frames):
            incl[f] = incl.get(f, 0) + n

    def top(d: dict[str, int], k: int) -> list[tuple[str, float]]:
        return [(name, round(100 * c / total, 1)) for name, c in sorted(d.items(), key=lambda x: -x[1])[:k]]

    return total, top(self_c, 15) if total else [], top(incl, 20) if total else []


# ----------------------------------------------------------------------------- smoke

# (members, msg/s): a few seconds each, enough for every member to get every line
SMOKE_POINTS = {
    "chat-svc": (50, 100),
    "chat-svc-base": (50, 100),
    "chat-svc-ids": (50, 100),
    "chat-svc-ws": (50, 100),
    "seed": (30, 30),
    "c-epoll": (50, 100),
    "ngircd": (30, 30),
}
SMOKE_STORM = 200


@dataclass
class Smoke:
    runs: dict[str, Run]
    skipped: dict[str, str]
    problems: list[str]
    storm: Storm | None = None


def smoke(bench: Bench, servers: Sequence[str], required: Sequence[str]) -> Smoke:
    """Correctness only, loose bounds: every member gets every line from every server, chat-svc
    reaches every idle member, and every server stopped cleanly with a clean log. A server in
    ``required`` that cannot run here is a failure; any other is skipped with the reason."""
    result = Smoke({}, {}, [])
    for kind in available(bench, servers, result.skipped):
        members, rate = SMOKE_POINTS[kind]
        run = measure(bench, kind, members, rate, f"smoke-{kind}")
        result.runs[kind] = run
        if not run.sync_ok:
            result.problems.append(f"{kind}: the barrier broadcast did not reach every member")
        if not run.delivered:
            result.problems.append(f"{kind}: no deliveries observed")
        if run.lost:
            result.problems.append(f"{kind}: lost {run.lost} of {run.expected} deliveries")
        if kind != "seed":  # the seed relays raw recv() chunks: torn lines are what it does
            for key in ("malformed", "duplicates", "out_of_order", "disconnects", "join_failed", "id_missing",
                        "id_errors", "id_mismatch"):  # fmt: skip
                if getattr(run, key):
                    result.problems.append(f"{kind}: {key} = {getattr(run, key)}")
            if run.p99_ms is None or run.p99_ms > 2000:
                result.problems.append(f"{kind}: p99 {run.p99_ms} ms (loose bound 2000 ms)")
    for kind in ("chat-svc", "chat-svc-ws"):
        if kind not in servers:
            continue
        name = "idle" if kind == "chat-svc" else f"idle-{kind}"
        run = measure(bench, kind, 200, 0, f"smoke-{name}", idle=True)
        result.runs[name] = run
        probe = run.idle
        if probe is None or (probe.probe_delivered or 0) < run.members - 1:
            got = (probe.probe_delivered, probe.probe_expected) if probe else (None, None)
            result.problems.append(f"{name}: probe reached {got[0]} of {run.members - 1} ({got[1]} got in)")
    if "chat-svc" in servers:
        result.storm = storm(bench, SMOKE_STORM, 100, after=2.0)
        if result.storm.skipped and "chat-svc" not in required:
            result.skipped["storm"] = result.storm.skipped
        else:
            result.problems += [f"storm: {problem}" for problem in result.storm.problems]
    result.problems += [f"{kind}: {why}" for kind, why in result.skipped.items() if kind in required]
    result.problems += bench.server_problems
    return result
