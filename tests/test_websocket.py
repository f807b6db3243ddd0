"""WebSocket chat on /ws over real sockets against a real server: the same rules as TCP, framed."""

from __future__ import annotations

import signal
import socket
import threading
import time
from pathlib import Path

import pytest
from _chat import LineClient, get, make_cert, pump, scrape
from _ws import Refused, WsClient, mask_frame
from wsproto.events import TextMessage


def ws(srv, nick: str | None = None, room: str | None = None, **kwargs) -> WsClient:
    """A welcomed WebSocket member (renamed and moved when asked)."""
    client = WsClient(srv.host, srv.port, **kwargs)
    srv.clients.append(client)
    return client.join(nick, room)


def test_websocket_and_tcp_members_share_rooms_nicks_and_history(chat_server):
    srv = chat_server()
    tcp = srv.member("tcp", room="dev")
    tcp.send("said before anyone came")
    alice = ws(srv, "alice")
    alice.send("/nick tcp")
    assert alice.expect("!") == "! nick tcp is taken"
    alice.send("/join dev")
    assert alice.expect("* you joined dev") == "* you joined dev"
    assert alice.expect("[history]") == "[history] [tcp] said before anyone came"
    assert tcp.expect("* alice joined dev") == "* alice joined dev"
    alice.send("hello from a browser")
    assert tcp.expect("[alice]") == "[alice] hello from a browser"
    tcp.send("hello from nc")
    assert alice.expect("[tcp]") == "[tcp] hello from nc"
    alice.send("/who")
    assert alice.expect("* in dev") == "* in dev (2): alice, tcp"
    assert all(message.endswith("\n") for message in alice.messages)


def test_a_message_split_across_frames_and_a_frame_of_many_lines(chat_server):
    srv = chat_server("--flood-rate", "0")
    alice, bob = ws(srv, "alice"), srv.member("bob")
    # One message in three frames, a line broken across two of them.
    for piece, last in (("one\ntw", False), ("o\nthr", False), ("ee", True)):
        alice.sock.sendall(alice.ws.send(TextMessage(data=piece, message_finished=last)))
    assert [bob.expect("[alice]") for _ in range(3)] == ["[alice] one", "[alice] two", "[alice] three"]
    # A message's last line needs no newline; a frame may carry many lines.
    alice.sock.sendall(alice.ws.send(TextMessage(data="no newline")))
    assert bob.expect("[alice]") == "[alice] no newline"
    alice.send("".join(f"line {n}\n" for n in range(200)))
    assert [bob.expect("[alice]") for _ in range(200)] == [f"[alice] line {n}" for n in range(200)]
    # A hand-masked frame with CRLF lines, as any client library may send.
    alice.send_raw(mask_frame(0x1, b"crlf one\r\ncrlf two\r\n"))
    assert [bob.expect("[alice]") for _ in range(2)] == ["[alice] crlf one", "[alice] crlf two"]


def test_server_messages_hold_whole_lines_and_coalesce_under_load(chat_server):
    srv = chat_server("--flood-rate", "0")
    reader = ws(srv, "reader")
    talker = srv.member("talker")
    total = 3000
    pump(talker.sock, b"".join(b"burst %05d\n" % n for n in range(total)))
    before = len(reader.messages)
    got = [reader.expect("[talker]") for _ in range(total)]
    assert got == [f"[talker] burst {n:05d}" for n in range(total)]
    messages = reader.messages[before:]
    assert all(message.endswith("\n") for message in messages)
    # One message per coalesced write, not one per line.
    assert len(messages) < total / 3, len(messages)


def test_ping_pong_and_the_keepalive(chat_server):
    srv = chat_server("--ws-ping-interval", "0.3")
    alice = ws(srv, "alice")
    alice.ping(b"are you there")
    deadline = time.monotonic() + 3
    while not alice.pongs and time.monotonic() < deadline:
        alice.pump(0.1)
    assert alice.pongs == [b"are you there"]
    # A silent client is pinged; one that answers stays, one that never reads is dropped.
    mute = ws(srv, "mute")
    bystander = srv.member("bystander")
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        alice.pump(0.1)
    assert alice.pings and alice.close_code is None
    bystander.expect("* mute left lobby", timeout=5)
    assert mute.wait_closed() == (1008, "ping timeout")
    alice.send("still here")
    assert bystander.expect("[alice]") == "[alice] still here"
    assert scrape(srv.port)["chat_disconnects_total{reason=ping_timeout,transport=ws}"] == 1


def test_pongs_are_not_input_for_the_idle_timeout(chat_server):
    srv = chat_server("--ws-ping-interval", "0.2", "--idle-timeout", "1.5")
    alice = ws(srv, "alice")
    started = time.monotonic()
    assert alice.expect("!", timeout=5) == "! idle timeout"
    assert alice.pings, "answered pings in the meantime"
    assert alice.wait_closed() == (1008, "idle timeout")
    assert time.monotonic() - started < 4


