"""Every Prometheus metric the service exports, defined in one place.

Hot paths never touch prometheus_client objects per delivery: they bump
plain ints in ``Counters`` and a collector reads them at scrape time.
Rare events (connects, disconnects) use pre-bound labelled children.
No label ever takes a value per room or per nick, so series stay bounded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeHistogramMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from . import __version__
from .identity import AUTH_FAILURE_REASONS

DISCONNECT_REASONS = (
    "quit",
    "eof",
    "error",
    "slow_consumer",
    "outbound_budget",
    "flood",
    "line_too_long",
    "idle_timeout",
    "shutdown",
    "auth_failed",
    "auth_throttled",
    "server_full",
    "http_request",
    "kicked",
    "banned",
    "token_expired",
    # WebSocket only:
    "frame_too_big",
    "protocol_error",
    "ping_timeout",
)

TRANSPORTS = ("tcp", "ws")

# HTTP requests by what they ask for; a bounded set, whatever the path.
PATH_CLASSES = ("page", "ws", "metrics", "health", "api", "other")

WS_UPGRADE_OUTCOMES = ("accepted", "bad_request", "origin", "gone")

# Connections closed at the door, before a session started (transport.py).
REFUSED_REASONS = ("connect_rate", "max_per_ip", "pending_full", "admission_timeout", "proxy_header")

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# The *_created series double the output and no dashboard here uses them.
disable_created_metrics()

# How late the 1 s loop timer ran: a few ms is normal, 0.25 s is the p99 target, seconds a stall.
LOOP_LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

ROOM_SIZE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)


@dataclass
class Counters:
    """Hot-path counters kept as plain ints; exported at scrape time.

    Fan-out bumps these for every delivery and every write, and an int
    attribute costs far less to bump than a prometheus_client Counter, which
    takes a lock.  The hub, the sessions and the sinks share one instance.
    """

    deliveries: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    chat_messages: int = 0
    commands: int = 0
    private_messages: int = 0
    flood_delayed: int = 0
    resumes_complete: int = 0
    resumes_incomplete: int = 0
    resume_lines: int = 0
    rooms_refused: int = 0
    notices_held_back: int = 0


class Metrics:
    """The registry and the instruments; one per server process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            self.registry.register(collector)
        r = self.registry
        self.accepted = Counter("chat_connections_accepted", "Connections accepted on the chat port.", registry=r)
        self.disconnects = Counter(
            "chat_disconnects",
            "Chat members disconnected, by reason and transport.",
            ["reason", "transport"],
            registry=r,
        )
        self.by_reason = {
            transport: {reason: self.disconnects.labels(reason, transport) for reason in DISCONNECT_REASONS}
            for transport in TRANSPORTS
        }
        self.http_requests = Counter(
            "chat_http_connections", "Connections on the chat port served as HTTP.", registry=r
        )
        requests = Counter(
            "chat_http_requests", "HTTP requests (both ports), by path class.", ["path"], registry=r
        )
        self.requests_by_path = {path: requests.labels(path) for path in PATH_CLASSES}
        upgrades = Counter(
            "chat_ws_upgrades", "WebSocket upgrade requests on /ws, by outcome.", ["outcome"], registry=r
        )
        self.ws_upgrades = {outcome: upgrades.labels(outcome) for outcome in WS_UPGRADE_OUTCOMES}
        refused = Counter(
            "chat_connections_refused",
            "Connections closed at the door before a session started, by reason.",
            ["reason"],
            registry=r,
        )
        self.refused = {reason: refused.labels(reason) for reason in REFUSED_REASONS}
        self.accept_paused = Counter(
            "chat_accept_paused",
            "Times a listener stopped accepting for a moment because accept() failed, by errno (EMFILE, ...).",
            ["error"],
            registry=r,
        )
        self.fanout_latency = Histogram(
            "chat_fanout_latency_seconds",
            "From reading a line to handing it to every local recipient's queue "
            "(and writing it to every socket that could take it).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.loop_lag = Gauge(
            "chat_event_loop_lag_seconds", "How late the event loop ran a 1 s timer, last time.", registry=r
        )
        # The gauge holds one tick's lag for 1 s, so a stall shorter than the scrape interval is
        # usually gone before the next scrape; the histogram counts every tick and loses none.
        self.loop_lag_ticks = Histogram(
            "chat_event_loop_tick_lag_seconds",
            "How late each tick of the event loop's 1 s timer ran.",
            buckets=LOOP_LAG_BUCKETS,
            registry=r,
        )
        self.drain_seconds = Gauge(
            "chat_drain_seconds",
            "Seconds since the lame-duck drain began (0 while not draining).",
            registry=r,
        )
        self.auth_failures = Counter(
            "chat_auth_failures", "Refused /auth attempts, by reason.", ["reason"], registry=r
        )
        self.auth_failures_by_reason = {reason: self.auth_failures.labels(reason) for reason in AUTH_FAILURE_REASONS}
        self.api_requests = Counter(
            "chat_api_requests", "Operator API requests, by route template and status.", ["route", "status"], registry=r
        )
        self.api_replays = Counter(
            "chat_api_idempotent_replays",
            "API publishes answered from an earlier request with the same Idempotency-Key (nothing delivered).",
            registry=r,
        )
        self.bans = Gauge("chat_bans", "Bans in force, as this instance enforces them.", registry=r)
        build = Gauge("chat_build_info", "Version of the running chat-svc.", ["version"], registry=r)
        build.labels(__version__).set(1)

    def observe_latencies(self, values: Iterable[float]) -> None:
        observe = self.fanout_latency.observe
        for value in values:
            observe(value)

    def watch(
        self,
        hub: Population,
        counters: Counters,
        open_connections: Callable[[], Mapping[str, int]],
        pending_connections: Callable[[], int],
        ready: Callable[[], bool],
        max_clients: int,
        outbound: Outbound,
        retention: Retention,
    ) -> None:
        self.registry.register(
            _HubCollector(hub, counters, open_connections, pending_connections, ready, max_clients, outbound)
        )
        self.registry.register(_RetentionCollector(retention, counters))


