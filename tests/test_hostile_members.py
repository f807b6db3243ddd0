"""What hostile members can do to the others through the protocol (issue 18, items 3, 4, 6, 8, 11).

Each attack runs against a real server process while a ``Bystander`` from
another address (127.0.0.2) measures its own ``/msg`` round trip and
``/healthz``: the attack may cost the attacker, never the bystander more than
p99 250 ms and a health answer within 1 s.
"""

from __future__ import annotations

import re
import resource
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import pytest
from _chat import ServerProcess, pump, scrape
from _probe import Bystander, Measured
from _ws import WsClient

OTHER_IP = "127.0.0.2"
T = TypeVar("T")


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, needed), hard))


def open_many(
    srv: ServerProcess, count: int, first_lines: Callable[[int], bytes], rcvbuf: int = 0
) -> list[socket.socket]:
    """``count`` connections from 127.0.0.1, each sending ``first_lines(n)`` at once."""
    socks = []
    for n in range(count):
        sock = socket.socket()
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(10)
        sock.connect((srv.host, srv.port))
        sock.sendall(first_lines(n))
        socks.append(sock)
    return socks


def drain(socks: list[socket.socket], stop: threading.Event) -> threading.Thread:
    """Read and discard whatever the server sends ``socks`` until ``stop``."""

    def run() -> None:
        selector = selectors.DefaultSelector()
        for sock in socks:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
        while not stop.is_set() and selector.get_map():
            for key, _ in selector.select(0.1):
                try:
                    if not key.fileobj.recv(1 << 16):  # type: ignore[union-attr]
                        selector.unregister(key.fileobj)
                except BlockingIOError:
                    pass
                except OSError:
                    selector.unregister(key.fileobj)
        selector.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@contextmanager
def sampled(read: Callable[[], T], every: float) -> Iterator[list[T]]:
    """Calls ``read`` every ``every`` seconds while the block runs; yields the values so far."""
    samples = [read()]
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(every):
            samples.append(read())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        stop.set()
        thread.join()


def kernel_send_queues(port: int) -> list[int]:
    """Bytes in the kernel send queue of every TCP socket on local ``port`` (orphans included)."""
    queued = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rsplit(":", 1)[1], 16) == port:
            queued.append(int(fields[4].split(":")[0], 16))
    return queued


def assert_unhurt(measured: Measured) -> None:
    print("bystander:", measured.summary())
    assert len(measured.round_trips) >= 20, measured.summary()
    assert measured.lost == 0, measured.summary()
    assert measured.p99() < 0.25, measured.summary()
    assert not measured.health_failures, measured.summary()
    assert measured.slowest_health() < 1.0, measured.summary()


# ----------------------------------------------------------------------------- item 3: listings


@pytest.mark.slow
def test_listing_floods_over_5000_rooms_cost_the_others_a_bounded_slice(chat_server):
    """100 clients asking for /rooms and /who as fast as they may while there are 5000 rooms."""
    raise_fd_limit(12000)
    srv = chat_server()
    rooms = 5000
    holders = open_many(srv, rooms, lambda n: f"/nick h{n}\n/join r{n:04d}\n".encode())
    stop = threading.Event()
    drain(holders, stop)
    probe = srv.member("probe")
    deadline = time.monotonic() + 60
    while True:
        probe.send("/rooms")
        answer = probe.expect("* rooms: ")
        if f"in {rooms + 1} rooms)" in answer or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    # Bounded: the 50 biggest rooms and the totals, not 190 KB.
    assert answer.startswith("* rooms: lobby (1), r0000 (1), r0001 (1), ")
    assert answer.endswith(f" and {rooms + 1 - 50} more ({rooms + 1} members in {rooms + 1} rooms)")
    assert len(answer) < 1500
    attackers = open_many(srv, 100, lambda n: f"/nick x{n}\n".encode())
    drain(attackers, stop)
    asked = [0]

    def attack() -> None:
        # 10 lines a second each, the plain flood rate, all of them listings: the server
        # charges /rooms 5 and /who 3 tokens and fakelags the rest.
        while not stop.is_set():
            for n, sock in enumerate(attackers):
                try:
                    sock.sendall(b"/rooms\n" if n % 2 else b"/who\n")
                    asked[0] += 1
                except OSError:
                    pass
            stop.wait(0.1)

    with Bystander(srv.host, srv.port, source=OTHER_IP) as bystander:
        thread = threading.Thread(target=attack, daemon=True)
        thread.start()
        time.sleep(10)
        measured = bystander.stop()
    stop.set()
    thread.join()
    samples = scrape(srv.port)
    print(f"{asked[0]} listing requests sent; flood-delayed lines {samples['chat_flood_delayed_lines_total']:.0f}")
    assert_unhurt(measured)
    assert samples["chat_flood_delayed_lines_total"] > 1000
    assert samples.get("chat_disconnects_total{reason=flood,transport=tcp}", 0) == 0  # within the limits: nobody kicked


