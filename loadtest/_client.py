"""chat-svc's line protocol as a Locust client, in the pattern of ``locust/contrib``.

``ChatClient`` owns one member's connection: it opens the transport, joins a room, sends
lines, reads everything the server sends, and fires a Locust ``request`` event for each
connect, join and send (and for disconnects and ``!`` error lines, as failures). It knows
nothing about what the lines mean: every chat line heard goes to its ``Listener``, which
is where the swarm verifies fan-out.

``open_stream`` is the one place a transport plugs in: ``tcp://`` (a socket) or ``ws://``
(chat-svc's WebSocket endpoint on the same port, ``_websocket``). Request names are the
transport, request types are what happened, so Locust's table and the swarm's charts keep
connects, joins, sends and fan-outs apart, per transport.
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket as _stdsocket
import time
from dataclasses import dataclass
from typing import Protocol

import gevent
import gevent.event
from gevent import socket
from locust.event import EventHook

from loadtest._websocket import WebSocketStream

DEFAULT_HOST = "tcp://127.0.0.1:9009"
DEFAULT_PORT = 9009
TRANSPORTS = ("tcp", "ws")


class ServerDisconnectError(Exception):
    """The server closed or reset a connection the user did not close."""


class JoinError(Exception):
    """/nick, /join or the sync round trip failed."""


class ServerErrorLine(Exception):
    """The server sent a ``! error`` line after the handshake."""


@dataclass(frozen=True)
class Address:
    """Where one server listens, and over which transport."""

    transport: str
    host: str
    port: int


def parse_host(host: str | None) -> Address:
    """``tcp://H:P``, ``ws://H:P``, ``H:P`` or ``[::1]:P``; the default port is 9009."""
    h = (host or DEFAULT_HOST).strip()
    transport, sep, rest = h.partition("://")
    if not sep:
        transport, rest = "tcp", h
    rest = rest.rstrip("/")
    if rest.startswith("["):
        addr, _, port = rest[1:].partition("]")
        return Address(transport, addr, int(port.lstrip(":") or DEFAULT_PORT))
    if rest.count(":") == 1:
        addr, port = rest.split(":")
        return Address(transport, addr, int(port))
    return Address(transport, rest, DEFAULT_PORT)


class Stream(Protocol):
    """What the client needs from a transport: whole writes, reads, close."""

    def sendall(self, data: bytes) -> None: ...

    def recv(self, size: int) -> bytes: ...

    def close(self) -> None: ...


def open_stream(address: Address, timeout: float) -> Stream:
    """Connect to ``address`` over its transport."""
    if address.transport not in TRANSPORTS:
        raise ValueError(f"unsupported transport {address.transport!r}; use tcp://HOST:PORT or ws://HOST:PORT")
    if address.transport == "ws":
        return WebSocketStream.connect(address.host, address.port, timeout)
    sock = socket.create_connection((address.host, address.port), timeout=timeout)
    sock.setsockopt(_stdsocket.IPPROTO_TCP, _stdsocket.TCP_NODELAY, 1)
    sock.settimeout(None)
    return sock


class Listener(Protocol):
    """What a client reports besides request events."""

    def joined(self, nick: str, transport: str, t: float) -> None:
        """The server confirmed the join at ``t``: from now on the member must get every line."""

    def left(self, nick: str, t: float) -> None:
        """The member stopped being one at ``t`` (quit, or the connection was lost)."""

    def heard(self, nick: str, transport: str, sender: str, body: bytes, t: float) -> None:
        """A chat line ``[sender] body`` reached ``nick`` at ``t`` (taken once per read, before parsing)."""

    def failed(self, counter: str) -> None:
        """Count one of connect_failures, join_failures, disconnects, server_errors."""


