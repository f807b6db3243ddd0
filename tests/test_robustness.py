"""One bad client costs only itself: limits, flood control, shutdown, TLS, tokens."""

from __future__ import annotations

import os
import random
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
from _chat import LineClient, delta, get, make_cert, pump, scrape, wait_for


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


def test_a_reader_too_slow_for_its_send_queue_is_told_why_before_the_close(chat_server):
    # A small send buffer, so the queue fills soon; a normal receive buffer, so what the kernel
    # holds drains at once when the reader reads again (a tiny one crawls through zero-window probes).
    srv = chat_server("--flood-rate", "0", "--sendq-bytes", "65536", "--sndbuf-bytes", "16384")
    slow = srv.member("slow")
    talker = srv.member("talker")
    talker.send(("z" * 1000 + "\n") * 600)
    slow_consumers = "chat_disconnects_total{reason=slow_consumer,transport=tcp}"
    wait_for(lambda: scrape(srv.port)[slow_consumers] == 1, 5, "the slow reader dropped")
    assert slow.lines_until_closed(5)[-1:] == ["! send queue exceeded"]


def test_64_mb_without_a_newline_is_cut_off_and_memory_stays_bounded(chat_server):
    srv = chat_server()
    bob = srv.member("bob")
    before = srv.rss_kb()
    flooder = srv.connect()
    flooder.send("/nick flooder")
    thread = pump(flooder.sock, b"A" * (64 << 20))
    assert flooder.lines_until_closed(30)[-1:] == ["! line too long"]
    thread.join(30)
    assert not thread.is_alive()
    assert srv.rss_kb() - before < 16 * 1024
    bob.expect("* flooder left")
    bob.send("/who")
    assert bob.expect("* in lobby") == "* in lobby (1): bob"


def test_a_20000_line_flood_does_not_drown_out_the_room(chat_server):
    srv = chat_server()
    alice, bob = srv.member("alice"), srv.member("bob")
    flooder = srv.member("flooder")
    pump(flooder.sock, b"".join(b"flood %05d\n" % n for n in range(20000)))
    wait_for(lambda: scrape(srv.port)["chat_flood_delayed_lines_total"] >= 1, 5, "the flooder is throttled")
    started = time.monotonic()
    alice.send("still here?")
    assert bob.expect("[alice]", timeout=1.5) == "[alice] still here?"
    assert time.monotonic() - started < 1.5
    flooded = [line for line in bob.lines_for(1.0) if line.startswith("[flooder]")]
    assert len(flooded) <= 40
    assert flooder.lines_until_closed(5)[-1:] == ["! excess flood"]
    assert scrape(srv.port)["chat_disconnects_total{reason=flood,transport=tcp}"] == 1


def test_a_room_backlog_past_8_mib_pauses_its_senders(chat_server):
    """Lines wait in the room's log until the next fan-out pass hands them out.

    A reader whose input is always readable would append without end before that pass
    runs; past 8 MiB waiting (hub.ROOM_BACKLOG_LIMIT) it sleeps so the pass can run.
    A room of one shows it plainly: its log fills the same way and nothing else holds
    the lines, so peak memory follows the backlog (about 17 MB with the pause, about
    twice what was sent without it).
    """
    srv = chat_server("--flood-rate", "0", "--max-line-bytes", "65536")
    sender = srv.member("sender", room="big")
    count = 64 * 1024 // 60  # 64 MB in 60 KB lines
    chat_lines = "chat_messages_received_total{kind=chat}"
    before, peak_before = scrape(srv.port), srv.rss_kb("VmHWM")
    data = (b"x" * (60 << 10) + b"\n") * count
    pump(sender.sock, data, chunk=len(data)).join(30)  # one sendall: the kernel never runs dry
    sender.send("/who")
    sender.expect("* in big (1)", timeout=30)
    assert delta(before, scrape(srv.port), chat_lines) == count
    grown_mb = (srv.rss_kb("VmHWM") - peak_before) / 1024
    assert grown_mb < 40, f"peak memory grew {grown_mb:.0f} MB while 64 MB went through a room of one"


def test_flood_control_delays_a_fast_sender_to_its_rate(chat_server):
    srv = chat_server("--flood-burst", "5", "--flood-rate", "10")
    alice, bob = srv.member("alice"), srv.member("bob")
    alice.send("".join(f"m{n}\n" for n in range(15)))
    started = time.monotonic()
    got = [bob.expect("[alice]") for _ in range(15)]
    assert got == [f"[alice] m{n}" for n in range(15)]
    assert 0.8 < time.monotonic() - started < 3.0


def test_a_client_throttled_longer_than_flood_kick_after_is_dropped(chat_server):
    srv = chat_server("--flood-burst", "1", "--flood-rate", "5", "--flood-kick-after", "1")
    alice, bob = srv.member("alice"), srv.member("bob")
    # 6 s of lines at 5/s, but a few hundred bytes: far below --flood-max-input-bytes.
    alice.send("".join(f"m{n}\n" for n in range(30)))
    assert alice.lines_until_closed(5)[-1:] == ["! excess flood"]
    delivered = [line for line in bob.read_until("* alice left") if line.startswith("[alice]")]
    assert delivered == [f"[alice] m{n}" for n in range(len(delivered))]
    assert 2 <= len(delivered) <= 12
    assert scrape(srv.port)["chat_disconnects_total{reason=flood,transport=tcp}"] == 1


