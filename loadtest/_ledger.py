"""Fan-out bookkeeping for the chat swarm, free of Locust and gevent so it can be unit-tested.

Three pieces, one per role:

* ``Recorder`` lives in every process that runs users (a local run or a worker). Users
  report joins, leaves, sends and receipts to it. Per-recipient ordering checks
  (duplicates, out-of-order) happen here because only the recipient's process sees its
  stream in order. Everything else is batched (``take_batch``) and shipped as plain
  lists, which is what Locust's msgpack messaging carries.
* ``Ledger`` lives in the process that judges loss (the local process, or the master in
  distributed mode). It applies batches from every node, keeps the swarm-side room
  membership (who had *completed* joining, and who had not started leaving) and, once a
  message's deadline has passed, decides which expected recipients never got it.
* ``evaluate``/``format_summary`` turn the totals into the threshold table.

Membership "at send time" is tracked here rather than read from the server's
``joined``/``left`` notices, because the server suppresses notices in rooms above
``--notice-threshold`` members. A member B is expected to receive A's message M iff B's
join was confirmed by the server before A sent M and B did not start leaving before M's
deadline. Both timestamps come from ``time.time()`` on the swarm side, so distributed
runs across machines need synchronised clocks (NTP); on one host they share one clock.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

# ---------------------------------------------------------------------------
# latency histogram


class LatencyHistogram:
    """Exact-count, log-bucketed latency histogram that merges across processes.

    Every delivery is counted here (cheap: one ``log`` and one dict increment) while
    only a sample is fired as a Locust request event, so thresholds are judged on all
    deliveries without paying Locust's per-event cost. Buckets are 1/64 of an e-fold of
    microseconds (about 1.6 % wide); percentiles report the bucket's upper edge, so they
    err on the pessimistic side.
    """

    SCALE = 64

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.total = 0
        self.max_us = 0

    def add_us(self, us: int) -> None:
        """Count one latency given in microseconds."""
        us = max(us, 1)
        k = int(math.log(us) * self.SCALE)
        self.counts[k] = self.counts.get(k, 0) + 1
        self.total += 1
        if us > self.max_us:
            self.max_us = us

    def merge_wire(self, wire: list[list[int]], max_us: int = 0) -> None:
        """Add counts shipped by ``to_wire`` from another process."""
        for k, n in wire:
            self.counts[k] = self.counts.get(k, 0) + n
            self.total += n
        self.max_us = max(self.max_us, max_us)

    def to_wire(self) -> list[list[int]]:
        """Counts as ``[[bucket, count], ...]`` (msgpack-friendly)."""
        return [[k, n] for k, n in self.counts.items()]

    def percentile_ms(self, q: float) -> float | None:
        """Latency in ms below which a fraction ``q`` of deliveries fall (None when empty)."""
        if self.total == 0:
            return None
        rank = max(1, math.ceil(q * self.total))
        seen = 0
        for k in sorted(self.counts):
            seen += self.counts[k]
            if seen >= rank:
                return min(math.exp((k + 1) / self.SCALE), float(self.max_us)) / 1000.0
        return self.max_us / 1000.0


# ---------------------------------------------------------------------------
# per-process recorder


class _SenderStream:
    """What one recipient has seen from one sender: highest seq plus the gaps below it."""

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
        self._recv: dict[tuple[str, int], list[str]] = {}
        self._late: dict[tuple[str, int], list[str]] = {}
        self._hist = LatencyHistogram()
        self._steady = LatencyHistogram()
        self._lag = LatencyHistogram()
        self._per_sec: dict[int, int] = {}
        self._delta: dict[str, int] = dict.fromkeys(COUNTER_NAMES, 0)

    def count(self, name: str, n: int = 1) -> None:
        """Bump a counter (disconnects, failures, ...) that the judge sums over nodes."""
        self.counters[name] += n
        self._delta[name] += n

    def loop_lag(self, seconds: float) -> None:
        """How late a timer fired in this process: time it could not spend reading sockets."""
        self._lag.add_us(int(seconds * 1_000_000))

    def joined(self, room: str, nick: str, t: float) -> None:
        """``nick`` is a member of ``room`` from ``t`` on (server confirmed the join)."""
        self._joins.append([room, nick, t])

    def left(self, nick: str, t: float) -> None:
        """``nick`` stops being a member at ``t`` (leaving started or connection lost)."""
        self._leaves.append([nick, t])
        self.streams.pop(nick, None)

    def sent(self, room: str, nick: str, seq: int, t_send: float) -> None:
        """``nick`` sent message ``seq`` into ``room`` at ``t_send``."""
        self._sends.append([room, nick, seq, t_send])
        self.count("sent")

    def received(self, recipient: str, sender: str, seq: int, t_send: float, t_recv: float) -> tuple[str, float]:
        """Record a chat line seen by ``recipient``; returns (kind, latency_ms).

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
        us = int(latency * 1_000_000)
        self._hist.add_us(us)
        if self.steady_from is not None and t_recv >= self.steady_from:
            self._steady.add_us(us)
        sec = int(t_recv)
        self._per_sec[sec] = self._per_sec.get(sec, 0) + 1
        self.count("deliveries")
        key = (sender, seq)
        if latency <= self.deadline:
            self._recv.setdefault(key, []).append(recipient)
        else:
            self._late.setdefault(key, []).append(recipient)
            self.count("late")
            if kind == "ok":
                kind = "late"
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
            "recv": [[s, q, r] for (s, q), r in self._recv.items()],
            "late": [[s, q, r] for (s, q), r in self._late.items()],
            "hist": self._hist.to_wire(),
            "hist_max_us": self._hist.max_us,
            "steady": self._steady.to_wire(),
            "steady_max_us": self._steady.max_us,
            "lag": self._lag.to_wire(),
            "lag_max_us": self._lag.max_us,
            "per_sec": [[s, n] for s, n in self._per_sec.items()],
            "counters": {k: v for k, v in self._delta.items() if v},
            "cpu_max": self.cpu_max,
        }
        empty = not any(batch[k] for k in ("joins", "leaves", "sends", "recv", "late", "hist", "counters"))
        self._reset_batch()
        return None if empty else batch


