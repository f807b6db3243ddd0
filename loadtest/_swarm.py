"""ChatUser and the Locust plumbing that verifies fan-out across the whole swarm.

Kept out of the locustfile (``loadtest/chat.py`` only re-exports ``ChatUser``) so the
event listeners are registered exactly once however Locust imports the directory.

Process roles:

* local run (``locust -f loadtest``): users feed a ``Recorder``; every 0.5 s its batch is
  applied to a ``Ledger`` in the same process, which judges loss and fires failures.
* distributed (``--master``/``--worker``/``--processes``): workers ship the same batches
  to the master with ``runner.send_message("chat_batch", ...)``; the master's ``Ledger``
  sees every send, join and receipt of the swarm, so a line sent on worker A and lost on
  its way to a member on worker B is caught. The master tells workers the run id and
  worker count (``chat_setup``, sent before the first spawn message, so room assignment
  mixes users of all workers) and when to stop sending (``chat_drain``).

End of a run: on ``test_stopping`` (fired before users are stopped) the judge asks every
node to stop sending, then waits until every message still inside its deadline has
reached all expected members (or the deadline passed), so stopping the test does not
itself look like loss. ``test_stop`` then judges what is left and prints the summary.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import secrets
import socket as _stdsocket
import sys
import time
from typing import Any

import gevent
import gevent.event
from gevent import socket
from locust import User, events, task
from locust.env import Environment
from locust.runners import MasterRunner, WorkerRunner

from loadtest._ledger import Ledger, LostMessage, Recorder, evaluate, format_summary

log = logging.getLogger("chat-swarm")

DEFAULT_HOST = "tcp://127.0.0.1:9009"
FLUSH_INTERVAL = 0.5  # worker -> judge batch period
SWEEP_INTERVAL = 0.5  # how often the judge looks for overdue messages
DISTRIBUTED_GRACE = 1.5  # extra wait past a deadline for other workers' batches
LOCAL_GRACE = FLUSH_INTERVAL + 0.2


class LostMessageError(Exception):
    """A chat line that not every member of its room (at send time) got before the deadline."""


class DuplicateError(Exception):
    """A member received the same chat line twice."""


class OutOfOrderError(Exception):
    """A member received a sender's line after a later line of the same sender."""


class EchoError(Exception):
    """The server sent a sender's own chat line back to it."""


class ServerDisconnectError(Exception):
    """The server closed or reset a connection the user did not close."""


class JoinError(Exception):
    """/nick, /join or the sync round trip failed."""


class ServerErrorLine(Exception):
    """The server sent a ``! error`` line after the handshake."""


_FAILURES = {
    "dup": DuplicateError("duplicate delivery"),
    "ooo": OutOfOrderError("out-of-order delivery (per sender)"),
    "echo": EchoError("own line echoed to sender"),
}


# ---------------------------------------------------------------------------
# options


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any, **_kw: Any) -> None:
    """Swarm knobs and capacity thresholds; masters forward them to workers."""
    g = parser.add_argument_group("chat-svc swarm")
    g.add_argument(
        "--max-p99-ms",
        type=float,
        default=None,
        help="Fail the run if the p99 fan-out latency (all deliveries) exceeds this.",
    )
    g.add_argument(
        "--max-loss-ratio",
        type=float,
        default=0.0,
        help="Fail if lost deliveries / expected deliveries exceeds this (default 0).",
    )
    g.add_argument(
        "--min-deliveries-per-s",
        type=float,
        default=None,
        help="Fail if deliveries/s after ramp-up stays below this.",
    )
    g.add_argument(
        "--msg-rate",
        type=float,
        default=1.0,
        help="Chat lines per second per user (0 = listen only). The server's flood "
        "control allows 10/s; start it with --flood-rate 0 for more.",
    )
    g.add_argument("--room-size", type=int, default=20, help="Users per swarm room.")
    g.add_argument(
        "--deadline",
        type=float,
        default=5.0,
        help="Seconds a line may take to reach every member before it counts as lost.",
    )
    g.add_argument("--msg-bytes", type=int, default=64, help="Size of each chat line (padded).")
    g.add_argument(
        "--fanout-sample-every",
        type=int,
        default=10,
        help="Fire a Locust 'fanout' event for 1 of N deliveries (all are counted in the summary's latency histogram).",
    )
    g.add_argument("--room-prefix", default="swarm", help="Prefix of the swarm's room names.")
    g.add_argument(
        "--join-timeout",
        type=float,
        default=10.0,
        help="Seconds to wait for the welcome line and the /join round trip.",
    )
    g.add_argument("--summary-json", default="", help="Also write the summary as JSON here.")


