"""One bad client costs only itself: limits, flood control, shutdown, TLS, tokens."""

from __future__ import annotations

import os
import random
import signal
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest
from _require import require_binary
from conftest import LineClient
from test_observability import get, scrape


def pump(sock: socket.socket, data: bytes, chunk: int = 1 << 16, pause: float = 0.0) -> threading.Thread:
    """Write ``data`` from a thread (``pause`` s between chunks) until done or cut off."""

    def run() -> None:
        view = memoryview(data)
        try:
            for offset in range(0, len(view), chunk):
                sock.sendall(view[offset : offset + chunk])
                time.sleep(pause)
        except OSError:
            pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_member_who_never_reads_is_dropped_while_ten_others_get_every_line_in_order(chat_server):
    srv = chat_server("--flood-rate", "0")
    stuck = srv.connect()
    stuck.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.send("/nick stuck")
    readers = [srv.member(f"r{n}") for n in range(10)]
    talker = srv.member("talker")
    total = 4000
    payload = "p" * 1000
    results: dict[int, list[str]] = {}

    def read_all(index: int, client: LineClient) -> None:
        lines = []
        while len(lines) < total:
            line = client.recv_line(20)
            if line.startswith("[talker]"):
                lines.append(line)
        results[index] = lines

    threads = [threading.Thread(target=read_all, args=(n, c)) for n, c in enumerate(readers)]
    for thread in threads:
        thread.start()
    # About 2 MB/s: readers that read keep up, the one that does not falls behind.
    data = "".join(f"{n:05d} {payload}\n" for n in range(total)).encode()
    pump(talker.sock, data, chunk=20_000, pause=0.01).join(30)
    for thread in threads:
        thread.join(30)
    expected = [f"[talker] {n:05d} {payload}" for n in range(total)]
    assert [results.get(n) == expected for n in range(10)] == [True] * 10
    assert scrape(srv.port)["chat_disconnects_total{reason=slow_consumer,transport=tcp}"] == 1
    assert '"slow_consumer_disconnected"' in srv.log_text()
    readers[0].send("/who")
    assert "stuck" not in readers[0].expect("* in lobby")


def test_64_mb_without_a_newline_is_cut_off_and_memory_stays_bounded(chat_server):
    srv = chat_server()
    bob = srv.member("bob")
    before = srv.rss_kb()
    flooder = srv.connect()
    flooder.send("/nick flooder")
    thread = pump(flooder.sock, b"A" * (64 << 20))
    thread.join(30)
    assert not thread.is_alive()
    assert flooder.closed(5)
    assert srv.rss_kb() - before < 100 * 1024
    bob.expect("* flooder left")
    bob.send("/who")
    assert bob.expect("* in lobby") == "* in lobby (1): bob"


def test_a_20000_line_flood_does_not_drown_out_the_room(chat_server):
    srv = chat_server()
    alice, bob = srv.member("alice"), srv.member("bob")
    flooder = srv.member("flooder")
    pump(flooder.sock, b"".join(b"flood %05d\n" % n for n in range(20000)))
    time.sleep(0.2)
    started = time.monotonic()
    alice.send("still here?")
    assert bob.expect("[alice]", timeout=1.5) == "[alice] still here?"
    assert time.monotonic() - started < 1.5
    flooded = [line for line in bob.lines_for(1.0) if line.startswith("[flooder]")]
    assert len(flooded) <= 40
    samples = scrape(srv.port)
    assert samples["chat_flood_delayed_lines_total"] >= 1
    assert samples["chat_disconnects_total{reason=flood,transport=tcp}"] == 1


def test_flood_control_delays_a_fast_sender_to_its_rate(chat_server):
    srv = chat_server("--flood-burst", "5", "--flood-rate", "10")
    alice, bob = srv.member("alice"), srv.member("bob")
    alice.send("".join(f"m{n}\n" for n in range(15)))
    started = time.monotonic()
    got = [bob.expect("[alice]") for _ in range(15)]
    assert got == [f"[alice] m{n}" for n in range(15)]
    assert 0.8 < time.monotonic() - started < 3.0


def test_sigterm_tells_twenty_members_closes_them_and_exits_zero(chat_server):
    srv = chat_server()
    members = [srv.member(f"m{n}") for n in range(20)]
    started = time.monotonic()
    srv.signal(signal.SIGTERM)
    for member in members:
        assert member.expect("* server shutting down") == "* server shutting down"
        assert member.closed(10)
    assert srv.proc.wait(10) == 0
    assert time.monotonic() - started < 10
    with pytest.raises(OSError):
        socket.create_connection((srv.host, srv.port), timeout=1).close()


