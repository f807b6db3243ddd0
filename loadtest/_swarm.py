"""One swarm run across Locust's processes: who records, who judges, when it ends.

Kept out of the locustfile (``loadtest/chat.py`` only re-exports ``ChatUser``) so the
event listeners are registered exactly once however Locust imports the directory.

Process roles:

* local run (``locust -f loadtest``): users feed a ``Recorder``; every 0.5 s its batch is
  applied to a ``Ledger`` in the same process, which judges loss.
* distributed (``--master``/``--worker``/``--processes``): workers ship the same batches
  to the master with ``runner.send_message("chat_batch", ...)``; the master's ``Ledger``
  sees every send, join and receipt of the swarm, so a line sent on worker A and lost on
  its way to a member on worker B is caught. The master tells workers the run id and
  worker count (``chat_setup``, sent before the first spawn message, so room assignment
  mixes users of all workers) and when to stop sending (``chat_drain``).

The judge fires one ``verify`` request per line it judges (its time: until the last
member had it; ``LostMessageError`` when someone missed it), and recipients fire a
``fanout`` request for a sample of deliveries. The verdict itself is a delivery ratio,
in ``_verdict``.

End of a run: on ``test_stopping`` (fired before users are stopped) the judge asks every
node to stop sending, waits until every line still inside its deadline has reached all
expected members (or the deadline passed), so stopping the test does not itself look like
loss, and then gives the verdict. It is final from then on: the web UI shows it before the
run is reported stopped, and the exit code is taken from it.
"""

from __future__ import annotations

import json
import logging
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import gevent
from locust import events
from locust import log as locust_log
from locust.env import Environment
from locust.runners import MasterRunner, WorkerRunner

from loadtest import _webui
from loadtest._client import parse_hosts
from loadtest._ledger import JudgedLine, Ledger
from loadtest._options import SwarmOptions
from loadtest._recorder import Recorder, parse_probe
from loadtest._verdict import Verdict, evaluate, to_csv

log = logging.getLogger("chat-swarm")

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


_FAILURES = {
    "dup": DuplicateError("duplicate delivery"),
    "ooo": OutOfOrderError("out-of-order delivery (per sender)"),
    "echo": EchoError("own line echoed to sender"),
}


class MemberListener:
    """The swarm's ``Listener`` for one user's client: what it hears goes to the recorder."""

    __slots__ = ("room", "swarm")

    def __init__(self, swarm: Swarm, room: str) -> None:
        self.swarm = swarm
        self.room = room

    def joined(self, nick: str, transport: str, t: float) -> None:
        if self.swarm.recorder is not None:
            self.swarm.recorder.joined(self.room, nick, t, transport)

    def left(self, nick: str, t: float) -> None:
        if self.swarm.recorder is not None:
            self.swarm.recorder.left(nick, t)

    def count(self, counter: str) -> None:
        if self.swarm.recorder is not None:
            self.swarm.recorder.count(counter)

    def resumed(self, nick: str, complete: bool, t_off: float, t_on: float) -> None:
        if self.swarm.recorder is not None:
            self.swarm.recorder.resumed(nick, complete, t_off, t_on)

    def heard(self, nick: str, transport: str, sender: str, body: bytes, t: float, line_id: str | None) -> None:
        probe = parse_probe(body)
        if probe is not None and self.swarm.recorder is not None:
            kind, ms = self.swarm.recorder.received(nick, sender, probe[0], probe[1], t, line_id)
            self.swarm.delivered(kind, ms, len(body), transport)


