"""Issue 18 point 2: connections that are not members yet count from accept, and get one short budget.

With 700 descriptors, 800 connections from one address trickling HTTP headers a
byte a second take every place for the not yet admitted; a newcomer from another
address still gets in at once (the oldest trickler of the address holding the
most places makes room), the probes answer, and a member on another address
notices nothing.  Whatever a connection does, it is a member or gone within
--admission-timeout; and --max-per-ip counts it from accept.
"""

from __future__ import annotations

import signal
import threading
import time

from _attack import Crowd, connect
from _chat import LineClient, make_cert, scrape
from _probe import Bystander
from _require import require_binary

BUSY = b"! server busy: too many connections waiting, try again\n"


def test_header_tricklers_from_one_address_cannot_keep_anyone_else_out(chat_server):
    prlimit = require_binary("prlimit")
    srv = chat_server("--admission-timeout", "4", prefix=(prlimit, "--nofile=700:700"))
    stop = threading.Event()
    with Bystander(srv.host, srv.port, source="127.0.0.2") as bystander:
        crowd = Crowd(srv.host, srv.port, 800, first=b"GET /metrics HTTP/1.1\r\n")
        crowd.trickle(b"X-Slow: " + b"a" * 60, every=1.0, until=stop)
        time.sleep(1.0)
        joins = []
        for n in range(5):  # newcomers from another address, while the tricklers hold every place
            started = time.monotonic()
            newcomer = LineClient(srv.host, srv.port, source="127.0.0.3")
            newcomer.send(f"/nick new{n}")
            newcomer.expect("* welcome")
            joins.append(time.monotonic() - started)
        outcomes = crowd.outcomes(6)  # past the admission budget
        stop.set()
        samples = scrape(srv.port)
    measured = bystander.stop()
    crowd.close()
    print(outcomes, [f"{j * 1000:.0f} ms" for j in joins], measured.summary())
    assert max(joins) < 1.0
    assert samples["chat_connections_refused_total{reason=pending_full}"] >= 100
    assert samples["chat_connections_refused_total{reason=admission_timeout}"] >= 1
    # every trickler was closed: made room for someone, or out of time
    assert sum(n for label, n in outcomes.items() if label.endswith("+closed")) == 800, outcomes
    assert samples["chat_connections_pending"] <= 2
    assert measured.lost == 0 and not measured.health_failures
    assert measured.p99() < 0.25 and measured.slowest_health() < 1.0, measured.summary()


def test_admission_budget_ends_a_slow_auth_and_a_slow_request_whatever_they_send(chat_server):
    srv = chat_server("--token", "sesame", "--auth-timeout", "30", "--http-timeout", "30", "--admission-timeout", "1.5")
    auth = srv.connect()
    http = connect(srv.host, srv.port)
    http.sendall(b"GET /healthz HTTP/1.1\r\n")
    started = time.monotonic()
    for _ in range(6):  # a header byte and a blank line every half second, forever if it could
        try:
            http.sendall(b"X")
            auth.sock.sendall(b"\n")
        except OSError:
            break
        time.sleep(0.5)
    assert auth.expect("!") == "! authentication required: send /auth TOKEN first"
    assert auth.closed(1)
    http.settimeout(2)
    assert http.recv(100) == b""
    assert time.monotonic() - started < 3.5
    assert scrape(srv.port)["chat_connections_refused_total{reason=admission_timeout}"] == 1


def test_admission_budget_ends_a_tls_handshake_that_never_finishes(chat_server, tmp_path):
    cert, key = make_cert(tmp_path)
    srv = chat_server("--tls-cert", str(cert), "--tls-key", str(key), "--admission-timeout", "1")
    silent = connect(srv.host, srv.port)
    silent.sendall(b"\x16\x03\x01")  # the start of a ClientHello, and nothing more
    silent.settimeout(3)
    started = time.monotonic()
    assert silent.recv(100) == b""
    assert time.monotonic() - started < 1.5


def test_max_per_ip_counts_connections_from_accept(chat_server):
    srv = chat_server("--max-per-ip", "3", "--http-sniff-ms", "3000")
    silent = [connect(srv.host, srv.port) for _ in range(3)]  # not members yet: still being sniffed
    fourth = connect(srv.host, srv.port)
    fourth.settimeout(3)
    assert fourth.recv(200) == b"! server full: too many connections from your address\n"
    assert fourth.recv(200) == b""
    other = connect(srv.host, srv.port, "127.0.0.2")
    other.sendall(b"/nick other\n")
    other.settimeout(3)
    assert other.recv(200).startswith(b"* welcome")
    for sock in (*silent, fourth, other):
        sock.close()
    time.sleep(0.2)
    assert scrape(srv.port)["chat_connections_refused_total{reason=max_per_ip}"] == 1


def test_a_connection_dropped_as_its_sniff_window_ends_never_gets_a_session(chat_server):
    """The room drops a stuck silent connection in the same turn of the event loop as its sniff window ends.

    The server is stopped while a newcomer's handshake completes in the kernel and
    the silent one's window runs out; once it runs again, one turn of its loop
    usually holds both: the accept that drops the silent one (its socket closed),
    then its sniff timer (the other order makes it a member: that attempt proves
    nothing and another is made).  The timer ended its wait, so nothing failed in
    it: it used to go on and build a session on the closed socket (a Traceback,
    EBADF), as under a burst of WebSocket members whose first bytes TCP had
    delayed past the window.
    """
    srv = chat_server("--max-pending", "1", "--http-sniff-ms", "1000")
    told = []
    while len(told) < 8 and told.count(BUSY) < 2:
        silent = connect(srv.host, srv.port)  # sniffed for 1 s, stuck (may be dropped) after 0.5 s
        started = time.monotonic()
        time.sleep(0.7)
        srv.signal(signal.SIGSTOP)
        try:
            newcomer = connect(srv.host, srv.port, "127.0.0.2")
            time.sleep(max(0.0, started + 1.3 - time.monotonic()))
        finally:
            srv.signal(signal.SIGCONT)
        silent.settimeout(5)
        told.append(silent.recv(200))
        if told[-1] == BUSY:
            assert silent.recv(200) == b""
        newcomer.settimeout(5)
        assert newcomer.recv(200).startswith(b"* welcome")  # silent too: a member after its window
        silent.close()
        newcomer.close()
    print(told)
    assert BUSY in told
    assert "Traceback" not in srv.log_text()
    assert srv.scrape()["chat_connections_refused_total{reason=pending_full}"] == told.count(BUSY)
