"""chat-svc's line protocol as a Locust client, in the pattern of ``locust/contrib``.

``ChatClient`` owns one member's connection: it opens the transport, joins a room, sends
lines, reads everything the server sends, and fires a Locust ``request`` event for each
connect, join and send (and for disconnects and ``!`` error lines, as failures). It knows
nothing about what the lines mean: every chat line heard goes to its ``Listener``, which
is where the swarm verifies fan-out.

In resume mode (several hosts, or a load balancer) a connection the server closes is not a
failure: the client turns message ids on from the start, and when the server drops it (the
drain's ``* server restarting, reconnect``, or a plain close) it reconnects to the next host
by itself, takes the same nick and ``/resume``s its room from the last id it saw, dropping
lines it already had (``_ids``). The member stays one member throughout; the swarm is told
how the resume went and how long it took.

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
import zlib
from dataclasses import dataclass
from typing import Protocol

import gevent
import gevent.event
from gevent import socket
from locust.event import EventHook

from loadtest._ids import Id, Position, format_id, split_id
from loadtest._websocket import WebSocketStream

DEFAULT_HOST = "tcp://127.0.0.1:9009"
DEFAULT_PORT = 9009
TRANSPORTS = ("tcp", "ws")
RESTARTING = b"* server restarting, reconnect"
RETRY_FIRST, RETRY_MAX = 0.05, 1.0  # resume mode: pause between reconnect attempts, doubling


class ServerDisconnectError(Exception):
    """The server closed or reset a connection the user did not close."""


class JoinError(Exception):
    """/nick, /join or the sync round trip failed."""


class ServerErrorLine(Exception):
    """The server sent a ``! error`` line after the handshake."""


class ResumeIncompleteError(Exception):
    """The server could not replay every line since the member's last id, and said why."""


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


def parse_hosts(host: str | None) -> list[Address]:
    """A comma-separated list of what ``parse_host`` takes: the hosts a resuming user moves along."""
    parts = [part for part in (host or DEFAULT_HOST).split(",") if part.strip()]
    return [parse_host(part) for part in parts] or [parse_host(None)]


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

    def heard(self, nick: str, transport: str, sender: str, body: bytes, t: float, line_id: str | None) -> None:
        """A chat line ``[sender] body`` (id ``line_id``) reached ``nick`` at ``t`` (taken once per read)."""

    def resumed(self, nick: str, complete: bool, t_off: float, t_on: float) -> None:
        """Resume mode: dropped at ``t_off``, back in the room at ``t_on``; ``complete``: nothing is missing."""

    def count(self, counter: str) -> None:
        """Count one of connect_failures, join_failures, disconnects, server_errors, deduped, ..."""