def test_shutdown_delivers_what_is_queued_before_closing(chat_server):
    # As above: a small send buffer, a normal receive buffer, and a reader that does not read yet.
    srv = chat_server("--flood-rate", "0", "--shutdown-timeout", "10", "--sndbuf-bytes", "16384")
    slow = srv.member("slow")
    talker = srv.member("talker")
    sent = [f"{n:04d} {'q' * 1000}" for n in range(600)]  # more than the kernel holds, less than --sendq-bytes
    talker.send("".join(line + "\n" for line in sent))
    wait_for(lambda: scrape(srv.port)["chat_sendq_max_bytes"] > 0, 10, "lines queued for the slow reader")
    srv.signal(signal.SIGTERM)
    srv.wait_log("drain_started")
    lines = slow.lines_until_closed(10)  # reading only now, during the drain
    assert [line for line in lines if line.startswith("[talker]")] == [f"[talker] {line}" for line in sent]
    assert lines[-1] == "* server restarting, reconnect"
    assert srv.proc.wait(10) == 0


def test_sigterm_tells_twenty_members_closes_them_and_exits_zero(chat_server):
    srv = chat_server()
    members = [srv.member(f"m{n}") for n in range(20)]
    started = time.monotonic()
    srv.signal(signal.SIGTERM)
    for member in members:
        assert member.expect("* server restarting") == "* server restarting, reconnect"
        assert member.closed(10)
    assert srv.proc.wait(10) == 0
    assert time.monotonic() - started < 10
    with pytest.raises(OSError):
        socket.create_connection((srv.host, srv.port), timeout=1).close()


def test_second_signal_exits_at_once_with_status_1(chat_server):
    srv = chat_server("--flood-rate", "0", "--shutdown-timeout", "30", "--sendq-bytes", str(64 << 20))
    stuck = srv.connect()
    stuck.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.send("/nick stuck")
    talker = srv.member("talker")
    talker.send(("y" * 8000 + "\n") * 300)
    wait_for(lambda: scrape(srv.port)["chat_sendq_max_bytes"] > 0, 10, "a queue the drain waits for")
    srv.signal(signal.SIGTERM)
    srv.wait_log("drain_started")  # draining for up to 30 s
    assert srv.proc.poll() is None
    srv.expect_exit(1)
    srv.signal(signal.SIGINT)
    assert srv.proc.wait(3) == 1
    assert srv.wait_log("shutdown_forced")["signal"] == "SIGINT"


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
    assert alice.lines_until_closed(3)[-1:] == ["! idle timeout"]
    assert scrape(srv.port)["chat_disconnects_total{reason=idle_timeout,transport=tcp}"] == 1


def test_a_member_who_keeps_talking_outlives_the_idle_timeout_and_a_listener_does_not(chat_server):
    """Only input resets the idle clock: lines the silent member is sent do not keep it."""
    srv = chat_server("--idle-timeout", "2")
    talker, silent = srv.member("talker"), srv.member("silent")
    deadline = time.monotonic() + 4.5  # past twice the timeout: at least two scans saw the talker
    n = 0
    while time.monotonic() < deadline:
        try:
            talker.send(f"still here {n}")
        except OSError:
            break  # closed by the server: the count below says so
        n += 1
        time.sleep(0.25)
    heard = silent.lines_until_closed(3)
    assert heard[-1:] == ["! idle timeout"]
    assert [line for line in heard if line.startswith("[talker]")], "the listener was sent lines, then dropped"
    assert scrape(srv.port)["chat_disconnects_total{reason=idle_timeout,transport=tcp}"] == 1
    talker.send("/who")
    assert talker.expect("* in lobby") == "* in lobby (1): talker"


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


def test_tls_round_trip_and_metrics_with_a_self_signed_certificate(chat_server, tmp_path: Path):
    cert, key = make_cert(tmp_path)
    srv = chat_server("--tls-cert", str(cert), "--tls-key", str(key))
    alice, bob = srv.member("alice"), srv.member("bob")  # over TLS, trusting exactly this certificate
    alice.send("over tls " + "t" * 5000)
    assert bob.expect("[alice]") == "[alice] over tls " + "t" * 5000
    plain = srv.connect(tls=False)
    plain.send("/nick plain")
    assert plain.closed(5)
    samples = srv.scrape()  # HTTP is sniffed after the handshake, so Prometheus scrapes over TLS too
    assert samples["chat_members"] == 2
    assert samples["chat_http_connections_total"] == 1
    assert srv.get("/healthz")[:2] == (200, "ok\n")
    with pytest.raises(OSError):
        get(srv.port, "/healthz")  # plain HTTP on a TLS port gets no answer


def test_random_bytes_from_many_connections_cost_nothing(chat_server):
    srv = chat_server("--flood-rate", "0", "--max-line-bytes", "2048")
    alice, bob = srv.member("alice"), srv.member("bob")
    rng = random.Random(1234)
    before = srv.rss_kb()
    seen = []
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
        seen += bob.read_until("[alice] canary")
        for sock in socks:
            sock.close()

    def who() -> str:
        alice.send("/who")
        return alice.expect("* in lobby")

    wait_for(lambda: who() == "* in lobby (2): alice, bob", 5, "every random connection gone")
    assert srv.rss_kb() - before < 30 * 1024
    garbage = [line for line in seen if line.startswith("[127.0.0.1:")]
    assert len(garbage) > 20, seen  # the random lines did reach bob, so this checks something
    for line in seen:
        assert not any(ord(ch) < 32 and ch != "\t" for ch in line), line
        assert not any(0x7F <= ord(ch) < 0xA0 for ch in line), line
    assert get(srv.port, "/healthz")[0] == 200
