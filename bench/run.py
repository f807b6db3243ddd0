#!/usr/bin/env python3
"""chat-svc benchmark: chat-svc and the seed's select() server, side by side.

    python bench/run.py              # full run (about 20 minutes), writes bench/results/full.json
    python bench/run.py --quick      # one run per point, shorter search (about 6 minutes)
    python bench/run.py --smoke      # a few seconds, correctness only (CI: tests/test_bench_smoke.py)

Each measurement starts a fresh server pinned to core 1 (`taskset -c 1`) and
drives it with bench/chatload.c (compiled here with gcc) pinned to core 0.
The generator samples the server's CPU and RSS from /proc, its own CPU with
getrusage and the per-core busy time from /proc/stat, so every run also says
how much CPU *other* processes took on the two cores (the machine may be
shared). Runs disturbed by other load are repeated; tables quote medians.

Scenarios (flood control off, 64-byte lines, all members in one room):
  fanout    1000 members all sending at 100/300/1000/2000/3000 msg/s in total
  search    largest rate with p99 <= 50 ms and 0 loss, for both servers; ratio
  idle      19,000 idle members, one broadcast reaching every one; RSS per member
  redis     two chat-svc instances sharing the room through a local redis-server
  profile   py-spy on chat-svc at 2000 msg/s: where the server's Python time goes
  crosscheck  (with --crosscheck-loadgen PATH) the same points measured by an
            independent load generator, to compare with chatload
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
SEED = BENCH / "seed_server.py"
LOADGEN_SRC = BENCH / "chatload.c"

P99_LIMIT_MS = 50.0
# load generator CPU (fraction of one core): at GEN_CPU_LIMIT the run is invalid (the numbers would
# describe the generator); above GEN_CPU_WARN its event loop adds measurable delay, so latencies are
# upper bounds (a pass still passes, a fail is inconclusive)
GEN_CPU_LIMIT = 0.90
GEN_CPU_WARN = 0.75
# a run is noisy when other processes kept the server waiting for its core this share of the
# window (or the generator twice that); noisy runs are repeated and the least disturbed one kept
NOISE_LIMIT = 0.05


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kb = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1])
    commit = ""
    with contextlib.suppress(Exception):
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    dirty = False
    with contextlib.suppress(Exception):
        dirty = bool(
            subprocess.run(
                ["git", "-C", str(ROOT), "status", "--porcelain", "--", "service"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
        )
    gevent_version = ""
    with contextlib.suppress(Exception):
        import gevent

        gevent_version = gevent.__version__
    import resource

    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "mem_gb": round(mem_kb / 1048576, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "gevent": gevent_version,
        "nofile_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        "git_commit": commit,
        "service_has_uncommitted_changes": dirty,
        "date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def cpu_busy() -> list[float]:
    """Busy seconds per CPU (user+nice+system+irq+softirq) from /proc/stat."""
    tck = os.sysconf("SC_CLK_TCK")
    out: list[float] = []
    for line in Path("/proc/stat").read_text().splitlines():
        m = re.match(r"cpu(\d+) (\d+) (\d+) (\d+) (\d+) (\d+) (\d+) (\d+)", line)
        if m:
            v = [int(x) for x in m.groups()[1:]]
            out.append((v[0] + v[1] + v[2] + v[5] + v[6]) / tck)
    return out


def wait_for_quiet(cores: Sequence[int], max_wait: float, limit: float = 0.25) -> float:
    """Wait (bounded) until other processes use less than `limit` of a core on `cores`.

    Returns the load seen last (cores busy, summed over `cores`)."""
    deadline = time.monotonic() + max_wait
    busy = 0.0
    while True:
        a = cpu_busy()
        time.sleep(0.5)
        b = cpu_busy()
        busy = sum(b[c] - a[c] for c in cores if c < len(a)) / 0.5
        if busy < limit or time.monotonic() >= deadline:
            return busy
        time.sleep(1.0)


def proc_cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def proc_rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


# ----------------------------------------------------------------------------- building


def build_loadgen(cc: str = "gcc") -> Path:
    """Compile chatload.c once per source version into bench/.build/ (ignored by git)."""
    src = LOADGEN_SRC.read_bytes()
    digest = hashlib.sha256(src).hexdigest()[:12]
    out_dir = BENCH / ".build"
    out = out_dir / f"chatload-{digest}"
    if out.exists():
        return out
    compiler = shutil.which(cc)
    if compiler is None:
        raise SystemExit(f"bench: a C compiler ({cc}) is needed to build {LOADGEN_SRC.name}")
    out_dir.mkdir(exist_ok=True)
    tmp = out_dir / f".chatload-{digest}.{os.getpid()}"
    cmd = [compiler, "-O2", "-Wall", "-o", str(tmp), str(LOADGEN_SRC)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise SystemExit(f"bench: building chatload failed:\n{r.stderr}")
    tmp.replace(out)
    return out


# ----------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def default_ours_cmd() -> list[str]:
    exe = Path(sys.executable)
    script = exe.parent / "chat-svc"
    if script.exists():
        return [str(script)]
    venv = ROOT / ".venv" / "bin" / "chat-svc"
    if venv.exists():
        return [str(venv)]
    return [sys.executable, "-m", "chat_svc"]


@dataclass
class Pinning:
    enabled: bool
    server_core: int = 1
    gen_core: int = 0
    nice: int = 0

    def _prio(self, cmd: list[str]) -> list[str]:
        return ["nice", "-n", str(self.nice), *cmd] if self.nice else cmd

    def server(self, cmd: list[str]) -> list[str]:
        return self._prio(["taskset", "-c", str(self.server_core), *cmd] if self.enabled else cmd)

    def gen(self, cmd: list[str]) -> list[str]:
        return self._prio(["taskset", "-c", str(self.gen_core), *cmd] if self.enabled else cmd)

    def prioritize(self, pid: int) -> None:
        """With autogroup scheduling, nice only ranks tasks of one session; a process started in
        its own session also gets its session group's weight raised (best effort)."""
        if self.nice:
            with contextlib.suppress(OSError):
                Path(f"/proc/{pid}/autogroup").write_text(f"{self.nice}\n")


class Server:
    """One server process on a free loopback port, stopped when the block ends."""

    def __init__(self, argv: list[str], port: int, pin: Pinning, workdir: Path, name: str) -> None:
        self.port = port
        self.name = name
        self.log_path = workdir / f"{name}-{port}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            pin.server(argv),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=str(ROOT),
            start_new_session=True,
        )
        self.pid = self.proc.pid  # nice and taskset exec the command: same pid
        pin.prioritize(self.pid)

    def wait_ready(self, timeout: float = 30.0, http: bool = False) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.tail()}")
            try:
                if http:
                    with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as r:
                        if r.status == 200:
                            return
                else:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                        return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not listen on {self.port} within {timeout}s: {self.tail()}")

    def tail(self, n: int = 2000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_bytes()[-n:].decode(errors="replace")
        return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=8)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                self.proc.wait(timeout=5)
        self._log.close()


