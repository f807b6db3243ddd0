"""Server processes for the benchmark and the capacity sweep: start, wait, scrape, stop, check.

One wrapper for every server either tool starts (chat-svc, the seed, the C broadcaster,
ngircd, redis-server). It keeps the server's output in a log file and checks the server when
it stops: a server that crashed, ignored SIGTERM, exited with an unexpected code or logged
one of FAILURE_MARKS has failed the run, however good its numbers looked (chat-svc logs a bug
in one session or one fan-out pass and carries on serving everybody else).
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from bench import BENCH, ROOT
from bench.machine import Pinning

SEED = BENCH / "seed_server.py"
FAILURE_MARKS = ("session_failed", "fanout_failed", "shutdown_failed", "Traceback")


def free_port() -> int:
    """A loopback port nobody listens on right now (the server binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """One server process on a loopback port, its output in ``log_path``.

    ``exit_codes`` are the codes that count as a clean stop after SIGTERM (a server without a
    SIGTERM handler dies of the signal: ``-signal.SIGTERM``). ``stop()`` returns the problems
    found; they stay in ``problems``.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        port: int,
        log_dir: Path,
        *,
        pin: Pinning | None = None,
        exit_codes: Sequence[int] = (0,),
    ) -> None:
        self.name = name
        self.port = port
        self.exit_codes = tuple(exit_codes)
        self.who = f"{name} (port {port})"
        self.problems: list[str] = []
        self.log_path = log_dir / f"{name}-{port}.log"
        self._log = self.log_path.open("wb")
        cmd = pin.server(list(argv)) if pin else list(argv)
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=str(ROOT),
            start_new_session=True,
        )
        self.pid = self.proc.pid  # nice and taskset exec the command: same pid
        if pin:
            pin.prioritize(self.pid)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self, timeout: float = 30.0, http: bool = False) -> None:
        """Until the port accepts a connection (``http``: until /healthz answers 200)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
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

    def stop(self, timeout: float = 20.0) -> list[str]:
        """SIGTERM, wait, then check the exit code and the log (once; later calls repeat the verdict)."""
        if self._log.closed:
            return self.problems
        if not self.alive():
            self.problems.append(f"{self.who} exited with {self.proc.returncode} before it was stopped")
        else:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
                self.problems.append(f"{self.who} did not exit within {timeout:g}s of SIGTERM (killed)")
            else:
                if self.proc.returncode not in self.exit_codes:
                    self.problems.append(f"{self.who} exited with {self.proc.returncode} after SIGTERM")
        self._log.close()
        self.problems.extend(self._log_problems())
        return self.problems

    def _log_problems(self) -> list[str]:
        found: list[str] = []
        with contextlib.suppress(OSError), self.log_path.open("rb") as f:
            for raw in f:
                line = raw.decode(errors="replace").strip()
                mark = next((m for m in FAILURE_MARKS if m in line), None)
                if mark and not any(mark in p for p in found):
                    found.append(f"{self.who} logged {mark}: {line[:300]}")
        return found


# ----------------------------------------------------------------------------- Prometheus


@dataclass(frozen=True)
class Scrape:
    """The samples of one /metrics page, parsed by prometheus_client."""

    samples: tuple[Sample, ...]

    @classmethod
    def parse(cls, text: str) -> Scrape:
        return cls(tuple(s for family in text_string_to_metric_families(text) for s in family.samples))

    def value(self, name: str, default: float = 0.0) -> float:
        """Sum of the samples called ``name`` over all their label sets (``default`` if none)."""
        values = [s.value for s in self.samples if s.name == name]
        return float(sum(values)) if values else default

    def has(self, name: str) -> bool:
        return any(s.name == name for s in self.samples)

    def buckets(self, histogram: str) -> dict[float, float]:
        """Cumulative count per upper bound ``le`` of a histogram, summed over its other labels."""
        out: dict[float, float] = {}
        for s in self.samples:
            if s.name == histogram + "_bucket":
                le = float(s.labels["le"])
                out[le] = out.get(le, 0.0) + s.value
        return out


def scrape(url: str, timeout: float = 5.0) -> Scrape:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return Scrape.parse(r.read().decode())


def wait_backplane(ports: Sequence[int], timeout: float = 15) -> tuple[bool, str]:
    """Every instance reports chat_backplane_up 1 on /metrics."""
    deadline = time.monotonic() + timeout
    last = "no chat_backplane_up metric"
    while time.monotonic() < deadline:
        ups = []
        for port in ports:
            try:
                page = scrape(f"http://127.0.0.1:{port}/metrics", timeout=2)
            except OSError as exc:
                last = str(exc)
                ups.append(False)
                continue
            if not page.has("chat_backplane_up"):
                last = "no chat_backplane_up metric (backplane not implemented?)"
            ups.append(page.value("chat_backplane_up") >= 1)
        if all(ups):
            return True, ""
        time.sleep(0.5)
    return False, last


# ----------------------------------------------------------------------------- the servers compared


@dataclass(frozen=True)
class Kind:
    """How to start one kind of server, drive it and judge its exit.

    ``search`` is where the rate search starts and the lowest and highest rates it tries (msg/s).
    """

    name: str
    argv: Callable[[int, Sequence[str]], list[str]]
    connect_rate: float
    protocol: str = "raw"
    http_ready: bool = False
    exit_codes: tuple[int, ...] = (0,)
    search: tuple[float, float, float] = (2000, 50, 12000)
    missing: str = ""  # why it cannot run on this machine; "" when it can
    ids: bool = False  # the members turn message ids on (/ids) and the generator checks every id


def find_ngircd() -> str | None:
    """ngircd lives in /usr/sbin, which is not on every PATH."""
    return shutil.which("ngircd") or shutil.which("ngircd", path="/usr/sbin:/usr/local/sbin")


def ngircd_config(port: int, workdir: Path) -> Path:
    """A config for one benchmark instance: loopback only, no DNS/ident/PAM lookups on connect,
    no per-IP connection cap and no penalty time (ngircd otherwise throttles a client sending
    more than a few commands at once, which would measure the throttle, not the server)."""
    path = workdir / f"ngircd-{port}.conf"
    path.write_text(
        "[Global]\n"
        "\tName = bench.invalid\n"
        "\tInfo = chat-svc benchmark peer\n"
        "\tAdminInfo1 = chat-svc benchmark\n"
        "\tAdminInfo2 = loopback only\n"
        "\tAdminEMail = bench@bench.invalid\n"
        "\tListen = 127.0.0.1\n"
        f"\tPorts = {port}\n"
        '\tMotdPhrase = "bench"\n'
        "[Limits]\n"
        "\tMaxConnections = 0\n"
        "\tMaxConnectionsIP = 0\n"
        "\tMaxPenaltyTime = 0\n"
        "\tPingTimeout = 600\n"
        "\tPongTimeout = 600\n"
        "[Options]\n"
        "\tDNS = no\n"
        "\tIdent = no\n"
        "\tPAM = no\n"
    )
    return path


def kinds(
    ours_cmd: Sequence[str],
    workdir: Path,
    broadcaster: Path | None,
    ngircd: str | None,
    baseline_cmd: Sequence[str] | None = None,
) -> dict[str, Kind]:
    def chat_svc(cmd: Sequence[str]) -> Callable[[int, Sequence[str]], list[str]]:
        def argv(port: int, extra: Sequence[str]) -> list[str]:
            # no lame-duck drain when the bench stops it (environment variables: a snapshot of a
            # version without the drain settings ignores them)
            return ["env", "CHAT_DRAIN_DELAY=0", "CHAT_DRAIN_SPREAD=0", *cmd, "--host", "127.0.0.1",
                    "--port", str(port), "--flood-rate", "0", *extra]  # fmt: skip

        return argv

    ours = chat_svc(ours_cmd)

    def seed(port: int, extra: Sequence[str]) -> list[str]:
        return [sys.executable, str(SEED), str(port), "127.0.0.1"]

    def c_epoll(port: int, extra: Sequence[str]) -> list[str]:
        return [str(broadcaster), str(port), "127.0.0.1"]

    def irc(port: int, extra: Sequence[str]) -> list[str]:
        return [str(ngircd), "--nodaemon", "--config", str(ngircd_config(port, workdir))]

    return {
        "chat-svc": Kind("chat-svc", ours, connect_rate=2000, http_ready=True),
        # chat-svc as committed at --baseline REV, measured in the same run (before/after a change)
        "chat-svc-base": Kind(
            "chat-svc-base",
            chat_svc(baseline_cmd or ()),
            connect_rate=2000,
            http_ready=True,
            missing="" if baseline_cmd else "no --baseline REV given",
        ),
        # the same server, every member with message ids on (issue 12): what ids cost, side by side
        "chat-svc-ids": Kind("chat-svc-ids", ours, connect_rate=2000, http_ready=True, ids=True),
        # the same server, every member on WebSocket (GET /ws) instead of raw TCP
        "chat-svc-ws": Kind("chat-svc-ws", ours, connect_rate=2000, protocol="ws", http_ready=True),
        # the seed accepts one connection per select() round and announces each to everybody;
        # with its listen(10) backlog a gentle ramp avoids SYN retries. It has no SIGTERM handler.
        "seed": Kind("seed", seed, connect_rate=200, exit_codes=(-signal.SIGTERM,), search=(40, 2, 2000)),
        "c-epoll": Kind(
            "c-epoll",
            c_epoll,
            connect_rate=2000,
            search=(4000, 50, 40000),
            missing="" if broadcaster else "bench/broadcaster.c was not built",
        ),
        # every JOIN is announced to the whole channel: a gentler ramp
        "ngircd": Kind(
            "ngircd",
            irc,
            connect_rate=500,
            protocol="irc",
            search=(500, 5, 12000),
            missing="" if ngircd else "ngircd is not installed (Debian package ngircd)",
        ),
    }


def redis_argv(port: int) -> list[str]:
    redis = shutil.which("redis-server") or "redis-server"
    return [redis, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]


def default_ours_cmd() -> list[str]:
    exe = Path(sys.executable)
    script = exe.parent / "chat-svc"
    if script.exists():
        return [str(script)]
    venv = ROOT / ".venv" / "bin" / "chat-svc"
    if venv.exists():
        return [str(venv)]
    return [sys.executable, "-m", "chat_svc"]


def export_snapshot(rev: str, workdir: Path, name: str = "snapshot") -> tuple[list[str], str]:
    """chat-svc from service/ as committed at ``rev`` (or the working tree as it is now, for
    ``worktree``), copied under workdir/``name`` so edits made during the run do not leak into it.
    Returns the command that runs it and what it is."""
    dest = workdir / name
    cmd = ["env", f"PYTHONPATH={dest / 'service'}", sys.executable, "-m", "chat_svc"]
    if rev == "worktree":
        shutil.copytree(ROOT / "service", dest / "service", ignore=shutil.ignore_patterns("*.pyc"))
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30
        ).stdout.strip()
        return cmd, f"{head} + working tree of {time.strftime('%Y-%m-%d %H:%M:%S')}"
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--verify", f"{rev}^{{commit}}"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout.strip()  # fmt: skip
    dest.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", commit, "service"], capture_output=True, timeout=60, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, timeout=60, check=True)
    return cmd, commit
