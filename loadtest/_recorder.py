"""What one swarm process saw, batched for the judge; free of Locust and gevent.

Every process that runs users (a local run or a worker) has one ``Recorder``. Users report
joins, leaves, sends and receipts to it. Duplicates and out-of-order lines are caught here,
because only the recipient's process sees its stream in order. Everything else is shipped
as plain lists (``take_batch``), which is what Locust's msgpack messaging carries, to the
``Ledger`` that judges the whole swarm.

The swarm's chat lines ("probes") are ``lt <seq> <send-time-us> <padding>``. With the
sender's nick from the server's ``[nick] text`` prefix they name the line swarm-wide, and
the send time travels inside, so a recipient computes latency without any lookup.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from loadtest._histogram import LatencyHistogram


def probe_line(seq: int, t_send: float, size: int) -> bytes:
    """The ``seq``-th line of a sender, sent at ``t_send``, padded to ``size`` bytes plus newline."""
    head = f"lt {seq} {int(t_send * 1_000_000)} "
    return (head + "x" * max(1, size - len(head))).encode() + b"\n"


def parse_probe(body: bytes) -> tuple[int, float] | None:
    """(seq, send time) of a probe's text, or None for any other chat line."""
    if body[:3] != b"lt ":
        return None
    parts = body.split(b" ", 3)
    try:
        return int(parts[1]), int(parts[2]) / 1_000_000
    except (IndexError, ValueError):
        return None


class _SenderStream:
    """What one recipient has seen from one sender: highest seq plus the gaps below it.

    This is the one place a receipt is called a duplicate. In resume mode the client has
    already dropped lines whose message id it had seen (``_ids``), so a duplicate here is
    one that dedup by id did not catch: the same line under two ids.
    """

    __slots__ = ("first", "holes", "last")

    MAX_HOLES = 4096

    def __init__(self, seq: int) -> None:
        self.first = seq
        self.last = seq
        self.holes: set[int] = set()

    def check(self, seq: int) -> str:
        """Classify ``seq`` as "ok", "dup" or "ooo" (out of order) and update the state."""
        if seq > self.last:
            if seq > self.last + 1 and len(self.holes) < self.MAX_HOLES:
                self.holes.update(range(max(self.last + 1, seq - 256), seq))
            self.last = seq
            return "ok"
        if seq in self.holes:
            self.holes.discard(seq)
            return "ooo"
        if seq < self.first:
            self.holes.update(range(seq + 1, self.first))
            self.first = seq
            return "ooo"
        return "dup"


COUNTER_NAMES = (
    "sent",
    "deliveries",
    "late",
    "dup",
    "ooo",
    "echo",
    "server_errors",
    "disconnects",
    "connect_failures",
    "join_failures",
    # resume mode
    "server_closes",
    "resumes_complete",
    "resumes_incomplete",
    "reconnect_retries",
    "deduped",
    "id_mismatches",
)