def test_second_signal_exits_at_once(chat_server):
    srv = chat_server("--flood-rate", "0", "--shutdown-timeout", "30", "--sendq-bytes", str(64 << 20))
    stuck = srv.connect()
    stuck.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.send("/nick stuck")
    talker = srv.member("talker")
    for _ in range(1500):
        talker.send("y" * 8000)
    time.sleep(0.5)
    srv.signal(signal.SIGTERM)
    time.sleep(0.5)
    assert srv.proc.poll() is None
    srv.signal(signal.SIGINT)
    assert srv.proc.wait(3) != 0


def test_max_clients_refuses_the_next_connection_cleanly(chat_server):
    srv = chat_server("--max-clients", "2")
    alice, bob = srv.member("alice"), srv.member("bob")
    third = srv.connect()
    third.send("hello?")
    assert third.expect("!") == "! server full"
    assert third.closed()
    alice.send("still working")
    assert bob.expect("[alice]") == "[alice] still working"
    assert scrape(srv.port)["chat_disconnects_total{reason=server_full,transport=tcp}"] == 1


def test_per_ip_cap_and_idle_timeout(chat_server):
    srv = chat_server("--max-per-ip", "1", "--idle-timeout", "1")
    alice = srv.member("alice")
    second = srv.connect()
    second.send("hi")
    assert second.expect("!").startswith("! server full")
    assert alice.closed(3)
    assert scrape(srv.port)["chat_disconnects_total{reason=idle_timeout,transport=tcp}"] == 1


def test_token_required_wrong_and_right(chat_server, tmp_path: Path):
    token_file = tmp_path / "token"
    token_file.write_text("open-sesame\n")
    srv = chat_server("--token-file", str(token_file), "--auth-timeout", "1")
    silent = srv.connect()
    assert silent.expect("!") == "! authentication required: send /auth TOKEN first"
    assert silent.closed()
    early = srv.connect()
    early.send("hello without auth")
    assert early.expect("!") == "! authentication failed"
    assert early.closed()
    wrong = srv.connect()
    wrong.send("/auth open-sesamE")
    assert wrong.expect("!") == "! authentication failed"
    assert wrong.closed()
    right = srv.connect()
    right.send("/auth open-sesame\n/nick alice")
    right.expect("* welcome")
    right.expect("* ")
    other = srv.connect()
    other.send(b"/auth open-sesame\r\n")
    other.expect("* welcome")
    right.send("authenticated hello")
    assert other.expect("[alice]") == "[alice] authenticated hello"
    assert get(srv.port, "/healthz")[0] == 200
    assert scrape(srv.port)["chat_disconnects_total{reason=auth_failed,transport=tcp}"] == 3
    assert "open-sesame" not in srv.log_text()


def make_cert(directory: Path) -> tuple[Path, Path]:
    openssl = require_binary("openssl")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return cert, key


def test_tls_round_trip_with_a_self_signed_certificate(chat_server, tmp_path: Path):
    cert, key = make_cert(tmp_path)
    srv = chat_server("--tls-cert", str(cert), "--tls-key", str(key))
    context = ssl.create_default_context(cafile=str(cert))
    context.check_hostname = False

    def tls_member(nick: str) -> LineClient:
        client = LineClient.__new__(LineClient)
        client.sock = context.wrap_socket(socket.create_connection((srv.host, srv.port), timeout=5))
        client.timeout = 5.0
        client._buffer = b""
        client.send(f"/nick {nick}")
        client.expect_re(f"now known as {nick}$")
        return client

    alice, bob = tls_member("alice"), tls_member("bob")
    alice.send("over tls " + "t" * 5000)
    assert bob.expect("[alice]") == "[alice] over tls " + "t" * 5000
    plain = srv.connect()
    plain.send("/nick plain")
    assert plain.closed(5)


def test_random_bytes_from_many_connections_cost_nothing(chat_server):
    srv = chat_server("--flood-rate", "0", "--max-line-bytes", "2048")
    alice, bob = srv.member("alice"), srv.member("bob")
    rng = random.Random(1234)
    before = srv.rss_kb()
    for _round in range(3):
        socks = []
        for _ in range(40):
            sock = socket.create_connection((srv.host, srv.port), timeout=5)
            sock.sendall(os.urandom(rng.randrange(1, 6000)))
            socks.append(sock)
        for sock in socks:
            try:
                sock.sendall(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))) + b"\n\x1b[2J\x00\n")
            except OSError:
                pass
        alice.send("canary")
        assert bob.expect("[alice]") == "[alice] canary"
        for sock in socks:
            sock.close()
    time.sleep(0.5)
    assert srv.proc.poll() is None
    assert srv.rss_kb() - before < 30 * 1024
    for line in bob.lines_for(0.5):
        assert "\x1b" not in line and "\x00" not in line
    assert get(srv.port, "/healthz")[0] == 200
