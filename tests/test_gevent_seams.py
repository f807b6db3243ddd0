"""The gevent internals chat-svc relies on still work as chat_svc.gevent_seams assumes.

gevent documents neither; when an upgrade breaks one, these fail and say which.
"""

from __future__ import annotations

import io
import socket
from collections.abc import Callable

import gevent
import gevent.socket
import gevent.ssl
import pytest
from chat_svc.gevent_seams import QuietHandler, raw_socket, wsgi_handler
from gevent import pywsgi


def test_raw_socket_is_the_same_connection_and_never_waits() -> None:
    ours, peer = gevent.socket.socketpair()
    try:
        raw = raw_socket(ours)
        broke = "gevent changed its socket wrapper: fix chat_svc.gevent_seams.raw_socket"
        assert raw.fileno() == ours.fileno(), broke
        assert raw.gettimeout() == 0.0, broke + " (the socket under it is not non-blocking)"
        with pytest.raises(BlockingIOError):
            raw.recv(100)  # nothing to read: must not wait
        assert raw.send(b"out\n") == 4
        assert peer.recv(100) == b"out\n"
        peer.sendall(b"in\n")
        gevent.sleep(0.01)
        assert raw.recv(100) == b"in\n"
    finally:
        ours.close()
        peer.close()


def test_raw_socket_of_a_tls_socket_is_the_descriptor_below_tls() -> None:
    ours, peer = gevent.socket.socketpair()
    context = gevent.ssl.SSLContext(gevent.ssl.PROTOCOL_TLS_CLIENT)
    wrapped = context.wrap_socket(ours, server_hostname="x", do_handshake_on_connect=False)
    try:
        raw = raw_socket(wrapped)
        broke = "gevent changed its SSL socket: fix chat_svc.gevent_seams.raw_socket"
        assert raw.fileno() == wrapped.fileno() and not isinstance(raw, gevent.ssl.SSLSocket), broke
        raw.shutdown(socket.SHUT_RD)
        assert raw.recv(100) == b""  # the input is shut, below the TLS layer
    finally:
        wrapped.close()
        peer.close()


def test_wsgi_handler_reads_the_request_from_the_given_stream() -> None:
    def app(environ: dict[str, object], start_response: Callable[..., object]) -> list[bytes]:
        body = f"{environ['REQUEST_METHOD']} {environ['PATH_INFO']}\n".encode()
        start_response("200 OK", [("Content-Length", str(len(body))), ("Connection", "close")])
        return [body]

    server = pywsgi.WSGIServer(("127.0.0.1", 0), app, log=None, error_log=None)
    ours, peer = gevent.socket.socketpair()
    try:
        # The whole request is in the stream and none in the socket: a handler
        # that ignored rfile would wait on the socket and time out.
        rfile = io.BufferedReader(io.BytesIO(b"GET /probe HTTP/1.1\r\nHost: x\r\n\r\n"))
        with gevent.Timeout(5, AssertionError("pywsgi ignored rfile: fix chat_svc.gevent_seams.wsgi_handler")):
            wsgi_handler(server, ours, ("127.0.0.1", 1), rfile).handle()
        ours.close()
        answer = b""
        while chunk := peer.recv(4096):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
        assert answer.endswith(b"\r\n\r\nGET /probe\n")
    finally:
        ours.close()
        peer.close()


def test_quiet_handler_ends_client_failures_without_a_traceback_and_passes_our_timeouts_on(
    capfd: pytest.CaptureFixture[str],
) -> None:
    broke = "pywsgi changed its error hooks: fix chat_svc.gevent_seams.QuietHandler"

    def slow_app(environ: dict[str, object], start_response: Callable[..., object]) -> list[bytes]:
        gevent.sleep(1)
        return []

    server = pywsgi.WSGIServer(("127.0.0.1", 0), slow_app, log=None, error_log=None, handler_class=QuietHandler)
    # A client whose headers stop coming: the socket times out while pywsgi reads them.
    ours, peer = gevent.socket.socketpair()
    ours.settimeout(0.05)
    peer.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\nX-Slow: a")
    wsgi_handler(server, ours, ("127.0.0.1", 1), ours.makefile("rb")).handle()
    ours.close()
    peer.close()
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err, broke
    # Our own time limit fires inside the application: it reaches us, unprinted.
    ours, peer = gevent.socket.socketpair()
    peer.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
    limit = gevent.Timeout(0.05)
    with pytest.raises(gevent.Timeout) as raised, limit:
        wsgi_handler(server, ours, ("127.0.0.1", 1), ours.makefile("rb")).handle()
    assert raised.value is limit, broke
    ours.close()
    peer.close()
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err, broke