@pytest.mark.parametrize(
    ("send", "line", "code", "reason"),
    [
        ("/quit", "* bye", 1000, "bye"),
        ("x" * 9000, "! line too long", 1008, "line too long"),
        ("".join(f"flood {n}\n" for n in range(400)), "! excess flood", 1008, "excess flood"),
    ],
    ids=["quit", "line_too_long", "flood"],
)
def test_close_codes_for_what_the_client_did(chat_server, send, line, code, reason):
    srv = chat_server("--flood-burst", "5", "--flood-rate", "2", "--flood-max-input-bytes", "1000")
    client = ws(srv, "alice")
    client.send(send)
    assert client.expect(line[:1], timeout=10) == line
    assert client.wait_closed() == (code, reason)


def test_shutdown_says_so_and_closes_with_1001(chat_server):
    srv = chat_server()
    members = [ws(srv, f"m{n}") for n in range(5)]
    srv.signal(signal.SIGTERM)
    for member in members:
        assert member.expect("* server") == "* server restarting, reconnect"
        assert member.wait_closed() == (1001, "server shutting down")
    assert srv.proc.wait(10) == 0


def test_client_close_is_answered_and_bad_frames_are_refused_with_their_code(chat_server):
    srv = chat_server()
    bob = srv.member("bob")
    leaving = ws(srv, "leaving")
    leaving.close_with(1001, "tab closed")
    assert leaving.wait_closed()[0] == 1001
    bob.expect("* leaving left lobby")
    unmasked = ws(srv, "unmasked")
    unmasked.send_raw(b"\x81\x02hi")
    assert unmasked.wait_closed()[0] == 1002
    bad_utf8 = ws(srv, "bad_utf8")
    bad_utf8.send_raw(mask_frame(0x1, b"\xff\xfe\n"))
    assert bad_utf8.wait_closed()[0] == 1007
    samples = scrape(srv.port)
    assert samples["chat_disconnects_total{reason=protocol_error,transport=ws}"] == 2
    assert samples["chat_disconnects_total{reason=eof,transport=ws}"] == 1


def test_a_frame_over_the_limit_is_refused_from_its_header(chat_server):
    srv = chat_server("--max-line-bytes", "1024", "--flood-rate", "0")
    bob = srv.member("bob")
    # 4 x --max-line-bytes is allowed, however many lines it holds.
    fits = ws(srv, "fits")
    lines = b"".join(b"short line %04d\n" % n for n in range(256))[:4096]
    fits.send_raw(mask_frame(0x1, lines[: lines.rindex(b"\n") + 1]))
    assert bob.expect("[fits]") == "[fits] short line 0000"
    # A header announcing a gigabyte is refused before a byte of it arrives.
    before = srv.rss_kb()
    big = ws(srv, "big")
    big.send_raw(bytes([0x81, 0x80 | 127]) + (1 << 30).to_bytes(8, "big") + b"\x00\x00\x00\x00")
    assert big.wait_closed(3) == (1009, "frame too big")
    just_over = ws(srv, "over")
    just_over.send_raw(mask_frame(0x1, b"y" * 4097))
    assert just_over.wait_closed(3) == (1009, "frame too big")
    assert srv.rss_kb() - before < 10 * 1024
    assert not [line for line in bob.lines_for(0.3) if line.startswith(("[big]", "[over]"))]
    assert scrape(srv.port)["chat_disconnects_total{reason=frame_too_big,transport=ws}"] == 2


def test_origins_same_host_by_default_a_list_or_any(chat_server):
    srv = chat_server()
    ws(srv, origin=f"http://127.0.0.1:{srv.port}")
    ws(srv, origin="https://127.0.0.1:9999")  # the page may come from another port (--metrics-port)
    ws(srv)  # no Origin: not a browser
    with pytest.raises(Refused) as refused:
        WsClient(srv.host, srv.port, origin="https://evil.example")
    assert refused.value.status == 403 and refused.value.body == b"origin not allowed\n"
    with pytest.raises(Refused):
        WsClient(srv.host, srv.port, origin="null")
    assert scrape(srv.port)["chat_ws_upgrades_total{outcome=origin}"] == 2

    listed = chat_server("--ws-origins", "https://chat.example.com, same-host")
    ws(listed, origin="https://chat.example.com")
    ws(listed, origin="http://127.0.0.1")
    with pytest.raises(Refused):
        WsClient(listed.host, listed.port, origin="http://chat.example.com")

    anyone = chat_server("--ws-origins", "*")
    ws(anyone, origin="https://evil.example")


def test_a_plain_get_on_ws_gets_a_clear_refusal(chat_server):
    srv = chat_server()
    status, body, _ = get(srv.port, "/ws")
    assert status in (400, 426)
    assert "WebSocket" in body
    with socket.create_connection((srv.host, srv.port), timeout=5) as raw:
        raw.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n")
        assert raw.recv(4096).startswith(b"HTTP/1.1 426")
    assert scrape(srv.port)["chat_ws_upgrades_total{outcome=bad_request}"] == 2
    srv.member("still-fine")


