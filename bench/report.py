"""The results file (bench/results/<mode>.json, schema below) and the report printed from it.

Schema 2 (``Results``; field names are the JSON keys, documented in docs/performance.md):
machine, pinning and params say what ran where; each scenario has its own object (null when
not run); ``targets`` are issue 7's targets and the ratios against the peers; ``server_problems``
lists every server that did not stop cleanly or logged a failure; ``runs`` holds every Run.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.machine import Machine, Pinning
from bench.measure import GEN_CPU_LIMIT, GEN_CPU_WARN, P99_LIMIT_MS, Point, Run, ratio
from bench.scenarios import Crosscheck, Fanout, Idle, Profile, Redis, Search, Smoke, Storm, rate_key
from bench.shards import HEADER as SHARDS_HEADER
from bench.shards import Shards, extrapolation_text
from bench.shards import rows as shards_rows

SCHEMA = 2
LIMIT = "c-epoll"  # the machine's limit the others are compared with
WS_COST_LIMIT = 1.25  # WebSocket members may cost this much server CPU per delivery, against TCP ones


@dataclass
class Params:
    servers: list[str]
    repeat: int
    duration_s: float
    warmup_s: float
    drain_s: float
    line_bytes: int
    flood_rate: int
    server_cmd: list[str]
    snapshot: str
    baseline: str
    p99_limit_ms: float
    gen_cpu_invalid_at: float
    noisy_if_disturbed_above: float


@dataclass
class Target:
    target: str
    status: str  # PASS | FAIL | INFO
    measured: str


@dataclass
class Results:
    schema: int  # SCHEMA when written
    mode: str  # full | quick | smoke
    machine: Machine
    pinning: Pinning
    params: Params
    fanout: Fanout | None = None
    search: dict[str, Search] | None = None
    idle: Idle | None = None
    idle_ws: Idle | None = None
    redis: Redis | None = None
    shards: Shards | None = None
    storm: Storm | None = None
    crosscheck: Crosscheck | None = None
    profile: Profile | None = None
    smoke: Smoke | None = None
    targets: list[Target] = field(default_factory=list)
    server_problems: list[str] = field(default_factory=list)
    runs: list[Run] = field(default_factory=list)

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(self), indent=1) + "\n")
        tmp.replace(path)


# ----------------------------------------------------------------------------- formatting


def fmt_int(v: float | None) -> str:
    return "—" if v is None else f"{v:,.0f}"


def fmt_ms(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v:.1f}" if v < 100 else f"{v:,.0f}"


def fmt_f(v: float | None, nd: int = 2) -> str:
    return "—" if v is None else f"{v:.{nd}f}"


def fmt_x(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v:.1f}x" if v < 100 else f"{v:,.0f}x"


def fmt_loss(p: Point) -> str:
    if p.lost_max == 0:
        return "0"
    return f"{(p.loss_ratio or 0):.1%}"


def validity(p: Point) -> str:
    if not p.valid:
        return "NO"
    return "yes*" if p.gen_busy else "yes"


def describe(run: Run) -> str:
    """One line per run, logged as it finishes."""
    flags = []
    if not run.valid:
        flags.append("INVALID: " + "; ".join(run.invalid_reasons))
    if run.noisy:
        flags.append(
            f"noisy (waited for their core: server {run.server_runq_wait:.0%}, generator {run.gen_runq_wait:.0%})"
        )
    if run.idle:
        p = run.idle
        return (
            f"{run.server:8} idle {run.members} members: probe {p.probe_delivered}/{p.probe_expected} "
            f"in {fmt_ms(p.probe_last_ms)} ms, RSS {run.server_rss_mb} MB "
            f"({p.rss_kb_per_member} KB/member) {' '.join(flags)}"
        )
    return (
        f"{run.server:8} {run.tool:8} {run.rate:>7g} msg/s: {fmt_int(run.deliveries_per_s)} deliveries/s, "
        f"lost {run.lost}, p50 {fmt_ms(run.p50_ms)} p99 {fmt_ms(run.p99_ms)} "
        f"p999 {fmt_ms(run.p999_ms)} ms, server {fmt_f(run.server_us_per_delivery, 2)} us/delivery, "
        f"gen CPU {fmt_f(run.gen_cpu, 2)} {' '.join(flags)}"
    )


def table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = [
        "| "
        + " | ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        + " |"
        for r in rows
    ]
    return "\n".join([line, sep, *body])


def versus(name: str, a: Point, other: str, b: Point) -> str:
    """Two servers at the same point: throughput, tail latency and CPU per delivery, as ratios."""
    return (
        f"{name} vs {other}: deliveries/s {fmt_x(ratio(a.deliveries_per_s, b.deliveries_per_s))}, "
        f"p99 {fmt_ms(a.p99_ms)} vs {fmt_ms(b.p99_ms)} ms, server CPU per delivery "
        f"{fmt_f(a.server_us_per_delivery)} vs {fmt_f(b.server_us_per_delivery)} µs "
        f"({fmt_x(ratio(a.server_us_per_delivery, b.server_us_per_delivery))} of {other}'s)"
    )


def share_of_limit(search: dict[str, Search], name: str) -> str | None:
    """'x % of the C limit': the largest rate meeting the target, against c-epoll's in the same run."""
    ours, limit = search.get(name), search.get(LIMIT)
    if not ours or not limit:
        return None
    r = ratio(ours.max_rate, limit.max_rate)
    if r is None:
        return None
    text = f"{name} reaches {r:.0%} of the C limit ({LIMIT}: {fmt_int(limit.max_rate)} msg/s) on this machine"
    if limit.generator_bound:
        text += (
            f"; {LIMIT} failed first at {fmt_int(limit.upper_bound_failed)} msg/s because the load generator "
            "could not keep up, so its own limit is higher and this share is an upper bound"
        )
    return text


