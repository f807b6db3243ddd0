"""Wiring: config, logs, metrics, hub and listeners; start-up and graceful shutdown."""

from __future__ import annotations

import os
import resource
import signal
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import gevent
import gevent.event
import structlog

from . import __version__, logs, protocol
from .admission import FD_RESERVE, Admission, FdBudget, WaitingRoom
from .api import Api, ApiKeys
from .bans import Ban, BanList, BanStore
from .budget import OutboundBudget
from .commands import Listings
from .config import Config, load
from .directory import Directory
from .httpfront import Health, HttpFront, Route, default_routes, serve_metrics_port
from .hub import Hub, Member
from .idempotency import IdempotencyStore, LocalIdempotency
from .identity import Authenticator, ExpiryWatch
from .logs import Coalesced
from .metrics import Counters, Metrics
from .roomlog import RoomLogs
from .session import Session, SessionContext, SessionLimits
from .throttle import AddressBuckets, Networks
from .transport import ChatServer
from .webpage import Page
from .ws import WebSockets

if TYPE_CHECKING:
    from .backplane import RedisBackplane

LOOP_TICK = 1.0
LOOP_STALL = 10.0
# Seconds of the drain's last phase kept for flushing the backplane's queue and presence,
# and for closing what is left and exiting.
BACKPLANE_RESERVE = 0.5
EXIT_RESERVE = 0.3
# Refusals, failed /auth and accept pauses are logged at most once per key per interval.
LOG_INTERVAL = 10.0


