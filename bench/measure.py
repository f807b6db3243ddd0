"""One measurement: a fresh server, a generator run, and the typed Run it yields; medians per point.

A generator's JSON becomes a Run here and nowhere else (``Run.from_chatload``,
``Run.from_loadgen``), so every later step reads named, typed fields. Runs disturbed by other
processes on the measured cores are repeated and the least disturbed one kept; a point's figures
are medians over its clean runs (``Point``), except loss, where the worst run counts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import log
from bench.generator import Chatload, Loadgen
from bench.machine import Pinning, wait_for_quiet
from bench.servers import Kind, ServerProcess, free_port

P99_LIMIT_MS = 50.0
# load generator CPU (fraction of one core): at GEN_CPU_LIMIT the run is invalid (the numbers would
# describe the generator); above GEN_CPU_WARN its event loop adds measurable delay, so latencies are
# upper bounds (a pass still passes, a fail is inconclusive)
GEN_CPU_LIMIT = 0.90
GEN_CPU_WARN = 0.75
# a run is noisy when other processes kept the server waiting for its core this share of the
# window (or the generator twice that); noisy runs are repeated and the least disturbed one kept
NOISE_LIMIT = 0.05
# idle runs: most members connecting at once (below chat-svc's --max-pending, 1024). A burst of
# WebSocket members arrives faster than the server can upgrade them; past its backlog the kernel
# drops handshakes, TCP retries them seconds later and the generator gives up on them, and the
# run would measure that instead of what the members cost.
IDLE_MAX_CONNECTING = 1000


@dataclass
class Observer:
    """What the passive clients of a separate, lightly loaded chatload --observe saw in the run."""

    members: int
    received: int | None
    malformed: int | None
    p50_ms: float | None
    p99_ms: float | None
    p999_ms: float | None


@dataclass
class IdleProbe:
    """Idle mode: members held connected, then one broadcast that must reach every one."""

    probe_expected: int | None
    probe_delivered: int | None
    probe_last_ms: float | None
    server_rss_mb_before: float
    server_rss_mb_hold: float
    rss_kb_per_member: float | None
    rss_kb_per_member_hold: float | None
    rss_kb_total_per_member: float | None
    ramp_s: float | None


@dataclass
class RedisUse:
    cpu_s: float
    rss_mb: float


@dataclass
class Figures:
    """What a run measures and a point reports as the median over its runs."""

    deliveries_per_s: float | None
    p50_ms: float | None
    p99_ms: float | None
    p999_ms: float | None
    max_ms: float | None
    server_us_per_delivery: float | None
    server_cpu_util: float | None
    server_user_share: float | None
    server_rss_mb: float | None
    server_rss_mb_max: float | None
    gen_cpu: float | None
    loss_ratio: float | None


@dataclass
class Run(Figures):
    """One generator run against one fresh server (or pair of servers sharing a redis)."""

    label: str
    server: str
    tool: str  # chatload | external
    protocol: str  # raw | irc | ws
    members: int
    rate: float
    attempt: int
    connected: int | None
    join_failed: int | None
    sync_ok: bool
    sent: int | None
    expected: int | None
    delivered: int | None
    lost: int | None
    send_lag_mean_us: float | None
    lines_per_read: float | None
    malformed: int | None
    merged_lines: int | None
    duplicates: int | None
    out_of_order: int | None
    disconnects: int | None
    steal_s: float | None
    # --ids: load lines without an id, ids that did not grow per member, one line with two ids
    id_missing: int | None = None
    id_errors: int | None = None
    id_mismatch: int | None = None
    # interference: busy time of the two cores not spent by our processes, and the time our
    # processes were runnable while another task had their core (the direct measure); the
    # external generator reports no per-core window, so its runs are judged by chatload's
    other_cpu_before: float = 0.0
    other_cpu_server_core: float = 0.0
    other_cpu_gen_core: float = 0.0
    server_runq_wait: float = 0.0
    gen_runq_wait: float = 0.0
    disturbance: float = 0.0
    noisy: bool = False
    # verdict (see _judge)
    valid: bool = True
    invalid_reasons: list[str] = field(default_factory=list)
    gen_busy: bool = False
    server_alive: bool = True
    observer: Observer | None = None
    idle: IdleProbe | None = None
    redis: RedisUse | None = None

    @classmethod
    def from_chatload(cls, raw: dict[str, Any], server: str, attempt: int = 0, other_cpu_before: float = 0.0) -> Run:
        lat = raw.get("latency_ms", {})
        if not lat.get("n", 1):
            lat = {}
        window = raw.get("window_s", 0) or 0
        busy = raw.get("cpu_busy_s_window", [0, 0])
        srv_cpu = raw.get("server_cpu_s_window", 0)
        gen_cpu_window = raw.get("loadgen_cpu_util_window", 0) or 0
        gen_cpu = raw.get("loadgen_cpu_util_send") if raw.get("mode") == "fanout" else gen_cpu_window

        def per_window(seconds: float | None) -> float:
            return (seconds or 0) / window if window > 0 else 0.0

        run = cls(
            **_alike(raw),
            server=server,
            tool="chatload",
            rate=raw.get("rate", 0.0),
            attempt=attempt,
            join_failed=raw.get("join_failed"),
            p50_ms=lat.get("p50"),
            p99_ms=lat.get("p99"),
            p999_ms=lat.get("p999"),
            max_ms=lat.get("max"),
            server_us_per_delivery=raw.get("server_cpu_us_per_delivery"),
            server_cpu_util=raw.get("server_cpu_util_window"),
            server_user_share=round(raw.get("server_user_s_window", 0) / srv_cpu, 3) if srv_cpu else None,
            gen_cpu=gen_cpu,
            lines_per_read=raw.get("load_lines_per_read"),
            steal_s=raw.get("steal_s_window"),
            other_cpu_before=round(other_cpu_before, 2),
            other_cpu_server_core=round(per_window(max(0.0, busy[1] - srv_cpu)) if len(busy) > 1 else 0.0, 3),
            other_cpu_gen_core=round(per_window(max(0.0, busy[0] - gen_cpu_window * window)) if busy else 0.0, 3),
            server_runq_wait=round(per_window(raw.get("server_runq_wait_s_window")), 4),
            gen_runq_wait=round(per_window(raw.get("loadgen_runq_wait_s_window")), 4),
        )
        run._judge(max(raw.get("loadgen_cpu_util_send") or 0, gen_cpu_window), per_window(raw.get("steal_s_window")))
        if raw.get("mode") == "idle":
            run.idle = _idle_probe(raw, run.members)
        return run

    @classmethod
    def from_loadgen(cls, raw: dict[str, Any], server: str, rate: float, attempt: int = 0) -> Run:
        """The independent generator's documented fields (see shared/bench/README.md)."""
        lat = {k: (raw.get("latency_us", {}).get(k) or 0) / 1000 for k in ("p50", "p99", "p999", "max")}
        run = cls(
            **_alike(raw),
            server=server,
            tool="external",
            rate=rate,
            attempt=attempt,
            join_failed=None,
            p50_ms=lat["p50"],
            p99_ms=lat["p99"],
            p999_ms=lat["p999"],
            max_ms=lat["max"],
            server_us_per_delivery=raw.get("server_us_per_delivery"),
            server_cpu_util=raw.get("server_cpu_util_send_drain"),
            server_user_share=None,
            gen_cpu=raw.get("loadgen_cpu_util_send"),
            lines_per_read=None,
            steal_s=raw.get("steal_s_send_drain"),
        )
        gen = max(raw.get("loadgen_cpu_util_send") or 0, raw.get("loadgen_cpu_util_send_drain") or 0)
        run._judge(gen, 0.0)
        return run

    def _judge(self, gen_cpu: float, steal: float) -> None:
        if gen_cpu >= GEN_CPU_LIMIT:
            self.invalid_reasons.append(f"load generator CPU {gen_cpu:.2f} of a core")
        if (self.send_lag_mean_us or 0) > 2000:
            self.invalid_reasons.append("load generator fell behind its send schedule")
        self.valid = not self.invalid_reasons
        self.gen_busy = GEN_CPU_WARN <= gen_cpu < GEN_CPU_LIMIT
        self.disturbance = round(max(self.server_runq_wait, self.gen_runq_wait / 2, steal), 4)
        self.noisy = self.disturbance > NOISE_LIMIT

    def passes(self, p99_limit: float = P99_LIMIT_MS) -> bool:
        """Meets the latency target with nothing lost, measured by a generator that kept up."""
        return (
            self.valid
            and self.sync_ok
            and self.lost == 0
            and (self.delivered or 0) > 0
            and self.p99_ms is not None
            and self.p99_ms <= p99_limit
        )

    def correct(self) -> bool:
        ids_wrong = self.id_missing or self.id_errors or self.id_mismatch
        return not self.malformed and not self.duplicates and not self.out_of_order and not ids_wrong


