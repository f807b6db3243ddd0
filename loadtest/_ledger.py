"""The swarm's judge of fan-out, free of Locust and gevent so it can be unit-tested.

The ``Ledger`` lives in the process that judges loss (the local process, or the master in
distributed mode). It applies the ``Recorder`` batches of every node, keeps the swarm-side
room membership (who had *completed* joining, and who had not started leaving) and, once
a line's deadline has passed, decides which expected recipients never got it.

Membership "at send time" is tracked here rather than read from the server's
``joined``/``left`` notices, because the server suppresses notices in rooms above
``--notice-threshold`` members. A member B is expected to receive A's line M iff B's
join was confirmed by the server before A sent M and B did not start leaving before M's
deadline. Both timestamps come from ``time.time()`` on the swarm side, so distributed
runs across machines need synchronised clocks (NTP); on one host they share one clock.

In resume mode a member the server dropped stays a member while it reconnects: the replay
of its resume must bring every line it missed. Only an incomplete resume (the server said
lines may be missing) excuses it, for the lines whose deadline window overlaps its absence
(a *gap*). Every member must see a line under the same message id, whichever instance it
is connected to: ids are cluster-wide.

A lost delivery is either *late* (it arrived, after the deadline) or *never* arrived.
Both count as loss: the deadline is the delivery contract. Lines are judged at deadline
+ grace, so a receipt that comes later still moves its delivery from never to late.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from loadtest._histogram import LatencyHistogram
from loadtest._recorder import COUNTER_NAMES

# Event-loop lag p99 above which a swarm process could not read its sockets in time.
SWARM_LAG_WARN_MS = 20.0
SWARM_CPU_WARN_PCT = 90.0
LOST_SAMPLE = 20


@dataclass
class Member:
    """Swarm-side view of one connection's room membership."""

    room: str
    node: str
    join_t: float
    leave_t: float | None = None
    transport: str = "tcp"
    # (dropped, back) of each incomplete resume: lines around then are not expected
    gaps: list[tuple[float, float]] = field(default_factory=list)


@dataclass
class _Msg:
    room: str
    node: str
    t_send: float
    received: set[str] = field(default_factory=set)
    late: set[str] = field(default_factory=set)
    last_recv: float = 0.0
    line_id: str | None = None


@dataclass
class JudgedLine:
    """The verdict on one chat line: who was expected, who missed it, how long it took.

    ``complete_ms`` is the time from the send to its last receipt, once every expected
    member had it (None when someone missed it).
    """

    sender: str
    seq: int
    room: str
    expected: int
    missing: list[str]
    late: int
    cross_node: int
    complete_ms: float | None