# ---------------------------------------------------------------------------
# the judge


@dataclass
class Member:
    """Swarm-side view of one connection's room membership."""

    room: str
    node: str
    join_t: float
    leave_t: float | None = None


@dataclass
class _Msg:
    room: str
    node: str
    t_send: float
    received: set[str] = field(default_factory=set)
    late: set[str] = field(default_factory=set)


@dataclass
class LostMessage:
    """Verdict for one message that not every expected member received in time."""

    sender: str
    seq: int
    room: str
    missing: list[str]
    late: int
    cross_node: int


class Ledger:
    """Judges fan-out over the whole swarm from the batches of every node.

    ``grace`` is how long after a message's deadline the verdict waits, to let batches
    from other nodes arrive (a worker flushes every 0.5 s).
    """

    def __init__(self, deadline: float, grace: float) -> None:
        self.deadline = deadline
        self.grace = grace
        self.members: dict[str, Member] = {}
        self.room_members: dict[str, list[str]] = defaultdict(list)
        self.pending: dict[tuple[str, int], _Msg] = {}
        self.orphans: dict[tuple[str, int], tuple[float, set[str], set[str]]] = {}
        self.done: set[tuple[str, int]] = set()
        self.hist = LatencyHistogram()
        self.steady_hist = LatencyHistogram()
        self.lag_hist = LatencyHistogram()
        self.per_sec: dict[int, int] = defaultdict(int)
        self.counters: dict[str, int] = dict.fromkeys(COUNTER_NAMES, 0)
        self.cpu_max: dict[str, float] = {}
        self.nodes: set[str] = set()
        self.judged_messages = 0
        self.expected_deliveries = 0
        self.delivered_in_time = 0
        self.lost_deliveries = 0
        self.lost_late = 0
        self.lost_cross_node = 0
        self.lost_messages = 0
        self.cross_node_deliveries = 0
        self.unexpected_deliveries = 0
        self.unjudged_messages = 0
        self.unknown_receipts = 0
        self.window: tuple[float | None, float | None] = (None, None)
        self.first_send: float | None = None
        self.last_send: float | None = None
        self.frozen_at: float | None = None

    # -- input -----------------------------------------------------------------

    def apply(self, batch: dict[str, Any], now: float) -> None:
        """Merge one node's batch (from ``Recorder.take_batch``)."""
        node = batch["node"]
        self.nodes.add(node)
        for room, nick, t in batch["joins"]:
            self.members[nick] = Member(room, node, t)
            self.room_members[room].append(nick)
        for nick, t in batch["leaves"]:
            m = self.members.get(nick)
            if self.frozen_at is not None and t >= self.frozen_at:
                continue  # the test stopping its users, after every verdict was settled
            if m is not None and m.leave_t is None:
                m.leave_t = t
        for room, nick, seq, t_send in batch["sends"]:
            key = (nick, seq)
            msg = _Msg(room, node, t_send)
            orphan = self.orphans.pop(key, None)
            if orphan is not None:
                msg.received |= orphan[1]
                msg.late |= orphan[2]
            self.pending[key] = msg
            if self.first_send is None or t_send < self.first_send:
                self.first_send = t_send
            if self.last_send is None or t_send > self.last_send:
                self.last_send = t_send
        for attr, rows in (("received", batch["recv"]), ("late", batch["late"])):
            for sender, seq, recipients in rows:
                key = (sender, seq)
                msg = self.pending.get(key)
                if msg is not None:
                    getattr(msg, attr).update(recipients)
                elif key not in self.done:
                    _t0, rec, late = self.orphans.setdefault(key, (now, set(), set()))
                    (rec if attr == "received" else late).update(recipients)
        self.hist.merge_wire(batch["hist"], batch.get("hist_max_us", 0))
        self.steady_hist.merge_wire(batch.get("steady", []), batch.get("steady_max_us", 0))
        self.lag_hist.merge_wire(batch.get("lag", []), batch.get("lag_max_us", 0))
        for sec, n in batch["per_sec"]:
            self.per_sec[sec] += n
        for k, v in batch["counters"].items():
            self.counters[k] = self.counters.get(k, 0) + v
        self.cpu_max[node] = max(self.cpu_max.get(node, 0.0), batch.get("cpu_max", 0.0))

    # -- verdicts --------------------------------------------------------------

    def expected(self, msg: _Msg, sender: str) -> list[str]:
        """Members that must get ``msg``: joined before it was sent, stayed past its deadline."""
        out = []
        horizon = msg.t_send + self.deadline
        for nick in self.room_members.get(msg.room, ()):
            if nick == sender:
                continue
            m = self.members[nick]
            if m.join_t <= msg.t_send and (m.leave_t is None or m.leave_t > horizon):
                out.append(nick)
        return out

    def sweep(self, now: float, final: bool = False) -> list[LostMessage]:
        """Judge every message whose deadline (plus grace) has passed; return the lost ones.

        With ``final`` (all batches are in, sending has stopped) the grace is waived and
        messages already received by every expected member are judged even before their
        deadline; only incomplete messages still inside their deadline are left out, as
        "unjudged", rather than guessed at.
        """
        lost: list[LostMessage] = []
        due = now - self.deadline - (0.0 if final else self.grace)

        def ready(key: tuple[str, int], m: _Msg) -> bool:
            if m.t_send <= due:
                return True
            return final and all(r in m.received for r in self.expected(m, key[0]))

        for key in [k for k, m in self.pending.items() if ready(k, m)]:
            msg = self.pending.pop(key)
            self.done.add(key)
            sender, seq = key
            expected = self.expected(msg, sender)
            self.judged_messages += 1
            self.expected_deliveries += len(expected)
            missing = [n for n in expected if n not in msg.received]
            self.delivered_in_time += len(expected) - len(missing)
            self.unexpected_deliveries += len(msg.received) - (len(expected) - len(missing))
            self.cross_node_deliveries += sum(
                1 for n in expected if n in msg.received and self.members[n].node != msg.node
            )
            if missing:
                late = sum(1 for n in missing if n in msg.late)
                cross = sum(1 for n in missing if self.members[n].node != msg.node)
                self.lost_messages += 1
                self.lost_deliveries += len(missing)
                self.lost_late += late
                self.lost_cross_node += cross
                lost.append(LostMessage(sender, seq, msg.room, missing, late, cross))
        if final:
            self.unjudged_messages += len(self.pending)
            self.pending.clear()
        for key in [k for k, o in self.orphans.items() if final or o[0] < due - 5.0]:
            self.unknown_receipts += len(self.orphans.pop(key)[1])
        return lost

    def unresolved(self, now: float) -> int:
        """Messages within their deadline still missing an expected recipient.

        Used to end the drain early: once this is 0, waiting longer cannot change a
        verdict (overdue messages are already lost, so they are not waited for).
        """
        n = 0
        for (sender, _seq), msg in self.pending.items():
            if msg.t_send + self.deadline < now:
                continue
            if any(r not in msg.received for r in self.expected(msg, sender)):
                n += 1
        return n

    # -- report ----------------------------------------------------------------

    def deliveries_per_s(self) -> float:
        """Deliveries per second over the measurement window (whole seconds inside it)."""
        start, end = self.window
        start = start if start is not None else self.first_send
        end = end if end is not None else self.last_send
        if start is None or end is None or end <= start:
            return 0.0
        lo, hi = math.ceil(start), math.floor(end)
        if hi - lo >= 1:
            return sum(self.per_sec.get(s, 0) for s in range(lo, hi)) / (hi - lo)
        total = sum(n for s, n in self.per_sec.items() if start - 1 <= s <= end)
        return total / (end - start)

    def totals(self) -> dict[str, Any]:
        """Every number the summary and the capacity sweep need, JSON-ready."""
        expected = self.expected_deliveries
        start, end = self.window
        steady = self.steady_hist.total > 0
        lat = self.steady_hist if steady else self.hist
        return {
            "nodes": len(self.nodes),
            "members": len(self.members),
            "rooms": len(self.room_members),
            "messages_sent": self.counters.get("sent", 0),
            "messages_judged": self.judged_messages,
            "messages_unjudged": self.unjudged_messages,
            "messages_lost": self.lost_messages,
            "expected_deliveries": expected,
            "delivered_in_time": self.delivered_in_time,
            "lost_deliveries": self.lost_deliveries,
            "lost_late": self.lost_late,
            "lost_never": self.lost_deliveries - self.lost_late,
            "lost_cross_node": self.lost_cross_node,
            "cross_node_deliveries": self.cross_node_deliveries,
            "unexpected_deliveries": self.unexpected_deliveries,
            "unknown_receipts": self.unknown_receipts,
            "loss_ratio": (self.lost_deliveries / expected) if expected else 0.0,
            "deliveries": self.counters.get("deliveries", 0),
            "deliveries_per_s": self.deliveries_per_s(),
            "window_s": (end - start) if start is not None and end is not None else None,
            "latency_scope": "after ramp-up" if steady else "whole run",
            "p50_ms": lat.percentile_ms(0.50),
            "p95_ms": lat.percentile_ms(0.95),
            "p99_ms": lat.percentile_ms(0.99),
            "max_ms": lat.max_us / 1000.0 if lat.total else None,
            "run_p50_ms": self.hist.percentile_ms(0.50),
            "run_p99_ms": self.hist.percentile_ms(0.99),
            "run_max_ms": self.hist.max_us / 1000.0 if self.hist.total else None,
            "duplicates": self.counters.get("dup", 0),
            "out_of_order": self.counters.get("ooo", 0),
            "echoes": self.counters.get("echo", 0),
            "server_errors": self.counters.get("server_errors", 0),
            "disconnects": self.counters.get("disconnects", 0),
            "connect_failures": self.counters.get("connect_failures", 0),
            "join_failures": self.counters.get("join_failures", 0),
            "swarm_cpu_max": max(self.cpu_max.values(), default=0.0),
            "swarm_lag_p99_ms": self.lag_hist.percentile_ms(0.99),
            "swarm_lag_max_ms": self.lag_hist.max_us / 1000.0 if self.lag_hist.total else None,
        }


