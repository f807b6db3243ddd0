"""Sockets: accepting, admission at the door, TCP options, TLS and sniffing; each chat socket gets its sink and session.

The transport decides what a connection is (HTTP, WebSocket or chat, plain
or TLS, from a balancer or not) and builds the matching writer (``sinks``)
for it, and for a WebSocket the framing (``ws``); from then on the session
reads and the sink writes.  Before that, every accepted socket holds an
``Arrival`` (admission.py) and passes the door:

1. a balancer listed in --proxy-protocol-from must name the real client in a
   PROXY header first (proxyproto.py); everyone else is that address;
2. the client address's connect bucket (--connect-burst, --connect-rate);
3. its open connections (--max-per-ip);
4. the rest of the pre-admission phase (TLS handshake, sniffing, HTTP, the
   WebSocket upgrade, /auth) within one --admission-timeout, in a waiting
   room of --max-pending places.

A refusal is one short line (plain TCP only) and a close, counted in
``chat_connections_refused_total{reason}`` and logged at most once per
address and reason per interval.
"""

from __future__ import annotations

import socket
import ssl
import time
from typing import Any

import gevent

from .admission import Arrival
from .config import Config
from .gevent_seams import raw_socket
from .httpfront import CHAT, HTTP, UNDECIDED, HttpFront, classify
from .listener import PausingServer
from .metrics import Metrics
from .proxyproto import ProxyHeaderError, looks_like_header, read_header
from .session import Session, SessionContext
from .sinks import TcpSink, TlsSink
from .throttle import AddressBuckets, Networks
from .ws import WebSockets, WsStream

LISTEN_BACKLOG = 4096
WAITING_FULL_RETRY = 0.01
PROXY = "proxy"  # what sniff calls a PROXY header from a client not allowed to send one

TOO_FAST = "connecting too fast: try again later"
BUSY = "server busy: too many connections waiting, try again"
PROXY_REFUSED = "PROXY protocol header not accepted from your address"