# ----------------------------------------------------------------------------- the report


def render(res: Results) -> str:
    out: list[str] = []
    m, pin = res.machine, res.pinning
    out.append(
        f"machine: {m.nproc} CPUs ({m.cpu_model}), kernel {m.kernel}, Python {m.python}, gevent {m.gevent}, "
        f"{m.date_utc}; server pinned to core {pin.server_core}, generator to core {pin.gen_core}"
        if pin.enabled
        else f"machine: {m.nproc} CPUs ({m.cpu_model}); NOT pinned (fewer than 2 CPUs or no taskset)"
    )
    if res.fanout:
        out += ["", *_fanout(res.fanout, res.params.repeat)]
    if res.search:
        out += ["", *_search(res.search)]
    for idle in (res.idle, res.idle_ws):
        if idle:
            out += ["", _idle(idle)]
    if res.redis:
        out += ["", *_redis(res.redis)]
    if res.shards:
        out += ["", *_shards(res.shards)]
    if res.storm:
        out += ["", _storm(res.storm)]
    if res.crosscheck:
        out += ["", *_crosscheck(res.crosscheck)]
    if res.profile:
        out += ["", *_profile(res.profile)]
    if res.server_problems:
        out += ["", "Servers that did not stop cleanly or logged a failure:"]
        out += [f"  {p}" for p in res.server_problems]
    if res.targets:
        out += ["", "Targets (issue 7) and peers"]
        out += [f"  [{t.status:4}] {t.target}: {t.measured}" for t in res.targets]
    return "\n".join(out)


