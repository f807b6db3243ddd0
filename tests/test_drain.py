"""The lame-duck drain on SIGTERM (issue 12, Done-when 5) over a real process and real sockets."""

from __future__ import annotations

import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable

from _chat import LineClient, ServerProcess

Start = Callable[..., ServerProcess]
NOTICE = "* server restarting, reconnect"


def readyz(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def drain_seconds(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith("chat_drain_seconds "):
                return float(line.split()[1])
    raise AssertionError("no chat_drain_seconds")


class Watch(threading.Thread):
    """Reads one member until EOF, timing the restart notice and the close; keeps every line."""

    def __init__(self, client: LineClient, last_words: str | None = None) -> None:
        super().__init__(daemon=True)
        self.client = client
        self.last_words = last_words
        self.lines: list[str] = []
        self.told: float | None = None
        self.closed: float | None = None

    def run(self) -> None:
        while True:
            try:
                line = self.client.recv_line(timeout=20)
            except (EOFError, OSError):
                self.closed = time.monotonic()
                self.client.close()  # as a client does when the server is gone
                return
            except TimeoutError:
                return
            self.lines.append(line)
            if line == NOTICE:
                self.told = time.monotonic()
                if self.last_words:  # as if sent just before the notice arrived
                    self.client.send(self.last_words)


def test_sigterm_turns_unready_at_once_then_closes_members_spread_over_the_window(chat_server: Start) -> None:
    delay, spread, count = 1.0, 2.0, 20
    srv = chat_server(
        "--drain-delay", str(delay), "--drain-spread", str(spread), "--metrics-port", "0", "--flood-rate", "0"
    )  # fmt: skip
    metrics_port = srv.metrics_port
    assert metrics_port
    members = [srv.member(f"m{n}") for n in range(count)]
    watches = [Watch(member) for member in members]
    for watch in watches:
        watch.start()
    assert readyz(metrics_port) == 200
    started = time.monotonic()
    srv.signal(signal.SIGTERM)
    while readyz(metrics_port) != 503:
        assert time.monotonic() - started < 0.1, "/readyz still 200 100 ms after SIGTERM"
    unready = time.monotonic() - started
    members[0].send("still serving during the delay")  # members keep chatting while the balancer catches up
    assert 0 < drain_seconds(metrics_port) < delay
    for watch in watches:
        watch.join(delay + spread + 5)
    assert srv.proc.wait(delay + spread + 2) == 0
    exited = time.monotonic() - started
    told = sorted(watch.told - started for watch in watches if watch.told is not None)
    closed = sorted(watch.closed - started for watch in watches if watch.closed is not None)
    assert len(told) == len(closed) == count, "every member told, then closed"
    assert told[0] >= delay - 0.05, f"first member told {told[0]:.2f}s after SIGTERM, before the delay ended"
    assert told[-1] - told[0] >= spread * 0.6, f"told over {told[-1] - told[0]:.2f}s, not spread over {spread}s"
    assert closed[-1] - closed[0] >= spread * 0.6, f"closed over {closed[-1] - closed[0]:.2f}s"
    # evenly: no more than about a quarter of the members in any quarter of the window
    quarters = [sum(1 for t in closed if told[0] + spread * q / 4 <= t < told[0] + spread * (q + 1) / 4)
                for q in range(4)]  # fmt: skip
    assert max(quarters) <= count / 4 + 3, f"closes per quarter of the window: {quarters}"
    assert exited < delay + spread + 2, f"exited {exited:.2f}s after SIGTERM"
    for watch in watches[1:]:
        assert "[m0] still serving during the delay" in watch.lines
        assert not [line for line in watch.lines if " left " in line], "leave notices while draining"
        assert watch.lines[-1] == NOTICE
    print(f"/readyz 503 after {unready * 1000:.0f} ms; told {told[0]:.2f}-{told[-1]:.2f}s; exit {exited:.2f}s")


def test_a_line_sent_after_the_notice_still_reaches_members_not_yet_told(chat_server: Start) -> None:
    srv = chat_server("--drain-delay", "0", "--drain-spread", "3", "--flood-rate", "0")
    members = [srv.member(f"m{n}") for n in range(10)]
    watches = [Watch(member, last_words=f"last words of m{n}") for n, member in enumerate(members)]
    for watch in watches:
        watch.start()
    srv.signal(signal.SIGTERM)
    for watch in watches:
        watch.join(10)
    assert srv.proc.wait(5) == 0
    order = sorted(range(len(watches)), key=lambda n: watches[n].told or 0)
    for rank, n in enumerate(order):
        heard = [line for line in watches[n].lines if line.startswith("[m")]
        # every member told earlier was still read after its notice, and relayed to this one
        assert heard == [f"[m{k}] last words of m{k}" for k in order[:rank]], (rank, heard)


def test_a_second_signal_during_the_drain_exits_at_once_with_status_1(chat_server: Start) -> None:
    srv = chat_server("--drain-delay", "30", "--drain-spread", "30")
    srv.member("m")
    srv.signal(signal.SIGTERM)
    time.sleep(0.3)
    assert srv.proc.poll() is None
    started = time.monotonic()
    srv.expect_exit(1)
    srv.signal(signal.SIGTERM)
    assert srv.proc.wait(3) == 1
    assert time.monotonic() - started < 2
