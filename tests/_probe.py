"""A well-behaved member and a health prober that measure what an attack costs everyone else.

Hardening tests run an attack against a real server while a ``Bystander`` keeps
talking to itself (``/msg`` to its own nick, a round trip through the whole
input, command, hub and output path) and polls ``/healthz``.  The test then
asserts on the bystander's round-trip p99 and the slowest health answer.
The bystander runs in a process of its own (this file run as a script), with
plain threads and blocking sockets: the attack's threads in the test process
would otherwise hold the GIL while it waits to read, and their cost would be
measured as the server's.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

# On two cores the server and the attack's threads can take both, and a bystander waiting for
# a core would count its own scheduling delay as the server's (a run saw 330 ms round trips
# while the server's loop never lagged 250 ms).  It stands for a member on another machine, so
# it runs ahead of them where it may (root: CI); the server and the attack keep their priority.
_PRIORITY = ["nice", "-n", "-10"] if os.geteuid() == 0 else []


@dataclass
class Measured:
    """What the bystander saw: round trips of its own /msg, and /healthz answer times (seconds)."""

    round_trips: list[float] = field(default_factory=list)
    # When each round trip started (monotonic), to see which phase of an attack was slow.
    started: list[float] = field(default_factory=list)
    health: list[float] = field(default_factory=list)
    lost: int = 0
    health_failures: list[str] = field(default_factory=list)
    # With ``record=True``: every line the bystander received, with its arrival time (monotonic).
    lines: list[tuple[float, bytes]] = field(default_factory=list)

    def p99(self) -> float:
        values = sorted(self.round_trips)
        if not values:
            return float("inf")
        return values[min(len(values) - 1, int(len(values) * 0.99))]

    def slowest(self, count: int = 5) -> list[tuple[float, float]]:
        """The ``count`` slowest round trips as (start, seconds), in time order."""
        pairs = sorted(zip(self.started, self.round_trips, strict=True), key=lambda pair: pair[1])[-count:]
        return sorted(pairs)

    def slowest_health(self) -> float:
        return max(self.health, default=float("inf"))

    def summary(self) -> str:
        median = statistics.median(self.round_trips) if self.round_trips else float("nan")
        return (
            f"{len(self.round_trips)} round trips, p50 {median * 1000:.1f} ms, p99 {self.p99() * 1000:.1f} ms, "
            f"{self.lost} lost; {len(self.health)} health checks, slowest {self.slowest_health() * 1000:.0f} ms, "
            f"failures {self.health_failures[:3]}"
        )


@dataclass
class Settings:
    """Who the bystander is and how it measures; ``health_port`` None means the chat port."""

    host: str
    port: int
    nick: str = "bystander"
    source: str = "127.0.0.1"
    health_port: int | None = None
    # 8 lines a second: under the default --flood-rate (10), so the server never
    # fakelags the bystander itself (at 0.05 s its p50 became the 50 ms fakelag).
    interval: float = 0.125
    timeout: float = 5.0
    token: str | None = None
    # Keep every line received, with its arrival time (``Measured.lines``).
    record: bool = False


class Bystander:
    """Joins as ``nick`` from ``source`` (e.g. 127.0.0.2, "another IP") and measures until stopped.

    The health checks come from ``source`` too, to ``health_port`` (the chat port
    unless given), so per-address limits hit by an attack from elsewhere do not
    apply to them either.  ``token`` is sent as ``/auth`` first when the server
    wants one.  It has joined when the constructor returns, and measures from
    then until ``stop`` (or the end of its ``with`` block).
    """

    def __init__(self, host: str, port: int, **options: Any) -> None:
        settings = Settings(host, port, **options)
        self.measured: Measured | None = None
        self._proc = subprocess.Popen(
            [*_PRIORITY, sys.executable, __file__, json.dumps(asdict(settings))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert self._proc.stdout is not None
        joined = self._proc.stdout.readline().strip()
        if joined != "joined":
            self._proc.kill()
            raise RuntimeError(f"the bystander could not join: {joined} {self._proc.stdout.read()[-2000:]}")

    def __enter__(self) -> Bystander:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> Measured:
        if self.measured is None:
            assert self._proc.stdin is not None and self._proc.stdout is not None
            self._proc.stdin.write("stop\n")
            self._proc.stdin.close()
            output = self._proc.stdout.read()
            self._proc.wait(30)
            figures = json.loads(output.strip().splitlines()[-1])
            figures["lines"] = [(at, line.encode("latin-1")) for at, line in figures["lines"]]
            self.measured = Measured(**figures)
        return self.measured


class _Probe:
    """The bystander itself, in its own process: a member talking to itself, and a health prober."""

    def __init__(self, settings: Settings) -> None:
        host, port, nick, timeout = settings.host, settings.port, settings.nick, settings.timeout
        self.record = settings.record
        self.host, self.port, self.nick = host, port, nick
        self.source = settings.source
        self.health_port = settings.health_port or port
        self.interval = settings.interval
        self.timeout = timeout
        self.measured = Measured()
        self._stop = threading.Event()
        self.sock = socket.create_connection((host, port), timeout=timeout, source_address=(self.source, 0))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buffer = b""
        if settings.token is not None:
            self.sock.sendall(f"/auth {settings.token}\n".encode())
        self._expect_line(b"* welcome")
        self.sock.sendall(f"/nick {nick}\n".encode())
        self._expect_line(b"is now known as " + nick.encode())
        self._threads = [
            threading.Thread(target=self._talk, daemon=True),
            threading.Thread(target=self._check_health, daemon=True),
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> Measured:
        self._stop.set()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(self.timeout + 1)
        self.sock.close()
        return self.measured

    def _expect_line(self, needle: bytes) -> bytes:
        deadline = time.monotonic() + self.timeout
        while True:
            while b"\n" in self._buffer:
                line, _, self._buffer = self._buffer.partition(b"\n")
                if self.record:
                    self.measured.lines.append((time.monotonic(), line))
                if needle in line:
                    return line
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no line with {needle!r}")
            self.sock.settimeout(remaining)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("server closed the bystander's connection")
            self._buffer += chunk

    def _talk(self) -> None:
        seq = 0
        while not self._stop.is_set():
            seq += 1
            token = f"probe-{seq}"
            started = time.monotonic()
            try:
                self.sock.sendall(f"/msg {self.nick} {token}\n".encode())
                self._expect_line(token.encode())
            except TimeoutError:
                self.measured.lost += 1
                continue
            except OSError:
                self.measured.lost += 1
                return
            self.measured.round_trips.append(time.monotonic() - started)
            self.measured.started.append(started)
            self._stop.wait(self.interval)

    def _check_health(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                conn = http.client.HTTPConnection(
                    self.host, self.health_port, timeout=self.timeout, source_address=(self.source, 0)
                )
                conn.request("GET", "/healthz")
                status = conn.getresponse().status
                conn.close()
                if status != 200:
                    self.measured.health_failures.append(f"status {status}")
            except OSError as exc:
                self.measured.health_failures.append(repr(exc))
            self.measured.health.append(time.monotonic() - started)
            self._stop.wait(0.2)


def _main() -> None:
    """Run as a script by ``Bystander``: join, say so, measure until told to stop, print the figures."""
    try:
        probe = _Probe(Settings(**json.loads(sys.argv[1])))
    except (OSError, EOFError) as exc:
        print(f"failed: {exc!r}", flush=True)
        sys.exit(1)
    print("joined", flush=True)
    probe.start()
    sys.stdin.readline()
    figures = asdict(probe.stop())
    figures["lines"] = [(at, line.decode("latin-1")) for at, line in figures["lines"]]  # JSON has no bytes
    print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    _main()