class ChatClient:
    """One chat member's connection; ``connect`` again after a failure once ``retry_in()`` is 0.

    With ``resume`` the client reconnects by itself after the server dropped it
    (``reconnecting``); ``connect`` is then only for the first connection.
    """

    def __init__(self, request_event: EventHook, listener: Listener, join_timeout: float, resume: bool = False) -> None:
        self.request_event = request_event
        self.listener = listener
        self.join_timeout = join_timeout
        self.resume = resume
        self.stream: Stream | None = None
        self.transport = "tcp"
        self.nick = ""
        self.room = ""
        self.joined = False
        self.reconnecting = False
        self.position = Position()
        self._hosts: list[Address] = []
        self._host_index = 0
        self._reader: gevent.Greenlet | None = None
        self._reconnector: gevent.Greenlet | None = None
        self._closing = False
        self._quit = False
        self._retry_at = 0.0
        self._backoff = 0.5
        self._welcome = gevent.event.Event()
        self._synced = gevent.event.Event()
        self._answered = gevent.event.Event()
        self._resume_reason: str | None = None
        self._sync_token = b""
        self._handshake_errors: list[str] = []

    def retry_in(self) -> float:
        """Seconds until the next connection attempt is due (backoff after failures)."""
        return max(0.0, self._retry_at - time.time())

    def connect(self, host: str | None, nick: str, room: str, transport: str | None = None) -> bool:
        """Connect to ``host`` (over ``transport`` when given, else its scheme's), take ``nick``,
        join ``room``; wait until the server confirmed both.

        ``host`` may list several (``tcp://a:1,tcp://b:2``): a client starts on one picked by
        its nick, so users spread over them, and moves to the next after a failure.
        """
        self.nick, self.room, self.joined = nick, room, False
        t0 = time.perf_counter()
        try:
            hosts = parse_hosts(host)
            if transport:
                hosts = [dataclasses.replace(a, transport=transport) for a in hosts]
            if not self._hosts:
                self._host_index = zlib.crc32(nick.encode()) % len(hosts)
            self._hosts = hosts
            address = hosts[self._host_index % len(hosts)]
            self.transport = address.transport
            stream = open_stream(address, self.join_timeout)
        except (OSError, ValueError) as e:
            self._host_index += 1
            return self._failed("connect", t0, e)
        t1 = self._start(stream, None)
        if not self._welcome.wait(self.join_timeout) or self.stream is not stream:
            self._host_index += 1
            return self._failed("connect", t0, ConnectionError("no welcome line from server"), stream)
        self._fire("connect", t0)
        why = self._await_join(stream, None)
        if why is not None:
            return self._failed("join", t1, JoinError(why), stream)
        self.joined = True
        self._backoff = 0.5
        self.listener.joined(nick, self.transport, time.time())
        self._fire("join", t1)
        return True

    def say(self, line: bytes) -> bool:
        """Send one line (ending in a newline); False when the connection is gone."""
        stream = self.stream
        if stream is None or not self.joined:
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
        self._quit = True
        if self._reconnector is not None:
            self._reconnector.kill(block=False)
        if self.reconnecting:
            self.reconnecting = False
            self.listener.left(self.nick, time.time())
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

    def _fire(
        self, kind: str, t0: float, length: int = 0, exc: Exception | None = None, ms: float | None = None
    ) -> None:
        self.request_event.fire(
            request_type=kind,
            name=self.transport,
            response_time=(time.perf_counter() - t0) * 1000 if ms is None else ms,
            response_length=length,
            exception=exc,
            context={},
        )

    def _start(self, stream: Stream, since: Id | None) -> float:
        """Start reading ``stream`` and send the handshake: ``/nick``, ids, ``/join`` or ``/resume``, the sync."""
        nick, room = self.nick, self.room
        self._welcome, self._synced, self._answered = gevent.event.Event(), gevent.event.Event(), gevent.event.Event()
        self._handshake_errors = []
        self._resume_reason = None
        self._sync_token = f"ltsync{nick}".encode()
        self._closing = False
        self.stream = stream
        lines = [f"/nick {nick}"]
        if self.resume:
            lines.append("/ids")
        if since is None:
            self.position.joining()
            lines.append(f"/join {room}")
        else:
            self.position.resuming(since)
            lines.append(f"/resume {room} {format_id(since)}")
        self._reader = gevent.spawn(self._read_loop, stream, nick)
        # Speak first: the server holds the welcome for up to 250 ms while it sniffs for an
        # HTTP request line, unless the client's first line shows it is a chat client. The
        # /msg to ourselves comes back only after /nick and /join (or /resume) went through.
        t1 = time.perf_counter()
        with contextlib.suppress(OSError):
            stream.sendall(("\n".join(lines) + f"\n/msg {nick} ").encode() + self._sync_token + b"\n")
        return t1

    def _await_join(self, stream: Stream, since: Id | None) -> str | None:
        """Wait for the sync (and the answer to ``/resume``); the reason when the join failed."""
        if not self._synced.wait(self.join_timeout) or self.stream is not stream or self._handshake_errors:
            return "; ".join(self._handshake_errors) or "no reply to /join within --join-timeout"
        if since is not None and not self._answered.wait(self.join_timeout):
            return "no answer to /resume"
        return None

    def _failed(self, kind: str, t0: float, exc: Exception, stream: Stream | None = None) -> bool:
        """A connect or join that did not complete (not a server disconnect): retry later."""
        self.listener.count(f"{kind}_failures")
        self._fire(kind, t0, exc=exc)
        if stream is not None:
            self._drop(stream)
        self._retry_later()
        return False

    def _drop(self, stream: Stream) -> None:
        self._closing = True
        if self.stream is stream:
            self.stream = None
        stream.close()

    def _retry_later(self) -> None:
        self._retry_at = time.time() + self._backoff
        self._backoff = min(self._backoff * 2, 5.0)

    def _lost(self, stream: Stream, why: str) -> None:
        """The server dropped us: resume (resume mode), or count it, stop being a member, reconnect later."""
        if self.stream is not stream or self._closing:
            return
        self.stream = None
        stream.close()
        self._welcome.set()
        self._synced.set()
        self._answered.set()
        if self.reconnecting:
            return  # a reconnect attempt failed: its loop tries the next host
        if self.resume and self.joined and not self._quit:
            self.joined = False
            self.reconnecting = True
            self.listener.count("server_closes")
            self._reconnector = gevent.spawn(self._reconnect, time.time())
            return
        if self.joined:
            self.listener.left(self.nick, time.time())
        self.joined = False
        self.listener.count("disconnects")
        self._fire("disconnect", time.perf_counter(), exc=ServerDisconnectError(why))
        self._retry_later()

    def _reconnect(self, t_off: float) -> None:
        """Resume mode: back into the room through the next host, from the last id seen.

        Keeps trying, host after host, until it is back or the user stops; every failed
        attempt is counted (``reconnect_retries``), and what the room said meanwhile is
        judged by the swarm as usual, so a user that stays away loses lines.
        """
        pause = RETRY_FIRST
        while not self._quit:
            self._host_index += 1
            address = self._hosts[self._host_index % len(self._hosts)]
            since = self.position.last
            try:
                stream = open_stream(address, self.join_timeout)
            except OSError:
                stream = None
            if stream is not None:
                self.transport = address.transport
                self._start(stream, since)
                why = "no welcome line" if not self._welcome.wait(self.join_timeout) else None
                why = why or self._await_join(stream, since)
                if why is None and self.stream is stream:
                    self._resumed(t_off, since)
                    return
                self._drop(stream)
            self.listener.count("reconnect_retries")
            gevent.sleep(pause)
            pause = min(pause * 2, RETRY_MAX)

    def _resumed(self, t_off: float, since: Id | None) -> None:
        t_on = time.time()
        complete = since is not None and self._resume_reason is None
        self.reconnecting = False
        self.joined = True
        self.listener.resumed(self.nick, complete, t_off, t_on)
        self._fire("reconnect", 0.0, ms=(t_on - t_off) * 1000)
        if not complete:
            why = self._resume_reason or "no id seen in the room yet: joined instead"
            self._fire("resume", 0.0, exc=ResumeIncompleteError(why), ms=0.0)

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
                    if self._on_line(line.rstrip(b"\r"), t, nick):
                        why = "server restarting"
                        break
                else:
                    continue
                break
        except OSError as e:
            why = f"connection error: {e.__class__.__name__}"
        self._lost(stream, why)

    def _on_line(self, line: bytes, t: float, nick: str) -> bool:
        """Handle one line; True when the server told us to go (resume mode)."""
        line_id = None
        if line[:1] == b"@":
            line_id, line = split_id(line)
            if line_id is not None and not self.position.belongs(line_id):
                return False  # the lobby's, while joining or resuming
        if line[:1] == b"[":
            j = line.find(b"] ", 1)
            if j < 0:
                return False
            body = line[j + 2 :]
            if not self._synced.is_set() and body == self._sync_token:
                self._synced.set()
                return False
            sender = line[1:j].decode()
            shown = None
            if line_id is not None:
                if not self.position.note(line_id):
                    self.listener.count("deduped")
                    return False
                if sender == nick and not self.position.in_room:
                    return False  # our own line, in the replay
                shown = format_id(line_id)
            self.listener.heard(nick, self.transport, sender, body, t, shown)
        elif line[:2] == b"! ":
            text = line[2:].decode("utf-8", "replace")
            if self.resume and text.startswith("resume incomplete "):
                self._resume_reason = text
                self.position.entered()
                self._answered.set()
            elif not self._synced.is_set() or self._handshake_errors:
                # A handshake that failed: what follows is its consequence (the sync /msg to a
                # nick still held by our old connection on a draining instance), not the server's.
                self._handshake_errors.append(text)
                self._synced.set()
            else:
                self.listener.count("server_errors")
                self._fire("server-error", time.perf_counter(), exc=ServerErrorLine(text))
        elif line.startswith(b"* welcome"):
            self._welcome.set()
        elif self.resume:
            if line == RESTARTING:
                return True
            if line.startswith(b"* resumed "):
                self.position.entered()
                self._answered.set()
            elif line == b"* you joined " + self.room.lower().encode():
                self.position.entered()
        return False