def _opt(env: Environment | None, name: str, default: Any) -> Any:
    """Option value, tolerating library use (no parsed_options) and web-UI strings."""
    opts = env.parsed_options if env is not None else None
    value = getattr(opts, name, default) if opts is not None else default
    if isinstance(value, str) and not isinstance(default, str):
        value = value.strip()
        if value == "":
            return None
        return type(default)(value) if default is not None else float(value)
    return value


# ---------------------------------------------------------------------------
# per-process state


class _State:
    """Everything one Locust process knows about the current swarm run."""

    def __init__(self) -> None:
        self.env: Environment | None = None
        self.run_id = ""
        self.workers = 1
        self.worker_index = 0
        self.recorder: Recorder | None = None
        self.ledger: Ledger | None = None
        self.draining = False
        self.drained = False
        self.finished = False
        self.next_index = 0
        self.sample_counter = 0
        self.greenlets: list[gevent.Greenlet] = []
        self.summary = ""
        self.failed_runs = 0
        self.runs = 0


STATE = _State()


def _is_worker() -> bool:
    return isinstance(STATE.env.runner if STATE.env else None, WorkerRunner)


def _is_master() -> bool:
    return isinstance(STATE.env.runner if STATE.env else None, MasterRunner)


def _fire(request_type: str, name: str, ms: float, length: int = 0, exc: Exception | None = None) -> None:
    if STATE.env is not None:
        STATE.env.events.request.fire(
            request_type=request_type,
            name=name,
            response_time=ms,
            response_length=length,
            exception=exc,
            context={},
        )


def parse_host(host: str | None) -> tuple[str, int]:
    """``tcp://H:P``, ``H:P`` or ``[::1]:P`` -> (host, port); the default port is 9009."""
    h = (host or DEFAULT_HOST).strip()
    if "://" in h:
        h = h.split("://", 1)[1]
    h = h.rstrip("/")
    if h.startswith("["):
        addr, _, rest = h[1:].partition("]")
        return addr, int(rest.lstrip(":") or 9009)
    if h.count(":") == 1:
        addr, port = h.split(":")
        return addr, int(port)
    return h, 9009


# ---------------------------------------------------------------------------
# the user


