"""``python -m bench``: parse the flags, run the chosen scenarios, print the report, write the results."""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

import bench
from bench import BENCH, log, scenarios, shards
from bench.generator import BROADCASTER_SRC, CHATLOAD_SRC, Chatload, Loadgen, Timing, build
from bench.machine import Pinning, machine_info
from bench.measure import GEN_CPU_LIMIT, NOISE_LIMIT, P99_LIMIT_MS, Bench
from bench.report import SCHEMA, Params, Results, check_targets, describe, render
from bench.servers import default_ours_cmd, export_snapshot, find_ngircd, kinds

SCENARIOS = ("fanout", "search", "idle", "idle-ws", "redis", "shards", "storm", "profile", "crosscheck")
SERVERS = ("chat-svc", "chat-svc-base", "chat-svc-ids", "chat-svc-ws", "seed", "c-epoll", "ngircd")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench", description=bench.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--smoke", action="store_true", help="a few seconds per server, correctness only (CI)")
    mode.add_argument("--quick", action="store_true", help="one run per point and a shorter search")
    p.add_argument("--only", default="", help=f"comma list of scenarios: {','.join(SCENARIOS)}")
    p.add_argument(
        "--servers",
        default="",
        help=f"servers compared in fanout, search and smoke (default {','.join(SERVERS)}; one that cannot run "
        "here is skipped with the reason, unless named here)",
    )
    p.add_argument("--rates", default="100,300,1000,2000,3000", help="fan-out rates, msg/s in total")
    p.add_argument("--members", type=int, default=1000)
    p.add_argument("--idle-members", type=int, default=19000)
    p.add_argument("--rooms", type=int, default=10, help="rooms the shards scenario spreads --members over")
    p.add_argument("--shard-rates", default="1000,3000", help="shards scenario rates, msg/s in total over all rooms")
    p.add_argument("--storm-members", type=int, default=10000, help="members dropped and resumed in the storm")
    p.add_argument("--storm-rate", type=float, default=100, help="msg/s sent while the storm runs")
    p.add_argument("--repeat", type=int, default=None, help="runs per point (default 3, --quick 1)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds of sending per run")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--drain", type=float, default=5.0, help="most seconds to wait for in-flight deliveries")
    p.add_argument("--server-cmd", default="", help="command for chat-svc (default: the venv's chat-svc)")
    p.add_argument(
        "--snapshot",
        default="",
        metavar="REV",
        help="benchmark chat-svc as committed at git REV (service/ exported to a temp dir), not the working tree",
    )
    p.add_argument(
        "--baseline",
        default="",
        metavar="REV",
        help="also measure chat-svc as committed at git REV, as server chat-svc-base, in the same run",
    )
    p.add_argument("--crosscheck-loadgen", default="", help="path of an independent loadgen binary to cross-check with")
    p.add_argument("--crosscheck-points", default="chat-svc:1000,chat-svc:2000,chat-svc:3000,seed:100")
    p.add_argument("--no-pin", action="store_true", help="do not pin with taskset")
    p.add_argument("--quiet-wait", type=float, default=20.0, help="most seconds to wait for other load before a run")
    p.add_argument(
        "--nice",
        type=int,
        default=None,
        help="scheduling niceness of server and generator (default -15 when permitted: keeps other "
        "processes on a shared machine from taking the measured cores; 0 = off)",
    )
    p.add_argument("--retries", type=int, default=None, help="repeats of a run disturbed by other load (default 1)")
    p.add_argument("--results-dir", default=str(BENCH / "results"))
    p.add_argument("--out", default="", help="results file name (default: <mode>.json)")
    p.add_argument("--cc", default="gcc")
    args = p.parse_args(argv)
    default_servers = [s for s in SERVERS if s != "chat-svc-base" or args.baseline]
    args.server_list = [s.strip() for s in args.servers.split(",") if s.strip()] or default_servers
    unknown = set(args.server_list) - set(SERVERS)
    if unknown:
        p.error(f"unknown server(s) {', '.join(sorted(unknown))}; choose from {', '.join(SERVERS)}")
    return args


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # stop servers and generators on the way out
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    repeat = args.repeat or (1 if mode in ("quick", "smoke") else 3)
    retries = args.retries if args.retries is not None else (0 if mode == "smoke" else 1)
    nice = args.nice if args.nice is not None else (-15 if os.geteuid() == 0 and mode != "smoke" else 0)
    pin = Pinning.for_host(not args.no_pin, nice)
    smoke = mode == "smoke"
    timing = Timing(2.0, 0.3, 3.0) if smoke else Timing(args.duration, args.warmup, args.drain)
    workdir = Path(tempfile.mkdtemp(prefix="chat-bench-"))
    ours_cmd = shlex.split(args.server_cmd) if args.server_cmd else default_ours_cmd()
    snapshot = ""
    if args.snapshot:
        ours_cmd, snapshot = export_snapshot(args.snapshot, workdir)
    baseline_cmd, baseline = export_snapshot(args.baseline, workdir, "baseline") if args.baseline else (None, "")
    chatload = Chatload(build(CHATLOAD_SRC, args.cc), pin, timing)
    broadcaster = build(BROADCASTER_SRC, args.cc) if "c-epoll" in args.server_list else None
    ctx = Bench(
        chatload=chatload,
        pin=pin,
        workdir=workdir,
        kinds=kinds(ours_cmd, workdir, broadcaster, find_ngircd(), baseline_cmd),
        quiet_wait=0.0 if smoke else args.quiet_wait,
        retries=retries,
        external=Loadgen(Path(args.crosscheck_loadgen).resolve(), pin, timing) if args.crosscheck_loadgen else None,
        on_run=lambda run: log(f"  {describe(run)}"),
    )
    results = Results(
        schema=SCHEMA,
        mode=mode,
        machine=machine_info(),
        pinning=pin,
        params=Params(
            servers=args.server_list,
            repeat=repeat,
            duration_s=timing.duration,
            warmup_s=timing.warmup,
            drain_s=timing.drain,
            line_bytes=64,
            flood_rate=0,
            server_cmd=ours_cmd,
            snapshot=snapshot,
            baseline=baseline,
            p99_limit_ms=P99_LIMIT_MS,
            gen_cpu_invalid_at=GEN_CPU_LIMIT,
            noisy_if_disturbed_above=NOISE_LIMIT,
        ),
    )
    log(
        f"bench: chatload {chatload.path.name}, chat-svc = {' '.join(ours_cmd)}, "
        f"pinning {'on' if pin.enabled else 'OFF'}, nice {pin.nice}, logs in {workdir}"
    )
    rc = 0
    try:
        if smoke:
            required = [s.strip() for s in args.servers.split(",") if s.strip()]
            results.smoke = scenarios.smoke(ctx, args.server_list, required)
            for p in results.smoke.problems:
                log(f"SMOKE FAILURE: {p}")
            rc = 1 if results.smoke.problems else 0
            print("smoke: OK" if not rc else "smoke: FAILED\n  " + "\n  ".join(results.smoke.problems))
        else:
            run_scenarios(ctx, results, args, mode, repeat)
            results.server_problems = ctx.server_problems
            results.targets = check_targets(results)
            print(render(results))
            rc = 1 if ctx.server_problems else 0
    finally:
        results.runs = ctx.runs
        results.server_problems = ctx.server_problems
        out_path = Path(args.results_dir) / (args.out or f"{mode}.json")
        results.write(out_path)
        log(f"bench: results in {out_path}")
        shutil.rmtree(workdir, ignore_errors=True)
    return rc