def _fanout(fan: Fanout, repeat: int) -> list[str]:
    out = [
        f"Fan-out: {fan.members} members in one room, all sending 64-byte lines, flood control off "
        f"(medians of {repeat} run(s))"
    ]
    rows = []
    for rate in fan.rates:
        for kind, pts in fan.points.items():
            a = pts[rate_key(rate)]
            rows.append([kind, f"{rate:g}", fmt_int(a.deliveries_per_s), fmt_loss(a), fmt_ms(a.p50_ms),
                         fmt_ms(a.p99_ms), fmt_ms(a.p999_ms), fmt_f(a.server_us_per_delivery, 2),
                         fmt_f(a.server_rss_mb, 0), fmt_f(a.gen_cpu, 2), validity(a)])  # fmt: skip
    out.append(
        table(rows, ["server", "msg/s", "deliveries/s", "loss", "p50 ms", "p99 ms", "p999 ms",
                     "server µs/delivery", "server RSS MB", "gen CPU", "valid"])
    )  # fmt: skip
    out.append(
        f"  valid: yes* = the load generator used {GEN_CPU_WARN:.2f}-{GEN_CPU_LIMIT:.2f} of its core, so its "
        "event loop adds delay and latencies are upper bounds; NO = it reached "
        f"{GEN_CPU_LIMIT:.2f} (numbers describe the generator)"
    )
    for kind, why in fan.skipped.items():
        out.append(f"  {kind}: not measured: {why}")
    ours = fan.points.get("chat-svc")
    if ours:
        for rate in fan.rates:
            key = rate_key(rate)
            for other, pts in fan.points.items():
                if other != "chat-svc":
                    out.append(f"  at {rate:g} msg/s " + versus("chat-svc", ours[key], other, pts[key]))
    return out


def _search(srch: dict[str, Search]) -> list[str]:
    members = next(iter(srch.values())).members
    out = [f"Largest rate meeting p99 <= {P99_LIMIT_MS:g} ms with 0 loss ({members} members)"]
    rows = []
    for kind, s in srch.items():
        a = s.at_max
        first_failing = "—" if s.upper_bound_failed is None else f"{s.upper_bound_failed:g}"
        if s.generator_bound:
            first_failing += " (generator)"
        rows.append([kind, fmt_int(s.max_rate) if (s.max_rate or 0) >= 20 else str(s.max_rate),
                     fmt_int(a.deliveries_per_s if a else None), fmt_ms(a.p99_ms if a else None),
                     fmt_f(a.server_us_per_delivery if a else None, 2), fmt_f(a.gen_cpu if a else None, 2),
                     first_failing, s.note])  # fmt: skip
    out.append(
        table(rows, ["server", "max msg/s", "deliveries/s", "p99 ms", "server µs/delivery", "gen CPU",
                     "first failing", "note"])
    )  # fmt: skip
    ours = srch.get("chat-svc")
    if ours:
        for other, s in srch.items():
            if other not in ("chat-svc", LIMIT):
                out.append(f"  ratio chat-svc / {other}: {fmt_x(ratio(ours.max_rate, s.max_rate))}")
        share = share_of_limit(srch, "chat-svc")
        if share:
            out.append(f"  {share}")
    return out


def _idle(idle: Idle) -> str:
    return (
        f"Idle ({idle.server}): {idle.members:,} members asked for, one broadcast: reached "
        f"{idle.probe_delivered_min:,}/{idle.others:,} ({idle.probe_expected or 0:,} got in) "
        f"(last after {fmt_ms(idle.probe_last_ms)} ms); "
        f"server RSS {fmt_f(idle.server_rss_mb, 0)} MB "
        f"(before connects {fmt_f(idle.server_rss_mb_before, 0)} MB): "
        f"{fmt_f(idle.rss_kb_per_member, 2)} KB per member added "
        f"({fmt_f(idle.rss_kb_total_per_member, 2)} KB total/member); "
        f"generator CPU {fmt_f(idle.gen_cpu, 2)}." + (f" Seed: {idle.seed}" if idle.server == "chat-svc" else "")
    )