class ChatUser(User):
    """One chat connection: joins a swarm room, sends numbered lines, checks what it receives.

    Chat lines look like ``lt <seq> <send-time-us> <padding>``; with the sender's nick
    from the ``[nick] text`` prefix they identify the message swarm-wide, and the send
    time travels along so the recipient computes latency without any lookup.
    """

    host = DEFAULT_HOST

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self.index = STATE.next_index
        STATE.next_index += 1
        self.sock: socket.socket | None = None
        self.reader: gevent.Greenlet | None = None
        self.nick = ""
        self.room = ""
        self.seq = 0
        self.gen = 0
        self.joined = False
        self._closing = False
        self._next_attempt = 0.0
        self._backoff = 0.5
        self._next_send: float | None = None
        self._welcome = gevent.event.Event()
        self._synced = gevent.event.Event()
        self._sync_token = b""
        self._handshake_errors: list[str] = []
        self.rate = float(_opt(environment, "msg_rate", 1.0) or 0.0)
        self.msg_bytes = int(_opt(environment, "msg_bytes", 64))
        self.join_timeout = float(_opt(environment, "join_timeout", 10.0))
        room_size = max(1, int(_opt(environment, "room_size", 20)))
        # interleave workers so every room holds users of every worker
        global_index = self.index * max(1, STATE.workers) + STATE.worker_index
        prefix = str(_opt(environment, "room_prefix", "swarm"))
        self.base_nick = f"lt{STATE.run_id}w{STATE.worker_index}u{self.index}"
        self.room = f"{prefix}{STATE.run_id}r{global_index // room_size}"

    # -- pacing ----------------------------------------------------------------

    def wait_time(self) -> float:
        """Constant pacing at --msg-rate with a random phase, never bursting to catch up."""
        now = time.time()
        if self.sock is None:
            return max(0.05, min(1.0, self._next_attempt - now))
        if self.rate <= 0 or STATE.draining:
            return 0.5
        period = 1.0 / self.rate
        if self._next_send is None:
            self._next_send = now + random.random() * period
        else:
            self._next_send += period
            if self._next_send < now - period:
                self._next_send = now
        return max(0.0, self._next_send - now)

    @task
    def chat(self) -> None:
        """Connect if needed, else send one chat line."""
        if self.sock is None:
            if time.time() >= self._next_attempt:
                self._connect()
            return
        if self.rate > 0 and not STATE.draining and self.joined:
            self._send_line()

    def on_stop(self) -> None:
        """Leave cleanly: record the leave first so the judge stops expecting deliveries."""
        sock = self.sock
        if sock is None:
            return
        self._closing = True
        if self.joined and STATE.recorder is not None:
            STATE.recorder.left(self.nick, time.time())
        self.joined = False
        self.sock = None
        with contextlib.suppress(OSError):
            sock.sendall(b"/quit\n")
        sock.close()
        if self.reader is not None:
            self.reader.kill(block=False)

    # -- connection --------------------------------------------------------------

    def _connect(self) -> None:
        rec = STATE.recorder
        if rec is None:
            return
        host, port = parse_host(self.host)
        self.gen += 1
        self.nick = self.base_nick if self.gen == 1 else f"{self.base_nick}r{self.gen - 1}"
        self.seq = 0
        self._next_send = None
        self._welcome = gevent.event.Event()
        self._synced = gevent.event.Event()
        self._handshake_errors = []
        self._sync_token = f"ltsync{STATE.run_id}{self.gen}".encode()
        t0 = time.perf_counter()
        try:
            sock = socket.create_connection((host, port), timeout=self.join_timeout)
            sock.setsockopt(_stdsocket.IPPROTO_TCP, _stdsocket.TCP_NODELAY, 1)
            sock.settimeout(None)
        except OSError as e:
            rec.count("connect_failures")
            _fire("TCP", "connect", (time.perf_counter() - t0) * 1000, exc=e)
            self._retry_later()
            return
        self._closing = False
        self.sock = sock
        self.reader = gevent.spawn(self._read_loop, sock, self.nick)
        # Speak first: the server holds the welcome for up to 250 ms while it sniffs for an
        # HTTP request line, unless the client's first line shows it is a chat client.
        t1 = time.perf_counter()
        with contextlib.suppress(OSError):
            sock.sendall(f"/nick {self.nick}\n/join {self.room}\n/msg {self.nick} ".encode() + self._sync_token + b"\n")
        if not self._welcome.wait(self.join_timeout) or self.sock is not sock:
            rec.count("connect_failures")
            _fire(
                "TCP",
                "connect",
                (time.perf_counter() - t0) * 1000,
                exc=ConnectionError("no welcome line from server"),
            )
            self._abandon(sock)
            return
        _fire("TCP", "connect", (time.perf_counter() - t0) * 1000)
        ok = self._synced.wait(self.join_timeout) and self.sock is sock
        if not ok or self._handshake_errors:
            rec.count("join_failures")
            why = "; ".join(self._handshake_errors) or "no reply to /join within --join-timeout"
            _fire("CHAT", "join", (time.perf_counter() - t1) * 1000, exc=JoinError(why))
            self._abandon(sock)
            return
        self.joined = True
        self._backoff = 0.5
        rec.joined(self.room, self.nick, time.time())
        _fire("CHAT", "join", (time.perf_counter() - t1) * 1000)

    def _retry_later(self) -> None:
        self._next_attempt = time.time() + self._backoff
        self._backoff = min(self._backoff * 2, 5.0)

    def _abandon(self, sock: socket.socket) -> None:
        """Close a connection whose handshake failed (not a server disconnect)."""
        self._closing = True
        if self.sock is sock:
            self.sock = None
        sock.close()
        self._retry_later()

    def _lost(self, sock: socket.socket, why: str) -> None:
        """The server dropped us: count it, stop being a member, reconnect later."""
        if self.sock is not sock or self._closing:
            return
        self.sock = None
        rec = STATE.recorder
        if self.joined and rec is not None:
            rec.left(self.nick, time.time())
        self.joined = False
        sock.close()
        self._welcome.set()
        self._synced.set()
        if rec is not None:
            rec.count("disconnects")
        _fire("TCP", "disconnect", 0, exc=ServerDisconnectError(why))
        self._retry_later()

    def _send_line(self) -> None:
        sock, rec = self.sock, STATE.recorder
        if sock is None or rec is None:
            return
        self.seq += 1
        t = time.time()
        head = f"lt {self.seq} {int(t * 1_000_000)} "
        line = (head + "x" * max(1, self.msg_bytes - len(head))).encode() + b"\n"
        t0 = time.perf_counter()
        try:
            sock.sendall(line)
        except OSError as e:
            self._lost(sock, f"send failed: {e.__class__.__name__}")
            return
        rec.sent(self.room, self.nick, self.seq, t)
        _fire("CHAT", "send", (time.perf_counter() - t0) * 1000, len(line))

    def _read_loop(self, sock: socket.socket, nick: str) -> None:
        """Consume every line; arrival time is taken once per recv(), so parsing is not billed."""
        buf = b""
        why = "connection closed by server"
        try:
            while True:
                data = sock.recv(262144)
                t = time.time()
                if not data:
                    break
                buf += data
                if b"\n" not in data:
                    continue
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    self._on_line(line.rstrip(b"\r"), t, nick)
        except OSError as e:
            why = f"connection error: {e.__class__.__name__}"
        self._lost(sock, why)

    def _on_line(self, line: bytes, t: float, nick: str) -> None:
        rec = STATE.recorder
        if rec is None:
            return
        if line[:1] == b"[":
            j = line.find(b"] ", 1)
            if j < 0:
                return
            body = line[j + 2 :]
            if body[:3] == b"lt ":
                parts = body.split(b" ", 3)
                try:
                    seq, t_send = int(parts[1]), int(parts[2]) / 1_000_000
                except (IndexError, ValueError):
                    return
                kind, ms = rec.received(nick, line[1:j].decode(), seq, t_send, t)
                if kind in ("ok", "late"):
                    STATE.sample_counter += 1
                    if STATE.sample_counter >= self._sample_every():
                        STATE.sample_counter = 0
                        _fire("CHAT", "fanout", ms, len(line))
                else:
                    _fire("CHAT", "fanout", ms, len(line), _FAILURES[kind])
            elif not self._synced.is_set() and body.endswith(self._sync_token):
                self._synced.set()
        elif line[:2] == b"! ":
            text = line[2:].decode("utf-8", "replace")
            if not self._synced.is_set():
                self._handshake_errors.append(text)
            else:
                rec.count("server_errors")
                _fire("CHAT", "server-error", 0, exc=ServerErrorLine(text))
        elif line.startswith(b"* welcome"):
            self._welcome.set()

    def _sample_every(self) -> int:
        return max(1, int(_opt(self.environment, "fanout_sample_every", 10) or 1))


