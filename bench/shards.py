"""The ``shards`` scenario (issue 16): one Redis against a 3-master Redis Cluster, in one run.

For each backend and rate: two chat-svc instances, ``members`` members in ``rooms`` rooms (each
room's members split over both instances), one chatload per room, all at once. The backend is one
redis-server or a cluster of 3 masters the scenario starts itself on free loopback ports
(bench/rediscluster.py) and stops afterwards. Besides what the generators measure, a thread
samples /proc/<pid>/stat of every chat-svc and redis-server and /proc/stat every SAMPLE_S, and
each process's CPU is read over the sending window the generators report (CLOCK_MONOTONIC: the
latest start to the earliest end), which gives the Redis CPU per shard.

Every server shares the server core (the generators have the other), as in the ``redis``
scenario: on a 2-core machine the figures show what each process costs, not what two machines
would carry. How many msg/s a shard would take before it fills a core is extrapolated on paper
from its CPU per msg/s (``extrapolate``), never measured.
"""

from __future__ import annotations

import contextlib
import shutil
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import pairwise
from types import TracebackType

from bench import log, rediscluster
from bench.machine import cpu_busy, proc_cpu, proc_rss_kb
from bench.measure import GEN_CPU_LIMIT, Bench, Run, med
from bench.servers import ServerProcess, free_port, redis_argv, wait_backplane

BACKENDS = ("redis", "cluster")  # one redis-server; a cluster of CLUSTER_MASTERS masters
CLUSTER_MASTERS = 3
SAMPLE_S = 0.1
CONNECT_RATE = 500  # per generator: ten of them connect at once


def room_names(rooms: int) -> list[str]:
    """room-0 ... room-9 spread 4/3/3 over a 3-master cluster's default slot split."""
    return [f"room-{i}" for i in range(rooms)]


# ----------------------------------------------------------------------------- CPU over a window


def cores_between(samples: Sequence[tuple[float, float]], start: float, end: float) -> float | None:
    """Cores used between ``start`` and ``end`` (CPU seconds per second) from (time, CPU seconds)
    samples, each bound interpolated between the samples around it; None unless both are covered."""

    def at(t: float) -> float | None:
        for (t0, v0), (t1, v1) in pairwise(samples):
            if t0 <= t <= t1:
                return v0 if t1 == t0 else v0 + (v1 - v0) * (t - t0) / (t1 - t0)
        return None

    a, b = at(start), at(end)
    if a is None or b is None or end <= start:
        return None
    return (b - a) / (end - start)


class CpuTrace:
    """Samples the CPU seconds of named processes, of each core (``core<i>``) and of the whole
    machine every SAMPLE_S in a thread, so they can be read over a window known only afterwards."""

    def __init__(self, pids: Mapping[str, int]) -> None:
        self.pids = dict(pids)
        cores = [f"core{i}" for i in range(len(cpu_busy()))]
        self.samples: dict[str, list[tuple[float, float]]] = {name: [] for name in [*self.pids, *cores, "machine"]}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-trace", daemon=True)

    def __enter__(self) -> CpuTrace:
        self._sample()
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sample()

    def _sample(self) -> None:
        t = time.monotonic()
        for name, pid in self.pids.items():
            self.samples[name].append((t, proc_cpu(pid)))
        busy = cpu_busy()
        for i, seconds in enumerate(busy):
            self.samples[f"core{i}"].append((t, seconds))
        self.samples["machine"].append((t, sum(busy)))

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self._sample()

    def cores(self, name: str, start: float, end: float) -> float | None:
        value = cores_between(self.samples.get(name, []), start, end)
        return None if value is None else round(value, 4)


# ----------------------------------------------------------------------------- backends


@dataclass
class Backend:
    """A running Redis backend: the URL the instances get and its redis-server processes."""

    kind: str
    url: str
    nodes: list[ServerProcess]
    cli: str = ""

    def placement(self, rooms: Sequence[str]) -> dict[int, list[str]]:
        """Which node (port) holds each room: its ``{room}`` hash tag's slot."""
        if self.kind == "redis":
            return {self.nodes[0].port: list(rooms)}
        spans = {node.port: rediscluster.own_slots(self.cli, node.port) for node in self.nodes}
        out: dict[int, list[str]] = {port: [] for port in spans}
        for room in rooms:
            slot = rediscluster.key_slot(self.cli, self.nodes[0].port, "{" + room + "}")
            port = next(p for p, ranges in spans.items() if any(lo <= slot <= hi for lo, hi in ranges))
            out[port].append(room)
        return out