@dataclass
class Kind:
    """How to start one kind of server."""

    name: str  # "chat-svc" | "seed"
    argv: Callable[[int, Sequence[str]], list[str]]
    connect_rate: float
    http_ready: bool = False


def kinds(ours_cmd: list[str]) -> dict[str, Kind]:
    def ours(port: int, extra: Sequence[str]) -> list[str]:
        return [*ours_cmd, "--host", "127.0.0.1", "--port", str(port), "--flood-rate", "0", *extra]

    def seed(port: int, extra: Sequence[str]) -> list[str]:
        return [sys.executable, str(SEED), str(port), "127.0.0.1"]

    return {
        # the seed accepts one connection per select() round and announces each to
        # everybody; with its listen(10) backlog a gentle ramp avoids SYN retries
        "chat-svc": Kind("chat-svc", ours, connect_rate=2000, http_ready=True),
        "seed": Kind("seed", seed, connect_rate=200),
    }


# ----------------------------------------------------------------------------- runs


@dataclass
class Ctx:
    loadgen: Path
    pin: Pinning
    workdir: Path
    kinds: dict[str, Kind]
    duration: float
    warmup: float
    drain: float
    quiet_wait: float
    retries: int
    external: Path | None = None
    all_runs: list[dict[str, Any]] = field(default_factory=list)


def summarize(raw: dict[str, Any], window_extra: dict[str, Any]) -> dict[str, Any]:
    """The compact per-run record kept in the results JSON."""
    lat = raw.get("latency_ms", {})
    if not lat.get("n", 1):
        lat = {}
    window = raw.get("window_s", 0) or 0
    busy = raw.get("cpu_busy_s_window", [0, 0])
    srv_cpu = raw.get("server_cpu_s_window", 0)
    gen_cpu_w = raw.get("loadgen_cpu_util_window", 0) * window
    noise_srv = max(0.0, busy[1] - srv_cpu) / window if window > 0 and len(busy) > 1 else 0.0
    noise_gen = max(0.0, busy[0] - gen_cpu_w) / window if window > 0 and busy else 0.0
    out = {
        "label": raw.get("label"),
        "members": raw.get("clients"),
        "rate": raw.get("rate"),
        "connected": raw.get("connected"),
        "sync_ok": raw.get("sync_ok"),
        "sent": raw.get("sent"),
        "expected": raw.get("expected"),
        "delivered": raw.get("delivered"),
        "lost": raw.get("lost"),
        "loss_ratio": raw.get("loss_ratio"),
        "deliveries_per_s": raw.get("deliveries_per_s"),
        "p50_ms": lat.get("p50"),
        "p99_ms": lat.get("p99"),
        "p999_ms": lat.get("p999"),
        "max_ms": lat.get("max"),
        "server_us_per_delivery": raw.get("server_cpu_us_per_delivery"),
        "server_cpu_util": raw.get("server_cpu_util_window"),
        "server_user_share": round(raw.get("server_user_s_window", 0) / srv_cpu, 3) if srv_cpu else None,
        "server_rss_mb": round(raw.get("server_rss_kb_end", 0) / 1024, 1),
        "server_rss_mb_max": round(raw.get("server_rss_kb_max_sampled", 0) / 1024, 1),
        "gen_cpu": raw.get("loadgen_cpu_util_send")
        if raw.get("mode") == "fanout"
        else raw.get("loadgen_cpu_util_window"),
        "send_lag_mean_us": raw.get("send_lag_mean_us"),
        "lines_per_read": raw.get("load_lines_per_read"),
        "malformed": raw.get("malformed"),
        "merged_lines": raw.get("merged_lines"),
        "duplicates": raw.get("duplicates"),
        "out_of_order": raw.get("out_of_order"),
        "disconnects": raw.get("disconnects_by_server"),
        "other_cpu_server_core": round(noise_srv, 3),
        "other_cpu_gen_core": round(noise_gen, 3),
        "steal_s": raw.get("steal_s_window"),
        **window_extra,
    }
    reasons = []
    gen = max(raw.get("loadgen_cpu_util_send", 0) or 0, raw.get("loadgen_cpu_util_window", 0) or 0)
    if gen >= GEN_CPU_LIMIT:
        reasons.append(f"load generator CPU {gen:.2f} of a core")
    if (raw.get("send_lag_mean_us") or 0) > 2000:
        reasons.append("load generator fell behind its send schedule")
    out["valid"] = not reasons
    out["invalid_reasons"] = reasons
    out["gen_busy"] = GEN_CPU_WARN <= gen < GEN_CPU_LIMIT
    # time our processes were runnable but another task had their core: the direct measure of
    # interference (busy-minus-ours above also counts kernel work charged to no process)
    wait_srv = (raw.get("server_runq_wait_s_window") or 0) / window if window > 0 else 0.0
    wait_gen = (raw.get("loadgen_runq_wait_s_window") or 0) / window if window > 0 else 0.0
    out["server_runq_wait"] = round(wait_srv, 4)
    out["gen_runq_wait"] = round(wait_gen, 4)
    steal = (raw.get("steal_s_window") or 0) / window if window > 0 else 0.0
    out["disturbance"] = round(max(wait_srv, wait_gen / 2, steal), 4)
    out["noisy"] = out["disturbance"] > NOISE_LIMIT
    return out


def passes(run: dict[str, Any], p99_limit: float = P99_LIMIT_MS) -> bool:
    return bool(
        run.get("valid")
        and run.get("sync_ok")
        and run.get("lost") == 0
        and (run.get("delivered") or 0) > 0
        and run.get("p99_ms") is not None
        and run["p99_ms"] <= p99_limit
    )