class Service:
    """The running server: builds the parts, runs the background loops, answers the probes, shuts down."""

    def __init__(self, config: Config, fd_limit: int | None = None) -> None:
        self.config = config
        self.log = structlog.get_logger("chat_svc")
        self.descriptors = FdBudget.plan(fd_limit or resource.getrlimit(resource.RLIMIT_NOFILE)[0], config.max_clients)
        self.metrics = Metrics()
        self.counters = Counters()
        self.hub = Hub(
            self.counters,
            history=config.history,
            notice_threshold=config.notice_threshold,
            observe_latency=self.metrics.observe_latencies,
            logs=RoomLogs(
                config.resume_lines,
                config.resume_bytes,
                config.history_budget_bytes,
                config.resume_keep,
                local=not config.redis_url,
            ),
            notice_rate=config.notice_rate,
        )
        self.budget = OutboundBudget(config.outbound_budget_bytes)
        # Cluster mode (--redis-url): the hub relays through Redis; see backplane/.
        # Imported only then, so a single instance never loads redis.
        self.backplane: RedisBackplane | None = None
        self.bans = BanList()
        directory: Directory = self.hub
        ban_store: BanStore = self.bans
        idempotency: IdempotencyStore = LocalIdempotency()
        if config.redis_url:
            from .backplane import RedisBackplane
            from .backplane.instance import RoomBounds

            self.backplane = RedisBackplane(
                config.redis_url,
                self.hub,
                instance_id=config.instance_id,
                presence_ttl=config.presence_ttl,
                rooms=RoomBounds(config.resume_lines, config.resume_bytes, config.resume_keep),
                bans=self.bans,
            )
            self.hub.backplane = self.backplane
            self.metrics.registry.register(self.backplane.collector())
            directory = self.backplane.directory
            ban_store = self.backplane.bans
            idempotency = self.backplane.idempotency
        self.bans.on_added = self._enforce_ban
        self.metrics.bans.set_function(lambda: len(self.bans))
        self.auth = Authenticator(
            config.access_token(),
            config.jwt_key_file,
            audience=config.jwt_audience,
            issuer=config.jwt_issuer,
            require=config.require_auth,
            failures=self.metrics.auth_failures_by_reason,
        )
        self.sessions: set[Session] = set()
        self.connection_slots = Admission(per_ip_limit=config.max_per_ip)
        self.member_slots = Admission(self.descriptors.members)
        self.waiting = WaitingRoom(config.max_pending, lambda: self.descriptors.sockets - self.member_slots.count)
        self.coalesced = [
            Coalesced(self.log, "client_refused", LOG_INTERVAL),
            Coalesced(self.log, "auth_failed", LOG_INTERVAL),
            Coalesced(self.log, "accept_paused", LOG_INTERVAL),
        ]
        refusals, auth_log, self.accept_log = self.coalesced
        self.session_context = SessionContext(
            hub=self.hub,
            directory=directory,
            limits=SessionLimits.from_config(config),
            counters=self.counters,
            connection_slots=self.connection_slots,
            waiting=self.waiting,
            member_slots=self.member_slots,
            auth_failures=AddressBuckets(
                config.auth_failure_burst, config.auth_failure_rate, Networks(config.throttle_exempt)
            ),
            refusals=refusals,
            auth_log=auth_log,
            disconnects=self.metrics.by_reason,
            sessions=self.sessions,
            auth=self.auth,
            expiry=ExpiryWatch(self._token_expired),
            bans=self.bans,
            budget=self.budget,
            listings=Listings(ttl=0.0 if self.backplane is not None else 1.0),
        )
        self.shutting_down = False
        self.accepting = False
        self.loop_tick = time.monotonic()
        self.websockets = WebSockets(
            config.ws_origins,
            frame_limit=config.max_line_bytes * 4,
            ping_interval=config.ws_ping_interval,
            count_upgrade=lambda outcome: self.metrics.ws_upgrades[outcome].inc(),
        )
        self.metrics.watch(
            self.hub,
            self.counters,
            self._open_connections,
            lambda: self.waiting.count,
            lambda: self._ready()[0],
            self.descriptors.members,
            self.budget,
            self.hub.logs,
        )
        # The operator API (--api-keys-file) is served where /metrics is: on the chat
        # port, or only on --metrics-port when there is one.
        self.api_keys = ApiKeys(config.api_keys_file) if config.api_keys_file else None
        api = None
        if self.api_keys is not None:
            api = Api(
                self.api_keys,
                directory,
                ban_store,
                idempotency,
                self.metrics.api_requests,
                self.metrics.api_replays,
                max_text_bytes=config.max_line_bytes,
            )
        page = Page(lambda: int(self.server.server_port), tls=bool(config.tls_cert))
        health = Health(self._alive, self._ready)
        self.routes = default_routes(self.metrics.registry, health, page, self.metrics.requests_by_path)
        if api is not None:
            self.routes.add(Route(("/api/",), api, "api", methods=None, prefix=True))
        # With --metrics-port the operators' routes (metrics, probes, the API) leave the chat port.
        self.http = HttpFront(self.routes.app(internal=config.metrics_port is None))
        self.server = ChatServer(config, self.session_context, self.metrics, self.http, self.websockets)
        self.server.on_pause = self._accept_paused
        self.metrics_server: Any = None
        self.stopped = gevent.event.Event()
        self.exit_code = 0

    def _open_connections(self) -> dict[str, int]:
        websockets = self.websockets.open_streams
        return {"tcp": self.connection_slots.count - websockets, "ws": websockets}

    # -- health -----------------------------------------------------------

    def _alive(self) -> tuple[bool, str]:
        stalled = time.monotonic() - self.loop_tick
        if stalled > LOOP_STALL:
            return False, f"event loop stalled for {stalled:.1f}s"
        return True, "ok"

    def _ready(self) -> tuple[bool, str]:
        if self.shutting_down:
            return False, "draining"
        if not self.accepting:
            return False, "not accepting"
        if self.backplane is not None and not self.backplane.up:
            if self.config.ready_requires_backplane:
                return False, "backplane down"
            return True, "ready (degraded: backplane down)"
        return True, "ready"

    # -- the operator's reach ------------------------------------------------------

    def _enforce_ban(self, ban: Ban) -> None:
        """A ban new to this instance: its members that match it are told and disconnected."""
        notice = protocol.error_line(f"banned: {ban.reason}")
        for session in list(self.sessions):
            member = session.member
            if member is None or member.room is None:
                continue
            sub = member.identity.sub if member.identity is not None else None
            if ban.matches(member.nick, session.ip, sub):
                self.log.info("member_banned", nick=member.nick, ban=ban.id)
                self.hub.end(member, notice, "banned")

    def _token_expired(self, member: Member) -> None:
        if self.hub.member(member.nick) is member:
            self.log.info("token_expired", nick=member.nick)
            self.hub.end(member, protocol.error_line("token expired"), "token_expired")

    def reload(self) -> None:
        """SIGHUP: read --api-keys-file and --jwt-key-file again; a file that fails keeps what was loaded."""
        steps = (("api_keys", self.api_keys.load if self.api_keys else None), ("jwt_key", self.auth.reload))
        for name, step in steps:
            if step is None:
                continue
            try:
                step()
            except (OSError, ValueError) as exc:
                self.log.error("reload_failed", what=name, error=str(exc))
        self.log.info("reloaded", api_keys=len(self.api_keys) if self.api_keys else None, jwt=self.auth.accepts_jwt)

    def _expire_idle(self) -> None:
        """Drop members silent for --idle-timeout; one scan a second, no timer per member."""
        limit = self.config.idle_timeout
        notice = protocol.error_line("idle timeout")
        while True:
            gevent.sleep(min(1.0, limit / 2))
            cutoff = time.monotonic() - limit
            for session in list(self.sessions):
                member = session.member
                if member is not None and session.last_input < cutoff:
                    # After the room lines it is owed: the reason is the last line before the close.
                    self.hub.send_to(member, notice)
                    session.kill("idle_timeout")

    def _accept_paused(self, error: str, delay: float) -> None:
        self.metrics.accept_paused.labels(error).inc()
        self.accept_log.note(error, "pauses", error=error, max_delay_s=self.server.max_delay)

    def _housekeeping(self) -> None:
        """Flush the coalesced logs every second; forget refilled throttle buckets every ten."""
        ticks = 0
        while True:
            gevent.sleep(1.0)
            for coalesced in self.coalesced:
                coalesced.flush()
            ticks += 1
            if ticks % 10 == 0:
                self.server.housekeep()
                self.session_context.auth_failures.prune()

    def _watch_loop(self) -> None:
        while True:
            before = time.monotonic()
            gevent.sleep(LOOP_TICK)
            self.loop_tick = time.monotonic()
            lag = max(0.0, self.loop_tick - before - LOOP_TICK)
            self.metrics.loop_lag.set(lag)
            self.metrics.loop_lag_ticks.observe(lag)

    # -- running ----------------------------------------------------------

    def start(self) -> None:
        if self.backplane is not None:
            self.backplane.start()
        self.server.start()
        self.accepting = True
        self.websockets.start()
        gevent.spawn(self._watch_loop)
        gevent.spawn(self._housekeeping)
        if self.config.idle_timeout:
            gevent.spawn(self._expire_idle)
        config = self.config
        if config.metrics_port is not None:
            self.metrics_server = serve_metrics_port(
                config.metrics_host, config.metrics_port, self.routes.app(internal=True), config.http_timeout
            )
            self.metrics_server.on_pause = self._accept_paused
        budget = self.descriptors
        self.log.info(
            "fd_budget",
            fd_limit=budget.fd_limit,
            reserve=FD_RESERVE,
            chat_sockets=budget.sockets,
            max_clients=budget.members,
            max_clients_configured=config.max_clients,
            max_pending=config.max_pending,
        )
        self.log.info(
            "server_started",
            version=__version__,
            address=f"{config.host}:{self.server.server_port}",
            metrics_port=self.metrics_server.server_port if self.metrics_server else None,
            config=config.public(),
        )

    def shutdown(self) -> None:
        """The lame-duck drain: stay up a while unready, then close members spread out, then stop.

        Whatever goes wrong on the way, the process still stops (status 1 then).
        """
        try:
            self._drain()
        except Exception:
            self.exit_code = 1
            self.log.exception("shutdown_failed")
        finally:
            self.stopped.set()

    def _drain(self) -> None:
        """SIGTERM: /readyz 503 at once; serve --drain-delay; tell and close members over --drain-spread.

        Each member is told ``* server restarting, reconnect`` at its own
        time, after every line it is owed; from then on it gets no room lines,
        the connection is half-closed once that is written, and its input is
        still read until it closes, so a line it sent before it saw the notice
        still reaches the room.  No leave notices while draining.  Whatever is
        left at delay + spread + --shutdown-timeout is closed.
        """
        config = self.config
        started = time.monotonic()
        self.shutting_down = True
        self.metrics.drain_seconds.set_function(lambda: time.monotonic() - started)
        self.log.info("drain_started", members=len(self.hub.members), delay_s=config.drain_delay,
                      spread_s=config.drain_spread)  # fmt: skip
        gevent.sleep(config.drain_delay)
        self.accepting = False
        self.member_slots.close("server restarting")
        self.server.close()
        self.hub.draining = True
        members = len(self.hub.members)
        order = [session for session in self.sessions if session.member is not None]
        for session in self.sessions.difference(order):
            session.kill("shutdown")  # not a member yet (authenticating): nothing to resume
        spread_from = time.monotonic()
        # Told members get --shutdown-timeout after the last notice to close (the promise: an exit
        # by spread end + --shutdown-timeout); a little of it is kept for closing the rest,
        # flushing the backplane and exiting.
        reserve = EXIT_RESERVE + (BACKPLANE_RESERVE if self.backplane is not None else 0.0)
        grace = max(0.0, config.shutdown_timeout - reserve)
        deadline = spread_from + config.drain_spread + grace
        told: list[Session] = []
        next_up = 0
        while next_up < len(order) or told:
            now = time.monotonic()
            # member i is told at spread_from + spread * i / n
            due = len(order)
            if config.drain_spread > 0:
                due = min(due, int((now - spread_from) / config.drain_spread * len(order)) + 1)
            for session in order[next_up:due]:
                if not session.finished:
                    session.tell_to_go(protocol.RESTARTING)
                    told.append(session)
            if next_up < len(order) <= due:  # the last one told now: the grace counts from here
                deadline = min(deadline, now + grace)
            next_up = max(next_up, due)
            told = [session for session in told if _still_writing(session)]
            if now >= deadline:
                break
            gevent.sleep(0.01)
        while self.sessions and time.monotonic() < deadline:
            gevent.sleep(0.01)
        for session in list(self.sessions):
            session.kill("shutdown")
        if self.backplane is not None:
            self.backplane.stop(timeout=BACKPLANE_RESERVE)
        if self.metrics_server is not None:
            self.metrics_server.close()
        seconds = round(time.monotonic() - started, 3)
        self.metrics.drain_seconds.set_function(lambda: seconds)
        self.log.info("drain_complete", members=members, seconds=seconds)


