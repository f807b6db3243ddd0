"""Each member's bounded outbound queue, and the contract with the socket under it.

Fan-out calls ``push`` for every recipient.  ``push`` never blocks: when
nothing is queued it tries one non-blocking write straight away (under load
the hub has already coalesced many lines into that one write); whatever the
kernel does not take is queued and the sink writes it when the socket turns
writable.  Passing ``limit`` queued bytes marks the member a slow consumer, so
one client that stops reading costs the room nothing and the server at most
``limit`` bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from .protocol import error_line

OVERFLOW_NOTICE = error_line("send queue exceeded")


class Sink(Protocol):
    """The writing end of one connection, built by the transport; tests can supply their own."""

    # True when every byte the client sends shows on the socket's fd, so its
    # session may park on an io watcher between inputs.  Not so under TLS,
    # whose layer buffers decrypted input the fd does not show.
    parkable: bool

    def send_nowait(self, data: bytes) -> int:
        """Write what the kernel takes now; raise OSError when the peer is gone."""

    def kick(self, outbox: Outbox) -> None:
        """Write ``outbox`` out (``take``/``unsend``) whenever the socket is writable, until empty."""

    def close(self) -> None:
        """Stop writing; called once the member is gone."""


class Outbox:
    """Queue of encoded lines owed to one member, bounded by ``limit`` bytes."""

    __slots__ = ("_queue", "_sink", "_torn", "closed", "kicked", "limit", "on_error", "on_overflow", "size")

    def __init__(
        self,
        sink: Sink,
        limit: int,
        on_overflow: Callable[[], None],
        on_error: Callable[[], None],
    ) -> None:
        self._sink = sink
        self._queue: list[bytes] = []
        self._torn = False
        self.size = 0
        self.limit = limit
        self.closed = False
        self.kicked = False
        self.on_overflow = on_overflow
        self.on_error = on_error

    def push(self, data: bytes) -> None:
        """Queue ``data`` (shared, never copied when it goes out whole)."""
        if self.closed:
            return
        if not self.size:
            try:
                sent = self._sink.send_nowait(data)
            except OSError:
                self.closed = True
                self.on_error()
                return
            if sent == len(data):
                self._torn = False
                return
            self._torn = self._torn or sent > 0
            data = data[sent:]
        self._queue.append(data)
        self.size += len(data)
        if self.size > self.limit:
            self._overflow()
        elif not self.kicked:
            self.kicked = True
            self._sink.kick(self)

    def take(self) -> bytes:
        """Everything queued, as one buffer for one write (the coalescing step)."""
        queue = self._queue
        data = queue[0] if len(queue) == 1 else b"".join(queue)
        queue.clear()
        self.size = 0
        return data

    def unsend(self, rest: bytes, torn: bool) -> None:
        """Put back the tail of a write the kernel did not take, ahead of newer lines."""
        self._queue.insert(0, rest)
        self.size += len(rest)
        self._torn = torn
        if self.size > self.limit:
            self._overflow()

    def all_sent(self) -> None:
        """The sink wrote everything it took and stops watching for writability."""
        self._torn = False
        self.kicked = False

    def _overflow(self) -> None:
        """Drop what is queued, tell the member why (best effort), and give up on it."""
        self._queue.clear()
        self.size = 0
        self.closed = True
        notice = self.overflow_notice(self._torn)
        if notice:
            try:
                self._sink.send_nowait(notice)
            except OSError:
                pass
        self.on_overflow()

    def overflow_notice(self, torn: bool) -> bytes:
        """What is written when the queue overflows; after a torn write, the line must be ended first."""
        notice = OVERFLOW_NOTICE
        return b"\n" + notice if torn else notice

    def close(self) -> None:
        """The member is gone: queue nothing more, and stop the sink writing."""
        self.closed = True
        self._sink.close()

    def fail(self) -> None:
        """The sink hit a socket error while writing."""
        if not self.closed:
            self.closed = True
            self.on_error()