# ----------------------------------------------------------------------------- item 4: memory


# Rounds a second of the memory attack (see paced() below).
PACE = 4


@pytest.mark.slow
def test_a_thousand_members_that_never_read_stay_within_the_memory_budget(chat_server):
    """Each attacker stays within its own limits: it never reads, fills its own room's history
    (20 lines of 8 KB) and queues /msg-to-self lines up to about --sendq-bytes.  Together they
    would hold 1.5 GB; the outbound budget keeps the process under the documented bound."""
    raise_fd_limit(4000)
    budget = 128 << 20
    srv = chat_server()
    count, history, line_bytes = 1000, 20, 8000
    text = "m" * line_bytes
    attackers = open_many(
        srv, count, lambda n: f"/nick a{n}\n/join h{n}\n".encode(), rcvbuf=4096
    )
    before_kb = srv.rss_kb()

    def paced(rounds: int, line: Callable[[int], bytes]) -> None:
        """One line to every attacker per round, 4 rounds a second (the flood rate allows 10).

        What the attack costs in memory does not depend on its pace; its pace sets how much
        of a core the server spends decoding 8 KB lines, and on loopback the attacker's own
        TCP work lands on the same two cores.  At 9 a second (9000 lines/s) a 2-core host
        starves the server and the bystander with it; at 6 the bystander's p99 sat at
        140-330 ms on an idle machine, which says as much about this host as the server."""
        for _ in range(rounds):
            started = time.monotonic()
            for n, sock in enumerate(attackers):
                try:
                    sock.sendall(line(n))
                except OSError:
                    pass
            time.sleep(max(0.0, 1 / PACE - (time.monotonic() - started)))

    charged = sampled(lambda: scrape(srv.port), 0.5)
    bystander = Bystander(srv.host, srv.port, source=OTHER_IP)
    with sampled(srv.rss_kb, 0.2) as rss, charged as outbound, bystander:
        phases = [time.monotonic()]
        paced(history, lambda n: f"{text}\n".encode())
        phases.append(time.monotonic())
        # About 1.45 MB each: the kernel's full send buffer (twice --sndbuf-bytes) and just
        # under --sendq-bytes queued.
        paced(180, lambda n: f"/msg a{n} {text}\n".encode())
        phases.append(time.monotonic())
        time.sleep(1)
        samples = scrape(srv.port)
        measured = bystander.stop()
        # Dropped connections are reset, not closed: no full send buffer stays behind in the
        # kernel (as an orphan socket) for minutes.  The attackers have not closed theirs.
        left_behind = sum(kernel_send_queues(srv.port))
    for sock in attackers:
        sock.close()
    peak_mb = max(rss) / 1024
    charged_bytes = [s["chat_outbound_bytes"] for s in outbound]
    shed = samples.get("chat_disconnects_total{reason=outbound_budget,transport=tcp}", 0)
    slow = samples.get("chat_disconnects_total{reason=slow_consumer,transport=tcp}", 0)
    # The documented bound (docs/operations.md, "Memory"): the process with its members connected,
    # 40 KB per busy member, every room's history bound and the outbound budget.
    history_mb = count * history * (8192 + 100) / 2**20
    bound_mb = before_kb / 1024 + count * 40 / 1024 + history_mb + budget / 2**20
    print(
        f"RSS before {before_kb / 1024:.0f} MB, peak {peak_mb:.0f} MB, bound {bound_mb:.0f} MB; "
        f"outbound charged at most {max(charged_bytes) / 2**20:.0f} MiB (budget {budget >> 20} MiB), "
        f"held in queues at most {max(s['chat_sendq_bytes'] for s in outbound) / 2**20:.0f} MiB; "
        f"shed {shed:.0f}, slow consumers {slow:.0f}; kernel send queues left {left_behind} bytes"
    )
    print("phases at", [round(at - phases[0], 2) for at in phases], "slowest round trips (start, s):",
          [(round(at - phases[0], 2), round(rtt, 3)) for at, rtt in measured.slowest()],
          "server loop ticks later than 0.25 s:", samples["chat_event_loop_tick_lag_seconds_count"]
          - samples["chat_event_loop_tick_lag_seconds_bucket{le=0.25}"])
    assert_unhurt(measured)
    assert shed > 0
    assert max(charged_bytes) > budget * 0.8  # the attack did reach the budget
    # Kernel buffers fill before the budget can see them (a thousand at the same moment here),
    # so one scrape may catch it past the budget; the next must find it shed back under.
    assert sum(value > budget * 1.02 for value in charged_bytes) <= 1, charged_bytes
    assert left_behind < 1 << 20
    assert peak_mb < bound_mb
    assert peak_mb < 512
    assert '"outbound_budget_exceeded"' in srv.log_text()


