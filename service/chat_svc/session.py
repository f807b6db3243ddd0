"""One chat connection: authentication, admission, its read loop and its limits.

The session owns everything about a single client that is not shared:
the line framer, the flood bucket, its last input time and the reason it ended.
What it shares with the others comes in one ``SessionContext``.  It talks to
the room hub only through ``Hub`` methods, hands slash commands to
``commands``, and uses its socket only for reading; writes go through the
member's Outbox.
"""

from __future__ import annotations

import fcntl
import itertools
import math
import socket
import struct
import termios
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import gevent
import structlog
from prometheus_client import Counter

from . import commands, protocol
from .admission import Admission, Arrival, WaitingRoom
from .bans import BanList
from .budget import OutboundBudget
from .config import Config
from .directory import Directory
from .flood import TokenBucket
from .framing import LineFramer
from .gevent_seams import raw_socket
from .httpfront import is_request_line
from .hub import Hub, Member
from .identity import MISSING, NICK_TAKEN, Authenticator, ExpiryWatch, Identity
from .jwtauth import AuthFailed
from .logs import Coalesced
from .metrics import Counters
from .outbox import Outbox, Sink
from .text import clean
from .throttle import AddressBuckets

DEFAULT_ROOM = "lobby"
# Input read at once.  A throttled session holds its chunk (and the lines split from it)
# while it waits out its fakelag, so this bounds what a member's input costs in memory:
# 1000 throttled members held 128 MB with 64 KiB chunks.  16 KiB still takes in some
# 100 lines of a busy sender per call.
RECV_BYTES = 16384
_ids = itertools.count(1)

# Reasons after which the client is owed what is already queued (a goodbye,
# an error line) before the socket closes; the rest close at once.
_GRACEFUL = frozenset(
    {
        "quit",
        "line_too_long",
        "flood",
        "idle_timeout",
        "auth_failed",
        "auth_throttled",
        "server_full",
        "shutdown",
        "kicked",
        "banned",
        "token_expired",
        "http_request",
    }
)
# Reasons a connection is refused before it becomes a member.
_REFUSALS = ("auth_failed", "auth_throttled", "server_full", "banned")
# SO_LINGER on with a zero timeout: close() resets the connection and frees its buffers.
_LINGER_RESET = struct.pack("ii", 1, 0)


log = structlog.get_logger("chat_svc.session")


@dataclass(frozen=True, slots=True)
class SessionLimits:
    """What each client may do and must present; built once from Config for every session."""

    max_line_bytes: int
    sendq_bytes: int
    flood_burst: int
    flood_rate: float
    flood_max_input_bytes: int
    flood_kick_after: float
    auth_timeout: float
    log_messages: bool
    room_create_burst: int = 20
    room_create_rate: float = 0.0

    @classmethod
    def from_config(cls, config: Config) -> SessionLimits:
        return cls(
            max_line_bytes=config.max_line_bytes,
            sendq_bytes=config.sendq_bytes,
            flood_burst=config.flood_burst,
            flood_rate=config.flood_rate,
            flood_max_input_bytes=config.flood_max_input_bytes,
            flood_kick_after=config.flood_kick_after,
            auth_timeout=config.auth_timeout,
            log_messages=config.log_messages,
            room_create_burst=config.room_create_burst,
            room_create_rate=config.room_create_rate,
        )