# ---------------------------------------------------------------------------
# wiring


@events.init.add_listener
def _on_init(environment: Environment, **_kw: Any) -> None:
    STATE.env = environment
    runner = environment.runner
    if runner is None:
        return
    if isinstance(runner, WorkerRunner):
        runner.register_message("chat_setup", _on_setup_msg)
        runner.register_message("chat_drain", _on_drain_msg)
    else:
        runner.register_message("chat_batch", _on_batch_msg)


def _on_setup_msg(environment: Environment, msg: Any, **_kw: Any) -> None:
    STATE.run_id = msg.data["run_id"]
    STATE.workers = int(msg.data["workers"])
    runner = environment.runner
    STATE.worker_index = int(getattr(runner, "worker_index", 0) or 0)


def _on_drain_msg(environment: Environment, msg: Any, **_kw: Any) -> None:
    STATE.draining = True


def _on_batch_msg(environment: Environment, msg: Any, **_kw: Any) -> None:
    if STATE.ledger is not None:
        STATE.ledger.apply(msg.data, time.time())


def _spawn(fn: Any) -> None:
    STATE.greenlets.append(gevent.spawn(fn))


def _kill_greenlets() -> None:
    for g in STATE.greenlets:
        g.kill(block=False)
    STATE.greenlets = []