class Ledger:
    """Judges fan-out over the whole swarm from the batches of every node.

    ``grace`` is how long after a message's deadline the verdict waits, to let batches
    from other nodes arrive (a worker flushes every 0.5 s).
    """

    def __init__(self, deadline: float, grace: float, resume: bool = False) -> None:
        self.deadline = deadline
        self.grace = grace
        self.resume = resume
        self.members: dict[str, Member] = {}
        self.room_members: dict[str, list[str]] = defaultdict(list)
        self.pending: dict[tuple[str, int], _Msg] = {}
        self.orphans: dict[tuple[str, int], tuple[float, set[str], set[str]]] = {}
        self.done: set[tuple[str, int]] = set()
        # judged lines still missing someone: a receipt arriving now makes it "late"
        self.missing: dict[tuple[str, int], set[str]] = {}
        self.hist = LatencyHistogram()
        self.steady_hist = LatencyHistogram()
        self.lag_hist = LatencyHistogram()
        self.reconnect_hist = LatencyHistogram()
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
        # "sender's transport->member's transport" -> [expected, lost]: fan-out across transports
        self.by_transport: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        self.unjudged_messages = 0
        # the first lost lines, for the JSON summary: which sender, when, who missed it
        self.lost_sample: list[dict[str, Any]] = []
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
        for room, nick, t, transport in batch["joins"]:
            self.members[nick] = Member(room, node, t, transport=transport)
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
        for nick, t_off, t_on in batch.get("gaps", ()):
            m = self.members.get(nick)
            if m is not None:
                m.gaps.append((t_off, t_on))
        for in_time, rows in ((True, batch["recv"]), (False, batch["late"])):
            for sender, seq, recipients, last_t in rows:
                self._receipts((sender, seq), recipients, last_t, in_time, now)
        for sender, seq, line_id in batch.get("ids", ()):
            line = self.pending.get((sender, seq))
            if line is None:
                continue  # judged already: its id was compared while it was pending
            if line.line_id is None:
                line.line_id = line_id
            elif line.line_id != line_id:
                self.counters["id_mismatches"] = self.counters.get("id_mismatches", 0) + 1
        self.reconnect_hist.merge_wire(batch.get("reconnect", []), batch.get("reconnect_max_us", 0))
        self.hist.merge_wire(batch["hist"], batch.get("hist_max_us", 0))
        self.steady_hist.merge_wire(batch.get("steady", []), batch.get("steady_max_us", 0))
        self.lag_hist.merge_wire(batch.get("lag", []), batch.get("lag_max_us", 0))
        for sec, n in batch["per_sec"]:
            self.per_sec[sec] += n
        for k, v in batch["counters"].items():
            self.counters[k] = self.counters.get(k, 0) + v
        self.cpu_max[node] = max(self.cpu_max.get(node, 0.0), batch.get("cpu_max", 0.0))

    def _receipts(self, key: tuple[str, int], recipients: list[str], last_t: float, in_time: bool, now: float) -> None:
        msg = self.pending.get(key)
        if msg is not None:
            (msg.received if in_time else msg.late).update(recipients)
            msg.last_recv = max(msg.last_recv, last_t)
            return
        missing = self.missing.get(key)
        if missing is not None:
            # judged already: whatever arrives now arrived (or reached the judge) too late
            arrived = missing.intersection(recipients)
            missing -= arrived
            self.lost_late += len(arrived)
            if not missing:
                del self.missing[key]
        elif key not in self.done:
            _t0, rec, late = self.orphans.setdefault(key, (now, set(), set()))
            (rec if in_time else late).update(recipients)

    # -- verdicts --------------------------------------------------------------

    def expected(self, msg: _Msg, sender: str) -> list[str]:
        """Members that must get ``msg``: joined before it was sent, stayed past its deadline."""
        out = []
        horizon = msg.t_send + self.deadline
        for nick in self.room_members.get(msg.room, ()):
            if nick == sender:
                continue
            m = self.members[nick]
            present = m.join_t <= msg.t_send and (m.leave_t is None or m.leave_t > horizon)
            if present and not any(t_off <= horizon and msg.t_send <= t_on for t_off, t_on in m.gaps):
                out.append(nick)
        return out

    def sweep(self, now: float, final: bool = False) -> list[JudgedLine]:
        """Judge every line whose deadline (plus grace) has passed; return the verdicts.

        With ``final`` (all batches are in, sending has stopped) the grace is waived and
        lines already received by every expected member are judged even before their
        deadline; only incomplete lines still inside their deadline are left out, as
        "unjudged", rather than guessed at.
        """
        judged: list[JudgedLine] = []
        due = now - self.deadline - (0.0 if final else self.grace)

        def ready(key: tuple[str, int], m: _Msg) -> bool:
            if m.t_send <= due:
                return True
            return final and all(r in m.received for r in self.expected(m, key[0]))

        for key in [k for k, m in self.pending.items() if ready(k, m)]:
            judged.append(self._judge(key, self.pending.pop(key)))
        if final:
            self.unjudged_messages += len(self.pending)
            self.pending.clear()
        for key in [k for k, o in self.orphans.items() if final or o[0] < due - 5.0]:
            self.unknown_receipts += len(self.orphans.pop(key)[1])
        return judged

    def _judge(self, key: tuple[str, int], msg: _Msg) -> JudgedLine:
        self.done.add(key)
        sender, seq = key
        expected = self.expected(msg, sender)
        self.judged_messages += 1
        self.expected_deliveries += len(expected)
        missing = [n for n in expected if n not in msg.received]
        self.delivered_in_time += len(expected) - len(missing)
        self.unexpected_deliveries += len(msg.received) - (len(expected) - len(missing))
        self.cross_node_deliveries += sum(1 for n in expected if n in msg.received and self.members[n].node != msg.node)
        origin = self.members[sender].transport if sender in self.members else "?"
        for nick in expected:
            pair = self.by_transport[f"{origin}->{self.members[nick].transport}"]
            pair[0] += 1
            pair[1] += nick not in msg.received
        late = sum(1 for n in missing if n in msg.late)
        cross = sum(1 for n in missing if self.members[n].node != msg.node)
        complete_ms = None
        if missing:
            self.lost_messages += 1
            self.lost_deliveries += len(missing)
            self.lost_late += late
            self.lost_cross_node += cross
            if len(self.lost_sample) < LOST_SAMPLE:
                sample = {"sender": sender, "seq": seq, "room": msg.room, "t_send": msg.t_send, "id": msg.line_id}
                self.lost_sample.append(sample | {"expected": len(expected), "missing": sorted(missing)[:5]})
            never = {n for n in missing if n not in msg.late}
            if never:
                self.missing[key] = never
        elif expected:
            complete_ms = (msg.last_recv - msg.t_send) * 1000.0
        return JudgedLine(sender, seq, msg.room, len(expected), missing, late, cross, complete_ms)

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
        cpu = max(self.cpu_max.values(), default=0.0)
        lag_p99 = self.lag_hist.percentile_ms(0.99)
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
            "by_transport": {
                pair: {"expected": e, "lost": lost} for pair, (e, lost) in sorted(self.by_transport.items())
            },
            "unexpected_deliveries": self.unexpected_deliveries,
            "lost_sample": self.lost_sample,
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
            "resume_mode": self.resume,
            "server_closes": self.counters.get("server_closes", 0),
            "resumes_complete": self.counters.get("resumes_complete", 0),
            "resumes_incomplete": self.counters.get("resumes_incomplete", 0),
            "reconnect_retries": self.counters.get("reconnect_retries", 0),
            "deduped": self.counters.get("deduped", 0),
            "id_mismatches": self.counters.get("id_mismatches", 0),
            "reconnect_p50_ms": self.reconnect_hist.percentile_ms(0.50),
            "reconnect_p99_ms": self.reconnect_hist.percentile_ms(0.99),
            "reconnect_max_ms": self.reconnect_hist.max_us / 1000.0 if self.reconnect_hist.total else None,
            "swarm_cpu_max": cpu,
            "swarm_lag_p99_ms": lag_p99,
            "swarm_lag_max_ms": self.lag_hist.max_us / 1000.0 if self.lag_hist.total else None,
            "swarm_starved": cpu >= SWARM_CPU_WARN_PCT or (lag_p99 is not None and lag_p99 >= SWARM_LAG_WARN_MS),
        }