def missing(kind: str) -> str:
    need = ["redis-server"] + (["redis-cli"] if kind == "cluster" else [])
    absent = [name for name in need if shutil.which(name) is None]
    return f"{' and '.join(absent)} not installed" if absent else ""


@contextlib.contextmanager
def backend(bench: Bench, kind: str) -> Iterator[Backend]:
    """One redis-server, or CLUSTER_MASTERS cluster masters created with ``redis-cli --cluster
    create``, on free loopback ports and pinned like the servers; stopped and checked afterwards."""
    nodes: list[ServerProcess] = []
    try:
        if kind == "redis":
            port = free_port()
            nodes.append(bench.start("redis-server", redis_argv(port), port))
            nodes[0].wait_ready(timeout=10)
            yield Backend(kind, f"redis://127.0.0.1:{port}/0", nodes)
            return
        exe, cli = shutil.which("redis-server") or "redis-server", shutil.which("redis-cli") or "redis-cli"
        ports = rediscluster.cluster_ports(CLUSTER_MASTERS)
        for port in ports:
            directory = bench.workdir / f"redis-node-{port}"
            directory.mkdir()
            nodes.append(bench.start("redis-node", rediscluster.node_argv(exe, port, directory), port))
        for node in nodes:
            rediscluster.wait_answering(cli, node.port, node.alive)
        rediscluster.create(cli, ports)
        rediscluster.wait_ok(cli, ports)
        yield Backend(kind, f"redis://127.0.0.1:{ports[0]}/0", nodes, cli)
    finally:
        for node in nodes:
            bench.stop(node)


# ----------------------------------------------------------------------------- one measurement


@dataclass
class ShardCpu:
    """One redis-server (a shard, or the single Redis) over the sending window."""

    port: int
    rooms: list[str]
    cpu: float | None  # cores: CPU seconds per second
    rss_mb: float


@dataclass
class ShardRun:
    """One backend at one rate: ``rooms`` generators at once; figures over all rooms."""

    backend: str
    rate: float  # msg/s in total, over all rooms
    members: int
    rooms: int
    window_s: float
    deliveries_per_s: float
    expected: int
    delivered: int
    lost: int
    loss_ratio: float | None
    p50_ms: float | None  # median of the rooms' p50
    p99_ms: float | None  # the worst room's p99
    sync_ok: bool
    correct: bool
    valid: bool
    gen_cpu: float  # all generators together, cores
    chat_svc_cpu: list[float | None]  # cores, per instance
    shards: list[ShardCpu]  # busiest first
    other_cpu: float | None  # cores the machine spent on processes other than these (shared machine)
    server_core_busy: float | None  # share of the servers' core busy (every process on it), when pinned
    labels: list[str] = field(default_factory=list)  # the rooms' Runs in ``runs`` of the results

    @property
    def busiest(self) -> ShardCpu | None:
        return self.shards[0] if self.shards and self.shards[0].cpu is not None else None