class Population(Protocol):
    """What the collector asks the hub at scrape time (the hub implements it)."""

    def queued_bytes(self) -> list[int]:
        """Bytes queued for each member: one entry per member."""

    def room_counts(self) -> list[tuple[str, int]]:
        """Each room with members, and how many."""


class Outbound(Protocol):
    """The outbound budget as the collector sees it (``OutboundBudget`` implements it)."""

    held: int
    limit: int

    @property
    def used(self) -> int:
        """Held bytes plus the kernel buffers of backlogged members: what the budget charges."""


class Retention(Protocol):
    """What the collector asks the room logs at scrape time (``RoomLogs`` implements it)."""

    bytes: int
    budget: int
    dropped_lines: dict[str, int]
    dropped_logs: dict[str, int]

    @property
    def dormant_count(self) -> int:
        """Logs of rooms without members, kept for resumes."""

    def __len__(self) -> int:
        """Logs retained, with members or dormant."""


# Every reason a retained line or log can be dropped, exported at 0 before the first.
LINE_DROP_REASONS = ("lines", "bytes", "budget", "expired")
LOG_DROP_REASONS = ("budget", "expired")


@dataclass(eq=False)
class _RetentionCollector(Collector):
    """Room logs, resumes and the bounds that drop retained lines, read at scrape time."""

    logs: Retention
    counters: Counters

    def collect(self) -> Iterator[Metric]:
        logs, stats = self.logs, self.counters
        resumes = CounterMetricFamily("chat_resumes", "/resume answered, by outcome.", labels=["outcome"])
        resumes.add_metric(["complete"], stats.resumes_complete)
        resumes.add_metric(["incomplete"], stats.resumes_incomplete)
        yield resumes
        yield CounterMetricFamily(
            "chat_resume_lines", "Lines replayed by complete resumes.", value=stats.resume_lines
        )
        yield GaugeMetricFamily(
            "chat_history_bytes", "Bytes retained by all room logs (lines with their overhead).", value=logs.bytes
        )
        yield GaugeMetricFamily(
            "chat_history_budget_bytes", "Configured --history-budget-bytes.", value=logs.budget
        )
        rooms = GaugeMetricFamily("chat_room_logs", "Room logs retained, by state.", labels=["state"])
        rooms.add_metric(["active"], len(logs) - logs.dormant_count)
        rooms.add_metric(["dormant"], logs.dormant_count)
        yield rooms
        lines = CounterMetricFamily(
            "chat_history_dropped_lines", "Retained lines dropped from room logs, by reason.", labels=["reason"]
        )
        for reason in LINE_DROP_REASONS:
            lines.add_metric([reason], logs.dropped_lines.get(reason, 0))
        yield lines
        dropped = CounterMetricFamily(
            "chat_room_logs_dropped", "Whole room logs dropped, by reason.", labels=["reason"]
        )
        for reason in LOG_DROP_REASONS:
            dropped.add_metric([reason], logs.dropped_logs.get(reason, 0))
        yield dropped
        yield CounterMetricFamily(
            "chat_room_creations_refused",
            "Joins refused because the member brought too many rooms into being.",
            value=stats.rooms_refused,
        )


