"""Metrics, health and logs, read the way Prometheus and an operator read them."""

from __future__ import annotations

import json
import signal
import socket
import time

import pytest
from _chat import delta, get, scrape, wait_for


def test_counters_move_by_exactly_the_traffic_sent(chat_server):
    srv = chat_server()
    alice, bob, carol = srv.member("alice"), srv.member("bob"), srv.member("carol")
    before = scrape(srv.port)
    alice.send("one")
    alice.send("two")
    for client in (bob, carol):
        assert client.expect("[alice] two")
    alice.send("/who")
    alice.expect("* in lobby")
    alice.send("/msg bob psst")
    bob.expect("[alice -> bob]")
    carol.send("z" * 9000)
    carol.expect("! line too long")
    bob.send("/quit")
    bob.expect("* bye")
    alice.expect("* carol left")
    alice.expect("* bob left")
    after = scrape(srv.port)
    assert delta(before, after, "chat_messages_received_total{kind=chat}") == 2
    assert delta(before, after, "chat_messages_received_total{kind=command}") == 2
    assert delta(before, after, "chat_messages_received_total{kind=private}") == 1
    # 2 lines x 2 recipients, 1 private, 2 leave notices x the one or two left.
    assert delta(before, after, "chat_deliveries_total") == 4 + 1 + 2 + 1
    sent = [b"one\n", b"two\n", b"/who\n", b"/msg bob psst\n", b"z" * 9000 + b"\n", b"/quit\n"]
    received = delta(before, after, "chat_bytes_received_total")
    assert received >= sum(map(len, sent[:4])) + len(b"/quit\n") + 8192
    assert delta(before, after, "chat_disconnects_total{reason=quit,transport=tcp}") == 1
    assert delta(before, after, "chat_disconnects_total{reason=line_too_long,transport=tcp}") == 1
    assert after["chat_members"] == 1
    assert delta(before, after, "chat_bytes_sent_total") >= 2 * len(b"[alice] one\n[alice] two\n")


def test_a_scrape_is_never_a_chat_member(chat_server):
    srv = chat_server()
    alice = srv.member("alice")
    for path in ("/metrics", "/healthz", "/readyz", "/nope"):
        get(srv.port, path)
    status, _, _ = get(srv.port, "/metrics", method="HEAD")
    assert status == 200
    alice.send("/who")
    assert alice.expect("* in lobby") == "* in lobby (1): alice"
    assert alice.lines_for(0.4) == []
    samples = scrape(srv.port)
    assert samples["chat_members"] == 1
    assert samples["chat_http_connections_total"] >= 5


def test_unknown_paths_and_methods_get_404_and_405(chat_server):
    srv = chat_server()
    assert get(srv.port, "/nope")[0] == 404
    assert get(srv.port, "/metrics", method="POST")[0] == 405
    assert get(srv.port, "/healthz", method="DELETE")[0] == 405


def test_slowly_typed_http_request_line_is_still_http_and_a_chat_line_starting_with_get_is_chat(chat_server):
    srv = chat_server()
    alice = srv.member("alice")
    with socket.create_connection((srv.host, srv.port)) as raw:
        for piece in (b"GE", b"T /hea", b"lthz HTTP/1.1\r\n", b"Host: x\r\n\r\n"):
            raw.sendall(piece)
            time.sleep(0.15)
        reply = raw.recv(4096)
    assert reply.startswith(b"HTTP/1.1 200")
    bob = srv.connect()
    bob.send("GET me a coffee")
    bob.expect("* welcome")
    assert alice.expect("[") .endswith("] GET me a coffee")


def test_silent_client_becomes_a_member_after_the_sniff_window(chat_server):
    srv = chat_server()
    alice = srv.member("alice")
    quiet = srv.connect()
    quiet.expect("* welcome")  # sends nothing, as the seed's client: still a member
    alice.expect("* 127.0.0.1:")


def test_metrics_port_serves_the_same_endpoints(chat_server):
    srv = chat_server("--metrics-port", "0", "--metrics-host", "127.0.0.1")
    port = srv.metrics_port
    assert port
    srv.member("alice")
    samples = scrape(port)
    assert samples["chat_members"] == 1
    assert samples["chat_build_info{version=0.1.0}"] == 1
    assert "process_cpu_seconds_total" in samples
    assert get(port, "/healthz")[0] == 200
    assert get(port, "/readyz")[:2] == (200, "ready\n")
    assert get(port, "/other")[0] == 404


def test_readyz_turns_503_while_draining_and_healthz_stays_up(chat_server):
    srv = chat_server(
        "--metrics-port", "0", "--flood-rate", "0", "--sendq-bytes", str(64 << 20), "--shutdown-timeout", "3"
    )
    port = srv.metrics_port
    assert port
    stuck = srv.connect()
    stuck.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.send("/nick stuck")
    talker = srv.member("talker")
    talker.send(("x" * 8000 + "\n") * 300)
    wait_for(lambda: scrape(port)["chat_sendq_max_bytes"] > 0, 10, "a queue for the drain to wait on")
    assert get(port, "/readyz")[:2] == (200, "ready\n")
    srv.signal(signal.SIGTERM)
    wait_for(lambda: get(port, "/readyz")[:2] == (503, "draining\n"), 3, "/readyz 503 while draining")
    assert get(port, "/healthz")[0] == 200
    assert srv.proc.wait(10) == 0