def _alike(raw: dict[str, Any]) -> dict[str, Any]:
    """The fields both generators name alike (chatload took loadgen's documented names)."""
    return {
        "label": raw.get("label", ""),
        "protocol": raw.get("protocol", "raw"),
        "members": raw.get("clients", 0),
        "connected": raw.get("connected"),
        "sync_ok": bool(raw.get("sync_ok")),
        "sent": raw.get("sent"),
        "expected": raw.get("expected"),
        "delivered": raw.get("delivered"),
        "lost": raw.get("lost"),
        "loss_ratio": raw.get("loss_ratio"),
        "deliveries_per_s": raw.get("deliveries_per_s"),
        "send_lag_mean_us": raw.get("send_lag_mean_us"),
        "malformed": raw.get("malformed"),
        "merged_lines": raw.get("merged_lines"),
        "duplicates": raw.get("duplicates"),
        "out_of_order": raw.get("out_of_order"),
        "disconnects": raw.get("disconnects_by_server"),
        "id_missing": raw.get("id_missing") if raw.get("ids") else None,
        "id_errors": raw.get("id_errors") if raw.get("ids") else None,
        "id_mismatch": raw.get("id_mismatch") if raw.get("ids") else None,
        "server_rss_mb": round(raw.get("server_rss_kb_end", 0) / 1024, 1),
        "server_rss_mb_max": round(raw.get("server_rss_kb_max_sampled", 0) / 1024, 1),
    }