def run_scenarios(ctx: Bench, results: Results, args: argparse.Namespace, mode: str, repeat: int) -> None:
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    wanted = only or set(SCENARIOS) - ({"crosscheck"} if ctx.external is None else set())
    servers = args.server_list
    if "fanout" in wanted:
        rates = [float(r) for r in args.rates.split(",") if r.strip()]
        results.fanout = scenarios.fanout(ctx, servers, rates, args.members, repeat)
    if "search" in wanted:
        results.search = {}
        skipped: dict[str, str] = {}
        for kind in scenarios.available(ctx, servers, skipped):
            results.search[kind] = scenarios.search(
                ctx, kind, args.members, max_probes=6 if mode == "quick" else 9, confirm=1 if mode == "quick" else 3
            )
    if "idle" in wanted:
        results.idle = scenarios.idle(ctx, args.idle_members, 1 if mode == "quick" else 3)
    if "idle-ws" in wanted:
        results.idle_ws = scenarios.idle(ctx, args.idle_members, 1 if mode == "quick" else 3, kind="chat-svc-ws")
    if "redis" in wanted:
        results.redis = scenarios.redis(ctx, args.members, [300, 1000], repeat)
    if "shards" in wanted:
        rates = [float(r) for r in args.shard_rates.split(",") if r.strip()]
        results.shards = shards.shards(ctx, args.members, args.rooms, rates, repeat)
    if "storm" in wanted:
        results.storm = scenarios.storm(ctx, args.storm_members, args.storm_rate)
    if "crosscheck" in wanted:
        if ctx.external is None:
            log("crosscheck: needs --crosscheck-loadgen PATH")
        else:
            pairs = (item.partition(":") for item in args.crosscheck_points.split(","))
            pts = [(kind, float(rate)) for kind, _, rate in pairs]
            results.crosscheck = scenarios.crosscheck(ctx, pts, args.members, repeat)
    if "profile" in wanted:
        results.profile = scenarios.profile(ctx, args.members, 2000, 6)


if __name__ == "__main__":
    sys.exit(main())
