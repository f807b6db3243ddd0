"""Metrics, health and logs, read the way Prometheus and an operator read them."""

from __future__ import annotations

import json
import signal
import socket
import time
import urllib.error
import urllib.request

from conftest import free_port
from prometheus_client.parser import text_string_to_metric_families


def get(port: int, path: str, method: str = "GET") -> tuple[int, str, dict[str, str]]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode(), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(), dict(error.headers)


def scrape(port: int) -> dict[str, float]:
    status, body, headers = get(port, "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return samples_of(body)


def samples_of(exposition: str) -> dict[str, float]:
    """``name{label=value,...}`` -> value for every sample of a text exposition."""
    samples = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def delta(before: dict[str, float], after: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


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
    assert delta(before, after, "chat_disconnects_total{reason=quit}") == 1
    assert delta(before, after, "chat_disconnects_total{reason=line_too_long}") == 1
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
    assert get(srv.port, "/")[0] == 404
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


def test_silent_client_becomes_a_member_within_the_sniff_window(chat_server):
    srv = chat_server()
    alice = srv.member("alice")
    started = time.monotonic()
    quiet = srv.connect()
    quiet.expect("* welcome")
    assert time.monotonic() - started < 0.6
    alice.expect("* 127.0.0.1:")


def test_metrics_port_serves_the_same_endpoints(chat_server):
    port = free_port()
    srv = chat_server("--metrics-port", str(port), "--metrics-host", "127.0.0.1")
    srv.member("alice")
    samples = scrape(port)
    assert samples["chat_members"] == 1
    assert samples["chat_build_info{version=0.1.0}"] == 1
    assert "process_cpu_seconds_total" in samples
    assert get(port, "/healthz")[0] == 200
    assert get(port, "/readyz") == (200, "ready\n", get(port, "/readyz")[2])
    assert get(port, "/other")[0] == 404


def test_readyz_turns_503_while_draining_and_healthz_stays_up(chat_server):
    port = free_port()
    srv = chat_server(
        "--metrics-port", str(port), "--flood-rate", "0", "--sendq-bytes", str(64 << 20), "--shutdown-timeout", "4"
    )
    stuck = srv.connect()
    stuck.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.send("/nick stuck")
    talker = srv.member("talker")
    line = "x" * 8000
    for _ in range(1500):
        talker.send(line)
    time.sleep(0.5)
    assert scrape(port)["chat_sendq_max_bytes"] > 0
    srv.signal(signal.SIGTERM)
    time.sleep(0.5)
    status, body, _ = get(port, "/readyz")
    assert (status, body) == (503, "draining\n")
    assert get(port, "/healthz")[0] == 200
    assert srv.proc.wait(10) == 0


def test_json_logs_carry_events_and_connection_context(chat_server):
    srv = chat_server("--token", "s3cret-token", "--flood-burst", "2", "--flood-rate", "1")
    alice = srv.connect()
    alice.send("/auth s3cret-token")
    alice.expect("* welcome")
    alice.send("/nick alice")
    alice.send("/join dev")
    alice.expect("* you joined dev")
    for n in range(4):
        alice.send(f"line {n}")
    time.sleep(0.3)
    alice.send("/quit")
    alice.expect("* bye")
    time.sleep(0.3)
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