@dataclass(frozen=True, slots=True)
class SessionContext:
    """Everything sessions share, and all a session knows of the server; one per server."""

    hub: Hub
    directory: Directory
    limits: SessionLimits
    counters: Counters
    # Every open chat-port socket (--max-per-ip): taken by the transport at
    # accept, given back by whoever closes the socket (the session, once it owns it).
    connection_slots: Admission
    # Sockets not admitted yet (--max-pending): left on joining or closing.
    waiting: WaitingRoom
    # Chat members (--max-clients as the descriptor budget lowers it): taken before joining.
    member_slots: Admission
    # Failed /auth per client address (--auth-failure-burst, --auth-failure-rate).
    auth_failures: AddressBuckets
    # Refusals and failed /auth, logged at most once per address per interval.
    refusals: Coalesced
    auth_log: Coalesced
    # By transport ("tcp", or the framing's name), then by reason.
    disconnects: Mapping[str, Mapping[str, Counter]]
    # Live sessions, for the idle scan, bans and shutdown.
    sessions: set[Session]
    # /auth: the shared token and JWTs; the watch that ends expired identities.
    auth: Authenticator
    expiry: ExpiryWatch
    # Enforced at connect, /nick and /auth.
    bans: BanList
    # All members' queued output together (--outbound-budget-bytes).
    budget: OutboundBudget
    # /rooms and /who answers shared by everyone asking within a moment.
    listings: commands.Listings

    @property
    def new_rooms(self) -> tuple[int, float]:
        return self.limits.room_create_burst, self.limits.room_create_rate


class Framing(Protocol):
    """A transport that carries lines inside frames (WebSocket), as a session sees it.

    A plain byte stream (TCP, TLS) has none.  With one, the session still
    reads bytes from its socket and writes through its Outbox; the framing
    turns what is read into line bytes for the framer, frames what the Outbox
    is handed, and has the last word when the session ends.
    """

    name: str
    # Why the peer's frames end the session (a close frame, a protocol
    # error, a frame over the limit); set by ``decode``.
    ended: str | None

    def open(
        self,
        sink: Sink,
        limit: int,
        on_overflow: Callable[[str], None],
        on_error: Callable[[], None],
        kill: Callable[[str], None],
        budget: OutboundBudget | None = None,
    ) -> Outbox:
        """Start: the member's outbox, which frames whatever it is pushed; ``kill`` ends a dead peer."""

    def decode(self, data: bytes) -> bytes:
        """Bytes read from the socket into line bytes for the framer (maybe none)."""

    def farewell(self, reason: str) -> None:
        """Queue the stream's last words for ``reason`` (a close frame); only the first call counts."""