def test_a_websocket_member_that_never_reads_is_dropped_while_others_flow(chat_server):
    srv = chat_server("--flood-rate", "0")
    stuck = WsClient(srv.host, srv.port)
    stuck.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.send("/nick stuck")
    readers: list[LineClient] = [ws(srv, f"w{n}") for n in range(3)] + [srv.member(f"t{n}") for n in range(3)]
    talker = srv.member("talker")
    total, payload = 3000, "p" * 1000
    results: dict[int, list[str]] = {}

    def read_all(index: int, client: LineClient) -> None:
        results[index] = [line for line in (client.expect("[talker]", 20) for _ in range(total))]

    threads = [threading.Thread(target=read_all, args=(n, c)) for n, c in enumerate(readers)]
    for thread in threads:
        thread.start()
    pump(talker.sock, "".join(f"{n:05d} {payload}\n" for n in range(total)).encode(), 20_000, 0.01).join(30)
    for thread in threads:
        thread.join(30)
    expected = [f"[talker] {n:05d} {payload}" for n in range(total)]
    assert [results.get(n) == expected for n in range(len(readers))] == [True] * len(readers)
    assert scrape(srv.port)["chat_disconnects_total{reason=slow_consumer,transport=ws}"] == 1
    readers[0].send("/who")
    assert "stuck" not in readers[0].expect("* in lobby")


def test_wss_on_the_tls_port(chat_server, tmp_path: Path):
    cert, key = make_cert(tmp_path)
    srv = chat_server("--tls-cert", str(cert), "--tls-key", str(key))
    alice = ws(srv, "alice", tls=srv.tls_context)
    tcp = srv.member("tls-tcp")
    alice.send("over wss " + "w" * 5000)
    assert tcp.expect("[alice]") == "[alice] over wss " + "w" * 5000
    tcp.send("back over tls")
    assert alice.expect("[tls-tcp]") == "[tls-tcp] back over tls"
    alice.ping(b"tls")
    assert alice.wait_closed(0.5) == (None, None) and alice.pongs == [b"tls"]
    with pytest.raises(OSError):
        WsClient(srv.host, srv.port, timeout=2)  # plain ws:// to the TLS port
    srv.signal(signal.SIGTERM)
    assert alice.expect("* server") == "* server restarting, reconnect"
    assert alice.wait_closed() == (1001, "server shutting down")
    assert srv.proc.wait(10) == 0


def test_token_max_clients_and_the_transport_label(chat_server):
    srv = chat_server("--token", "sesame", "--auth-timeout", "1", "--max-clients", "2")
    silent = WsClient(srv.host, srv.port)
    assert silent.expect("!") == "! authentication required: send /auth TOKEN first"
    assert silent.wait_closed() == (1008, "authentication failed")
    wrong = WsClient(srv.host, srv.port)
    wrong.send("/auth nope")
    assert wrong.expect("!") == "! authentication failed"
    assert wrong.wait_closed() == (1008, "authentication failed")
    alice = WsClient(srv.host, srv.port)
    alice.send("/auth sesame\n/nick alice")
    alice.expect_re("now known as alice$")
    bob = srv.connect()
    bob.send("/auth sesame")
    bob.expect("* welcome")
    full = WsClient(srv.host, srv.port)
    full.send("/auth sesame")
    assert full.expect("!") == "! server full"
    assert full.wait_closed() == (1013, "server full")
    samples = scrape(srv.port)
    assert samples["chat_connections{transport=ws}"] == 1
    assert samples["chat_connections{transport=tcp}"] >= 2  # bob, and this scrape
    assert samples["chat_disconnects_total{reason=auth_failed,transport=ws}"] == 2
    assert samples["chat_disconnects_total{reason=server_full,transport=ws}"] == 1
    assert samples["chat_http_requests_total{path=ws}"] == 4
    assert samples["chat_ws_upgrades_total{outcome=accepted}"] == 4


def test_the_page_on_the_chat_port_and_on_the_metrics_port(chat_server):
    srv = chat_server("--metrics-port", "0")
    metrics_port = srv.metrics_port
    assert metrics_port
    status, html, headers = get(srv.port, "/")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert 'data-chat-port=""' in html and '<script src="/chat.js"' in html
    for path, kind in (("/chat.js", "text/javascript"), ("/chat.css", "text/css")):
        status, body, headers = get(srv.port, path)
        assert status == 200 and headers["Content-Type"].startswith(kind) and body
    status, html, _ = get(metrics_port, "/")
    assert status == 200 and f'data-chat-port="{srv.port}" data-chat-tls="0"' in html
    assert get(srv.port, "/favicon.ico")[0] == 404
    assert get(srv.port, "/metrics")[0] == 404  # with --metrics-port, only there
    samples = scrape(metrics_port)
    assert samples["chat_http_requests_total{path=page}"] == 4
    assert samples["chat_http_requests_total{path=other}"] == 2