def _idle_probe(raw: dict[str, Any], members: int) -> IdleProbe:
    start = raw.get("server_rss_kb_start", 0)
    end = raw.get("server_rss_kb_end", 0)
    hold = raw.get("server_rss_kb_hold", 0)
    return IdleProbe(
        probe_expected=raw.get("probe_expected"),
        probe_delivered=raw.get("probe_delivered"),
        probe_last_ms=raw.get("probe_last_ms"),
        server_rss_mb_before=round(start / 1024, 1),
        server_rss_mb_hold=round(hold / 1024, 1),
        rss_kb_per_member=round((end - start) / members, 2) if members else None,
        rss_kb_per_member_hold=round((hold - start) / members, 2) if members else None,
        rss_kb_total_per_member=round(end / members, 2) if members else None,
        ramp_s=raw.get("ramp_s"),
    )


def med(values: Sequence[float | int | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return float(a) / float(b)


@dataclass
class Point(Figures):
    """One (server, rate) point: medians over its clean runs (all runs if none is clean)."""

    lost: float | None
    lost_max: int  # the worst run: one lossy run is a finding, not noise
    gen_cpu_max: float
    runs: int
    clean_runs: int
    valid: bool
    gen_busy: bool
    sync_ok: bool
    correct: bool
    observer_p50_ms: float | None = None
    observer_p99_ms: float | None = None

    @classmethod
    def of(cls, runs: Sequence[Run]) -> Point:
        clean = [r for r in runs if not r.noisy] or list(runs)
        seen = [r.observer for r in clean if r.observer]
        medians = {f.name: med([getattr(r, f.name) for r in clean]) for f in dataclasses.fields(Figures)}
        return cls(
            **medians,
            lost=med([r.lost for r in clean]),
            lost_max=max((r.lost or 0) for r in runs),
            gen_cpu_max=max((r.gen_cpu or 0) for r in runs),
            runs=len(runs),
            clean_runs=len([r for r in runs if not r.noisy]),
            valid=all(r.valid for r in clean),
            gen_busy=any(r.gen_busy for r in clean),
            sync_ok=all(r.sync_ok for r in clean),
            correct=all(r.correct() for r in clean),
            observer_p50_ms=med([o.p50_ms for o in seen]),
            observer_p99_ms=med([o.p99_ms for o in seen]),
        )

    def passes(self, p99_limit: float = P99_LIMIT_MS) -> bool:
        return self.lost_max == 0 and self.p99_ms is not None and self.p99_ms <= p99_limit and self.valid


# ----------------------------------------------------------------------------- running one


@dataclass
class Bench:
    """What every measurement needs: generators, pinning, the servers, and where results go."""

    chatload: Chatload
    pin: Pinning
    workdir: Path
    kinds: dict[str, Kind]
    quiet_wait: float
    retries: int
    external: Loadgen | None = None
    on_run: Callable[[Run], None] = lambda run: None
    runs: list[Run] = field(default_factory=list)
    server_problems: list[str] = field(default_factory=list)

    def record(self, run: Run) -> None:
        self.runs.append(run)
        self.on_run(run)

    @contextlib.contextmanager
    def server(self, kind: str, extra: Sequence[str] = ()) -> Iterator[ServerProcess]:
        """A fresh server of ``kind`` on a free port; stopped and checked when the block ends."""
        k = self.kinds[kind]
        port = free_port()
        srv = ServerProcess(kind, k.argv(port, extra), port, self.workdir, pin=self.pin, exit_codes=k.exit_codes)
        try:
            srv.wait_ready(http=k.http_ready)
            yield srv
        finally:
            self.server_problems.extend(srv.stop())

    def start(self, name: str, argv: Sequence[str], port: int, exit_codes: Sequence[int] = (0,)) -> ServerProcess:
        """A helper server (redis-server); the caller stops it with ``self.stop``."""
        return ServerProcess(name, argv, port, self.workdir, pin=self.pin, exit_codes=exit_codes)

    def stop(self, srv: ServerProcess) -> None:
        self.server_problems.extend(srv.stop())

    def quiet(self) -> float:
        return wait_for_quiet(self.pin.cores(), self.quiet_wait)


def measure(
    bench: Bench,
    kind: str,
    members: int,
    rate: float,
    label: str,
    *,
    idle: bool = False,
    extra: Sequence[str] = (),
    tool: str = "chatload",
    observers: int = 0,
) -> Run:
    """One measurement on a fresh server, repeated (bounded) while other load disturbs it.

    With ``observers``, that many of the ``members`` are passive clients in a separate, lightly
    loaded chatload process (``--observe``) that time every line they receive: an independent
    check of the main generator's latency figures."""
    k = bench.kinds[kind]
    attempts: list[Run] = []
    for attempt in range(bench.retries + 1):
        pre = bench.quiet()
        with (
            bench.server(kind, extra) as srv,
            bench.chatload.observer(srv.port, observers, members, k.connect_rate, k.protocol) as obs,
        ):
            if tool == "external":
                assert bench.external is not None
                raw = bench.external.run(
                    srv.port, srv.pid, members - observers, rate, label, k.connect_rate, k.protocol
                )
                run = Run.from_loadgen(raw, kind, rate, attempt)
                run.other_cpu_before = round(pre, 2)
            else:
                raw = bench.chatload.run(
                    [srv.port], [srv.pid], members - observers, rate, label, protocol=k.protocol, idle=idle,
                    connect_rate=3000 if idle else k.connect_rate, drain=10.0 if idle else None, ids=k.ids,
                    max_connecting=IDLE_MAX_CONNECTING if idle else 0,
                )  # fmt: skip
                run = Run.from_chatload(raw, kind, attempt, pre)
            run.server_alive = srv.alive()
        if obs:
            lat = obs.get("latency_ms", {})
            run.observer = Observer(
                observers, obs.get("delivered"), obs.get("malformed"), lat.get("p50"), lat.get("p99"), lat.get("p999")
            )
        attempts.append(run)
        bench.record(run)
        if not run.noisy:
            break
        if attempt < bench.retries:
            log("  (other processes used the benchmark cores during that run; repeating it)")
    return min(attempts, key=lambda r: r.disturbance)
