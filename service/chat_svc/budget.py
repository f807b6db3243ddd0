"""One global bound on what every member's outbound queue holds, as Redis bounds client output.

Each member's queue is bounded on its own (``--sendq-bytes``), but a thousand
members that never read, each just under its own bound, add up to more than a
pod has (1408 MB of RSS were measured).  ``OutboundBudget`` keeps the sum
under ``--outbound-budget-bytes``; past it, the members with the largest
queues are dropped first until the sum is back under 15/16 of the budget, as
Redis's ``maxmemory-clients`` evicts the biggest clients first.

What it counts is memory truly held:

- the bytes in queues, each buffer once however many members share it (fan-out
  hands every member at the same position the *same* bytes object, so adding
  up queue sizes counted one buffer once per member: 168 MB reported while the
  process held 43 MB);
- for every member with a backlog, its kernel send buffer, which is full (a
  queue only forms once the kernel refuses bytes), and which a container's
  memory limit counts too.

Counting sharing costs one dict operation per queued buffer (only queued ones:
a write the kernel takes whole never reaches the budget).
"""

from __future__ import annotations

import heapq
from typing import TYPE_CHECKING

import gevent
import structlog

if TYPE_CHECKING:
    from .outbox import Outbox

log = structlog.get_logger("chat_svc.budget")

# Queues dropped between two looks at I/O while shedding, and the pause (a timer, so the
# loop polls sockets: sleep(0) would only run queued callbacks).
SHED_BATCH = 32
SHED_PAUSE = 0.001


class OutboundBudget:
    """Queued outbound bytes of all members (each buffer once) plus their full kernel buffers, bounded."""

    __slots__ = ("_refs", "_shedding", "backlogged", "held", "kernel", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self.kernel = 0
        self.backlogged: dict[Outbox, int] = {}
        # id(buffer) -> [buffer, queues holding it]; the buffer is kept so its id stays its own.
        self._refs: dict[int, list[object]] = {}
        self._shedding = False

    @property
    def used(self) -> int:
        """What the budget charges: queued bytes held plus the kernel buffers of backlogged members."""
        return self.held + self.kernel

    def hold(self, data: bytes) -> None:
        """A queue took ``data``."""
        entry = self._refs.get(id(data))
        if entry is None:
            self._refs[id(data)] = [data, 1]
            self.held += len(data)
            if self.held + self.kernel > self.limit:
                self._over()
        else:
            entry[1] += 1  # type: ignore[operator]

    def release(self, data: bytes) -> None:
        """A queue let go of ``data`` (written, dropped or closed)."""
        entry = self._refs[id(data)]
        count = entry[1] - 1  # type: ignore[operator]
        if count:
            entry[1] = count
        else:
            del self._refs[id(data)]
            self.held -= len(data)

    def backlog(self, outbox: Outbox, kernel_buffer: int) -> None:
        """``outbox`` has bytes the kernel refused: its socket's send buffer is full."""
        if outbox not in self.backlogged:
            self.backlogged[outbox] = kernel_buffer
            self.kernel += kernel_buffer
            if self.held + self.kernel > self.limit:
                self._over()

    def caught_up(self, outbox: Outbox) -> None:
        """``outbox`` has nothing queued any more."""
        kernel_buffer = self.backlogged.pop(outbox, None)
        if kernel_buffer is not None:
            self.kernel -= kernel_buffer

    def _over(self) -> None:
        # Shedding ends sessions; do it in a greenlet of its own, never inside
        # the push (or the sweep) that crossed the line.
        if not self._shedding:
            self._shedding = True
            gevent.spawn(self._shed)

    def _shed(self) -> None:
        """Drop the largest queues until the budget is back under 15/16 of its limit.

        Dropping ends a session (logs, a notice to its room, a reset): hundreds at
        once would stall the loop for everyone else, so it lets the loop serve
        I/O after every ``SHED_BATCH`` drops, and looks again at what is largest.
        """
        try:
            used = self.used
            if used <= self.limit:
                return
            target = self.limit - self.limit // 16
            dropped = 0
            while self.used > target and self.backlogged:
                for outbox in heapq.nlargest(SHED_BATCH, self.backlogged, key=_queued):
                    if self.used <= target:
                        break
                    outbox.shed()
                    dropped += 1
                gevent.sleep(SHED_PAUSE)
            log.warning("outbound_budget_exceeded", used=used, limit=self.limit, dropped=dropped, now=self.used)
        finally:
            self._shedding = False


def _queued(outbox: Outbox) -> int:
    return outbox.size
