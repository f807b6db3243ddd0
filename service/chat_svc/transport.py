"""Sockets: accepting, TCP options, TLS, HTTP sniffing, and the write side.

The sinks are the only code that writes to client sockets.  ``TcpSink``
writes with the raw non-blocking socket and, when the kernel is full, lets
an io watcher call back on writability: no greenlet per writer, no switch per
delivery.  TLS cannot do partial non-blocking writes cleanly, so ``TlsSink``
drains through a short-lived writer greenlet instead.
"""

from __future__ import annotations

import socket
import ssl
import time
from typing import TYPE_CHECKING, Any

import gevent
from gevent.server import StreamServer

from .config import Config
from .httpfront import CHAT, HTTP, HttpFront, classify
from .metrics import Counters, Metrics
from .session import Session, SessionContext

if TYPE_CHECKING:
    from .outbox import Outbox

LISTEN_BACKLOG = 4096
_WRITE = 2


class TcpSink:
    """Non-blocking writes to a plain TCP socket; drains on writability callbacks."""

    __slots__ = ("_fd", "_raw", "_watcher", "counters")
    parkable = True

    def __init__(self, sock: Any, counters: Counters) -> None:
        self._raw = sock._sock  # the real non-blocking socket under gevent's wrapper
        self._fd = sock.fileno()
        self._watcher: Any = None
        self.counters = counters

    def send_nowait(self, data: bytes) -> int:
        try:
            sent: int = self._raw.send(data)
        except BlockingIOError:
            return 0
        self.counters.bytes_out += sent
        return sent

    def kick(self, outbox: Outbox) -> None:
        if self._watcher is None:
            self._watcher = gevent.get_hub().loop.io(self._fd, _WRITE)
        self._watcher.start(self._writable, outbox)

    def _writable(self, outbox: Outbox) -> None:
        if outbox.closed:
            self.close()
            return
        data = outbox.take()
        try:
            sent = self.send_nowait(data)
        except OSError:
            self.close()
            outbox.fail()
            return
        if sent < len(data):
            outbox.unsend(data[sent:], sent > 0)
        elif not outbox.size:
            self._watcher.stop()
            outbox.drained()

    def close(self) -> None:
        watcher = self._watcher
        if watcher is not None:
            self._watcher = None
            watcher.stop()
            watcher.close()


class TlsSink:
    """Writes through gevent's SSL socket from a writer greenlet that lives while data waits."""

    __slots__ = ("_sock", "_writer", "counters")
    parkable = False

    def __init__(self, sock: Any, counters: Counters) -> None:
        self._sock = sock
        self._writer: gevent.Greenlet | None = None
        self.counters = counters

    def send_nowait(self, data: bytes) -> int:
        return 0

    def kick(self, outbox: Outbox) -> None:
        if self._writer is None:
            self._writer = gevent.spawn(self._drain, outbox)

    def _drain(self, outbox: Outbox) -> None:
        try:
            while outbox.size and not outbox.closed:
                data = outbox.take()
                self._sock.sendall(data)
                self.counters.bytes_out += len(data)
            outbox.drained()
        except OSError:
            outbox.fail()
        finally:
            self._writer = None

    def close(self) -> None:
        writer = self._writer
        if writer is not None and writer is not gevent.getcurrent():
            writer.kill(block=False)


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

    A silent client becomes chat after ``window`` seconds (the seed's client
    sends nothing until its user types).  Bytes that may still grow into an
    HTTP request line get until ``limit`` seconds to complete it.
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

    def __init__(self, config: Config, ctx: SessionContext, metrics: Metrics, http: HttpFront) -> None:
        super().__init__((config.host, config.port), self.handle_connection, backlog=LISTEN_BACKLOG)
        self.config = config
        self.ctx = ctx
        self.metrics = metrics
        self.http = http
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
        if ctx.connections.acquire(ip) is not None:  # no cap on connections is configured yet
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
            if kind == HTTP:
                self.metrics.http_requests.inc()
                sock.settimeout(config.http_timeout)
                with gevent.Timeout(config.http_timeout * 2, False):
                    self.http.serve(sock, address, head)
            elif kind == CHAT:
                owned = True
                sink = TlsSink(sock, ctx.counters) if self.tls is not None else TcpSink(sock, ctx.counters)
                Session(ctx, sock, address, head, sink).run()
        finally:
            if not owned:
                ctx.connections.release(ip)
                sock.close()
