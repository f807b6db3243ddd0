"""ChatUser: one chat member of the swarm, as small as a Locust user should be.

The connection and the line protocol are in ``_client`` and the verification in
``_swarm`` (wiring) and ``_recorder``/``_ledger`` (judgement); this holds the task and
its pacing.
"""

from __future__ import annotations

import random
import time

from locust import User, task
from locust.env import Environment

from loadtest._client import DEFAULT_HOST, ChatClient
from loadtest._recorder import probe_line
from loadtest._swarm import SWARM, MemberListener


class ChatUser(User):
    """Joins a swarm room and sends numbered lines at ``--msg-rate``; reconnects when dropped."""

    host = DEFAULT_HOST

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self.opts = SWARM.options
        self.base_nick, self.room, self.transport = SWARM.enlist()
        self.client = ChatClient(
            environment.events.request,
            MemberListener(SWARM, self.room),
            self.opts.join_timeout,
            resume=self.opts.resume_on(self.host),
        )
        self.connects = 0
        self.seq = 0
        self._next_send: float | None = None

    def wait_time(self) -> float:
        """Constant pacing at --msg-rate with a random phase, never bursting to catch up."""
        if not self.client.joined:
            return max(0.05, min(1.0, self.client.retry_in()))
        if self.opts.msg_rate <= 0 or SWARM.draining:
            return 0.5
        now, period = time.time(), 1.0 / self.opts.msg_rate
        if self._next_send is None:
            self._next_send = now + random.random() * period
        else:
            self._next_send += period
            if self._next_send < now - period:
                self._next_send = now
        return max(0.0, self._next_send - now)

    @task
    def chat(self) -> None:
        """Join (again, under a fresh nick) if needed, else send one line.

        In resume mode the client reconnects by itself, as the same member, and the line
        numbers go on where they were.
        """
        if not self.client.joined:
            if not self.client.reconnecting and self.client.retry_in() <= 0:
                self.connects += 1
                nick = self.base_nick if self.connects == 1 else f"{self.base_nick}r{self.connects - 1}"
                self.seq, self._next_send = 0, None
                self.client.connect(self.host, nick, self.room, self.transport)
            return
        if self.opts.msg_rate > 0 and not SWARM.draining:
            self.seq += 1
            t = time.time()
            if self.client.say(probe_line(self.seq, t, self.opts.msg_bytes)):
                SWARM.sent(self.room, self.client.nick, self.seq, t)

    def on_stop(self) -> None:
        self.client.quit()