def _ship() -> None:
    """Send this process's batch to the judge (the master, or ourselves)."""
    rec = STATE.recorder
    if rec is None:
        return
    batch = rec.take_batch()
    if batch is None:
        return
    if _is_worker():
        STATE.env.runner.send_message("chat_batch", batch)  # type: ignore[union-attr]
    elif STATE.ledger is not None:
        STATE.ledger.apply(batch, time.time())


def _flusher() -> None:
    """Ship batches, and sample this process's CPU so the summary can warn when the
    swarm itself was the bottleneck (Locust's own monitor samples only every 5 s)."""
    wall, cpu = time.monotonic(), time.process_time()
    while True:
        gevent.sleep(FLUSH_INTERVAL)
        now_wall, now_cpu = time.monotonic(), time.process_time()
        if now_wall - wall >= 2.0 and STATE.recorder is not None:
            busy = 100.0 * (now_cpu - cpu) / (now_wall - wall)
            STATE.recorder.cpu_max = max(STATE.recorder.cpu_max, busy)
            wall, cpu = now_wall, now_cpu
        try:
            _ship()
        except Exception:
            log.exception("shipping swarm batch failed")


def _lag_monitor() -> None:
    """Measure event-loop lag: a 50 ms timer that fires late means receipts were read late.

    This is the honest measure of the swarm distorting its own latencies: CPU% cannot
    show a process that was starved by other processes on the machine.
    """
    while True:
        t = time.perf_counter()
        gevent.sleep(0.05)
        if STATE.recorder is not None:
            STATE.recorder.loop_lag(max(0.0, time.perf_counter() - t - 0.05))


def _sweeper() -> None:
    while True:
        gevent.sleep(SWEEP_INTERVAL)
        if STATE.ledger is not None:
            _report_lost(STATE.ledger.sweep(time.time()))


def _report_lost(lost: list[LostMessage]) -> None:
    ledger = STATE.ledger
    if ledger is None:
        return
    exc = LostMessageError(f"lost: not received by every room member within the {ledger.deadline:g}s deadline")
    for _ in lost:
        _fire("CHAT", "fanout", ledger.deadline * 1000, 0, exc)


@events.test_start.add_listener
def _on_test_start(environment: Environment, **_kw: Any) -> None:
    STATE.env = environment
    runner = environment.runner
    deadline = float(_opt(environment, "deadline", 5.0))
    _kill_greenlets()
    STATE.draining = STATE.drained = STATE.finished = False
    STATE.next_index = 0
    STATE.sample_counter = 0
    if isinstance(runner, WorkerRunner):
        STATE.recorder = Recorder(runner.client_id, deadline)
        _spawn(_flusher)
        _spawn(_lag_monitor)
        return
    STATE.run_id = secrets.token_hex(2)
    STATE.worker_index = 0
    STATE.runs += 1
    if isinstance(runner, MasterRunner):
        STATE.workers = max(1, runner.worker_count)
        STATE.ledger = Ledger(deadline, DISTRIBUTED_GRACE)
        runner.send_message("chat_setup", {"run_id": STATE.run_id, "workers": STATE.workers})
    else:
        STATE.workers = 1
        STATE.ledger = Ledger(deadline, LOCAL_GRACE)
        STATE.recorder = Recorder("local", deadline)
        _spawn(_flusher)
        _spawn(_lag_monitor)
    STATE.ledger.window = (time.time(), None)
    _spawn(_sweeper)


@events.spawning_complete.add_listener
def _on_spawning_complete(**_kw: Any) -> None:
    """Ramp-up is over: deliveries/s and the latency thresholds count from here on."""
    now = time.time()
    if STATE.recorder is not None and STATE.recorder.steady_from is None:
        STATE.recorder.steady_from = now
    if STATE.ledger is not None and not _is_worker() and STATE.ledger.window[1] is None:
        STATE.ledger.window = (now, None)