class Swarm:
    """Everything one Locust process knows about the current swarm run."""

    def __init__(self) -> None:
        self.env: Environment | None = None
        self.options = SwarmOptions()
        self.run_id = ""
        self.workers = 1
        self.worker_index = 0
        self.recorder: Recorder | None = None
        self.ledger: Ledger | None = None
        self.draining = False
        self.drained = False
        self.verdict: Verdict | None = None
        self.next_index = 0
        self.sample_counter = 0
        self.greenlets: list[gevent.Greenlet] = []
        self.failed_runs = 0
        self.runs = 0
        self.resume = False

    # -- what users call ---------------------------------------------------------

    def enlist(self) -> tuple[str, str, str | None]:
        """(base nick, room, transport) for a new user; rooms interleave the users of every worker.

        With ``--ws-share`` every room gets its share of WebSocket users (user g is one when
        floor(g x share) steps up at g), so each line crosses transports both ways; otherwise
        ``--transport``, or None for the --host scheme's.
        """
        index = self.next_index
        self.next_index += 1
        global_index = index * max(1, self.workers) + self.worker_index
        nick = f"lt{self.run_id}w{self.worker_index}u{index}"
        share = self.options.ws_share
        if share is not None:
            transport: str | None = "ws" if int((global_index + 1) * share) > int(global_index * share) else "tcp"
        else:
            transport = self.options.transport or None
        return nick, f"{self.options.room_prefix}{self.run_id}r{global_index // self.options.room_size}", transport

    def sent(self, room: str, nick: str, seq: int, t_send: float) -> None:
        if self.recorder is not None:
            self.recorder.sent(room, nick, seq, t_send)

    def delivered(self, kind: str, ms: float, length: int, transport: str) -> None:
        """Fire a ``fanout`` request for 1 in N good deliveries and for every bad one."""
        if kind in ("ok", "late"):
            self.sample_counter += 1
            if self.sample_counter < self.options.fanout_sample_every:
                return
            self.sample_counter = 0
        self._fire("fanout", transport, ms, length, _FAILURES.get(kind))

    # -- plumbing ----------------------------------------------------------------

    def _fire(self, kind: str, name: str, ms: float | None, length: int = 0, exc: Exception | None = None) -> None:
        if self.env is not None:
            self.env.events.request.fire(
                request_type=kind, name=name, response_time=ms, response_length=length, exception=exc, context={}
            )

    def _is_worker(self) -> bool:
        return isinstance(self.env.runner if self.env else None, WorkerRunner)

    def _is_master(self) -> bool:
        return isinstance(self.env.runner if self.env else None, MasterRunner)

    def _spawn(self, fn: Any) -> None:
        self.greenlets.append(gevent.spawn(fn))

    def _kill_greenlets(self) -> None:
        for g in self.greenlets:
            g.kill(block=False)
        self.greenlets = []

    def _ship(self) -> None:
        """Send this process's batch to the judge (the master, or ourselves)."""
        rec = self.recorder
        batch = rec.take_batch() if rec is not None else None
        if batch is None or self.env is None or self.env.runner is None:
            return
        if isinstance(self.env.runner, WorkerRunner):
            self.env.runner.send_message("chat_batch", batch)
        elif self.ledger is not None:
            self.ledger.apply(batch, time.time())

    def _flusher(self) -> None:
        """Ship batches, and sample this process's CPU so the verdict can warn when the
        swarm itself was the bottleneck (Locust's own monitor samples only every 5 s)."""
        wall, cpu = time.monotonic(), time.process_time()
        while True:
            gevent.sleep(FLUSH_INTERVAL)
            now_wall, now_cpu = time.monotonic(), time.process_time()
            if now_wall - wall >= 2.0 and self.recorder is not None:
                busy = 100.0 * (now_cpu - cpu) / (now_wall - wall)
                self.recorder.cpu_max = max(self.recorder.cpu_max, busy)
                wall, cpu = now_wall, now_cpu
            try:
                self._ship()
            except Exception:
                log.exception("shipping swarm batch failed")

    def _lag_monitor(self) -> None:
        """Measure event-loop lag: a 50 ms timer that fires late means receipts were read late.

        This is the honest measure of the swarm distorting its own latencies: CPU% cannot
        show a process that was starved by other processes on the machine.
        """
        while True:
            t = time.perf_counter()
            gevent.sleep(0.05)
            if self.recorder is not None:
                self.recorder.loop_lag(max(0.0, time.perf_counter() - t - 0.05))

    def _sweeper(self) -> None:
        while True:
            gevent.sleep(SWEEP_INTERVAL)
            if self.ledger is not None:
                self._report(self.ledger.sweep(time.time()))

    def _report(self, judged: list[JudgedLine]) -> None:
        """One ``verify`` request per judged line that had anyone to reach; a lost line has no time."""
        if self.ledger is None:
            return
        lost = LostMessageError(f"line missed by a member within the {self.ledger.deadline:g}s deadline")
        for line in judged:
            if line.complete_ms is not None:
                self._fire("verify", "line", line.complete_ms)
            elif line.missing:
                self._fire("verify", "line", None, exc=lost)

    # -- the run -----------------------------------------------------------------

    def on_init(self, environment: Environment, **_kw: Any) -> None:
        self.env = environment
        runner = environment.runner
        opts = environment.parsed_options
        if opts is not None and getattr(opts, "num_users", 0) is None:
            # a run of one user verifies nothing: the default fills one room
            opts.num_users = SwarmOptions.read(environment).room_size
        if isinstance(runner, WorkerRunner):
            runner.register_message("chat_setup", self._on_setup_msg)
            runner.register_message("chat_drain", self._on_drain_msg)
        elif runner is not None:
            runner.register_message("chat_batch", self._on_batch_msg)
        if environment.web_ui is not None:
            _webui.install(environment.web_ui, self)

    def _on_setup_msg(self, environment: Environment, msg: Any, **_kw: Any) -> None:
        self.run_id = msg.data["run_id"]
        self.workers = int(msg.data["workers"])
        self.worker_index = int(getattr(environment.runner, "worker_index", 0) or 0)

    def _on_drain_msg(self, environment: Environment, msg: Any, **_kw: Any) -> None:
        self.draining = True

    def _on_batch_msg(self, environment: Environment, msg: Any, **_kw: Any) -> None:
        if self.ledger is not None:
            self.ledger.apply(msg.data, time.time())

    def on_test_start(self, environment: Environment, **_kw: Any) -> None:
        self.env = environment
        runner = environment.runner
        self.options = SwarmOptions.read(environment)
        self.resume = self.options.resume_on(environment.host)
        deadline = self.options.deadline
        self._kill_greenlets()
        self.draining = self.drained = False
        self.verdict = None
        self.next_index = 0
        self.sample_counter = 0
        if isinstance(runner, WorkerRunner):
            self.recorder = Recorder(runner.client_id, deadline)
            self._spawn(self._flusher)
            self._spawn(self._lag_monitor)
            return
        self.run_id = secrets.token_hex(2)
        self.worker_index = 0
        self.runs += 1
        if isinstance(runner, MasterRunner):
            self.workers = max(1, runner.worker_count)
            self.ledger = Ledger(deadline, DISTRIBUTED_GRACE, self.resume)
            runner.send_message("chat_setup", {"run_id": self.run_id, "workers": self.workers})
        else:
            self.workers = 1
            self.ledger = Ledger(deadline, LOCAL_GRACE, self.resume)
            self.recorder = Recorder("local", deadline)
            self._spawn(self._flusher)
            self._spawn(self._lag_monitor)
        self.ledger.window = (time.time(), None)
        self._spawn(self._sweeper)

    def on_spawning_complete(self, **_kw: Any) -> None:
        """Ramp-up is over: deliveries/s and the latency thresholds count from here on."""
        now = time.time()
        if self.recorder is not None and self.recorder.steady_from is None:
            self.recorder.steady_from = now
        if self.ledger is not None and not self._is_worker() and self.ledger.window[1] is None:
            self.ledger.window = (now, None)

    def on_test_stopping(self, environment: Environment, **_kw: Any) -> None:
        if self._is_worker():
            self.draining = True
            self._ship()
            return
        self._finish(environment)

    def on_test_stop(self, environment: Environment, **_kw: Any) -> None:
        if self._is_worker():
            self._ship()
            return
        self._finish(environment)  # no-op when test_stopping already gave the verdict
        if not getattr(environment.parsed_options, "headless", False):
            self._print()

    def _drain(self) -> None:
        """Stop all sending, then wait until in-deadline messages have reached everyone.

        Bounded by deadline + grace; returns early once nothing inside its deadline is
        still missing a recipient (usually within a second on a healthy server).
        """
        ledger = self.ledger
        if ledger is None or self.drained:
            return
        self.drained = self.draining = True
        start = time.time()
        ledger.window = (ledger.window[0], start)
        if isinstance(self.env.runner if self.env else None, MasterRunner):
            self.env.runner.send_message("chat_drain", {})  # type: ignore[union-attr]
        min_wait = 2 * FLUSH_INTERVAL + 0.3
        limit = ledger.deadline + ledger.grace + 0.5
        while True:
            gevent.sleep(0.1)
            now = time.time()
            if not self._is_master():
                self._ship()
            if now - start >= min_wait and ledger.unresolved(now) == 0:
                break
            if now - start >= limit:
                break
        # Users are stopped only after this returns: their leaves are not membership churn.
        ledger.frozen_at = time.time()

    def _finish(self, environment: Environment) -> None:
        """Drain, judge everything left, give the verdict and remember whether it failed."""
        ledger = self.ledger
        if ledger is None or self.verdict is not None:
            return
        self._drain()
        self._ship()
        self._kill_greenlets()
        self._report(ledger.sweep(time.time(), final=True))
        self.verdict = self._judge(environment, final=True)
        if not self.verdict.passed:
            self.failed_runs += 1
        self._write_files(environment, self.verdict)

    def _judge(self, environment: Environment, final: bool) -> Verdict:
        assert self.ledger is not None
        runner = environment.runner
        opts = self.options
        totals = self.ledger.totals()
        exceptions = sum(e["count"] for e in runner.exceptions.values()) if runner else 0
        users = runner.target_user_count if runner else 0
        title = (
            f"chat-svc swarm summary: run {self.run_id}, {users} users, {opts.msg_rate:g} lines/s/user,"
            f" rooms of {opts.room_size}, deadline {opts.deadline:g}s"
            + (f", resume mode ({len(parse_hosts(environment.host))} host(s))" if self.resume else "")
        )
        settings = {
            "run_id": self.run_id,
            "users": users,
            "msg_rate": opts.msg_rate,
            "room_size": opts.room_size,
            "resume": self.resume,
            "thresholds": opts.thresholds(),
        }
        checks = evaluate(totals, user_exceptions=exceptions, **opts.thresholds())
        return Verdict(title, totals, checks, opts.deadline, settings, final)

    def current_verdict(self) -> Verdict | None:
        """The final verdict, or a provisional one while a run is going on (for the web UI)."""
        if self.verdict is not None or self.ledger is None or self.env is None:
            return self.verdict
        return self._judge(self.env, final=False)

    def exit_code(self) -> int:
        return 1 if self.failed_runs else 0

    def _write_files(self, environment: Environment, verdict: Verdict) -> None:
        """``--summary-json``, and ``<prefix>_verdict.{json,csv}`` beside Locust's ``--csv`` files."""
        data = json.dumps(verdict.to_json(), indent=2)
        if self.options.summary_json:
            Path(self.options.summary_json).write_text(data, encoding="utf-8")
        prefix = getattr(environment.parsed_options, "csv_prefix", None)
        if prefix:
            Path(f"{prefix}_verdict.json").write_text(data, encoding="utf-8")
            Path(f"{prefix}_verdict.csv").write_text(to_csv(verdict.rows()), encoding="utf-8")

    def _print(self) -> None:
        if self.verdict is not None:
            out = sys.stderr if getattr(self.env and self.env.parsed_options, "json", False) else sys.stdout
            print("\n" + self.verdict.text(), file=out, flush=True)

    def on_quitting(self, environment: Environment, **_kw: Any) -> None:
        """Set the exit code from the verdicts (overrides Locust's "any failure -> 1")."""
        if self._is_worker() or self.runs == 0:
            return
        self._finish(environment)  # no-op unless the run was interrupted before test_stopping
        # a crash in the swarm's own listeners must not pass for a verdict: Locust's code 2
        environment.process_exit_code = 2 if locust_log.unhandled_greenlet_exception else self.exit_code()

    def on_quit(self, exit_code: int, **_kw: Any) -> None:
        """Headless: print the verdict last, after Locust's own statistics."""
        if not self._is_worker() and getattr(self.env and self.env.parsed_options, "headless", False):
            self._print()


SWARM = Swarm()
events.init.add_listener(SWARM.on_init)
events.test_start.add_listener(SWARM.on_test_start)
events.spawning_complete.add_listener(SWARM.on_spawning_complete)
events.test_stopping.add_listener(SWARM.on_test_stopping)
events.test_stop.add_listener(SWARM.on_test_stop)
events.quitting.add_listener(SWARM.on_quitting)
events.quit.add_listener(SWARM.on_quit)