def _redis(red: Redis) -> list[str]:
    if red.skipped:
        return [f"Redis backplane: skipped ({red.skipped})"]
    rows = [
        [rate, fmt_int(a.deliveries_per_s), fmt_loss(a), fmt_ms(a.p50_ms), fmt_ms(a.p99_ms),
         fmt_f(a.server_us_per_delivery, 2), fmt_f(a.gen_cpu, 2)]
        for rate, a in red.points.items()
    ]  # fmt: skip
    return [
        f"Redis backplane: two chat-svc instances + redis-server, {red.members} members in one room",
        table(rows, ["msg/s", "deliveries/s", "loss", "p50 ms", "p99 ms", "µs/delivery (both)", "gen CPU"]),
    ]


def _shards(sh: Shards) -> list[str]:
    out = [
        f"Redis shards: two chat-svc instances, {sh.members} members in {sh.rooms} rooms (each split over both), "
        "one Redis against a 3-master cluster; CPU in cores over the sending window, every server on one core",
        table(shards_rows(sh), SHARDS_HEADER),
    ]
    out += [f"  {kind}: not measured: {why}" for kind, why in sh.skipped.items()]
    cluster = sh.extrapolation.get("cluster")
    if cluster:
        out.append("  " + extrapolation_text(cluster, sh.extrapolation.get("redis")))
    return out


def _storm(st: Storm) -> str:
    if st.run is None:
        return f"Reconnect storm: skipped ({st.skipped})"
    verdict = "; ".join(st.problems) or "nothing lost, repeated or reordered"
    return (
        f"Reconnect storm: {st.members:,} members of instance a dropped at once and resumed on instance b "
        f"(Redis, {st.rate:g} msg/s flowing): all back in {fmt_f(st.all_back_s, 2)} s (p50 {fmt_f(st.p50_s, 2)} s, "
        f"p99 {fmt_f(st.p99_s, 2)} s), {st.complete}/{st.members} complete, {st.replayed_lines:,} lines replayed, "
        f"{verdict}; plain connects of {st.members:,} to one instance in the same run: "
        f"{fmt_f(st.plain_connect_s, 2)} s"
    )


def _crosscheck(xc: Crosscheck) -> list[str]:
    names = {"deliveries_per_s": "deliveries/s", "p50_ms": "p50 ms", "p99_ms": "p99 ms",
             "server_us_per_delivery": "server µs/delivery", "gen_cpu": "gen CPU",
             "observer_p50_ms": "observers' p50 ms", "observer_p99_ms": "observers' p99 ms"}  # fmt: skip
    rows = []
    for p in xc.points:
        for key, name in names.items():
            d = p.relative_diff.get(key)
            rows.append([f"{p.server} @ {p.rate:g}", name, fmt_f(getattr(p.chatload, key), 2),
                         fmt_f(getattr(p.external, key), 2), "—" if d is None else f"{d:+.0%}"])  # fmt: skip
    out = [
        f"Cross-check with {xc.tool} (medians; difference = chatload / external - 1)",
        table(rows, ["point", "metric", "chatload", "external", "difference"]),
    ]
    for p in xc.points:
        a, b = p.chatload, p.external
        ra, rb = ratio(a.p50_ms, a.observer_p50_ms), ratio(b.p50_ms, b.observer_p50_ms)
        if ra is not None and rb is not None:
            out.append(
                f"  {p.server} @ {p.rate:g}: p50 against the same run's passive observers: "
                f"chatload {ra - 1:+.0%}, external {rb - 1:+.0%}"
            )
    return out


def _profile(prof: Profile) -> list[str]:
    if prof.skipped:
        return [f"Profile: skipped ({prof.skipped})"]
    share = prof.server_user_share
    out = [
        f"Profile (py-spy, chat-svc at {prof.rate:g} msg/s, {prof.samples} samples): server CPU "
        f"{fmt_f(prof.server_cpu_util, 2)} of a core, of which "
        f"{'?' if share is None else f'{share:.0%}'} in user space (Python) and the rest in the kernel"
    ]
    out += [f"  {pct:5.1f}% self  {name}" for name, pct in prof.top_self_pct[:8]]
    return out


# ----------------------------------------------------------------------------- targets