@events.test_stopping.add_listener
def _on_test_stopping(environment: Environment, **_kw: Any) -> None:
    if _is_worker():
        STATE.draining = True
        _ship()
        return
    _drain()


def _drain() -> None:
    """Stop all sending, then wait until in-deadline messages have reached everyone.

    Bounded by deadline + grace; returns early once nothing inside its deadline is
    still missing a recipient (usually within a second on a healthy server).
    """
    ledger = STATE.ledger
    if ledger is None or STATE.drained:
        return
    STATE.drained = True
    STATE.draining = True
    start = time.time()
    ledger.window = (ledger.window[0], start)
    if _is_master():
        STATE.env.runner.send_message("chat_drain", {})  # type: ignore[union-attr]
    min_wait = 2 * FLUSH_INTERVAL + 0.3
    limit = ledger.deadline + ledger.grace + 0.5
    while True:
        gevent.sleep(0.1)
        now = time.time()
        if not _is_master():
            _ship()
        if now - start >= min_wait and ledger.unresolved(now) == 0:
            break
        if now - start >= limit:
            break
    # Users are stopped only after this returns: their leaves are not membership churn.
    ledger.frozen_at = time.time()


@events.test_stop.add_listener
def _on_test_stop(environment: Environment, **_kw: Any) -> None:
    if _is_worker():
        _ship()
        return
    _finish(environment)


def _finish(environment: Environment) -> None:
    """Judge everything left, build the summary, remember whether the run failed."""
    ledger = STATE.ledger
    if ledger is None or STATE.finished:
        return
    _drain()
    _ship()
    _kill_greenlets()
    STATE.finished = True
    _report_lost(ledger.sweep(time.time(), final=True))
    totals = ledger.totals()
    runner = environment.runner
    exceptions = sum(e["count"] for e in runner.exceptions.values()) if runner else 0
    thresholds = {
        "max_p99_ms": _opt(environment, "max_p99_ms", None),
        "max_loss_ratio": _opt(environment, "max_loss_ratio", 0.0),
        "min_deliveries_per_s": _opt(environment, "min_deliveries_per_s", None),
    }
    checks = evaluate(totals, user_exceptions=exceptions, **thresholds)
    users = runner.target_user_count if runner else 0
    title = (
        f"chat-svc swarm summary: run {STATE.run_id}, {users} users, "
        f"{_opt(environment, 'msg_rate', 1.0):g} lines/s/user, rooms of "
        f"{_opt(environment, 'room_size', 20)}, deadline {ledger.deadline:g}s"
    )
    STATE.summary = format_summary(totals, checks, title)
    failed = not all(c.ok for c in checks)
    if failed:
        STATE.failed_runs += 1
    path = _opt(environment, "summary_json", "")
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(
                {
                    "run_id": STATE.run_id,
                    "users": users,
                    "msg_rate": _opt(environment, "msg_rate", 1.0),
                    "room_size": _opt(environment, "room_size", 20),
                    "deadline": ledger.deadline,
                    "thresholds": thresholds,
                    "totals": totals,
                    "checks": [c.__dict__ for c in checks],
                    "passed": not failed,
                },
                f,
                indent=2,
            )
    if not _opt(environment, "headless", False):
        _print_summary()


def _print_summary() -> None:
    if STATE.summary:
        out = sys.stderr if _opt(STATE.env, "json", False) else sys.stdout
        print("\n" + STATE.summary, file=out, flush=True)


@events.quitting.add_listener
def _on_quitting(environment: Environment, **_kw: Any) -> None:
    """Set the exit code from the thresholds (overrides Locust's "any failure -> 1")."""
    if _is_worker() or STATE.runs == 0:
        return
    _finish(environment)  # no-op unless the run was interrupted (Ctrl-C) before test_stop
    environment.process_exit_code = 1 if STATE.failed_runs else 0


@events.quit.add_listener
def _on_quit(exit_code: int, **_kw: Any) -> None:
    """Headless: print the table last, after Locust's own statistics."""
    if not _is_worker() and _opt(STATE.env, "headless", False):
        _print_summary()
