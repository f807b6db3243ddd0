"""The host: what it is, how busy its cores are, and how servers and generators are pinned.

The machine may be shared, so every run records how much CPU other processes took on the
measured cores; the figures are read from /proc, which costs nothing on the measured path.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import re
import resource
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench import ROOT


@dataclass(frozen=True)
class Machine:
    nproc: int
    cpu_model: str
    mem_gb: float
    kernel: str
    python: str
    gevent: str
    nofile_limit: int
    git_commit: str
    service_has_uncommitted_changes: bool
    date_utc: str


def _git(*args: str) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run(
            ["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    return ""


def machine_info() -> Machine:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kb = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1])
    gevent_version = ""
    with contextlib.suppress(ImportError):
        import gevent

        gevent_version = gevent.__version__
    return Machine(
        nproc=os.cpu_count() or 1,
        cpu_model=model,
        mem_gb=round(mem_kb / 1048576, 1),
        kernel=platform.release(),
        python=platform.python_version(),
        gevent=gevent_version,
        nofile_limit=resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        git_commit=_git("rev-parse", "--short", "HEAD"),
        service_has_uncommitted_changes=bool(_git("status", "--porcelain", "--", "service")),
        date_utc=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )


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


@dataclass(frozen=True)
class Pinning:
    """Servers on one core, generators on the other, so neither measures the other."""

    enabled: bool
    server_core: int = 1
    gen_core: int = 0
    nice: int = 0

    @classmethod
    def for_host(cls, allowed: bool, nice: int) -> Pinning:
        """Pinned when there are two cores and taskset, unless the caller says not to."""
        ok = allowed and (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None
        return cls(enabled=ok, nice=nice)

    def cores(self) -> list[int]:
        return [self.server_core, self.gen_core] if self.enabled else [0]

    def _prio(self, cmd: list[str]) -> list[str]:
        return ["nice", "-n", str(self.nice), *cmd] if self.nice else cmd

    def server(self, cmd: list[str]) -> list[str]:
        return self._prio(["taskset", "-c", str(self.server_core), *cmd] if self.enabled else cmd)

    def gen(self, cmd: list[str]) -> list[str]:
        return self._prio(["taskset", "-c", str(self.gen_core), *cmd] if self.enabled else cmd)

    def raised(self, by: int) -> Pinning:
        """The same cores at a higher priority (a passive observer reads as soon as data arrives)."""
        return Pinning(self.enabled, self.server_core, self.gen_core, nice=min(self.nice, 0) - by)

    def prioritize(self, pid: int) -> None:
        """With autogroup scheduling, nice only ranks tasks of one session; a process started in
        its own session also gets its session group's weight raised (best effort)."""
        if self.nice:
            with contextlib.suppress(OSError):
                Path(f"/proc/{pid}/autogroup").write_text(f"{self.nice}\n")