class ChatClient:
    """One chat member's connection; ``connect`` again after a failure once ``retry_in()`` is 0."""

    def __init__(self, request_event: EventHook, listener: Listener, join_timeout: float) -> None:
        self.request_event = request_event
        self.listener = listener
        self.join_timeout = join_timeout
        self.stream: Stream | None = None
        self.transport = "tcp"
        self.nick = ""
        self.joined = False
        self._reader: gevent.Greenlet | None = None
        self._closing = False
        self._retry_at = 0.0
        self._backoff = 0.5
        self._welcome = gevent.event.Event()
        self._synced = gevent.event.Event()
        self._sync_token = b""
        self._handshake_errors: list[str] = []

    def retry_in(self) -> float:
        """Seconds until the next connection attempt is due (backoff after failures)."""
        return max(0.0, self._retry_at - time.time())

    def connect(self, host: str | None, nick: str, room: str, transport: str | None = None) -> bool:
        """Connect to ``host`` (over ``transport`` when given, else its scheme's), take ``nick``,
        join ``room``; wait until the server confirmed both."""
        self.nick, self.joined = nick, False
        self._welcome, self._synced = gevent.event.Event(), gevent.event.Event()
        self._handshake_errors = []
        self._sync_token = f"ltsync{nick}".encode()
        t0 = time.perf_counter()
        try:
            address = parse_host(host)
            if transport:
                address = dataclasses.replace(address, transport=transport)
            self.transport = address.transport
            stream = open_stream(address, self.join_timeout)
        except (OSError, ValueError) as e:
            return self._failed("connect", t0, e)
        self._closing = False
        self.stream = stream
        self._reader = gevent.spawn(self._read_loop, stream, nick)
        # Speak first: the server holds the welcome for up to 250 ms while it sniffs for an
        # HTTP request line, unless the client's first line shows it is a chat client. The
        # /msg to ourselves comes back only after /nick and /join went through.
        t1 = time.perf_counter()
        with contextlib.suppress(OSError):
            stream.sendall(f"/nick {nick}\n/join {room}\n/msg {nick} ".encode() + self._sync_token + b"\n")
        if not self._welcome.wait(self.join_timeout) or self.stream is not stream:
            return self._failed("connect", t0, ConnectionError("no welcome line from server"), stream)
        self._fire("connect", t0)
        if not self._synced.wait(self.join_timeout) or self.stream is not stream or self._handshake_errors:
            why = "; ".join(self._handshake_errors) or "no reply to /join within --join-timeout"
            return self._failed("join", t1, JoinError(why), stream)
        self.joined = True
        self._backoff = 0.5
        self.listener.joined(nick, self.transport, time.time())
        self._fire("join", t1)
        return True

    def say(self, line: bytes) -> bool:
        """Send one line (ending in a newline); False when the connection is gone."""
        stream = self.stream
        if stream is None:
            return False
        t0 = time.perf_counter()
        try:
            stream.sendall(line)
        except OSError as e:
            self._lost(stream, f"send failed: {e.__class__.__name__}")
            return False
        self._fire("send", t0, len(line))
        return True

    def quit(self) -> None:
        """Leave on our own: the member stops counting first, so nothing after it is expected."""
        stream = self.stream
        if stream is None:
            return
        self._closing = True
        if self.joined:
            self.listener.left(self.nick, time.time())
        self.joined = False
        self.stream = None
        with contextlib.suppress(OSError):
            stream.sendall(b"/quit\n")
        stream.close()
        if self._reader is not None:
            self._reader.kill(block=False)

    # -- internals -------------------------------------------------------------

    def _fire(self, kind: str, t0: float, length: int = 0, exc: Exception | None = None) -> None:
        self.request_event.fire(
            request_type=kind,
            name=self.transport,
            response_time=(time.perf_counter() - t0) * 1000,
            response_length=length,
            exception=exc,
            context={},
        )

    def _failed(self, kind: str, t0: float, exc: Exception, stream: Stream | None = None) -> bool:
        """A connect or join that did not complete (not a server disconnect): retry later."""
        self.listener.failed(f"{kind}_failures")
        self._fire(kind, t0, exc=exc)
        if stream is not None:
            self._closing = True
            if self.stream is stream:
                self.stream = None
            stream.close()
        self._retry_later()
        return False

    def _retry_later(self) -> None:
        self._retry_at = time.time() + self._backoff
        self._backoff = min(self._backoff * 2, 5.0)

    def _lost(self, stream: Stream, why: str) -> None:
        """The server dropped us: count it, stop being a member, reconnect later."""
        if self.stream is not stream or self._closing:
            return
        self.stream = None
        if self.joined:
            self.listener.left(self.nick, time.time())
        self.joined = False
        stream.close()
        self._welcome.set()
        self._synced.set()
        self.listener.failed("disconnects")
        self._fire("disconnect", time.perf_counter(), exc=ServerDisconnectError(why))
        self._retry_later()

    def _read_loop(self, stream: Stream, nick: str) -> None:
        """Consume every line; arrival time is taken once per recv(), so parsing is not billed."""
        buf = b""
        why = "connection closed by server"
        try:
            while True:
                data = stream.recv(262144)
                t = time.time()
                if not data:
                    break
                buf += data
                if b"\n" not in data:
                    continue
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    self._on_line(line.rstrip(b"\r"), t, nick)
        except OSError as e:
            why = f"connection error: {e.__class__.__name__}"
        self._lost(stream, why)

    def _on_line(self, line: bytes, t: float, nick: str) -> None:
        if line[:1] == b"[":
            j = line.find(b"] ", 1)
            if j < 0:
                return
            body = line[j + 2 :]
            if not self._synced.is_set() and body == self._sync_token:
                self._synced.set()
            else:
                self.listener.heard(nick, self.transport, line[1:j].decode(), body, t)
        elif line[:2] == b"! ":
            text = line[2:].decode("utf-8", "replace")
            if not self._synced.is_set():
                self._handshake_errors.append(text)
            else:
                self.listener.failed("server_errors")
                self._fire("server-error", time.perf_counter(), exc=ServerErrorLine(text))
        elif line.startswith(b"* welcome"):
            self._welcome.set()