def test_json_logs_carry_events_and_connection_context(chat_server):
    srv = chat_server("--token", "s3cret-token", "--flood-burst", "2", "--flood-rate", "5")
    alice = srv.connect()
    alice.send("/auth s3cret-token")
    alice.expect("* welcome")
    alice.send("/nick alice")
    alice.send("/join dev")
    alice.expect("* you joined dev")
    for n in range(4):
        alice.send(f"line {n}")
    alice.send("/quit")
    alice.expect("* bye")
    srv.wait_log("client_disconnected")
    text = srv.log_text()
    assert "s3cret-token" not in text
    events = [json.loads(line) for line in text.splitlines() if line.strip()]
    by_name = {event["event"]: event for event in events}
    assert by_name["server_started"]["config"]["token"] == "<set>"
    for name in ("client_connected", "nick_changed", "room_joined", "flood_limited", "client_disconnected"):
        assert by_name[name]["conn_id"] >= 1 and by_name[name]["peer"].startswith("127.0.0.1:"), name
        assert by_name[name]["level"] and by_name[name]["timestamp"]
    gone = by_name["client_disconnected"]
    assert (gone["nick"], gone["room"], gone["reason"]) == ("alice", "dev", "quit")
    assert gone["duration_s"] > 0 and gone["bytes_in"] > 0
    assert not any("line 1" in json.dumps(event) for event in events)


def test_fanout_latency_histogram_observes_every_line(chat_server):
    srv = chat_server()
    alice, bob = srv.member("alice"), srv.member("bob")
    alice.expect_re("is now known as bob$")  # the last notice is out, so observed
    before = scrape(srv.port)
    for n in range(5):
        alice.send(f"line {n}")
    bob.expect("[alice] line 4")
    count = "chat_fanout_latency_seconds_count"
    wait_for(lambda: delta(before, scrape(srv.port), count) == 5, 5, "one observation per line")
    after = scrape(srv.port)
    assert delta(before, after, "chat_fanout_latency_seconds_bucket{le=+Inf}") == 5
    assert 0 < delta(before, after, "chat_fanout_latency_seconds_sum") < 5


def test_message_bodies_are_logged_only_with_log_messages(chat_server):
    quiet = chat_server("--log-level", "debug")
    loud = chat_server("--log-level", "debug", "--log-messages")
    for srv in (quiet, loud):
        alice, bob = srv.member("alice"), srv.member("bob")
        alice.send("the secret plans")
        bob.expect("[alice] the secret plans")
    event = loud.wait_log("message")
    assert (event["nick"], event["text"], event["level"]) == ("alice", "the secret plans", "debug")
    assert "the secret plans" not in quiet.log_text()  # logged before delivery, so it would be there


def test_port_in_use_is_logged_as_listen_failed_and_exits_1(chat_server):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        srv = chat_server(port=port, wait=False)
        srv.expect_exit(1)
        assert srv.proc.wait(10) == 1
    event = srv.wait_log("listen_failed")
    assert event["port"] == port and "Address already in use" in str(event["error"])


@pytest.mark.slow
def test_healthz_is_503_after_the_event_loop_stalled(chat_server):
    """A server blocked for over 10 s (here: logging to a pipe nobody reads) says so on /healthz.

    Connections that arrive during the stall are served right after it: the HTTP one is
    queued behind the chat one whose log line blocks, and is answered before the loop's
    1 s heartbeat has run again.
    """
    srv = chat_server(log_pipe=True)
    assert srv.get("/healthz")[:2] == (200, "ok\n")
    srv.signal(signal.SIGSTOP)
    try:
        srv.log_pipe.hold()  # the next log line ("client_connected") blocks the process
        chat = srv.connect()
        chat.send("hello")  # at once, so the server takes it for chat without waiting
        http = socket.create_connection((srv.host, srv.port))
        http.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
    finally:
        srv.signal(signal.SIGCONT)
    chat.expect("* welcome")  # sent just before the blocking log line
    time.sleep(10.5)  # the stall being measured: the server's threshold is 10 s
    http.settimeout(0.2)
    try:
        assert http.recv(1) == b"", "answered during the stall"
    except TimeoutError:
        pass
    srv.log_pipe.release()
    http.settimeout(5)
    reply = b""
    while chunk := http.recv(4096):
        reply += chunk
    http.close()
    assert reply.startswith(b"HTTP/1.1 503"), reply
    assert b"event loop stalled for 1" in reply
    wait_for(lambda: srv.get("/healthz")[:2] == (200, "ok\n"), 3, "healthy again")
