"""Issue 18 point 9: behind a real HAProxy, the PROXY protocol gives every member its own address.

HAProxy (Debian's package) runs on loopback in TCP mode with one frontend using
``send-proxy`` (v1) and one ``send-proxy-v2``; the server trusts only
127.0.0.1 (``--proxy-protocol-from``), where HAProxy connects from.  Clients
come from 127.0.0.2 and 127.0.0.3: their own addresses, not the balancer's,
show in nicks and logs and drive --max-per-ip.  A PROXY header from anyone
else is refused, and so is a trusted peer's connection without one.
"""

from __future__ import annotations

import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _attack import connect, log_events, scrape_from
from _chat import LineClient, free_port, make_cert, terminate, wait_port
from _require import require_binary


class HAProxy:
    """``haproxy -db`` with a send-proxy frontend (``v1``) and a send-proxy-v2 one (``v2``) in front of ``port``."""

    def __init__(self, port: int, directory: Path) -> None:
        exe = require_binary("haproxy")
        self.v1, self.v2 = free_port(), free_port()
        config = directory / "haproxy.cfg"
        config.write_text(
            f"""
global
    maxconn 1000
defaults
    mode tcp
    timeout connect 2s
    timeout client 30s
    timeout server 30s
frontend v1
    bind 127.0.0.1:{self.v1}
    default_backend chat_v1
frontend v2
    bind 127.0.0.1:{self.v2}
    default_backend chat_v2
backend chat_v1
    server chat 127.0.0.1:{port} send-proxy
backend chat_v2
    server chat 127.0.0.1:{port} send-proxy-v2
"""
        )
        self.proc = subprocess.Popen([exe, "-db", "-f", str(config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for frontend in (self.v1, self.v2):
            wait_port("127.0.0.1", frontend, proc=self.proc)

    def stop(self) -> None:
        terminate(self.proc)


@pytest.fixture
def haproxy_for(tmp_path: Path) -> Iterator:
    started: list[HAProxy] = []

    def start(port: int) -> HAProxy:
        proxy = HAProxy(port, tmp_path)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


def client(port: int, source: str, context: ssl.SSLContext | None = None) -> LineClient:
    return LineClient("127.0.0.1", port, context=context, source=source)


def test_members_behind_haproxy_keep_their_own_addresses_v1_and_v2(chat_server, haproxy_for):
    srv = chat_server("--proxy-protocol-from", "127.0.0.1/32")
    proxy = haproxy_for(srv.port)
    members, nicks = [], []
    for frontend in (proxy.v1, proxy.v2):
        member = client(frontend, "127.0.0.2")
        nick = f"127.0.0.2:{member.sock.getsockname()[1]}"
        assert member.expect("* welcome").startswith(f"* welcome to chat-svc, you are {nick} in lobby")
        members.append(member)
        nicks.append(nick)
    members[1].send("/who")
    assert members[1].expect("* in lobby") == f"* in lobby (2): {', '.join(sorted(nicks))}"
    connected = [e["peer"] for e in log_events(srv.log_path) if e["event"] == "client_connected"]
    assert connected == nicks


def test_per_address_caps_apply_to_the_real_client_not_the_balancer(chat_server, haproxy_for):
    srv = chat_server("--proxy-protocol-from", "127.0.0.1", "--max-per-ip", "2")
    proxy = haproxy_for(srv.port)
    first, second = client(proxy.v1, "127.0.0.2"), client(proxy.v2, "127.0.0.2")
    for member in (first, second):
        member.expect("* welcome")
    third = client(proxy.v2, "127.0.0.2")
    assert third.expect("!") == "! server full: too many connections from your address"
    assert third.closed()
    for frontend in (proxy.v1, proxy.v2):  # the balancer's own address holds nothing
        client(frontend, "127.0.0.3").expect("* welcome")
    assert scrape_via(proxy.v1)["chat_connections_refused_total{reason=max_per_ip}"] == 1


def scrape_via(frontend: int) -> dict[str, float]:
    return scrape_from(frontend, "127.0.0.4")


def test_a_proxy_header_from_anyone_else_is_refused_and_a_balancer_must_send_one(chat_server, haproxy_for):
    srv = chat_server("--proxy-protocol-from", "127.0.0.1/32")
    proxy = haproxy_for(srv.port)
    for header in (b"PROXY TCP4 10.9.8.7 127.0.0.1 4242 9009\r\n", b"\r\n\r\n\x00\r\nQUIT\n!\x11\x00\x0c"):
        spoofer = client(srv.port, "127.0.0.2")
        spoofer.sock.sendall(header + b"/nick root\n")
        assert spoofer.expect("!") == "! PROXY protocol header not accepted from your address"
        assert spoofer.closed()
    direct = connect(srv.host, srv.port)  # from 127.0.0.1, the trusted balancer's address, without a header
    direct.sendall(b"/nick sneaky\nhello\n")
    direct.settimeout(5)
    try:
        assert direct.recv(200) == b""
    except ConnectionResetError:
        pass  # closed with its lines unread: not a word, not a member
    samples = scrape_via(proxy.v2)
    assert samples["chat_connections_refused_total{reason=proxy_header}"] == 3
    assert samples["chat_members"] == 0
    refused = [e for e in log_events(srv.log_path) if e["event"] == "client_refused"]
    assert {(e["ip"], e["reason"]) for e in refused} == {("127.0.0.2", "proxy_header"), ("127.0.0.1", "proxy_header")}


def test_tls_behind_haproxy_gets_the_client_address_and_an_untouched_handshake(chat_server, haproxy_for, tmp_path):
    cert, key = make_cert(tmp_path)
    srv = chat_server("--proxy-protocol-from", "127.0.0.1/32", "--tls-cert", str(cert), "--tls-key", str(key))
    proxy = haproxy_for(srv.port)
    context = ssl.create_default_context(cafile=str(cert))
    context.check_hostname = False
    for frontend in (proxy.v1, proxy.v2):
        member = client(frontend, "127.0.0.3", context)
        member.send("/nick t")
        assert member.expect("* welcome").startswith("* welcome to chat-svc, you are 127.0.0.3:")
        member.close()
        time.sleep(0.1)
    direct = client(srv.port, "127.0.0.2", context)  # not a balancer: plain TLS, no header
    direct.send("/nick d")
    assert direct.expect("* welcome").startswith("* welcome to chat-svc, you are 127.0.0.2:")
