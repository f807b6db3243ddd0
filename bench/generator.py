"""The C programs of the benchmark: building them, and running the load generators pinned.

chatload (bench/chatload.c) is the project's generator; an independent one
(``--crosscheck-loadgen``) can drive the same points. Both write one JSON object; this module
returns it as parsed, and bench.measure turns it into a typed Run, once, in one place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import BENCH, log
from bench.machine import Pinning

CHATLOAD_SRC = BENCH / "chatload.c"
BROADCASTER_SRC = BENCH / "broadcaster.c"
BUILD_DIR = BENCH / ".build"  # ignored by git


def build(src: Path, cc: str = "gcc") -> Path:
    """Compile ``src`` with ``cc -O2`` once per source version into bench/.build/."""
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:12]
    out = BUILD_DIR / f"{src.stem}-{digest}"
    if out.exists():
        return out
    compiler = shutil.which(cc)
    if compiler is None:
        raise SystemExit(f"bench: a C compiler ({cc}) is needed to build {src.name}")
    BUILD_DIR.mkdir(exist_ok=True)
    tmp = BUILD_DIR / f".{src.stem}-{digest}.{os.getpid()}"
    cmd = [compiler, "-O2", "-Wall", "-o", str(tmp), str(src)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise SystemExit(f"bench: building {src.name} failed:\n{r.stderr}")
    tmp.replace(out)
    return out


def run_pinned(pin: Pinning, cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a generator (or py-spy) on the generator's core, prioritised, bounded in time."""
    proc = subprocess.Popen(
        pin.gen(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    pin.prioritize(proc.pid)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise RuntimeError(f"{Path(cmd[0]).name} did not finish within {timeout:.0f}s: {err[-500:]}") from None
    except BaseException:  # interrupted: never leave a generator behind
        proc.kill()
        proc.wait()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@dataclass(frozen=True)
class Timing:
    """Seconds of sending, of warm-up after the barrier, and at most of draining afterwards."""

    duration: float
    warmup: float
    drain: float


@dataclass(frozen=True)
class Chatload:
    path: Path
    pin: Pinning
    timing: Timing

    def run(
        self,
        ports: Sequence[int],
        pids: Sequence[int],
        members: int,
        rate: float,
        label: str,
        *,
        protocol: str = "raw",
        idle: bool = False,
        connect_rate: float = 2000,
        duration: float | None = None,
        drain: float | None = None,
        ids: bool = False,
        senders: int | None = None,
        storm_after: float | None = None,
        max_connecting: int = 0,
        room: str | None = None,
    ) -> dict[str, Any]:
        """One run; ``ids``: members send /ids and every id is checked; ``storm_after`` (two ports):
        the first port's members drop at once that many seconds into sending and resume on the second;
        ``max_connecting``: most members started and not ready yet at once (0: no limit); ``room``:
        the members /join it first (one generator per room, several at once)."""
        duration = self.timing.duration if duration is None else duration
        drain = self.timing.drain if drain is None else drain
        cmd = [str(self.path), "--port", ",".join(str(p) for p in ports), "--clients", str(members),
               "--rate", f"{rate:g}", "--duration", f"{duration:g}", "--warmup", f"{self.timing.warmup:g}",
               "--drain", f"{drain:g}", "--connect-rate", f"{connect_rate:g}", "--protocol", protocol,
               "--server-pid", ",".join(str(p) for p in pids), "--label", label]  # fmt: skip
        if idle:
            cmd.append("--idle")
        if ids:
            cmd.append("--ids")
        if senders is not None:
            cmd += ["--senders", str(senders)]
        if storm_after is not None:
            cmd += ["--storm-after", f"{storm_after:g}"]
        if max_connecting:
            cmd += ["--max-connecting", str(max_connecting)]
        if room is not None:
            cmd += ["--join", room]
        budget = members / connect_rate + 15 + self.timing.warmup + duration + drain + 30
        r = run_pinned(self.pin, cmd, budget)
        if r.returncode != 0 or not r.stdout.strip():
            raise RuntimeError(f"chatload failed ({r.returncode}): {r.stderr.strip()[-500:]}")
        result: dict[str, Any] = json.loads(r.stdout)
        return result

    @contextlib.contextmanager
    def observer(
        self, port: int, count: int, members: int, connect_rate: float, protocol: str = "raw"
    ) -> Iterator[dict[str, Any]]:
        """A passive chatload (--observe) with ``count`` members, started before the main generator,
        at a higher priority so it reads as soon as data arrives; yields its JSON once it has ended."""
        result: dict[str, Any] = {}
        if count <= 0:
            yield result
            return
        t = self.timing  # outlast the main run: its ramp, barrier, warmup, sending and longest drain
        hold = (members - count) / connect_rate + 3 + t.warmup + t.duration + t.drain + 2
        cmd = [str(self.path), "--port", str(port), "--clients", str(count), "--observe", "--protocol", protocol,
               "--duration", f"{hold:g}", "--connect-rate", "1000", "--label", "observer"]  # fmt: skip
        prio = self.pin.raised(4)
        proc = subprocess.Popen(
            prio.gen(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        prio.prioritize(proc.pid)
        try:
            time.sleep(0.5 if protocol == "raw" else 1.5)  # in the room before the main generator starts
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


@dataclass(frozen=True)
class Loadgen:
    """The independent generator (shared/bench/loadgen.c, built by the caller): same points, other code."""

    path: Path
    pin: Pinning
    timing: Timing

    def run(
        self, port: int, pid: int, members: int, rate: float, label: str, connect_rate: float, protocol: str = "raw"
    ) -> dict[str, Any]:
        t = self.timing
        cmd = [str(self.path), "--port", str(port), "--clients", str(members), "--senders", str(members),
               "--rate", f"{rate:g}", "--duration", f"{t.duration:g}", "--warmup", f"{max(t.warmup, 1):g}",
               "--drain", f"{t.drain:g}", "--connect-rate", f"{connect_rate:g}", "--protocol", protocol,
               "--json", "--server-pid", str(pid), "--label", label]  # fmt: skip
        r = run_pinned(self.pin, cmd, members / connect_rate + 120)
        if r.returncode != 0 or not r.stdout.strip():
            raise RuntimeError(f"external loadgen failed ({r.returncode}): {r.stderr.strip()[-500:]}")
        result: dict[str, Any] = json.loads(r.stdout)
        return result
