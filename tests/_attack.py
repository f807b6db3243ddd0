"""Bounded attacks for the hardening tests: many sockets from one address, and what each was told.

Plain blocking sockets opened from the test process; every attack has a
fixed count and a time limit, and ``Crowd.close`` ends it.
"""

from __future__ import annotations

import http.client
import json
import os
import selectors
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from _chat import parse_metrics


def connect(host: str, port: int, source: str = "127.0.0.1", timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout, source_address=(source, 0))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class Crowd:
    """``count`` connections from ``source``, each sending ``first`` (nothing if empty) when it connects."""

    def __init__(self, host: str, port: int, count: int, source: str = "127.0.0.1", first: bytes = b"") -> None:
        self.socks: list[socket.socket] = []
        self.failed = 0
        for _ in range(count):
            try:
                sock = connect(host, port, source)
                if first:
                    sock.sendall(first)
            except OSError:
                self.failed += 1
                continue
            self.socks.append(sock)

    def outcomes(self, seconds: float) -> Counter[str]:
        """Each socket's first line's start (``* welcome``, ``! server full``...), and ``+closed`` if it was closed.

        Reads until every socket was closed or has a line that is not a refusal (a
        refusal is followed by a close), or for ``seconds`` at most.
        """
        selector = selectors.DefaultSelector()
        seen: dict[int, bytes] = {}
        ended: set[int] = set()
        for index, sock in enumerate(self.socks):
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ, index)
        deadline = time.monotonic() + seconds
        while len(ended | {i for i, data in seen.items() if b"\n" in data and data[:1] != b"!"}) < len(self.socks):
            if time.monotonic() >= deadline:
                break
            for key, _ in selector.select(0.1):
                index = key.data
                try:
                    chunk = key.fileobj.recv(65536)  # type: ignore[union-attr]
                except BlockingIOError:
                    continue
                except OSError:
                    chunk = b""
                if chunk:
                    seen[index] = seen.get(index, b"") + chunk
                    continue
                ended.add(index)
                selector.unregister(key.fileobj)
        selector.close()
        counted: Counter[str] = Counter()
        for index in range(len(self.socks)):
            first = seen.get(index, b"").split(b"\n", 1)[0].decode(errors="replace")
            label = first.split(":", 1)[0].split(",", 1)[0] if first else "(nothing)"
            counted[label + (" +closed" if index in ended else "")] += 1
        return counted

    def trickle(self, data: bytes, every: float, until: threading.Event) -> threading.Thread:
        """Send ``data`` on every socket, one byte per socket every ``every`` seconds, until ``until`` is set."""

        def run() -> None:
            offset = 0
            while not until.is_set() and offset < len(data):
                for sock in self.socks:
                    try:
                        sock.send(data[offset : offset + 1])
                    except OSError:
                        pass
                offset += 1
                until.wait(every)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        for sock in self.socks:
            sock.close()
        self.socks.clear()


def log_events(path: Path) -> list[dict[str, object]]:
    """The server's JSON log; a line that is not JSON (a traceback on stdout or stderr) fails the test."""
    events = []
    for line in path.read_text(errors="replace").splitlines():
        if line.strip():
            try:
                events.append(json.loads(line))
            except ValueError:
                raise AssertionError(f"not a JSON log line: {line[:300]!r}") from None
    return events


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def scrape_from(port: int, source: str) -> dict[str, float]:
    """``test_observability.scrape`` from another address than the attack's (whose connects are throttled)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5, source_address=(source, 0))
    connection.request("GET", "/metrics")
    response = connection.getresponse()
    body = response.read().decode()
    connection.close()
    assert response.status == 200, body
    return parse_metrics(body)


def hammer(attack: Callable[[], None], seconds: float, threads: int = 4, per_second: float | None = None) -> int:
    """Run ``attack`` over and over from ``threads`` threads for ``seconds``, at most ``per_second`` runs a second.

    The pace matters on a two-core loopback: an unpaced attacker in the test
    takes the cores from the server, and the server's latency then measures
    the attacker's CPU, not the server's defences.  Returns how many runs finished.
    """
    stop = threading.Event()
    done = [0] * threads
    gap = threads / per_second if per_second else 0.0

    def run(index: int) -> None:
        due = time.monotonic()
        while not stop.is_set():
            if gap:
                due += gap
                stop.wait(max(0.0, due - time.monotonic()))
            try:
                attack()
            except OSError:
                continue
            done[index] += 1

    workers = [threading.Thread(target=run, args=(index,), daemon=True) for index in range(threads)]
    for worker in workers:
        worker.start()
    stop.wait(seconds)
    stop.set()
    for worker in workers:
        worker.join(10)
    return sum(done)