def measure_backend(bench: Bench, kind: str, members: int, rooms: int, rate: float, label: str) -> ShardRun | str:
    """One run; a string says why it could not run."""
    names = room_names(rooms)
    per_room = members // rooms
    bench.quiet()
    with backend(bench, kind) as be:
        extra = ["--redis-url", be.url]
        with bench.server("chat-svc", extra) as a, bench.server("chat-svc", extra) as b:
            ok, why = wait_backplane([a.port, b.port])
            if not ok:
                return f"backplane not up: {why}"
            pids = {"chat-svc a": a.pid, "chat-svc b": b.pid} | {str(n.port): n.pid for n in be.nodes}
            with CpuTrace(pids) as trace, ThreadPoolExecutor(rooms) as pool:
                futures = [
                    pool.submit(bench.chatload.run, [a.port, b.port], [a.pid, b.pid], per_room, rate / rooms,
                                f"{label}-{room}", connect_rate=CONNECT_RATE, room=room)
                    for room in names
                ]  # fmt: skip
                raws = [f.result() for f in futures]
            rss = {n.port: round(proc_rss_kb(n.pid) / 1024, 1) for n in be.nodes}
            placement = be.placement(names)
    # into the results' runs, unlogged: ten generators sharing a core wait for each other, so each
    # room's run reads "noisy"; the summary line below is what the run says
    runs = [Run.from_chatload(raw, f"chat-svc x2 + {kind}") for raw in raws]
    bench.runs.extend(runs)
    start = max(raw.get("t_send_start_mono_s", 0.0) for raw in raws)
    end = min(raw.get("t_send_end_mono_s", 0.0) for raw in raws)
    shards = [ShardCpu(n.port, placement.get(n.port, []), trace.cores(str(n.port), start, end), rss[n.port])
              for n in be.nodes]  # fmt: skip
    shards.sort(key=lambda s: -(s.cpu or 0))
    chat_cpu = [trace.cores("chat-svc a", start, end), trace.cores("chat-svc b", start, end)]
    gen_cpu = round(sum(r.gen_cpu or 0 for r in runs), 3)
    machine = trace.cores("machine", start, end)
    ours = [*chat_cpu, *(s.cpu for s in shards)]
    other = None if machine is None or None in ours else round(machine - sum(c or 0 for c in ours) - gen_cpu, 3)
    expected = sum(r.expected or 0 for r in runs)
    lost = sum(r.lost or 0 for r in runs)
    return ShardRun(
        backend=kind,
        rate=rate,
        members=per_room * rooms,
        rooms=rooms,
        window_s=round(end - start, 3),
        deliveries_per_s=round(sum(r.deliveries_per_s or 0 for r in runs), 1),
        expected=expected,
        delivered=sum(r.delivered or 0 for r in runs),
        lost=lost,
        loss_ratio=round(lost / expected, 6) if expected else None,
        p50_ms=med([r.p50_ms for r in runs]),
        p99_ms=max((r.p99_ms for r in runs if r.p99_ms is not None), default=None),
        sync_ok=all(r.sync_ok for r in runs),
        correct=all(r.correct() for r in runs),
        valid=all(r.valid for r in runs) and gen_cpu < GEN_CPU_LIMIT,
        gen_cpu=gen_cpu,
        chat_svc_cpu=chat_cpu,
        shards=shards,
        other_cpu=other,
        server_core_busy=trace.cores(f"core{bench.pin.server_core}", start, end) if bench.pin.enabled else None,
        labels=[r.label for r in runs],
    )


# ----------------------------------------------------------------------------- the scenario


@dataclass
class Extrapolation:
    """On paper, not measured: where a shard's CPU, grown in proportion to the rate, fills one core."""

    backend: str
    rate: float  # msg/s in total it was measured at
    shards: int
    rooms: int
    busiest_port: int
    busiest_rooms: int
    busiest_cpu: float  # cores at ``rate``
    us_per_msg: float  # µs of the busiest shard's CPU per msg/s of total traffic
    saturates_at: float  # msg/s in total at which the busiest shard would use one core
    even_saturates_at: float  # the same with the load spread evenly over the shards


@dataclass
class Shards:
    members: int
    rooms: int
    rates: list[float]
    points: dict[str, dict[str, list[ShardRun]]] = field(default_factory=dict)  # backend -> rate_key -> runs
    extrapolation: dict[str, Extrapolation] = field(default_factory=dict)  # backend -> at the highest rate
    skipped: dict[str, str] = field(default_factory=dict)  # backend -> why