# ---------------------------------------------------------------------------
# thresholds and the summary table


@dataclass
class Check:
    """One row of the summary table."""

    name: str
    threshold: str
    result: str
    ok: bool
    checked: bool = True


SWARM_LAG_WARN_MS = 20.0


def _fmt_ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f} ms"


def evaluate(
    totals: dict[str, Any],
    max_p99_ms: float | None,
    max_loss_ratio: float | None,
    min_deliveries_per_s: float | None,
    user_exceptions: int = 0,
) -> list[Check]:
    """Compare the run's totals with the thresholds; unset thresholds are shown, not checked."""
    checks: list[Check] = []
    ratio = totals["loss_ratio"]
    checks.append(
        Check(
            "fan-out loss ratio",
            "not set" if max_loss_ratio is None else f"<= {max_loss_ratio:g}",
            f"{ratio:.4g} ({totals['lost_deliveries']}/{totals['expected_deliveries']} deliveries,"
            f" {totals['messages_lost']} msgs)",
            max_loss_ratio is None or ratio <= max_loss_ratio,
            max_loss_ratio is not None,
        )
    )
    p99 = totals["p99_ms"]
    checks.append(
        Check(
            f"fan-out p99 ({totals.get('latency_scope', 'whole run')})",
            "not set" if max_p99_ms is None else f"<= {max_p99_ms:g} ms",
            _fmt_ms(p99),
            max_p99_ms is None or (p99 is not None and p99 <= max_p99_ms),
            max_p99_ms is not None,
        )
    )
    dps = totals["deliveries_per_s"]
    checks.append(
        Check(
            "deliveries/s",
            "not set" if min_deliveries_per_s is None else f">= {min_deliveries_per_s:g}",
            f"{dps:.1f}",
            min_deliveries_per_s is None or dps >= min_deliveries_per_s,
            min_deliveries_per_s is not None,
        )
    )
    checks.append(
        Check(
            "messages verified",
            "> 0",
            f"{totals['messages_judged']} ({totals['expected_deliveries']} deliveries expected)",
            totals["expected_deliveries"] > 0,
        )
    )
    for name, key in (
        ("duplicates", "duplicates"),
        ("out-of-order", "out_of_order"),
        ("echoed to sender", "echoes"),
        ("server error lines (!)", "server_errors"),
        ("server disconnects", "disconnects"),
        ("connect failures", "connect_failures"),
        ("join failures", "join_failures"),
    ):
        checks.append(Check(name, "= 0", str(totals[key]), totals[key] == 0))
    checks.append(Check("user exceptions", "= 0", str(user_exceptions), user_exceptions == 0))
    return checks


