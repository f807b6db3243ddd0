"""The backplane's reader: one pub/sub connection, read in order by one greenlet.

This greenlet decides whether the backplane is up: it is up while its
connection is subscribed and both the query pool and the publisher's
connection answer.  On any loss it reconnects with capped, jittered
exponential backoff, resubscribes the rooms that have local members, and
(through ``connects``) tells the publisher to rewrite this instance's presence.
Each sender's order holds because one connection is read in order.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import gevent
import gevent.event
import gevent.lock
import redis

from ..hub import ROOM_BACKLOG_LIMIT, Room
from . import keys
from .instance import Instance

if TYPE_CHECKING:
    from .publisher import RoomLine

# A joiner waits at most this long for its room's SUBSCRIBE to be confirmed.
SUBSCRIBE_WAIT = 1.0
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 3.0
# Messages delivered before other greenlets get a turn.
READ_BURST = 200


class Subscriber:
    """Subscriptions follow the rooms with local members; messages go to the hub.

    ``check`` and ``joining`` run in other greenlets; they never read the
    connection, they only write (UN)SUBSCRIBE to it or ask the publisher's
    greenlet (through ``wake``) to reconcile the subscriptions.
    """

    def __init__(
        self,
        instance: Instance,
        pool: redis.ConnectionPool | None,
        answering: Sequence[redis.Redis],
        wake: gevent.event.Event,
    ) -> None:
        self.hub = instance.hub
        self.log = instance.log
        self._pool = pool
        self._answering = answering
        self._wake = wake
        self._origin = instance.id.encode()
        self._inbox = keys.inbox(instance.id)
        # read by the collector and the publisher
        self.up = False
        self.received = 0
        self.reconnects = 0
        self.connects = 0
        # rooms whose subscription may have to change; the publisher's greenlet reconciles them
        self.pending: set[str] = set()
        # Called when another instance changed the bans, and after every (re)connect.
        self.on_bans_changed: Callable[[], None] | None = None
        # per connection
        self._conn: Any = None
        self._lock = gevent.lock.Semaphore()
        self._subscribed: set[str] = set()
        self._confirmed: set[str] = set()
        self._waiters: dict[str, gevent.event.Event] = {}
        self._joining: dict[str, int] = {}
        self._backlog: Room | None = None
        self._reset = False
        self._stopped = False
        # the publisher's: our own lines on their way, and what to do with them when Redis is lost
        self.sender_of: Callable[[int, str], RoomLine | None] = lambda tag, lane: None
        # (rooms: which rooms' lines; None: all of them)
        self.on_lost: Callable[[Callable[[str], bool] | None], None] | None = None
        # set when the URL could not be told a cluster node or not at start: checked on connect
        self.check_mode = False

    # -- asked by other greenlets -------------------------------------------------

    def check(self, room: str) -> None:
        """``room`` gained its first or lost its last local member: (un)subscribe soon."""
        self.pending.add(room)
        self._wake.set()

    @contextmanager
    def joining(self, room: str) -> Iterator[None]:
        """Keep ``room`` subscribed while a member joins; confirmed before the body runs.

        Blocks the joiner's greenlet for a round trip at most (SUBSCRIBE_WAIT),
        so a line published after the body reads the history reaches the
        joiner live.
        """
        self._joining[room] = self._joining.get(room, 0) + 1
        try:
            self._subscribe_for_join(room)
            yield
        finally:
            left = self._joining[room] - 1
            if left:
                self._joining[room] = left
            else:
                del self._joining[room]
            self.check(room)  # unsubscribes again if the join is abandoned

    def _subscribe_for_join(self, room: str) -> None:
        if room not in self._confirmed:
            self._await_subscription(
                room, self._subscribed, room, lambda: self._send("SUBSCRIBE", keys.room_channel(room))
            )

    def _await_subscription(self, room: str, subscribed: set[str], key: str, send: Callable[[], None]) -> None:
        """Send the subscription unless ``key`` is already asked for, then wait for its confirmation.

        ``subscribed`` is what the connection has been asked to follow (one Redis's rooms, or a
        shard's channels); a send that fails leaves ``key`` out of it, so reconcile asks again.
        """
        waiter = self._waiters.setdefault(room, gevent.event.Event())
        if key not in subscribed:
            subscribed.add(key)
            try:
                send()
            except BaseException:
                subscribed.discard(key)
                raise
        waiter.wait(SUBSCRIBE_WAIT)

    def reconcile(self) -> None:
        """Subscribe pending rooms that have local members, unsubscribe those that have none."""
        rooms, self.pending = self.pending, set()
        wanted = {room for room in rooms if room in self.hub.rooms or room in self._joining}
        subscribe = [room for room in wanted if room not in self._subscribed]
        unsubscribe = [room for room in rooms - wanted if room in self._subscribed]
        self._subscribed.update(subscribe)
        self._subscribed.difference_update(unsubscribe)
        self._confirmed.difference_update(unsubscribe)
        if subscribe:
            self._send("SUBSCRIBE", *(keys.room_channel(room) for room in subscribe))
        if unsubscribe:
            self._send("UNSUBSCRIBE", *(keys.room_channel(room) for room in unsubscribe))

    def room_up(self, room: str) -> bool:
        """Whether ``room``'s lines can be relayed now (one Redis: whether it is up)."""
        return self.up

    def channel_up(self, channel: str) -> bool:
        return self.up

    def lost(self, where: str, exc: BaseException) -> None:
        """Redis failed ``where``: down until the subscriber has reconnected.

        In the same step: no room mirror follows Redis any more (lines may be
        missed from now on), and the lines still on their way through Redis
        are delivered here (``on_lost``) before any later line.
        """
        if self.up:
            self.log.warning("backplane_down", where=where, error=str(exc))
        self.up = False
        self._reset = True
        for room_log in self.hub.logs:
            room_log.synced = False
        if self.on_lost is not None:
            self.on_lost(None)
        self._wake.set()
        for waiter in self._waiters.values():
            waiter.set()
        self._waiters.clear()

    def stop(self) -> None:
        self._stopped = True

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.disconnect()
        self.up = False

    def _send(self, *args: str) -> None:
        """Write a (UN)SUBSCRIBE on the connection; the reading greenlet reads the reply."""
        with self._lock:
            conn = self._conn
            if conn is None:
                raise redis.ConnectionError("backplane subscriber not connected")
            conn.send_command(*args)

    # -- the reading greenlet -------------------------------------------------------

    def run(self) -> None:
        """Connect, subscribe, read; on any loss mark the backplane down and reconnect."""
        delay = BACKOFF_FIRST
        connected_before = False
        while not self._stopped:
            try:
                conn = self._connect()
            except Exception as exc:
                if delay == BACKOFF_FIRST:
                    self.log.warning("backplane_unreachable", error=str(exc))
                gevent.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            if connected_before:
                self.reconnects += 1
            connected_before = True
            connected_at = time.monotonic()
            self.log.info("backplane_up", reconnects=self.reconnects, rooms=len(self._subscribed))
            try:
                self._read(conn)
            except Exception as exc:
                self.lost("subscriber", exc)
            finally:
                self._conn = None
                conn.disconnect()
                self._subscribed = set()
                self._confirmed = set()
                self._reset = False
            if self.up and not self._stopped:
                self.lost("subscriber", RuntimeError("reset"))
            if time.monotonic() - connected_at < 1.0:  # flapping: keep backing off
                gevent.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, BACKOFF_MAX)
            else:
                delay = BACKOFF_FIRST

    def _connect(self) -> Any:
        """A fresh connection with the inbox and every wanted room confirmed."""
        self._reset = False
        assert self._pool is not None
        conn = self._pool.connection_class(**self._pool.connection_kwargs)
        try:
            conn.connect()
            if self.check_mode:
                self._check_mode(conn)
            rooms = set(self.hub.rooms) | set(self._joining)
            self._subscribed = rooms
            self._confirmed = set()
            channels = [self._inbox, keys.CONTROL, *(keys.room_channel(room) for room in rooms)]
            conn.send_command("SUBSCRIBE", *channels)
            pending = len(channels)
            while pending:
                reply = conn.read_response()
                if reply[0] == b"subscribe":
                    pending -= 1
                self._dispatch(reply)
            for client in self._answering:
                client.ping()
        except BaseException:
            conn.disconnect()
            raise
        self._conn = conn
        self.connects += 1
        self.pending.update(self.hub.rooms)  # rooms that appeared while we connected
        self.up = True
        self._wake.set()
        if self.on_bans_changed is not None:
            self.on_bans_changed()
        return conn

    def _check_mode(self, conn: Any) -> None:
        """Refuse a cluster node found only now: this instance was built for one Redis at start."""
        conn.send_command("INFO", "cluster")
        if b"cluster_enabled:1" in conn.read_response():
            self.log.error("backplane_is_cluster", hint="--redis-url is a Redis Cluster node: restart chat-svc")
            raise redis.ConnectionError("--redis-url is a Redis Cluster node; restart to use cluster mode")
        self.check_mode = False

    def _read(self, conn: Any) -> None:
        """Deliver messages in order; pause while a room's backlog is over the hub's limit.

        Pausing leaves the excess in Redis' output buffer for this client; past
        Redis' ``client-output-buffer-limit pubsub`` it drops us and we
        reconnect (at-most-once), so neither side's memory grows without bound.
        """
        burst = 0
        while not self._stopped and not self._reset:
            if not conn.can_read(timeout=1.0):
                continue
            self._dispatch(conn.read_response())
            burst += 1
            if burst >= READ_BURST:
                burst = 0
                gevent.sleep(0)
            while self._backlog is not None and self._backlog.waiting > ROOM_BACKLOG_LIMIT:
                gevent.sleep(0.005)
            self._backlog = None

    def _dispatch(self, reply: list[Any]) -> None:
        kind = reply[0]
        if kind == b"message":
            self.receive(reply[1], reply[2])
        elif kind == b"subscribe":
            room = keys.room_of(reply[1])
            if room is not None and room in self._subscribed:
                self._confirmed.add(room)
                waiter = self._waiters.pop(room, None)
                if waiter is not None:
                    waiter.set()

    def receive(self, channel: bytes, message: bytes, lane: str = "") -> None:
        """Deliver a room line (ours too: Redis' order is the order) or a private line for a member here.

        ``lane``: the connection it came on (a cluster's shard); our lines come back in order on each.
        """
        opened = keys.open_envelope(message)
        if opened is None:
            return
        origin, kind, payload = opened
        hub = self.hub
        if kind == keys.PRIVATE:
            if hub.deliver_private(*keys.open_private(payload)):
                self.received += 1
            return
        if kind == keys.KICK:
            if hub.kick(*keys.open_private(payload)):
                self.received += 1
            return
        if kind == keys.BANS_CHANGED:
            if self.on_bans_changed is not None:
                self.on_bans_changed()
            return
        line = keys.open_line(payload)
        name = keys.room_of(channel)
        if line is None or name is None:
            return
        tag, epoch, offset, data = line
        ours = self.sender_of(tag, lane) if origin == self._origin else None
        room = hub.rooms.get(name)
        if room is None:
            if name in self._joining:
                hub.remember_remote(name, epoch, offset, data, kind == keys.LINE)
            return
        if ours is None:
            self.received += 1
            hub.deliver_remote(room, epoch, offset, data, kind == keys.LINE, None, time.perf_counter())
        else:
            hub.deliver_remote(room, epoch, offset, data, ours.chat, ours.sender, ours.t_read)
        if room.waiting > ROOM_BACKLOG_LIMIT:
            self._backlog = room