def run_gen(pin: Pinning, cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a load generator pinned, prioritised, bounded in time."""
    proc = subprocess.Popen(
        pin.gen(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    pin.prioritize(proc.pid)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise RuntimeError(f"load generator did not finish within {timeout:.0f}s: {err[-500:]}") from None
    except BaseException:  # interrupted: never leave a generator behind
        proc.kill()
        proc.wait()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_chatload(
    ctx: Ctx,
    ports: Sequence[int],
    pids: Sequence[int],
    members: int,
    rate: float,
    label: str,
    idle: bool = False,
    connect_rate: float = 2000,
    duration: float | None = None,
    drain: float | None = None,
) -> dict[str, Any]:
    duration = ctx.duration if duration is None else duration
    drain = ctx.drain if drain is None else drain
    cmd = [
        str(ctx.loadgen),
        "--port",
        ",".join(str(p) for p in ports),
        "--clients",
        str(members),
        "--rate",
        f"{rate:g}",
        "--duration",
        f"{duration:g}",
        "--warmup",
        f"{ctx.warmup:g}",
        "--drain",
        f"{drain:g}",
        "--connect-rate",
        f"{connect_rate:g}",
        "--server-pid",
        ",".join(str(p) for p in pids),
        "--label",
        label,
    ]
    if idle:
        cmd.append("--idle")
    budget = members / connect_rate + 15 + ctx.warmup + duration + drain + 30
    r = run_gen(ctx.pin, cmd, budget)
    if r.returncode != 0 or not r.stdout.strip():
        raise RuntimeError(f"chatload failed ({r.returncode}): {r.stderr.strip()[-500:]}")
    return json.loads(r.stdout)


def run_external(
    ctx: Ctx, port: int, pid: int, members: int, rate: float, label: str, connect_rate: float
) -> dict[str, Any]:
    """The independent generator (--crosscheck-loadgen), its JSON mapped onto chatload's names."""
    assert ctx.external is not None
    cmd = [
        str(ctx.external),
        "--port",
        str(port),
        "--clients",
        str(members),
        "--senders",
        str(members),
        "--rate",
        f"{rate:g}",
        "--duration",
        f"{ctx.duration:g}",
        "--warmup",
        f"{max(ctx.warmup, 1):g}",
        "--drain",
        f"{ctx.drain:g}",
        "--connect-rate",
        f"{connect_rate:g}",
        "--json",
        "--server-pid",
        str(pid),
        "--label",
        label,
    ]
    busy0 = cpu_busy()
    r = run_gen(ctx.pin, cmd, members / connect_rate + 120)
    busy1 = cpu_busy()
    if r.returncode != 0 or not r.stdout.strip():
        raise RuntimeError(f"external loadgen failed ({r.returncode}): {r.stderr.strip()[-500:]}")
    x = json.loads(r.stdout)
    lat = x.get("latency_us", {})
    window = x.get("delivery_window_s", 0) or ctx.duration
    return {
        "tool": "external",
        "label": label,
        "mode": "fanout",
        "clients": members,
        "rate": rate,
        "connected": x.get("connected"),
        "sync_ok": bool(x.get("sync_ok")),
        "sent": x.get("sent"),
        "expected": x.get("expected"),
        "delivered": x.get("delivered"),
        "lost": x.get("lost"),
        "loss_ratio": x.get("loss_ratio"),
        "deliveries_per_s": x.get("deliveries_per_s"),
        "latency_ms": {k: (lat.get(k, 0) or 0) / 1000 for k in ("p50", "p99", "p999", "max")},
        "server_cpu_us_per_delivery": x.get("server_us_per_delivery"),
        "server_cpu_util_window": x.get("server_cpu_util_send_drain"),
        "server_cpu_s_window": x.get("server_cpu_send_drain_s", 0),
        "server_rss_kb_end": x.get("server_rss_kb_end", 0),
        "server_rss_kb_max_sampled": x.get("server_rss_kb_max_sampled", 0),
        "loadgen_cpu_util_send": x.get("loadgen_cpu_util_send"),
        "loadgen_cpu_util_window": x.get("loadgen_cpu_util_send_drain"),
        "send_lag_mean_us": x.get("send_lag_mean_us"),
        "malformed": x.get("malformed"),
        "merged_lines": x.get("merged_lines"),
        "duplicates": x.get("duplicates"),
        "out_of_order": x.get("out_of_order"),
        "disconnects_by_server": x.get("disconnects_by_server"),
        "steal_s_window": x.get("steal_s_send_drain"),
        # whole-run busy time; the noise estimate below is only indicative here
        "cpu_busy_s_window": [0, 0],
        "window_s": window,
        "_whole_run_busy": [b - a for a, b in zip(busy0, busy1, strict=False)],
    }


@contextlib.contextmanager
def observer(ctx: Ctx, srv: Server, count: int, members: int, connect_rate: float) -> Iterator[dict[str, Any]]:
    """A passive chatload (--observe) with ``count`` members, started before the main generator,
    at a higher priority so it reads as soon as data arrives; yields its JSON once it has ended."""
    result: dict[str, Any] = {}
    if count <= 0:
        yield result
        return
    # outlast the main run: its ramp, barrier, warmup, sending and longest drain
    hold = (members - count) / connect_rate + 3 + ctx.warmup + ctx.duration + ctx.drain + 2
    cmd = [str(ctx.loadgen), "--port", str(srv.port), "--clients", str(count), "--observe",
           "--duration", f"{hold:g}", "--connect-rate", "1000", "--label", "observer"]  # fmt: skip
    prio = Pinning(ctx.pin.enabled, ctx.pin.server_core, ctx.pin.gen_core, nice=min(ctx.pin.nice, 0) - 4)
    proc = subprocess.Popen(
        prio.gen(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    prio.prioritize(proc.pid)
    try:
        time.sleep(0.5)  # connected and in the room before the main generator starts
        yield result
        out, err = proc.communicate(timeout=hold + 30)
        if proc.returncode == 0 and out.strip():
            result.update(json.loads(out))
        else:
            log(f"  observer failed ({proc.returncode}): {err.strip()[-300:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def server(ctx: Ctx, kind: str, extra: Sequence[str] = ()) -> Iterator[Server]:
    k = ctx.kinds[kind]
    port = free_port()
    srv = Server(k.argv(port, extra), port, ctx.pin, ctx.workdir, kind)
    try:
        srv.wait_ready(http=k.http_ready)
        yield srv
    finally:
        srv.stop()


def measure(
    ctx: Ctx,
    kind: str,
    members: int,
    rate: float,
    label: str,
    idle: bool = False,
    extra: Sequence[str] = (),
    tool: str = "chatload",
    observers: int = 0,
) -> dict[str, Any]:
    """One measurement on a fresh server, repeated (bounded) while other load disturbs it.

    With ``observers``, that many of the ``members`` are passive clients in a separate, lightly
    loaded chatload process (``--observe``) that time every line they receive: an independent
    check of the main generator's latency figures."""
    k = ctx.kinds[kind]
    attempts: list[dict[str, Any]] = []
    for attempt in range(ctx.retries + 1):
        pre = wait_for_quiet([ctx.pin.server_core, ctx.pin.gen_core] if ctx.pin.enabled else [0], ctx.quiet_wait)
        with server(ctx, kind, extra) as srv, observer(ctx, srv, observers, members, k.connect_rate) as obs:
            members_main = members - observers
            if tool == "external":
                raw = run_external(ctx, srv.port, srv.pid, members_main, rate, label, k.connect_rate)
            else:
                raw = run_chatload(
                    ctx,
                    [srv.port],
                    [srv.pid],
                    members_main,
                    rate,
                    label,
                    idle=idle,
                    connect_rate=k.connect_rate if not idle else 3000,
                    drain=10.0 if idle else None,
                )
            alive = srv.proc.poll() is None
        run = summarize(raw, {"server": kind, "tool": tool, "attempt": attempt, "other_cpu_before": round(pre, 2)})
        run["server_alive"] = alive
        if obs:
            lat = obs.get("latency_ms", {})
            run["observer"] = {
                "members": observers,
                "received": obs.get("delivered"),
                "malformed": obs.get("malformed"),
                "p50_ms": lat.get("p50"),
                "p99_ms": lat.get("p99"),
                "p999_ms": lat.get("p999"),
            }
        if idle:
            run.update(idle_fields(raw, members))
        if tool == "external":
            busy = raw.get("_whole_run_busy", [])
            run["noisy"] = False  # the external tool reports no window; judged by chatload's runs
            run["whole_run_busy_s"] = [round(b, 2) for b in busy[:2]]
        attempts.append(run)
        ctx.all_runs.append(run)
        log(f"  {describe(run)}")
        if not run["noisy"]:
            break
        if attempt < ctx.retries:
            log("  (other processes used the benchmark cores during that run; repeating it)")
    return min(attempts, key=lambda r: r.get("disturbance", 0))


def idle_fields(raw: dict[str, Any], members: int) -> dict[str, Any]:
    start = raw.get("server_rss_kb_start", 0)
    end = raw.get("server_rss_kb_end", 0)
    hold = raw.get("server_rss_kb_hold", 0)
    return {
        "probe_expected": raw.get("probe_expected"),
        "probe_delivered": raw.get("probe_delivered"),
        "probe_last_ms": raw.get("probe_last_ms"),
        "server_rss_mb_before": round(start / 1024, 1),
        "server_rss_mb_hold": round(hold / 1024, 1),
        "rss_kb_per_member": round((end - start) / members, 2) if members else None,
        "rss_kb_per_member_hold": round((hold - start) / members, 2) if members else None,
        "rss_kb_total_per_member": round(end / members, 2) if members else None,
        "ramp_s": raw.get("ramp_s"),
    }


def describe(run: dict[str, Any]) -> str:
    flags = []
    if not run.get("valid"):
        flags.append("INVALID: " + "; ".join(run.get("invalid_reasons", [])))
    if run.get("noisy"):
        flags.append(
            f"noisy (waited for their core: server {run['server_runq_wait']:.0%}, generator {run['gen_runq_wait']:.0%})"
        )
    if "probe_expected" in run:
        return (
            f"{run['server']:8} idle {run['members']} members: probe {run['probe_delivered']}/{run['probe_expected']} "
            f"in {run['probe_last_ms']:.0f} ms, RSS {run['server_rss_mb']} MB "
            f"({run['rss_kb_per_member']} KB/member) {' '.join(flags)}"
        )
    return (
        f"{run['server']:8} {run['tool']:8} {run['rate']:>7g} msg/s: {fmt_int(run['deliveries_per_s'])} deliveries/s, "
        f"lost {run['lost']}, p50 {fmt_ms(run['p50_ms'])} p99 {fmt_ms(run['p99_ms'])} "
        f"p999 {fmt_ms(run['p999_ms'])} ms, server {fmt_f(run['server_us_per_delivery'], 2)} us/delivery, "
        f"gen CPU {fmt_f(run['gen_cpu'], 2)} {' '.join(flags)}"
    )


# ----------------------------------------------------------------------------- aggregation


def med(values: Sequence[Any]) -> Any:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return statistics.median(vals)


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the clean runs of one point (all runs if none is clean)."""
    clean = [r for r in runs if not r.get("noisy")] or runs
    keys = (
        "deliveries_per_s",
        "p50_ms",
        "p99_ms",
        "p999_ms",
        "max_ms",
        "server_us_per_delivery",
        "server_cpu_util",
        "server_user_share",
        "server_rss_mb",
        "server_rss_mb_max",
        "gen_cpu",
        "loss_ratio",
        "lost",
    )
    agg: dict[str, Any] = {k: med([r.get(k) for r in clean]) for k in keys}
    agg["lost_max"] = max((r.get("lost") or 0) for r in runs)
    agg["gen_cpu_max"] = max((r.get("gen_cpu") or 0) for r in runs)
    agg["runs"] = len(runs)
    agg["clean_runs"] = len([r for r in runs if not r.get("noisy")])
    agg["valid"] = all(r.get("valid") for r in clean)
    agg["gen_busy"] = any(r.get("gen_busy") for r in clean)
    agg["sync_ok"] = all(r.get("sync_ok") for r in clean)
    agg["correct"] = all(
        not r.get("malformed") and not r.get("duplicates") and not r.get("out_of_order") for r in clean
    )
    return agg


def fmt_int(v: Any) -> str:
    return "—" if v is None else f"{v:,.0f}"


def fmt_ms(v: Any) -> str:
    if v is None:
        return "—"
    return f"{v:.1f}" if v < 100 else f"{v:,.0f}"


def fmt_f(v: Any, nd: int = 2) -> str:
    return "—" if v is None else f"{v:.{nd}f}"


def fmt_loss(agg: dict[str, Any]) -> str:
    if agg.get("lost_max") is None:
        return "—"
    if agg["lost_max"] == 0:
        return "0"
    return f"{(agg.get('loss_ratio') or 0):.1%}"


def validity(agg: dict[str, Any]) -> str:
    if not agg.get("valid"):
        return "NO"
    return "yes*" if agg.get("gen_busy") else "yes"


def ratio(a: Any, b: Any) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return float(a) / float(b)


# ----------------------------------------------------------------------------- scenarios


def scenario_fanout(
    ctx: Ctx, servers: Sequence[str], rates: Sequence[float], members: int, repeat: int
) -> dict[str, Any]:
    log(f"== fan-out: {members} members all sending, rates {list(rates)} msg/s, {repeat} run(s) each")
    runs: dict[str, dict[float, list[dict[str, Any]]]] = {s: {r: [] for r in rates} for s in servers}
    for rep in range(repeat):
        for rate in rates:
            for kind in servers:
                runs[kind][rate].append(measure(ctx, kind, members, rate, f"fanout-{kind}-{rate:g}-{rep}"))
    return {
        "members": members,
        "rates": list(rates),
        "points": {kind: {f"{rate:g}": aggregate(runs[kind][rate]) for rate in rates} for kind in servers},
    }


def scenario_search(
    ctx: Ctx, kind: str, members: int, start: float, lo_bound: float, hi_bound: float, max_probes: int, confirm: int
) -> dict[str, Any]:
    """Largest rate with p99 <= 50 ms and 0 loss: ladder x1.5 until it brackets, then bisect."""
    log(f"== rate search for {kind}: largest rate with p99 <= {P99_LIMIT_MS:g} ms and 0 loss")
    probes: list[dict[str, Any]] = []
    lo: float | None = None
    hi: float | None = None
    rate = start

    def rnd(r: float) -> float:
        return float(round(r)) if r >= 20 else round(r, 1)

    while len(probes) < max_probes:
        rate = rnd(rate)
        run = measure(ctx, kind, members, rate, f"search-{kind}-{rate:g}")
        ok = passes(run)
        probes.append({"rate": rate, "pass": ok, "p99_ms": run["p99_ms"], "lost": run["lost"], "valid": run["valid"]})
        if ok:
            lo = rate
        else:
            hi = rate
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
    confirmed: dict[str, Any] | None = None
    candidate = lo
    for _ in range(3):
        if candidate is None:
            break
        runs = [measure(ctx, kind, members, candidate, f"confirm-{kind}-{candidate:g}-{i}") for i in range(confirm)]
        agg = aggregate(runs)
        ok = agg["lost_max"] == 0 and agg["p99_ms"] is not None and agg["p99_ms"] <= P99_LIMIT_MS and agg["valid"]
        if ok:
            confirmed = {"rate": candidate, **agg}
            break
        candidate = rnd(candidate * 0.93)
        if candidate < lo_bound:
            break
    return {
        "members": members,
        "max_rate": confirmed["rate"] if confirmed else None,
        "at_max": confirmed,
        "upper_bound_failed": hi,
        "probes": probes,
        "note": "" if confirmed else f"no rate >= {lo_bound:g} msg/s met the target",
    }


def scenario_idle(ctx: Ctx, members: int, repeat: int) -> dict[str, Any]:
    log(f"== idle: {members} members connected at once, one broadcast must reach every one")
    runs = [
        measure(
            ctx, "chat-svc", members, 0, f"idle-{members}-{i}", idle=True, extra=["--max-clients", str(members + 1000)]
        )
        for i in range(repeat)
    ]
    clean = [r for r in runs if not r.get("noisy")] or runs
    return {
        "members": members,
        "runs": len(runs),
        "probe_delivered_min": min(r.get("probe_delivered") or 0 for r in runs),
        "probe_expected": runs[0].get("probe_expected"),
        "rss_kb_per_member": med([r.get("rss_kb_per_member") for r in clean]),
        "rss_kb_per_member_hold": med([r.get("rss_kb_per_member_hold") for r in clean]),
        "rss_kb_total_per_member": med([r.get("rss_kb_total_per_member") for r in clean]),
        "server_rss_mb": med([r.get("server_rss_mb") for r in clean]),
        "server_rss_mb_before": med([r.get("server_rss_mb_before") for r in clean]),
        "probe_last_ms": med([r.get("probe_last_ms") for r in clean]),
        "gen_cpu": med([r.get("gen_cpu") for r in clean]),
        "seed": "not measured: select() cannot watch descriptors >= 1024 (FD_SETSIZE)",
    }


def scenario_redis(ctx: Ctx, members: int, rates: Sequence[float], repeat: int) -> dict[str, Any]:
    """Two chat-svc instances (one room) joined by a redis-server on a free port."""
    log(f"== redis backplane: two instances, {members} members split over both, rates {list(rates)}")
    redis = shutil.which("redis-server")
    if redis is None:
        return {"skipped": "redis-server is not installed"}
    results: dict[str, Any] = {"members": members, "points": {}}
    for rate in rates:
        runs = []
        for rep in range(repeat):
            wait_for_quiet([ctx.pin.server_core, ctx.pin.gen_core] if ctx.pin.enabled else [0], ctx.quiet_wait)
            rport = free_port()
            rproc = subprocess.Popen(
                ctx.pin.server(
                    [redis, "--port", str(rport), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
                ),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            try:
                deadline = time.monotonic() + 10
                while True:
                    try:
                        socket.create_connection(("127.0.0.1", rport), timeout=1).close()
                        break
                    except OSError:
                        if time.monotonic() > deadline:
                            raise RuntimeError("redis-server did not start") from None
                        time.sleep(0.1)
                extra = ["--redis-url", f"redis://127.0.0.1:{rport}/0"]
                with server(ctx, "chat-svc", extra) as a, server(ctx, "chat-svc", extra) as b:
                    ok, why = wait_backplane([a.port, b.port])
                    if not ok:
                        return {"skipped": f"backplane not up: {why}"}
                    r_cpu0 = proc_cpu(rproc.pid)
                    raw = run_chatload(
                        ctx,
                        [a.port, b.port],
                        [a.pid, b.pid],
                        members,
                        rate,
                        f"redis-{rate:g}-{rep}",
                        connect_rate=2000,
                    )
                    r_cpu = proc_cpu(rproc.pid) - r_cpu0
                    rss_redis = proc_rss_kb(rproc.pid)
                run = summarize(raw, {"server": "chat-svc x2 + redis", "tool": "chatload", "attempt": 0})
                run["redis_cpu_s_run"] = round(r_cpu, 2)
                run["redis_rss_mb"] = round(rss_redis / 1024, 1)
                ctx.all_runs.append(run)
                log(f"  {describe(run)}")
                runs.append(run)
            finally:
                rproc.terminate()
                try:
                    rproc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    rproc.kill()
        results["points"][f"{rate:g}"] = aggregate(runs)
    return results


def wait_backplane(ports: Sequence[int], timeout: float = 15) -> tuple[bool, str]:
    """Both instances report chat_backplane_up 1 on /metrics."""
    deadline = time.monotonic() + timeout
    last = "no chat_backplane_up metric"
    while time.monotonic() < deadline:
        ups = []
        for port in ports:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                    text = r.read().decode()
            except OSError as exc:
                last = str(exc)
                ups.append(False)
                continue
            m = re.search(r"^chat_backplane_up(?:\{[^}]*\})? ([0-9.eE+-]+)$", text, re.M)
            ups.append(bool(m and float(m.group(1)) >= 1))
            if not m:
                last = "no chat_backplane_up metric (backplane not implemented?)"
        if all(ups):
            return True, ""
        time.sleep(0.5)
    return False, last


OBSERVERS = 20


def scenario_crosscheck(ctx: Ctx, points: Sequence[tuple[str, float]], members: int, repeat: int) -> dict[str, Any]:
    """The same points driven alternately by chatload and by the external generator.

    In every run OBSERVERS of the members are passive clients of a separate chatload --observe
    process, identical for both tools: each tool's latency can be checked against what these
    lightly loaded clients saw in the same run."""
    log(
        f"== cross-check against {ctx.external}: {list(points)}, alternating, {repeat} run(s) each, "
        f"{OBSERVERS} of the {members} members are passive observers"
    )
    out: dict[str, Any] = {"tool": str(ctx.external), "members": members, "observers": OBSERVERS, "points": []}
    for kind, rate in points:
        own: list[dict[str, Any]] = []
        ext: list[dict[str, Any]] = []
        for rep in range(repeat):
            own.append(measure(ctx, kind, members, rate, f"xcheck-own-{kind}-{rate:g}-{rep}", observers=OBSERVERS))
            ext.append(
                measure(
                    ctx, kind, members, rate, f"xcheck-ext-{kind}-{rate:g}-{rep}", tool="external", observers=OBSERVERS
                )
            )
        a, b = aggregate(own), aggregate(ext)
        for agg, runs in ((a, own), (b, ext)):
            seen = [r["observer"] for r in runs if r.get("observer")]
            agg["observer_p50_ms"] = med([o.get("p50_ms") for o in seen])
            agg["observer_p99_ms"] = med([o.get("p99_ms") for o in seen])
        diff = {}
        for key in (
            "deliveries_per_s", "p50_ms", "p99_ms", "p999_ms", "server_us_per_delivery", "gen_cpu",
            "observer_p50_ms", "observer_p99_ms",
        ):  # fmt: skip
            r = ratio(a.get(key), b.get(key))
            diff[key] = None if r is None else round(r - 1, 3)
        out["points"].append({"server": kind, "rate": rate, "chatload": a, "external": b, "relative_diff": diff})
    return out


def scenario_profile(ctx: Ctx, members: int, rate: float, seconds: float) -> dict[str, Any]:
    """py-spy on chat-svc during a fan-out run: where the server's Python time goes."""
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(pyspy).exists():
        return {"skipped": "py-spy is not installed (pip install py-spy)"}
    log(f"== profile: py-spy on chat-svc, {members} members at {rate:g} msg/s")
    out_file = ctx.workdir / "profile.txt"
    with server(ctx, "chat-svc") as srv:
        import threading

        result: dict[str, Any] = {}

        def load() -> None:
            try:
                result["raw"] = run_chatload(
                    ctx, [srv.port], [srv.pid], members, rate, "profile", connect_rate=2000, duration=seconds + 3
                )
            except Exception as exc:
                result["error"] = str(exc)

        t = threading.Thread(target=load)
        t.start()
        time.sleep(members / 2000 + ctx.warmup + 2.5)  # ramp + barrier + warmup, then sample the send window
        cmd = [
            pyspy,
            "record",
            "--pid",
            str(srv.pid),
            "--duration",
            f"{int(seconds)}",
            "--rate",
            "200",
            "--format",
            "raw",
            "--function",
            "--nonblocking",
            "--output",
            str(out_file),
        ]
        pr = run_gen(ctx.pin, cmd, seconds + 60)
        t.join(timeout=120)
    if pr.returncode != 0 or not out_file.exists():
        return {"skipped": f"py-spy failed: {(pr.stderr or pr.stdout).strip()[-400:]}"}
    prof = analyse_profile(out_file.read_text())
    raw = result.get("raw", {})
    if raw:
        cpu = raw.get("server_cpu_s_window") or 0
        prof["server_cpu_util"] = raw.get("server_cpu_util_window")
        prof["server_user_share"] = round(raw.get("server_user_s_window", 0) / cpu, 3) if cpu else None
        prof["run"] = summarize(raw, {"server": "chat-svc", "tool": "chatload", "attempt": 0, "profiled": True})
    prof.update({"members": members, "rate": rate})
    return prof


def analyse_profile(text: str) -> dict[str, Any]:
    """Self and inclusive shares per function from py-spy's raw (collapsed) output."""
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

    def top(d: dict[str, int], k: int) -> list[list[Any]]:
        return [[name, round(100 * c / total, 1)] for name, c in sorted(d.items(), key=lambda x: -x[1])[:k]]

    return {
        "samples": total,
        "top_self_pct": top(self_c, 15) if total else [],
        "top_inclusive_pct": top(incl, 20) if total else [],
    }


# ----------------------------------------------------------------------------- smoke


def smoke(ctx: Ctx) -> tuple[dict[str, Any], list[str]]:
    """A few seconds, loose bounds, correctness only."""
    problems: list[str] = []
    res: dict[str, Any] = {}
    for kind, members, rate in (("chat-svc", 50, 100), ("seed", 30, 30)):
        run = measure(ctx, kind, members, rate, f"smoke-{kind}")
        res[kind] = run
        if not run["sync_ok"]:
            problems.append(f"{kind}: the barrier broadcast did not reach every member")
        if not run["delivered"]:
            problems.append(f"{kind}: no deliveries observed")
        if run["lost"]:
            problems.append(f"{kind}: lost {run['lost']} of {run['expected']} deliveries")
        if kind == "chat-svc":
            for key in ("malformed", "duplicates", "out_of_order", "disconnects"):
                if run.get(key):
                    problems.append(f"{kind}: {key} = {run[key]}")
            if run["p99_ms"] is None or run["p99_ms"] > 2000:
                problems.append(f"{kind}: p99 {run['p99_ms']} ms (loose bound 2000 ms)")
    idle = measure(ctx, "chat-svc", 200, 0, "smoke-idle", idle=True)
    res["idle"] = idle
    if idle.get("probe_delivered") != idle.get("probe_expected") or not idle.get("probe_expected"):
        problems.append(f"idle: probe reached {idle.get('probe_delivered')} of {idle.get('probe_expected')}")
    return res, problems


# ----------------------------------------------------------------------------- report


def table(rows: list[list[str]], header: list[str]) -> str:
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


def report(results: dict[str, Any]) -> str:
    out: list[str] = []
    m = results["machine"]
    out.append(
        f"machine: {m['nproc']} CPUs ({m['cpu_model']}), kernel {m['kernel']}, Python {m['python']}, "
        f"gevent {m['gevent']}; server pinned to core {results['pinning']['server_core']}, "
        f"generator to core {results['pinning']['gen_core']}"
        if results["pinning"]["enabled"]
        else f"machine: {m['nproc']} CPUs ({m['cpu_model']}); NOT pinned (fewer than 2 CPUs or no taskset)"
    )
    fan = results.get("fanout")
    if fan:
        out.append("")
        out.append(
            f"Fan-out: {fan['members']} members in one room, all sending 64-byte lines, flood control off "
            f"(medians of {results['params']['repeat']} run(s))"
        )
        rows = []
        for rate in fan["rates"]:
            for kind, pts in fan["points"].items():
                a = pts[f"{rate:g}"]
                rows.append(
                    [
                        kind,
                        f"{rate:g}",
                        fmt_int(a["deliveries_per_s"]),
                        fmt_loss(a),
                        fmt_ms(a["p50_ms"]),
                        fmt_ms(a["p99_ms"]),
                        fmt_ms(a["p999_ms"]),
                        fmt_f(a["server_us_per_delivery"], 2),
                        fmt_f(a["server_rss_mb"], 0),
                        fmt_f(a["gen_cpu"], 2),
                        validity(a),
                    ]
                )
        out.append(
            table(
                rows,
                [
                    "server",
                    "msg/s",
                    "deliveries/s",
                    "loss",
                    "p50 ms",
                    "p99 ms",
                    "p999 ms",
                    "server µs/delivery",
                    "server RSS MB",
                    "gen CPU",
                    "valid",
                ],
            )
        )
        out.append(
            f"  valid: yes* = the load generator used {GEN_CPU_WARN:.2f}-{GEN_CPU_LIMIT:.2f} of its core, so its "
            "event loop adds delay and latencies are upper bounds; NO = it reached "
            f"{GEN_CPU_LIMIT:.2f} (numbers describe the generator)"
        )
        if "chat-svc" in fan["points"] and "seed" in fan["points"]:
            for rate in fan["rates"]:
                a, b = fan["points"]["chat-svc"][f"{rate:g}"], fan["points"]["seed"][f"{rate:g}"]
                rd = ratio(a["deliveries_per_s"], b["deliveries_per_s"])
                rp = ratio(b["p99_ms"], a["p99_ms"])
                rc = ratio(b["server_us_per_delivery"], a["server_us_per_delivery"])
                out.append(
                    f"  at {rate:g} msg/s chat-svc vs seed: deliveries/s x{fmt_f(rd, 1)}, "
                    f"p99 {fmt_f(rp, 1)}x lower, CPU per delivery {fmt_f(rc, 1)}x lower"
                )
    srch = results.get("search")
    if srch:
        out.append("")
        out.append(
            f"Largest rate meeting p99 <= {P99_LIMIT_MS:g} ms with 0 loss "
            f"({next(iter(srch.values()))['members']} members)"
        )
        rows = []
        for kind, s in srch.items():
            a = s.get("at_max") or {}
            rows.append(
                [
                    kind,
                    fmt_int(s.get("max_rate")) if (s.get("max_rate") or 0) >= 20 else str(s.get("max_rate")),
                    fmt_int(a.get("deliveries_per_s")),
                    fmt_ms(a.get("p99_ms")),
                    fmt_f(a.get("server_us_per_delivery"), 2),
                    fmt_f(a.get("gen_cpu"), 2),
                    str(s.get("upper_bound_failed") or "—"),
                    s.get("note", ""),
                ]
            )
        out.append(
            table(
                rows,
                [
                    "server",
                    "max msg/s",
                    "deliveries/s",
                    "p99 ms",
                    "server µs/delivery",
                    "gen CPU",
                    "first failing",
                    "note",
                ],
            )
        )
        if "chat-svc" in srch and "seed" in srch:
            r = ratio(srch["chat-svc"].get("max_rate"), srch["seed"].get("max_rate"))
            out.append(f"  ratio chat-svc / seed: {fmt_f(r, 1)}x" if r else "  ratio: n/a")
    idle = results.get("idle")
    if idle:
        out.append("")
        out.append(
            f"Idle: {idle['members']:,} members connected, one broadcast: reached "
            f"{idle['probe_delivered_min']:,}/{idle['probe_expected'] or 0:,} "
            f"(last after {fmt_ms(idle['probe_last_ms'])} ms); "
            f"server RSS {fmt_f(idle['server_rss_mb'], 0)} MB "
            f"(before connects {fmt_f(idle['server_rss_mb_before'], 0)} MB): "
            f"{fmt_f(idle['rss_kb_per_member'], 2)} KB per member added "
            f"({fmt_f(idle['rss_kb_total_per_member'], 2)} KB total/member); "
            f"generator CPU {fmt_f(idle['gen_cpu'], 2)}. "
            f"Seed: {idle['seed']}"
        )
    red = results.get("redis")
    if red:
        out.append("")
        if "skipped" in red:
            out.append(f"Redis backplane: skipped ({red['skipped']})")
        else:
            out.append(f"Redis backplane: two chat-svc instances + redis-server, {red['members']} members in one room")
            rows = []
            for rate, a in red["points"].items():
                rows.append(
                    [
                        rate,
                        fmt_int(a["deliveries_per_s"]),
                        fmt_loss(a),
                        fmt_ms(a["p50_ms"]),
                        fmt_ms(a["p99_ms"]),
                        fmt_f(a["server_us_per_delivery"], 2),
                        fmt_f(a["gen_cpu"], 2),
                    ]
                )
            out.append(
                table(rows, ["msg/s", "deliveries/s", "loss", "p50 ms", "p99 ms", "µs/delivery (both)", "gen CPU"])
            )
    xc = results.get("crosscheck")
    if xc:
        out.append("")
        out.append(f"Cross-check with {xc['tool']} (medians; difference = chatload / external - 1)")
        rows = []
        for p in xc["points"]:
            a, b, d = p["chatload"], p["external"], p["relative_diff"]
            for key, name in (
                ("deliveries_per_s", "deliveries/s"),
                ("p50_ms", "p50 ms"),
                ("p99_ms", "p99 ms"),
                ("server_us_per_delivery", "server µs/delivery"),
                ("gen_cpu", "gen CPU"),
                ("observer_p50_ms", "observers' p50 ms"),
                ("observer_p99_ms", "observers' p99 ms"),
            ):
                rows.append(
                    [
                        f"{p['server']} @ {p['rate']:g}",
                        name,
                        fmt_f(a.get(key), 2),
                        fmt_f(b.get(key), 2),
                        "—" if d.get(key) is None else f"{d[key]:+.0%}",
                    ]
                )
        out.append(table(rows, ["point", "metric", "chatload", "external", "difference"]))
        for p in xc["points"]:
            a, b = p["chatload"], p["external"]
            ra, rb = ratio(a.get("p50_ms"), a.get("observer_p50_ms")), ratio(b.get("p50_ms"), b.get("observer_p50_ms"))
            if ra is not None and rb is not None:
                out.append(
                    f"  {p['server']} @ {p['rate']:g}: p50 against the same run's passive observers: "
                    f"chatload {ra - 1:+.0%}, external {rb - 1:+.0%}"
                )
    prof = results.get("profile")
    if prof:
        out.append("")
        if "skipped" in prof:
            out.append(f"Profile: skipped ({prof['skipped']})")
        else:
            share = prof.get("server_user_share")
            out.append(
                f"Profile (py-spy, chat-svc at {prof['rate']:g} msg/s, {prof['samples']} samples): server CPU "
                f"{fmt_f(prof.get('server_cpu_util'), 2)} of a core, of which "
                f"{'?' if share is None else f'{share:.0%}'} in user space (Python) and the rest in the kernel"
            )
            for name, pct in prof["top_self_pct"][:8]:
                out.append(f"  {pct:5.1f}% self  {name}")
    tg = results.get("targets")
    if tg:
        out.append("")
        out.append("Targets (issue 7)")
        for t in tg:
            out.append(f"  [{t['status']:4}] {t['target']}: {t['measured']}")
    return "\n".join(out)


def check_targets(results: dict[str, Any]) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    fan = results.get("fanout", {}).get("points", {}).get("chat-svc", {})

    def fan_target(rate: str, limit: float, name: str) -> None:
        a = fan.get(rate)
        if not a:
            return
        ok = a["lost_max"] == 0 and a["p99_ms"] is not None and a["p99_ms"] <= limit and a["valid"]
        out.append(
            {
                "target": name,
                "status": "PASS" if ok else "FAIL",
                "measured": f"p99 {fmt_ms(a['p99_ms'])} ms, loss {fmt_loss(a)} (worst run lost {a['lost_max']}), "
                f"{fmt_int(a['deliveries_per_s'])} deliveries/s, gen CPU {fmt_f(a['gen_cpu'], 2)}",
            }
        )

    fan_target("300", 20.0, "300 msg/s: p99 <= 20 ms")
    fan_target("2000", P99_LIMIT_MS, "2000 msg/s (~2M deliveries/s): 0 loss, p99 <= 50 ms (required)")
    fan_target("3000", P99_LIMIT_MS, "3000 msg/s (~3M deliveries/s): 0 loss, p99 <= 50 ms (goal)")
    idle = results.get("idle")
    if idle:
        ok = (
            idle["probe_expected"]
            and idle["probe_delivered_min"] == idle["probe_expected"]
            and (idle["rss_kb_per_member"] or 99) <= 8
        )
        out.append(
            {
                "target": f"{idle['members']:,} members, every one reached, <= 8 KB RSS per member",
                "status": "PASS" if ok else "FAIL",
                "measured": f"{idle['probe_delivered_min']:,}/{idle['probe_expected'] or 0:,} reached, "
                f"{fmt_f(idle['rss_kb_per_member'], 2)} KB/member added "
                f"({fmt_f(idle['rss_kb_total_per_member'], 2)} KB total/member)",
            }
        )
    srch = results.get("search", {})
    if "chat-svc" in srch:
        r = ratio(srch["chat-svc"].get("max_rate"), (srch.get("seed") or {}).get("max_rate"))
        out.append(
            {
                "target": "largest rate with p99 <= 50 ms and 0 loss, and its ratio to the seed's",
                "status": "INFO",
                "measured": f"chat-svc {srch['chat-svc'].get('max_rate')} msg/s, "
                f"seed {(srch.get('seed') or {}).get('max_rate')} msg/s" + (f", ratio {r:.1f}x" if r else ""),
            }
        )
    return out


# ----------------------------------------------------------------------------- main


def export_snapshot(rev: str, workdir: Path) -> str:
    """service/ as committed at ``rev`` (or the working tree as it is now, for ``worktree``),
    copied under workdir/snapshot so edits made during the run do not leak into it."""
    if rev == "worktree":
        shutil.copytree(ROOT / "service", workdir / "snapshot" / "service", ignore=shutil.ignore_patterns("*.pyc"))
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30
        ).stdout.strip()
        return f"{head} + working tree of {time.strftime('%Y-%m-%d %H:%M:%S')}"
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--verify", f"{rev}^{{commit}}"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout.strip()  # fmt: skip
    dest = workdir / "snapshot"
    dest.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", commit, "service"], capture_output=True, timeout=60, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, timeout=60, check=True)
    return commit


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--smoke", action="store_true", help="a few seconds, correctness only (CI)")
    mode.add_argument("--quick", action="store_true", help="one run per point and a shorter search")
    p.add_argument("--only", default="", help="comma list of scenarios: fanout,search,idle,redis,profile,crosscheck")
    p.add_argument("--servers", default="chat-svc,seed", help="servers for fanout (chat-svc,seed)")
    p.add_argument("--rates", default="100,300,1000,2000,3000", help="fan-out rates, msg/s in total")
    p.add_argument("--members", type=int, default=1000)
    p.add_argument("--idle-members", type=int, default=19000)
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
    return p.parse_args(argv)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # stop servers and generators on the way out
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    repeat = args.repeat or (1 if mode in ("quick", "smoke") else 3)
    retries = args.retries if args.retries is not None else (0 if mode == "smoke" else 1)
    nproc = os.cpu_count() or 1
    nice = args.nice if args.nice is not None else (-15 if os.geteuid() == 0 and mode != "smoke" else 0)
    pin = Pinning(enabled=not args.no_pin and nproc >= 2 and shutil.which("taskset") is not None, nice=nice)
    loadgen = build_loadgen(args.cc)
    workdir = Path(tempfile.mkdtemp(prefix="chat-bench-"))
    ours_cmd = shlex.split(args.server_cmd) if args.server_cmd else default_ours_cmd()
    snapshot = ""
    if args.snapshot:
        snapshot = export_snapshot(args.snapshot, workdir)
        ours_cmd = ["env", f"PYTHONPATH={workdir / 'snapshot' / 'service'}", sys.executable, "-m", "chat_svc"]
    ctx = Ctx(
        loadgen=loadgen,
        pin=pin,
        workdir=workdir,
        kinds=kinds(ours_cmd),
        duration=2.0 if mode == "smoke" else args.duration,
        warmup=0.3 if mode == "smoke" else args.warmup,
        drain=3.0 if mode == "smoke" else args.drain,
        quiet_wait=0.0 if mode == "smoke" else args.quiet_wait,
        retries=retries,
        external=Path(args.crosscheck_loadgen).resolve() if args.crosscheck_loadgen else None,
    )
    results: dict[str, Any] = {
        "mode": mode,
        "machine": machine_info(),
        "pinning": {"enabled": pin.enabled, "server_core": pin.server_core, "gen_core": pin.gen_core, "nice": pin.nice},
        "params": {
            "repeat": repeat,
            "duration_s": ctx.duration,
            "warmup_s": ctx.warmup,
            "drain_s": ctx.drain,
            "line_bytes": 64,
            "flood_rate": 0,
            "server_cmd": ours_cmd,
            "snapshot": snapshot,
            "p99_limit_ms": P99_LIMIT_MS,
            "gen_cpu_invalid_at": GEN_CPU_LIMIT,
            "noisy_if_other_cpu_above": NOISE_LIMIT,
        },
    }
    log(
        f"bench: chatload {loadgen.name}, chat-svc = {' '.join(ours_cmd)}, "
        f"pinning {'on' if pin.enabled else 'OFF'}, nice {pin.nice}, logs in {workdir}"
    )
    rc = 0
    try:
        if mode == "smoke":
            res, problems = smoke(ctx)
            results["smoke"] = res
            results["problems"] = problems
            for p in problems:
                log(f"SMOKE FAILURE: {p}")
            rc = 1 if problems else 0
            print("smoke: OK" if not problems else "smoke: FAILED\n  " + "\n  ".join(problems))
        else:
            only = {s.strip() for s in args.only.split(",") if s.strip()}
            wanted = only or {"fanout", "search", "idle", "redis", "profile"} | (
                {"crosscheck"} if ctx.external else set()
            )
            servers = [s.strip() for s in args.servers.split(",") if s.strip()]
            rates = [float(r) for r in args.rates.split(",") if r.strip()]
            if "fanout" in wanted:
                results["fanout"] = scenario_fanout(ctx, servers, rates, args.members, repeat)
            if "search" in wanted:
                results["search"] = {}
                confirm = 1 if mode == "quick" else 3
                probes = 6 if mode == "quick" else 9
                if "chat-svc" in servers:
                    results["search"]["chat-svc"] = scenario_search(
                        ctx, "chat-svc", args.members, 2000, 50, 12000, probes, confirm
                    )
                if "seed" in servers:
                    results["search"]["seed"] = scenario_search(ctx, "seed", args.members, 40, 2, 2000, probes, confirm)
            if "idle" in wanted:
                results["idle"] = scenario_idle(ctx, args.idle_members, 1 if mode == "quick" else 3)
            if "redis" in wanted:
                results["redis"] = scenario_redis(ctx, args.members, [300, 1000], repeat)
            if "crosscheck" in wanted:
                if ctx.external is None:
                    results["crosscheck"] = None
                    log("crosscheck: needs --crosscheck-loadgen PATH")
                else:
                    pts = []
                    for item in args.crosscheck_points.split(","):
                        kind, _, rate = item.partition(":")
                        pts.append((kind, float(rate)))
                    results["crosscheck"] = scenario_crosscheck(ctx, pts, args.members, repeat)
            if "profile" in wanted:
                results["profile"] = scenario_profile(ctx, args.members, 2000, 6)
            results["targets"] = check_targets(results)
            print(report(results))
    finally:
        results["runs"] = ctx.all_runs
        out_dir = Path(args.results_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        out_path = out_dir / (args.out or f"{mode}.json")
        tmp = out_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(results, indent=1, default=str) + "\n")
        tmp.replace(out_path)
        log(f"bench: results in {out_path}")
        shutil.rmtree(workdir, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
