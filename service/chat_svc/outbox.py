"""Each member's bounded outbound queue, and the contract with the socket under it.

Fan-out calls ``push`` for every recipient.  ``push`` never blocks: when
nothing is queued it tries one non-blocking write straight away (under load
the hub has already coalesced many lines into that one write); whatever the
kernel does not take is queued and the sink writes it when the socket turns
writable.  Passing ``limit`` queued bytes marks the member a slow consumer, so
one client that stops reading costs the room nothing and the server at most
``limit`` bytes; and every queued buffer is accounted to the ``OutboundBudget``
all members share, which drops the largest queues when their sum is too big.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from .budget import OutboundBudget
from .protocol import error_line

# What a member is told when its queue is dropped, by reason.
DROP_NOTICES = {
    "slow_consumer": error_line("send queue exceeded"),
    "outbound_budget": error_line("send queue exceeded: server memory budget reached"),
}


class Sink(Protocol):
    """The writing end of one connection, built by the transport; tests can supply their own."""

    # True when every byte the client sends shows on the socket's fd, so its
    # session may park on an io watcher between inputs.  Not so under TLS,
    # whose layer buffers decrypted input the fd does not show.
    parkable: bool
    # Bytes the kernel holds for this connection once its send buffer is full
    # (what a backlogged member costs beyond its queue); 0 when not known.
    kernel_buffer: int

    def send_nowait(self, data: bytes) -> int:
        """Write what the kernel takes now; raise OSError when the peer is gone."""

    def kick(self, outbox: Outbox) -> None:
        """Write ``outbox`` out (``take``/``unsend``) whenever the socket is writable, until empty."""

    def close(self) -> None:
        """Stop writing; called once the member is gone."""


class Outbox:
    """Queue of encoded lines owed to one member, bounded by ``limit`` bytes (and by the shared ``budget``)."""

    __slots__ = (
        "_budget", "_queue", "_sink", "_torn", "closed", "kicked", "limit", "on_error", "on_overflow", "size"
    )

    def __init__(
        self,
        sink: Sink,
        limit: int,
        on_overflow: Callable[[str], None],
        on_error: Callable[[], None],
        budget: OutboundBudget | None = None,
    ) -> None:
        self._sink = sink
        self._queue: list[bytes] = []
        self._torn = False
        self._budget = budget
        self.size = 0
        self.limit = limit
        self.closed = False
        self.kicked = False
        # Called with the reason ("slow_consumer", "outbound_budget") once the queue is dropped.
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
            if self._budget is not None:
                self._budget.backlog(self, self._sink.kernel_buffer)
        self._queue.append(data)
        self.size += len(data)
        if self._budget is not None:
            self._budget.hold(data)
        if self.size > self.limit:
            self._drop("slow_consumer")
        elif not self.kicked:
            self.kicked = True
            self._sink.kick(self)

    def take(self) -> bytes:
        """Everything queued, as one buffer for one write (the coalescing step)."""
        queue = self._queue
        data = queue[0] if len(queue) == 1 else b"".join(queue)
        self._discard()
        return data

    def unsend(self, rest: bytes, torn: bool) -> None:
        """Put back the tail of a write the kernel did not take, ahead of newer lines."""
        self._queue.insert(0, rest)
        self.size += len(rest)
        self._torn = torn
        if self._budget is not None:
            self._budget.backlog(self, self._sink.kernel_buffer)
            self._budget.hold(rest)
        if self.size > self.limit:
            self._drop("slow_consumer")

    def all_sent(self) -> None:
        """The sink wrote everything it took and stops watching for writability."""
        self._torn = False
        self.kicked = False

    def shed(self) -> None:
        """The outbound budget is exceeded and this queue is among the largest: drop it."""
        if not self.closed:
            self._drop("outbound_budget")

    def _drop(self, reason: str) -> None:
        """Drop what is queued, tell the member why (best effort), and give up on it."""
        self._discard()
        self.closed = True
        notice = self.overflow_notice(reason, self._torn)
        if notice:
            try:
                self._sink.send_nowait(notice)
            except OSError:
                pass
        self.on_overflow(reason)

    def _discard(self) -> None:
        """Empty the queue, and give its buffers back to the budget."""
        budget = self._budget
        if budget is not None:
            for data in self._queue:
                budget.release(data)
            budget.caught_up(self)
        self._queue.clear()
        self.size = 0

    def overflow_notice(self, reason: str, torn: bool) -> bytes:
        """What is written when the queue is dropped for ``reason``; after a torn write, end the line first."""
        notice = DROP_NOTICES[reason]
        return b"\n" + notice if torn else notice

    def close(self) -> None:
        """The member is gone: queue nothing more, and stop the sink writing."""
        self.closed = True
        self._discard()
        self._sink.close()

    def fail(self) -> None:
        """The sink hit a socket error while writing."""
        if not self.closed:
            self.closed = True
            self.on_error()