def check_targets(res: Results) -> list[Target]:
    out: list[Target] = []
    fan = res.fanout.points.get("chat-svc", {}) if res.fanout else {}

    def fan_target(rate: str, limit: float, name: str) -> None:
        a = fan.get(rate)
        if a:
            out.append(
                Target(
                    name,
                    "PASS" if a.passes(limit) else "FAIL",
                    f"p99 {fmt_ms(a.p99_ms)} ms, loss {fmt_loss(a)} (worst run lost {a.lost_max}), "
                    f"{fmt_int(a.deliveries_per_s)} deliveries/s, gen CPU {fmt_f(a.gen_cpu, 2)}",
                )
            )

    fan_target("300", 20.0, "300 msg/s: p99 <= 20 ms")
    fan_target("2000", P99_LIMIT_MS, "2000 msg/s (~2M deliveries/s): 0 loss, p99 <= 50 ms (required)")
    fan_target("3000", P99_LIMIT_MS, "3000 msg/s (~3M deliveries/s): 0 loss, p99 <= 50 ms (goal)")
    ws = res.fanout.points.get("chat-svc-ws", {}) if res.fanout else {}
    tcp, web = fan.get("2000"), ws.get("2000")
    if tcp and web:
        cost = ratio(web.server_us_per_delivery, tcp.server_us_per_delivery)
        ok = web.passes(P99_LIMIT_MS) and cost is not None and cost <= WS_COST_LIMIT
        out.append(
            Target(
                f"WebSocket at 2000 msg/s: 0 loss, p99 <= 50 ms, server µs/delivery <= {WS_COST_LIMIT:g}x TCP's "
                "in the same run (issue 13)",
                "PASS" if ok else "FAIL",
                f"p99 {fmt_ms(web.p99_ms)} ms, loss {fmt_loss(web)}, {fmt_f(web.server_us_per_delivery)} vs "
                f"{fmt_f(tcp.server_us_per_delivery)} µs/delivery ({fmt_x(cost)} of TCP's), gen CPU "
                f"{fmt_f(web.gen_cpu, 2)}",
            )
        )
    fan = res.fanout.points.get("chat-svc-ids", {}) if res.fanout else {}
    fan_target("2000", P99_LIMIT_MS, "2000 msg/s with every member on ids: 0 loss, p99 <= 50 ms (issue 12)")
    if res.storm and res.storm.run is not None:
        st = res.storm
        ok = not st.problems and st.all_back_s is not None and st.all_back_s < 5.0
        out.append(Target(f"reconnect storm of {st.members:,}: all back and resumed in < 5 s, nothing lost",
                          "PASS" if ok else "FAIL", _storm(st).split(": ", 1)[1]))  # fmt: skip
    for idle in (res.idle, res.idle_ws):
        if not idle:
            continue
        ok = idle.reached_all and (idle.rss_kb_per_member or 99) <= 8
        out.append(
            Target(
                f"{idle.members:,} {idle.server} members, every one reached, <= 8 KB RSS per member",
                "PASS" if ok else "FAIL",
                f"{idle.probe_delivered_min:,}/{idle.others:,} reached ({idle.probe_expected or 0:,} got in), "
                f"{fmt_f(idle.rss_kb_per_member, 2)} KB/member added "
                f"({fmt_f(idle.rss_kb_total_per_member, 2)} KB total/member)",
            )
        )
    srch = res.search or {}
    if "chat-svc" in srch:
        rates = ", ".join(f"{k} {fmt_int(s.max_rate)} msg/s" for k, s in srch.items())
        out.append(Target("largest rate with p99 <= 50 ms and 0 loss, per server", "INFO", rates))
        share = share_of_limit(srch, "chat-svc")
        if share:
            out.append(Target("share of the machine's limit", "INFO", share))
    out.append(
        Target(
            "every server exited cleanly after SIGTERM, with no failure in its log",
            "FAIL" if res.server_problems else "PASS",
            f"{len(res.server_problems)} problem(s)" if res.server_problems else "all clean",
        )
    )
    return out
