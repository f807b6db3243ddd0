"""Sockets: accepting, TCP options, TLS and HTTP sniffing; each chat socket gets its sink and session.

The transport decides what a connection is (HTTP, WebSocket or chat, plain
or TLS) and builds the matching writer (``sinks``) for it, and for a
WebSocket the framing (``ws``); from then on the session reads and the sink
writes.
"""

from __future__ import annotations

import socket
import ssl
import time
from typing import Any

import gevent
from gevent.server import StreamServer

from .config import Config
from .httpfront import CHAT, HTTP, HttpFront, classify
from .metrics import Metrics
from .session import Session, SessionContext
from .sinks import TcpSink, TlsSink
from .ws import WebSockets, WsStream

LISTEN_BACKLOG = 4096


def tune(sock: Any, sndbuf: int) -> None:
    """Low latency for coalesced writes, a bounded kernel send buffer, and keepalive."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if sndbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 15), ("TCP_KEEPCNT", 4)):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


def sniff(sock: Any, window: float, limit: float) -> tuple[bytes, str]:
    """Read the first bytes and decide: HTTP request, chat, or gone (``eof``).

    A silent client becomes chat after ``window`` seconds: the original chat
    client (tests/seed_chat_client.py) sends nothing until its user types.
    Bytes that may still grow into an HTTP request line get until ``limit``
    seconds to complete it.
    """
    head = b""
    start = time.monotonic()
    deadline = start + window
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return head, CHAT
        sock.settimeout(remaining)
        try:
            data = sock.recv(4096)
        except TimeoutError:
            return head, CHAT
        except OSError:
            return head, "eof"
        if not data:
            return head, "eof" if not head else CHAT
        head += data
        kind = classify(head)
        if kind in (HTTP, CHAT):
            return head, kind
        deadline = start + limit


class ChatServer(StreamServer):
    """The chat port: each accepted socket starts in its own greenlet in ``handle_connection``."""

    def __init__(
        self, config: Config, ctx: SessionContext, metrics: Metrics, http: HttpFront, websockets: WebSockets
    ) -> None:
        super().__init__((config.host, config.port), self.handle_connection, backlog=LISTEN_BACKLOG)
        self.config = config
        self.ctx = ctx
        self.metrics = metrics
        self.http = http
        self.websockets = websockets
        self.tls: ssl.SSLContext | None = None
        if config.tls_cert and config.tls_key:
            self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.tls.load_cert_chain(config.tls_cert, config.tls_key)

    def do_close(self, sock: Any, *args: Any) -> None:
        """StreamServer closes a socket when its handler returns; ours may outlive it.

        A chat session parks on an io watcher and its accept greenlet ends, so
        whoever owns the socket closes it: ``handle_connection`` or the session.
        """

    def handle_connection(self, sock: Any, address: tuple[str, int]) -> None:
        """Sniff, then serve HTTP here or hand the socket to a chat session, which owns it."""
        config, ctx = self.config, self.ctx
        ip = address[0]
        if ctx.connection_slots.acquire(ip) is not None:  # no cap on connections is configured yet
            sock.close()
            return
        self.metrics.accepted.inc()
        owned = False
        try:
            tune(sock, config.sndbuf_bytes)
            if self.tls is not None:
                sock.settimeout(config.http_timeout)
                try:
                    sock = self.tls.wrap_socket(sock, server_side=True)
                except (OSError, ValueError):
                    return
            head, kind = sniff(sock, config.http_sniff_ms / 1000.0, config.http_timeout)
            stream: WsStream | None = None
            if kind == HTTP and self.websockets.wanted(head):
                self.metrics.requests_by_path["ws"].inc()
                sock.settimeout(config.http_timeout)
                with gevent.Timeout(config.http_timeout * 2, False):
                    stream = self.websockets.accept(sock, head)
                if stream is None:
                    return
                kind, head = CHAT, b""
            if kind == HTTP:
                self.metrics.http_requests.inc()
                sock.settimeout(config.http_timeout)
                with gevent.Timeout(config.http_timeout * 2, False):
                    self.http.serve(sock, address, head)
            elif kind == CHAT:
                owned = True
                sink = TlsSink(sock, ctx.counters) if self.tls is not None else TcpSink(sock, ctx.counters)
                Session(ctx, sock, address, head, sink, stream).run()
        finally:
            if not owned:
                ctx.connection_slots.release(ip)
                sock.close()