def median_run(runs: Sequence[ShardRun]) -> ShardRun:
    """The run whose busiest shard's CPU is the median (a real run, so its figures agree)."""
    ranked = sorted(runs, key=lambda r: r.busiest.cpu if r.busiest and r.busiest.cpu else 0.0)
    return ranked[(len(ranked) - 1) // 2]


def extrapolate(run: ShardRun) -> Extrapolation | None:
    """From the busiest shard's CPU per msg/s at ``run.rate``, the total rate at which that shard
    would use one whole core, assuming its CPU grows in proportion to the rate (it includes the
    fixed cost of an idle node, so the estimate errs low; batching in fuller pipelines would make
    a busier Redis cheaper per line, and that is not in it)."""
    top = run.busiest
    total = sum(s.cpu or 0 for s in run.shards)
    if top is None or top.cpu is None or top.cpu <= 0 or run.rate <= 0:
        return None
    return Extrapolation(
        backend=run.backend,
        rate=run.rate,
        shards=len(run.shards),
        rooms=run.rooms,
        busiest_port=top.port,
        busiest_rooms=len(top.rooms),
        busiest_cpu=top.cpu,
        us_per_msg=round(top.cpu / run.rate * 1e6, 2),
        saturates_at=round(run.rate / top.cpu),
        even_saturates_at=round(run.rate * len(run.shards) / total),
    )


def shards(bench: Bench, members: int, rooms: int, rates: Sequence[float], repeat: int) -> Shards:
    log(
        f"== shards: two chat-svc instances, {members} members in {rooms} rooms, one Redis against a "
        f"{CLUSTER_MASTERS}-master cluster, rates {list(rates)} msg/s in total"
    )
    result = Shards(members, rooms, list(rates))
    kinds = []
    for kind in BACKENDS:
        why = missing(kind)
        if why:
            log(f"  {kind}: not measured: {why}")
            result.skipped[kind] = why
        else:
            kinds.append(kind)
            result.points[kind] = {}
    for rep in range(repeat):
        for rate in rates:
            for kind in kinds:
                if kind in result.skipped:
                    continue
                got = measure_backend(bench, kind, members, rooms, rate, f"shards-{kind}-{rate:g}-{rep}")
                if isinstance(got, str):
                    log(f"  {kind}: not measured: {got}")
                    result.skipped[kind] = got
                    continue
                log(f"  {summary(got)}")
                result.points[kind].setdefault(f"{rate:g}", []).append(got)
    for kind, points in result.points.items():
        if points and kind not in result.skipped:
            ex = extrapolate(median_run(points[max(points, key=float)]))
            if ex:
                result.extrapolation[kind] = ex
    return result


# ----------------------------------------------------------------------------- report


def _f(v: float | None, nd: int = 2) -> str:
    return "—" if v is None else f"{v:.{nd}f}"


def _ms(v: float | None) -> str:
    return "—" if v is None else f"{v:.1f}" if v < 100 else f"{v:,.0f}"


def summary(run: ShardRun) -> str:
    """One line per run, logged as it finishes."""
    shards = ", ".join(f"{_f(s.cpu, 3)} ({len(s.rooms)} rooms)" for s in run.shards)
    return (
        f"{run.backend:7} {run.rate:>6g} msg/s: {run.deliveries_per_s:,.0f} deliveries/s, lost {run.lost}, "
        f"p99 {_ms(run.p99_ms)} ms, chat-svc CPU {' / '.join(_f(c) for c in run.chat_svc_cpu)}, "
        f"redis CPU {shards}, other processes {_f(run.other_cpu)}, server core busy {_f(run.server_core_busy)}"
    )


def us_per_msg(run: ShardRun) -> float | None:
    """µs of the busiest shard's CPU per msg/s of total traffic."""
    top = run.busiest
    return None if top is None or top.cpu is None or run.rate <= 0 else top.cpu / run.rate * 1e6


def loss_text(run: ShardRun) -> str:
    return "0" if run.lost == 0 else f"{run.lost:,} ({(run.loss_ratio or 0):.2%})"


def rows(result: Shards) -> list[list[str]]:
    """The side-by-side table: per rate, one row per backend (the median run when repeated)."""
    out = []
    for rate in result.rates:
        for kind, points in result.points.items():
            runs = points.get(f"{rate:g}")
            if not runs:
                continue
            r = median_run(runs)
            out.append([
                f"{rate:g}", kind, f"{r.deliveries_per_s:,.0f}", loss_text(r), _ms(r.p50_ms), _ms(r.p99_ms),
                " / ".join(_f(c) for c in r.chat_svc_cpu),
                " / ".join(f"{_f(s.cpu, 3)} ({len(s.rooms)})" for s in r.shards),
                _f(us_per_msg(r), 1),
                _f(r.gen_cpu), _f(r.other_cpu), _f(r.server_core_busy),
                "yes" if r.valid and r.sync_ok and r.correct else "NO",
            ])  # fmt: skip
    return out


HEADER = ["msg/s", "backend", "deliveries/s", "loss", "p50 ms", "p99 ms (worst room)", "chat-svc CPU a / b",
          "Redis CPU per shard (rooms)", "busiest shard µs per msg/s", "gen CPU", "other CPU", "server core busy",
          "valid"]  # fmt: skip


def extrapolation_text(ex: Extrapolation, single: Extrapolation | None = None) -> str:
    text = (
        f"Extrapolation on paper, not measured: at {ex.rate:g} msg/s the busiest of the {ex.shards} shards "
        f"({ex.busiest_rooms} of {ex.rooms} rooms) used {ex.busiest_cpu:.3f} of a core, {ex.us_per_msg:.1f} µs "
        f"per msg/s in total; if its CPU grew in proportion, it would fill one core at about "
        f"{ex.saturates_at:,.0f} msg/s in total ({ex.even_saturates_at:,.0f} msg/s with the load spread evenly "
        f"over the {ex.shards} shards)"
    )

    if single:
        text += (
            f"; one Redis at the same rate used {single.busiest_cpu:.3f} of a core: one core at about "
            f"{single.saturates_at:,.0f} msg/s"
        )

    return text + "."