def format_summary(totals: dict[str, Any], checks: list[Check], title: str) -> str:
    """Render the thresholds-vs-results table plus the details a reader needs."""
    w0 = max(len(c.name) for c in checks)
    w1 = max(len("threshold"), *(len(c.threshold) for c in checks))
    w2 = max(len("result"), *(len(c.result) for c in checks))
    lines = [title, f"{'check':<{w0}}  {'threshold':<{w1}}  {'result':<{w2}}  verdict"]
    lines.append("-" * len(lines[-1]))
    for c in checks:
        verdict = ("ok" if c.ok else "FAIL") if c.checked else "-"
        lines.append(f"{c.name:<{w0}}  {c.threshold:<{w1}}  {c.result:<{w2}}  {verdict}")
    t = totals
    counts = f"messages sent {t['messages_sent']}, judged {t['messages_judged']}, unjudged {t['messages_unjudged']}"
    deliveries = (
        f"deliveries {t['deliveries']} (expected {t['expected_deliveries']}, "
        f"in time {t['delivered_in_time']}, cross-worker {t['cross_node_deliveries']})"
    )
    lines.append(f"{counts}; {deliveries}")
    lost = (
        f"lost deliveries {t['lost_deliveries']} (arrived late {t['lost_late']}, "
        f"never {t['lost_never']}, cross-worker {t['lost_cross_node']})"
    )
    pcts = " ".join(f"{q} {_fmt_ms(t[q + '_ms'])}" for q in ("p50", "p95", "p99", "max"))
    lines.append(f"{lost}; latency ({t['latency_scope']}) {pcts}")
    run = " ".join(f"{q} {_fmt_ms(t['run_' + q + '_ms'])}" for q in ("p50", "p99", "max"))
    lines.append(f"latency over the whole run incl. ramp-up: {run}")
    cpu = t["swarm_cpu_max"]
    lag = t.get("swarm_lag_p99_ms")
    lines.append(
        f"swarm: {t['nodes']} node(s), {t['members']} connections, {t['rooms']} rooms, "
        f"max CPU {cpu:.0f}% per process, event-loop lag p99 {_fmt_ms(lag)} "
        f"max {_fmt_ms(t.get('swarm_lag_max_ms'))}"
    )
    if cpu >= 90 or (lag is not None and lag >= SWARM_LAG_WARN_MS):
        lines.append(
            "WARNING: the swarm itself was short of CPU (busy or starved by other processes);"
            " its latencies include that delay. Use --processes or a quieter machine."
        )
    failed = [c for c in checks if not c.ok]
    if failed:
        lines.append("RESULT: FAIL - " + "; ".join(f"{c.name} {c.result} violates {c.threshold}" for c in failed))
    else:
        lines.append("RESULT: PASS")
    return "\n".join(lines)