def tune(sock: Any, sndbuf: int) -> None:
    """Low latency for coalesced writes, a bounded kernel send buffer, and keepalive."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if sndbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 15), ("TCP_KEEPCNT", 4)):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


def _kind(head: bytes) -> str:
    header = looks_like_header(head)
    if header:
        return PROXY
    kind = classify(head)
    return UNDECIDED if header is None and kind == CHAT else kind


def sniff(sock: Any, window: float, limit: float) -> tuple[bytes, str]:
    """Read the first bytes and decide: HTTP request, chat, a PROXY header, or gone (``eof``).

    A silent client becomes chat after ``window`` seconds: the original chat
    client (tests/seed_chat_client.py) sends nothing until its user types.
    Bytes that may still grow into an HTTP request line or a PROXY header get
    until ``limit`` seconds to complete it.
    """
    head = b""
    start = time.monotonic()
    deadline = start + min(window, limit)
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
        kind = _kind(head)
        if kind != UNDECIDED:
            return head, kind
        deadline = start + limit


class ChatServer(PausingServer):
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
        self.connects = AddressBuckets(config.connect_burst, config.connect_rate, Networks(config.throttle_exempt))
        self.balancers = Networks(config.proxy_protocol_from)

    def do_close(self, sock: Any, *args: Any) -> None:
        """StreamServer closes a socket when its handler returns; ours may outlive it.

        A chat session parks on an io watcher and its accept greenlet ends, so
        whoever owns the socket closes it: ``handle_connection`` or the session.
        """

    def full(self) -> bool:
        """gevent asks before each accept: while the waiting room is full, leave arrivals in the backlog.

        gevent then stops accepting; look again every 10 ms (a place frees as
        soon as one of the waiting is admitted, answered or dropped).
        """
        if self.ctx.waiting.full():
            self.try_again_in(WAITING_FULL_RETRY)
            return True
        return False

    def do_read(self) -> Any:
        """Accept; refuse at once or seat the connection in the waiting room, before any greenlet runs.

        gevent accepts up to ``max_accept`` connections per wake-up and starts
        their greenlets later; counting them only then would leave that many
        descriptors outside the budget.  A refusal here (connect rate,
        --max-per-ip) costs no greenlet at all, which is what keeps connection
        churn cheap.
        """
        accepted = super().do_read()
        if accepted is None:
            return None
        sock, address = accepted
        ctx = self.ctx
        self.metrics.accepted.inc()
        arrival = Arrival(address, sock, ctx.waiting, ctx.connection_slots, self.config.admission_timeout)
        if arrival.ip not in self.balancers and not self._admit_address(arrival, address):
            sock.close()
            arrival.release()
            return None
        crowded = ctx.waiting.enter(arrival)
        if crowded is not None:
            self.refuse(crowded, "pending_full", BUSY)
            crowded.drop()
        return sock, address, arrival

    def handle_connection(self, sock: Any, address: tuple[str, int], arrival: Arrival) -> None:
        """Pass the connection through the door; close it unless a session owns it."""
        owned = False
        arrival.serve()
        try:
            if not arrival.dropped:
                owned = self._pass(arrival)
        finally:
            if not owned:
                arrival.sock.close()
                arrival.release()

    def _pass(self, arrival: Arrival) -> bool:
        """The door and the pre-admission phase; True once a chat session owns the socket."""
        config = self.config
        address = arrival.address
        if arrival.ip in self.balancers:
            try:
                address = read_header(arrival.sock, arrival.deadline) or address
            except ProxyHeaderError as exc:
                return self.refuse(arrival, "proxy_header", detail=str(exc))
            if not self._admit_address(arrival, address):
                return False
        tune(arrival.sock, config.sndbuf_bytes)
        budget = gevent.Timeout(arrival.remaining())
        try:
            with budget:
                chat = self._chat_head(arrival)
        except gevent.Timeout as timeout:
            if timeout is not budget:
                raise
            return self.refuse(arrival, "admission_timeout")
        # The waiting room may have dropped the connection (closed its socket) while
        # it waited.  A wait it was in fails then, but one that ended on its own
        # timer in the same turn of the event loop (a silent client's sniff window)
        # does not: the loop runs the accept that drops it first, the timer next.
        if chat is None or arrival.dropped:
            return False
        # The session keeps to what is left of the budget itself: past it, it is a member.
        head, stream = chat
        sock, ctx = arrival.sock, self.ctx
        sink = TlsSink(sock, ctx.counters) if self.tls is not None else TcpSink(sock, ctx.counters)
        Session(ctx, sock, arrival, head, sink, stream).run()
        return True

    def _admit_address(self, arrival: Arrival, address: tuple[str, int]) -> bool:
        """The door's per-address checks, connect bucket then --max-per-ip; False once refused."""
        if not self.connects.try_take(address[0]):
            return self.refuse(arrival, "connect_rate", TOO_FAST, address)
        refusal = arrival.claim(address)
        if refusal is not None:
            return self.refuse(arrival, "max_per_ip", refusal)
        return True

    def _chat_head(self, arrival: Arrival) -> tuple[bytes, WsStream | None] | None:
        """TLS handshake, sniffing, the WebSocket upgrade, serving HTTP here.

        For a chat connection, its first bytes and (WebSocket) its stream; None
        when there is no chat session to start.
        """
        config = self.config
        if self.tls is not None:
            arrival.sock.settimeout(config.http_timeout)
            try:
                # Wrapping takes the descriptor over: hold the TLS socket before the
                # handshake, so that whoever ends the connection closes that one.
                arrival.sock = self.tls.wrap_socket(arrival.sock, server_side=True, do_handshake_on_connect=False)
                arrival.sock.do_handshake()
            except (OSError, ValueError):
                return None
        sock = arrival.sock
        head, kind = sniff(sock, config.http_sniff_ms / 1000.0, config.http_timeout)
        if kind == PROXY:
            self.refuse(arrival, "proxy_header", PROXY_REFUSED)
            return None
        if kind == HTTP and self.websockets.wanted(head):
            self.metrics.requests_by_path["ws"].inc()
            sock.settimeout(config.http_timeout)
            try:
                stream = self.websockets.accept(sock, head)
            except OSError:
                return None
            return None if stream is None else (b"", stream)
        if kind == HTTP:
            self.metrics.http_requests.inc()
            sock.settimeout(config.http_timeout)
            try:
                self.http.serve(sock, arrival.address, head)
            except OSError:
                pass
            return None
        return (head, None) if kind == CHAT else None

    def refuse(
        self,
        arrival: Arrival,
        reason: str,
        text: str | None = None,
        address: tuple[str, int] | None = None,
        detail: str = "",
    ) -> bool:
        """Count and log a refusal and tell a plain-TCP client ``text``; the caller closes. Always False (not owned).

        A connection the waiting room dropped was counted then; whatever it
        was waiting for fails afterwards, and is not counted again.
        """
        if arrival.dropped:
            return False
        ip = (address or arrival.address)[0]
        self.metrics.refused[reason].inc()
        context = {"detail": detail} if detail else {}
        self.ctx.refusals.note((ip, reason), ip=ip, reason=reason, **context)
        if text is not None and self.tls is None:
            raw = raw_socket(arrival.sock)
            try:
                raw.send(f"! {text}\n".encode())
                # Closing with the client's first lines unread would reset the
                # connection, and the reset can discard the refusal on its way.
                for _ in range(16):
                    if not raw.recv(4096):
                        break
            except OSError:
                pass
        return False

    def housekeep(self) -> None:
        """Forget refilled connect buckets; the service calls it every few seconds."""
        self.connects.prune()