@dataclass(eq=False)  # the registry keys collectors by identity
class _HubCollector(Collector):
    """Reads the plain counters and asks the hub for its rooms and queues at scrape time."""

    hub: Population
    counters: Counters
    # Open chat-port connections by transport.
    open_connections: Callable[[], Mapping[str, int]]
    pending_connections: Callable[[], int]
    ready: Callable[[], bool]
    max_clients: int
    outbound: Outbound

    def collect(self) -> Iterator[Metric]:
        hub, stats = self.hub, self.counters
        connections = GaugeMetricFamily(
            "chat_connections", "Open connections on the chat port, by transport.", labels=["transport"]
        )
        for transport, count in self.open_connections().items():
            connections.add_metric([transport], count)
        yield connections
        yield GaugeMetricFamily(
            "chat_connections_pending",
            "Connections on the chat port not admitted yet (TLS, sniffing, HTTP, /auth).",
            value=self.pending_connections(),
        )
        sizes = hub.queued_bytes()
        yield GaugeMetricFamily("chat_members", "Chat members (joined connections).", value=len(sizes))
        yield GaugeMetricFamily(
            "chat_max_clients", "Effective --max-clients (lowered to fit the open-files limit).", value=self.max_clients
        )
        yield GaugeMetricFamily("chat_ready", "1 when /readyz answers 200.", value=1 if self.ready() else 0)
        received = CounterMetricFamily("chat_messages_received", "Lines received, by kind.", labels=["kind"])
        received.add_metric(["chat"], stats.chat_messages)
        received.add_metric(["command"], stats.commands)
        received.add_metric(["private"], stats.private_messages)
        yield received
        yield CounterMetricFamily("chat_deliveries", "Lines handed to a recipient.", value=stats.deliveries)
        yield CounterMetricFamily("chat_bytes_received", "Bytes read from chat clients.", value=stats.bytes_in)
        yield CounterMetricFamily("chat_bytes_sent", "Bytes written to chat clients.", value=stats.bytes_out)
        yield CounterMetricFamily(
            "chat_flood_delayed_lines", "Lines delayed by flood control (fakelag).", value=stats.flood_delayed
        )
        yield CounterMetricFamily(
            "chat_notices_held_back",
            "Join/leave/rename notices over --notice-rate, summed up in a line instead of shown.",
            value=stats.notices_held_back,
        )
        outbound = self.outbound
        yield GaugeMetricFamily(
            "chat_sendq_bytes",
            "Bytes held in members' outbound queues, each buffer once however many members share it.",
            value=outbound.held,
        )
        yield GaugeMetricFamily(
            "chat_sendq_max_bytes", "Largest outbound queue of any member.", value=max(sizes, default=0)
        )
        yield GaugeMetricFamily(
            "chat_outbound_bytes",
            "What the outbound budget charges: chat_sendq_bytes plus the full kernel send buffer of every "
            "member with a queue.",
            value=outbound.used,
        )
        yield GaugeMetricFamily(
            "chat_outbound_budget_bytes", "Configured --outbound-budget-bytes.", value=outbound.limit
        )
        counts = sorted(count for _, count in hub.room_counts())
        yield GaugeMetricFamily("chat_rooms", "Rooms with members on this instance.", value=len(counts))
        buckets, index = [], 0
        for bound in ROOM_SIZE_BUCKETS:
            while index < len(counts) and counts[index] <= bound:
                index += 1
            buckets.append((str(bound), index))
        buckets.append(("+Inf", len(counts)))
        yield GaugeHistogramMetricFamily(
            "chat_room_members", "Rooms by member count.", buckets=buckets, gsum_value=sum(counts)
        )