def _still_writing(session: Session) -> bool:
    """A told member whose notice (and what it was owed before it) is still being written.

    Once it is written the connection is half-closed and the session reads
    on until the client closes: it is no longer the drain's to watch.
    """
    if session.finished:
        return False
    if session.outbox.size:
        return True
    session.half_close()
    return False


def _raise_fd_limit() -> int:
    """Take the hard open-files limit: each member costs one descriptor."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def run(argv: Sequence[str] | None = None) -> int:
    config = load(argv)
    logs.configure(config.log_format, config.log_level)
    fd_limit = _raise_fd_limit()
    try:
        svc = Service(config, fd_limit)
    except (OSError, ValueError) as exc:  # an unreadable key file, a bad key
        structlog.get_logger("chat_svc").error("startup_failed", error=str(exc))
        return 1
    try:
        svc.start()
    except OSError as exc:
        svc.log.error("listen_failed", error=str(exc), port=config.port)
        return 1
    signals_seen: list[int] = []

    def on_signal(signum: int) -> None:
        signals_seen.append(signum)
        if len(signals_seen) > 1:
            svc.log.warning("shutdown_forced", signal=signal.Signals(signum).name)
            sys.stdout.flush()
            os._exit(1)
        svc.log.info("signal_received", signal=signal.Signals(signum).name)
        gevent.spawn(svc.shutdown)

    for signum in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(signum, on_signal, signum)
    gevent.signal_handler(signal.SIGHUP, svc.reload)
    svc.stopped.wait()
    return svc.exit_code