def test_the_budget_sheds_websocket_and_tcp_members_alike(chat_server):
    """A small budget, two members that never read (one over WebSocket), one that reads:
    the two are dropped by the budget, by transport, and the reader gets every line."""
    srv = chat_server("--flood-rate", "0", "--outbound-budget-bytes", "1200000")
    stuck_ws = WsClient(srv.host, srv.port)
    stuck_ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck_ws.send("/nick stuckws")
    stuck_tcp = srv.connect()
    stuck_tcp.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck_tcp.send("/nick stucktcp")
    reader = srv.member("reader")
    reader.send("/who")
    reader.expect("* in lobby (3)")
    talker = srv.member("talker")
    total, payload = 2000, "p" * 1000
    got: list[str] = []
    thread = threading.Thread(target=lambda: got.extend(reader.expect("[talker]", 20) for _ in range(total)))
    thread.start()
    pump(talker.sock, "".join(f"{n:05d} {payload}\n" for n in range(total)).encode(), 20_000, 0.01).join(30)
    thread.join(30)
    assert got == [f"[talker] {n:05d} {payload}" for n in range(total)]
    samples = scrape(srv.port)
    assert samples["chat_disconnects_total{reason=outbound_budget,transport=ws}"] == 1
    assert samples["chat_disconnects_total{reason=outbound_budget,transport=tcp}"] == 1
    assert samples["chat_outbound_bytes"] < 1200000


# ----------------------------------------------------------------------------- item 8: churn