class Recorder:
    """Collects one process's swarm events and ships them as batches.

    ``deadline`` (seconds) is needed here to tell in-time receipts from late ones: the
    sender's timestamp travels inside the chat line, so the recipient can decide alone.
    """

    def __init__(self, node: str, deadline: float) -> None:
        self.node = node
        self.deadline = deadline
        self.streams: dict[str, dict[str, _SenderStream]] = defaultdict(dict)
        self.counters: dict[str, int] = dict.fromkeys(COUNTER_NAMES, 0)
        self.cpu_max = 0.0
        # set when every user is spawned: latency after it is the steady-state figure
        self.steady_from: float | None = None
        self._reset_batch()

    def _reset_batch(self) -> None:
        self._joins: list[list[Any]] = []
        self._leaves: list[list[Any]] = []
        self._sends: list[list[Any]] = []
        # (sender, seq) -> [last arrival time, recipient, ...]
        self._recv: dict[tuple[str, int], list[Any]] = {}
        self._late: dict[tuple[str, int], list[Any]] = {}
        self._hist = LatencyHistogram()
        self._steady = LatencyHistogram()
        self._lag = LatencyHistogram()
        self._per_sec: dict[int, int] = {}
        self._delta: dict[str, int] = dict.fromkeys(COUNTER_NAMES, 0)
        # resume mode: (sender, seq) -> the line's id; disconnect-to-resume times; incomplete gaps
        self._ids: dict[tuple[str, int], str] = {}
        self._reconnect = LatencyHistogram()
        self._gaps: list[list[Any]] = []

    def count(self, name: str, n: int = 1) -> None:
        """Bump a counter (disconnects, failures, ...) that the judge sums over nodes."""
        self.counters[name] += n
        self._delta[name] += n

    def loop_lag(self, seconds: float) -> None:
        """How late a timer fired in this process: time it could not spend reading sockets."""
        self._lag.add_us(int(seconds * 1_000_000))

    def joined(self, room: str, nick: str, t: float, transport: str = "tcp") -> None:
        """``nick`` is a member of ``room`` from ``t`` on (server confirmed the join), over ``transport``."""
        self._joins.append([room, nick, t, transport])

    def left(self, nick: str, t: float) -> None:
        """``nick`` stops being a member at ``t`` (leaving started or connection lost)."""
        self._leaves.append([nick, t])
        self.streams.pop(nick, None)

    def resumed(self, nick: str, complete: bool, t_off: float, t_on: float) -> None:
        """Resume mode: ``nick`` was dropped at ``t_off`` and back in its room at ``t_on``.

        A complete resume keeps it a member throughout (the replay brings what it missed);
        after an incomplete one the server said lines may be missing, so from ``t_off`` to
        ``t_on`` it is not expected to get any (the ledger's gap), and the verdict counts it.
        """
        self.count("resumes_complete" if complete else "resumes_incomplete")
        self._reconnect.add_us(int(max(0.0, t_on - t_off) * 1_000_000))
        if not complete:
            self._gaps.append([nick, t_off, t_on])

    def sent(self, room: str, nick: str, seq: int, t_send: float) -> None:
        """``nick`` sent message ``seq`` into ``room`` at ``t_send``."""
        self._sends.append([room, nick, seq, t_send])
        self.count("sent")

    def received(
        self, recipient: str, sender: str, seq: int, t_send: float, t_recv: float, line_id: str | None = None
    ) -> tuple[str, float]:
        """Record a chat line seen by ``recipient``; returns (kind, latency_ms).

        ``line_id`` (resume mode) is the message id it came with: every member must see a
        line under the same id, whichever instance it is on (the ledger compares them).

        kind is "ok", "late" (after the deadline: it will count as lost), "dup", "ooo"
        (older than a later line already seen from the same sender) or "echo" (the
        server echoed a sender's own line back, which the protocol forbids).
        """
        latency = t_recv - t_send
        if sender == recipient:
            self.count("echo")
            return "echo", latency * 1000.0
        per = self.streams[recipient]
        stream = per.get(sender)
        if stream is None:
            per[sender] = _SenderStream(seq)
            kind = "ok"
        else:
            kind = stream.check(seq)
        if kind == "dup":
            self.count("dup")
            return kind, latency * 1000.0
        if line_id is not None and self._ids.setdefault((sender, seq), line_id) != line_id:
            self.count("id_mismatches")
        us = int(latency * 1_000_000)
        self._hist.add_us(us)
        if self.steady_from is not None and t_recv >= self.steady_from:
            self._steady.add_us(us)
        sec = int(t_recv)
        self._per_sec[sec] = self._per_sec.get(sec, 0) + 1
        self.count("deliveries")
        if latency <= self.deadline:
            into = self._recv
        else:
            into = self._late
            self.count("late")
            if kind == "ok":
                kind = "late"
        row = into.get((sender, seq))
        if row is None:
            into[(sender, seq)] = [t_recv, recipient]
        else:
            row[0] = max(row[0], t_recv)
            row.append(recipient)
        if kind == "ooo":
            self.count("ooo")
        return kind, latency * 1000.0

    def take_batch(self) -> dict[str, Any] | None:
        """Everything recorded since the last call, or None when there is nothing new."""
        batch: dict[str, Any] = {
            "node": self.node,
            "joins": self._joins,
            "leaves": self._leaves,
            "sends": self._sends,
            "recv": [[s, q, r[1:], r[0]] for (s, q), r in self._recv.items()],
            "late": [[s, q, r[1:], r[0]] for (s, q), r in self._late.items()],
            "hist": self._hist.to_wire(),
            "hist_max_us": self._hist.max_us,
            "steady": self._steady.to_wire(),
            "steady_max_us": self._steady.max_us,
            "lag": self._lag.to_wire(),
            "lag_max_us": self._lag.max_us,
            "per_sec": [[s, n] for s, n in self._per_sec.items()],
            "counters": {k: v for k, v in self._delta.items() if v},
            "cpu_max": self.cpu_max,
            "ids": [[s, q, i] for (s, q), i in self._ids.items()],
            "reconnect": self._reconnect.to_wire(),
            "reconnect_max_us": self._reconnect.max_us,
            "gaps": self._gaps,
        }
        empty = not any(batch[k] for k in ("joins", "leaves", "sends", "recv", "late", "hist", "counters", "gaps"))
        self._reset_batch()
        return None if empty else batch