class Session:
    """Serves one chat client from first line to close.

    An idle member holds no greenlet: once its input is used up the session
    *parks* on an io watcher, and the watcher spawns a short-lived greenlet
    when input arrives.  A waiting greenlet (its saved C stack and a page of
    Python frame stack) costs more than everything else a member needs, and
    tens of thousands of members share one process (docs/performance.md has
    the figures).  Slotted, without per-session loggers for the same reason;
    log context (conn_id, peer) is bound in each serving greenlet's
    contextvars.  TLS sessions never park (the SSL layer buffers input the fd
    does not show).
    """

    __slots__ = (
        "_flood_episode",
        "admitted",
        "arrival",
        "bucket",
        "busy",
        "bytes_in",
        "conn_id",
        "ctx",
        "draining",
        "finished",
        "first_line",
        "framer",
        "framing",
        "head",
        "ip",
        "last_input",
        "last_room",
        "member",
        "outbox",
        "port",
        "raw",
        "reason",
        "sock",
        "started",
        "watcher",
    )

    def __init__(
        self,
        ctx: SessionContext,
        sock: Any,
        arrival: Arrival,
        head: bytes,
        sink: Sink,
        framing: Framing | None = None,
    ) -> None:
        self.ctx = ctx
        limits = ctx.limits
        self.sock = sock
        self.arrival = arrival
        self.ip, self.port = arrival.address
        self.head = head
        self.conn_id = next(_ids)
        self.reason: str | None = None
        self.member: Member | None = None
        self.framer = LineFramer(limits.max_line_bytes)
        self.framing = framing
        if framing is None:
            self.outbox = Outbox(sink, limits.sendq_bytes, self._slow_consumer, self._socket_error, ctx.budget)
        else:
            self.outbox = framing.open(
                sink, limits.sendq_bytes, self._slow_consumer, self._socket_error, self.kill, ctx.budget
            )
        self.bucket = TokenBucket(limits.flood_burst, limits.flood_rate) if limits.flood_rate > 0 else None
        self.started = self.last_input = time.monotonic()
        self.raw = raw_socket(sock) if sink.parkable else None
        self.watcher: Any = None
        self.busy = True
        self.finished = False
        self.draining = False
        self.bytes_in = len(head)
        ctx.counters.bytes_in += len(head)
        self.admitted = False
        self.first_line = True
        self.last_room: str | None = None
        self._flood_episode: float | None = None

    # -- lifecycle --------------------------------------------------------

    def run(self) -> None:
        """Admit the client, then serve it; runs in the connection's accept greenlet."""
        self._bind_log_context()
        ctx = self.ctx
        ctx.sessions.add(self)
        try:
            member = self._admit()
            if member is not None:
                self.member = member
                identity = member.identity
                room = identity.start_room(DEFAULT_ROOM) if identity is not None else DEFAULT_ROOM
                ctx.hub.attach(member, room)
                ctx.expiry.watch(member)
                log.info("client_connected", nick=member.nick, room=room, identified=identity is not None)
                head, self.head = self.head, b""
                self._serve(head)
                return
        except Exception:
            self._failed()
        self._finish()

    def _admit(self) -> Member | None:
        """Bans, authentication, the member caps and the nick, in that order; None when refused (and told why)."""
        ctx = self.ctx
        ban = ctx.bans.for_ip(self.ip)
        if ban is not None:
            self._refuse(f"banned: {ban.reason}", "banned")
            return None
        identity: Identity | None = None
        if ctx.auth.required:
            presented = self._auth_line()
            if presented is None:
                return None
            try:
                identity = ctx.auth.check(presented)
            except AuthFailed as failed:
                self._auth_failed(failed.reason)
                return None
        if refusal := ctx.member_slots.acquire(self.ip):
            self._refuse(refusal, "server_full")
            return None
        self.admitted = True
        self.arrival.admitted()
        nick = f"{self.ip}:{self.port}"
        if identity is not None:
            nick = identity.sub
            ban = ctx.bans.for_nick(nick)
            if ban is not None:
                self._refuse(f"banned: {ban.reason}", "banned")
                return None
            taken = ctx.directory.reserve(nick)
            if taken is not None:
                ctx.auth.count(NICK_TAKEN)
                ctx.auth_log.note(self.ip, NICK_TAKEN, ip=self.ip)  # a valid token: not charged
                self._refuse(taken, "auth_failed")
                return None
        member = Member(nick, self.outbox, self)
        member.identity = identity
        return member

    def _refuse(self, error: str, reason: str) -> None:
        self.outbox.push(protocol.error_line(error))
        self.end(reason)

    def _bind_log_context(self) -> None:
        structlog.contextvars.bind_contextvars(conn_id=self.conn_id, peer=f"{self.ip}:{self.port}")

    def _failed(self) -> None:
        if self.reason is None:
            log.exception("session_failed")
            self.reason = "error"

    def _serve(self, head: bytes) -> None:
        """Handle ``head`` and whatever else is readable now; then park or finish."""
        self.busy = True
        data: bytes | None = head
        try:
            while self.reason is None:
                if data and not self._process(data):
                    break
                data = self._read_now()
                if data is None:
                    break
                if data is _PARK:
                    self._park()
                    return
        except Exception:
            self._failed()
        self._finish()

    def _park(self) -> None:
        """Wait for input without a greenlet: an io watcher calls ``_wake``."""
        if self.watcher is None:
            self.watcher = gevent.get_hub().loop.io(self.sock.fileno(), 1)
        self.busy = False
        self.watcher.start(self._wake)

    def _wake(self) -> None:
        self.watcher.stop()
        if not self.finished:
            self.busy = True
            gevent.spawn(self._burst)

    def _burst(self) -> None:
        self._bind_log_context()
        self._serve(b"")

    def end(self, reason: str) -> None:
        """Record why the session ends (the first reason wins; once told to go, the drain is why)."""
        if self.reason is None:
            self.reason = "shutdown" if self.draining and reason in ("eof", "error") else reason

    def tell_to_go(self, notice: bytes) -> None:
        """The drain reached this member: say ``notice`` and hand it no more room lines.

        Its input is still read (a line sent before it saw the notice is not
        lost) until it closes, or ``half_close`` and the drain's deadline end it.
        """
        self.draining = True
        member = self.member
        if member is not None and member.room is not None:
            self.ctx.hub.send_to(member, notice)
            self.ctx.hub.release(member)
        else:
            self.outbox.push(notice)

    def half_close(self) -> bool:
        """Everything owed is written: send FIN so the client sees the end, keep reading.

        Plain TCP only (TLS and WebSocket sessions are closed instead); False
        when the session was ended instead.
        """
        if self.finished:
            return False
        if self.raw is None or self.framing is not None:  # TLS; a WebSocket ends with its close frame
            self.kill("shutdown")
            return False
        self.outbox.closed = True  # nothing more is queued once the FIN is on its way
        try:
            self.raw.shutdown(socket.SHUT_WR)
        except OSError:
            self.kill("shutdown")
            return False
        return True

    def kill(self, reason: str) -> None:
        """End the session from outside its own flow (hub, sweeper, shutdown); never blocks.

        A parked session is finished on the spot.  A busy one leaves the room
        now; if it still owes the client a goodbye (graceful reasons) its
        input is shut so that its own greenlet wakes and flushes it (up to
        1 s, as in ``_finish``), otherwise its socket is closed and the
        greenlet finishes once its socket call fails.
        """
        self.end(reason)
        if self.busy:
            self._leave_hub()
            self._bid_farewell()
            if self.outbox.size and not self.outbox.closed and self.reason in _GRACEFUL:
                try:
                    # Under the SSL layer: SSLSocket.shutdown would drop the TLS state the flush needs.
                    raw_socket(self.sock).shutdown(socket.SHUT_RD)
                    return
                except OSError:
                    pass
            self.outbox.close()
            self.sock.close()
        else:
            self._finish()

    def _slow_consumer(self, reason: str) -> None:
        """The outbox dropped its queue: over --sendq-bytes, or among the largest past the outbound budget."""
        log.warning(
            "slow_consumer_disconnected",
            conn_id=self.conn_id,
            peer=f"{self.ip}:{self.port}",
            nick=self._nick_or_none(),
            reason=reason,
            limit=self.outbox.limit,
        )
        # The client is not reading: a plain close would leave its full kernel send buffer
        # behind (an orphan socket) until the kernel gives up on it, minutes later.
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        except OSError:
            pass
        self.kill(reason)

    def _socket_error(self) -> None:
        self.kill("error")

    def _leave_hub(self) -> None:
        member = self.member
        if member is not None and member.room is not None:
            self.last_room = member.room.name
            self.ctx.hub.detach(member)

    def _bid_farewell(self) -> None:
        """The transport's last words (a WebSocket close frame), once the member can be sent nothing else."""
        if self.framing is not None:
            self.framing.farewell(self.reason or "error")

    def _nick_or_none(self) -> str | None:
        return self.member.nick if self.member is not None else None

    def _finish(self) -> None:
        """Leave, flush what a graceful end owes the client, account, close; once."""
        if self.finished:
            return
        self.finished = True
        reason = self.reason or "error"
        member = self.member
        self._leave_hub()
        self._bid_farewell()
        if reason in _GRACEFUL and self.busy:
            self._wait_until_sent(1.0)
        self.busy = False
        self.outbox.close()
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher.close()
            self.watcher = None
        ctx = self.ctx
        ctx.sessions.discard(self)
        if self.admitted:
            self.admitted = False
            ctx.member_slots.release(self.ip)
        disconnects = ctx.disconnects["tcp" if self.framing is None else self.framing.name]
        if member is not None:
            disconnects[reason].inc()
            log.info(
                "client_disconnected",
                conn_id=self.conn_id,
                peer=f"{self.ip}:{self.port}",
                nick=member.nick,
                room=self.last_room,
                reason=reason,
                duration_s=round(time.monotonic() - self.started, 3),
                bytes_in=self.bytes_in,
            )
        elif reason in _REFUSALS:
            disconnects[reason].inc()
            if reason not in ("auth_failed", "auth_throttled"):  # those are in auth_failed
                ctx.refusals.note((self.ip, reason), ip=self.ip, reason=reason)
        self.sock.close()
        self.arrival.release()

    def _wait_until_sent(self, timeout: float) -> None:
        """Give queued lines (a goodbye, an error) up to ``timeout`` to reach the client."""
        deadline = time.monotonic() + timeout
        while self.outbox.size and not self.outbox.closed and time.monotonic() < deadline:
            gevent.sleep(0.01)

    # -- reading ----------------------------------------------------------

    def _recv(self, timeout: float | None, on_timeout: str) -> bytes | None:
        """Blocking read (in this greenlet) for the auth line."""
        self.sock.settimeout(timeout)
        try:
            return self._received(self.sock.recv(RECV_BYTES))
        except TimeoutError:
            self.end(on_timeout)
        except ConnectionResetError:
            self.end("eof")
        except OSError:
            self.end("error")
        return None

    def _read_now(self) -> bytes | None:
        """What is readable now, ``_PARK`` when nothing is (TLS: wait for it)."""
        try:
            if self.raw is not None:
                return self._received(self.raw.recv(RECV_BYTES))
            self.sock.settimeout(None)
            return self._received(self.sock.recv(RECV_BYTES))
        except BlockingIOError:
            return _PARK
        except ConnectionResetError:
            self.end("eof")
        except OSError:
            self.end("error")
        return None

    def _received(self, data: bytes) -> bytes | None:
        """Account for what was read; with a framing, what remains of it for the framer."""
        if not data:
            self.end("eof")
            return None
        self.bytes_in += len(data)
        self.ctx.counters.bytes_in += len(data)
        framing = self.framing
        if framing is not None:
            # Control frames (pings, pongs) are not input: --idle-timeout sees lines only.
            data = framing.decode(data)
            if framing.ended is not None:
                self.end(framing.ended)
            if not data:
                return data
        self.last_input = time.monotonic()
        return data

    def _auth_line(self) -> str | None:
        """What the first line that is not blank presents (``/auth X``: X); None when refused already.

        Within --auth-timeout and what is left of --admission-timeout.  An
        address that has used up its failures (--auth-failure-burst, then
        --auth-failure-rate) is refused before its line is looked at, so
        guessing goes no faster than the rate whatever the attacker does.
        """
        ctx = self.ctx
        deadline = min(time.monotonic() + ctx.limits.auth_timeout, self.arrival.deadline)
        lines = self._nonblank(self.framer.feed(self.head))
        self.head = b""
        while not lines:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.framer.overflowed:
                self.end("auth_failed")
            data = self._recv(remaining, "auth_failed") if self.reason is None else None
            if data is None:
                ctx.auth.count(MISSING)
                self.outbox.push(protocol.error_line("authentication required: send /auth TOKEN first"))
                return None
            lines = self._nonblank(self.framer.feed(data))
        first, rest = lines[0], lines[1:]
        self.head = b"".join(line + b"\n" for line in rest)
        self.first_line = False
        wait = ctx.auth_failures.wait(self.ip)
        if wait:
            ctx.auth_log.note(self.ip, "throttled", ip=self.ip)
            retry = math.ceil(wait)
            text = f"authentication failed: too many failures from your address, retry in {retry} s"
            self._refuse(text, "auth_throttled")
            return None
        parsed = protocol.parse(clean(first))
        if isinstance(parsed, protocol.Command) and parsed.name == "auth" and parsed.arg:
            return parsed.arg
        ctx.auth.count(MISSING)
        self._auth_failed(MISSING)
        return None

    def _auth_failed(self, reason: str) -> None:
        """A wrong or missing /auth: charged to the address, logged at most once per interval, refused."""
        self.ctx.auth_failures.take(self.ip)
        self.ctx.auth_log.note(self.ip, reason, ip=self.ip)
        self._refuse("authentication failed", "auth_failed")

    @staticmethod
    def _nonblank(lines: list[bytes]) -> list[bytes]:
        """Lines before ``/auth`` with the blank ones skipped (a client's stray CRLF is not a wrong token)."""
        while lines and not lines[0].strip():
            lines = lines[1:]
        return lines

    def _process(self, data: bytes) -> bool:
        """Frame and act on one chunk of input; False ends the session."""
        framer = self.framer
        t_read = time.perf_counter()
        lines = framer.feed(data)
        unread = len(data)
        limit = self.ctx.limits.max_line_bytes
        for raw in lines:
            unread -= len(raw) + 1
            if self.first_line and raw.strip() and not self._first_line(raw):
                return False
            parsed = protocol.parse(clean(raw, limit))
            if self.bucket is not None:
                delay = self.bucket.take(commands.cost(parsed))
                if delay:
                    if not self._fakelag(delay, unread):
                        return False
                    t_read = time.perf_counter()
            if parsed is not None and not self._handle(parsed, t_read):
                return False
        if framer.overflowed:
            self.outbox.push(protocol.error_line("line too long"))
            self.end("line_too_long")
            return False
        return True

    def _fakelag(self, delay: float, unread: int) -> bool:
        """Delay a line over the flood limit, or end a client that keeps flooding."""
        limits, bucket = self.ctx.limits, self.bucket
        assert bucket is not None
        self.ctx.counters.flood_delayed += 1
        backlog = unread + self.framer.pending + _kernel_unread(self.sock)
        sustained = limits.flood_kick_after and bucket.throttled_for() > limits.flood_kick_after
        if backlog > limits.flood_max_input_bytes or sustained:
            log.warning("flood_disconnected", nick=self._nick_or_none(), unread_bytes=backlog)
            self.outbox.push(protocol.error_line("excess flood"))
            self.end("flood")
            return False
        if bucket.throttled_since != self._flood_episode:
            self._flood_episode = bucket.throttled_since
            log.info("flood_limited", nick=self._nick_or_none(), delay_s=round(delay, 3))
        gevent.sleep(delay)
        return True

    # -- lines ---------------------------------------------------------------

    def _first_line(self, raw: bytes) -> bool:
        """The first line that is not blank; False (and refused) when it is an HTTP request line.

        An HTTP request that missed the sniff window (--http-sniff-ms) is never
        relayed as chat: its headers may carry credentials.
        """
        self.first_line = False
        if not is_request_line(raw):
            return True
        self.outbox.push(protocol.error_line("HTTP request refused: send it as soon as you connect"))
        self.end("http_request")
        return False

    def _handle(self, parsed: protocol.Command | str, t_read: float) -> bool:
        """Act on one parsed line; False ends the session."""
        member = self.member
        assert member is not None
        ctx = self.ctx
        stats = ctx.counters
        if isinstance(parsed, str):
            stats.chat_messages += 1
            if ctx.limits.log_messages:
                log.debug("message", nick=member.nick, text=parsed)
            ctx.hub.say(member, protocol.chat_line(member.nick, parsed), t_read)
            return True
        if parsed.name == "msg":
            stats.private_messages += 1
        else:
            stats.commands += 1
        reason = commands.dispatch(ctx, member, parsed)
        if reason is not None:
            self.end(reason)
            return False
        return True


_PARK = b"park"

_FIONREAD = struct.Struct("i")


def _kernel_unread(sock: Any) -> int:
    """Bytes the client sent that still sit in the kernel's receive buffer."""
    try:
        buffer = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    except (OSError, ValueError):
        return 0
    return int(_FIONREAD.unpack(buffer)[0])