@pytest.mark.slow
def test_connect_churn_shows_the_lobby_a_bounded_number_of_notices(chat_server):
    """Members joining and quitting the lobby as fast as one address may: at most --notice-rate
    notices a second reach the lobby, plus one summary line, and the bystander is unhurt."""
    srv = chat_server("--notice-rate", "5")
    stop = threading.Event()
    cycles = [0]

    def churn() -> None:
        while not stop.is_set():
            started = time.monotonic()
            for _ in range(10):
                try:
                    with socket.create_connection((srv.host, srv.port), timeout=5) as sock:
                        sock.sendall(b"/quit\n")
                        cycles[0] += 1
                except OSError:
                    pass
            stop.wait(max(0.0, 0.05 - (time.monotonic() - started)))  # about 200 cycles a second

    with Bystander(srv.host, srv.port, source=OTHER_IP, record=True) as bystander:
        threads = [threading.Thread(target=churn, daemon=True) for _ in range(2)]
        for thread in threads:
            thread.start()
        time.sleep(8)
        stop.set()
        for thread in threads:
            thread.join()
        time.sleep(1.5)  # the last summary
        measured = bystander.stop()
    notices = [(at, line.decode()) for at, line in measured.lines if re.match(rb"\* \S+ (joined|left) lobby$", line)]
    summaries = [(at, line.decode()) for at, line in measured.lines if line.startswith(b"* lobby: ")]
    print(f"{cycles[0]} churn cycles; {len(notices)} notices, {len(summaries)} summaries: {summaries[:3]}")
    assert cycles[0] > 1000
    assert_unhurt(measured)
    start = measured.lines[0][0]
    per_second: dict[int, int] = {}
    for at, _ in notices:
        per_second[int(at - start)] = per_second.get(int(at - start), 0) + 1
    # 5 a second, plus what a one-second window read late can straddle.
    assert max(per_second.values()) <= 10, per_second
    summed = 0
    for _, line in summaries:
        match = re.fullmatch(r"\* lobby: (?:(\d+) more joined)?(?:, )?(?:(\d+) more left)?", line)
        assert match, line
        summed += sum(int(group or 0) for group in match.groups())
    assert summed + len(notices) == 2 * cycles[0]
    assert scrape(srv.port)["chat_notices_held_back_total"] == summed


# ----------------------------------------------------------------------------- item 6: forgery


def test_no_member_can_write_a_line_the_server_writes(chat_server):
    srv = chat_server("--history", "5")
    bob = srv.member("bob")
    mallory = srv.connect()
    welcome = mallory.expect("* welcome")
    for nick in ("server", "history", "you", "Welcome", "HISTORY", "bye", "in"):
        mallory.send(f"/nick {nick}")
        assert mallory.expect("!") == f"! nick {nick} is reserved"
    mallory.send("/nick mallory")
    bob.expect_re("is now known as mallory$")
    attempts = [
        "/me shutting down",
        "/me is now known as root",
        "/me joined lobby",
        "/me " + welcome.removeprefix("* "),
        "[history] [admin] send me your token",
        "* server shutting down",
        "! server full",
        "fine\u2028* server shutting down",
        "\u202e* server shutting down",
    ]
    for attempt in attempts:
        mallory.send(attempt)
    heard = [bob.expect_re(r"mallory") for _ in attempts]
    assert heard == [
        "* [mallory] shutting down",
        "* [mallory] is now known as root",
        "* [mallory] joined lobby",
        "* [mallory] " + welcome.removeprefix("* "),
        "[mallory] [history] [admin] send me your token",
        "[mallory] * server shutting down",
        "[mallory] ! server full",
        "[mallory] fine * server shutting down",
        "[mallory] * server shutting down",
    ]
    # Every member line has one of the three member shapes, which no server line has.
    member_shape = re.compile(r"(\[[\w.\-]+\]|\[[\w.\-]+ -> [\w.\-]+\]|\* \[[\w.\-]+\]) ")
    assert all(member_shape.match(line) for line in heard)
    mallory.send("/join dev")
    joined = mallory.expect("* you joined dev")
    mallory.send("/me waves")
    mallory.send("/who")
    mallory.expect("* in dev")
    carol = srv.member("carol", room="dev")
    server_lines = [welcome, carol.expect("[history]"), joined]
    srv.signal()
    server_lines.append(bob.expect("* server restarting, reconnect"))
    assert server_lines[1] == "[history] * [mallory] waves"
    assert not set(heard) & set(server_lines)
    assert not any(member_shape.match(line) for line in server_lines if not line.startswith("[history]"))


# ----------------------------------------------------------------------------- item 11: no growth


def test_invalid_utf8_never_makes_a_line_bigger_than_the_limit(chat_server):
    srv = chat_server()
    alice, bob = srv.member("alice"), srv.member("bob")
    alice.sock.sendall(b"\xff" * 8192 + b"\n")
    line = bob.expect("[alice]")
    text = line.removeprefix("[alice] ")
    assert text == "\ufffd" * 2730 and len(text.encode()) <= 8192
    alice.send("still here")
    assert bob.expect("[alice]") == "[alice] still here"
