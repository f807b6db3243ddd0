"""Redis backplane: several chat-svc instances behind one TCP load balancer share rooms.

Why Redis pub/sub rather than a cluster protocol of our own: it is the engine
Centrifugo, Socket.IO and Flask-SocketIO scale out on, operators already know
how to run and watch it, and Redis Cluster's sharded pub/sub is the road
beyond one Redis.  Without ``--redis-url`` none of this is loaded and the
service stays a single process with in-memory rooms.

What lives where (every name starts with ``chat:``)::

    room:<room>      pub/sub channel of a room.  An instance subscribes only while the
                     room has local members: subscribing every node to everything is
                     what burned 100% CPU in socket.io-redis-adapter#41.
    inst:<id>        pub/sub inbox of one instance: /msg to its members.
    history:<room>   list capped at --history lines (RPUSH + LTRIM); read by every joiner,
                     so it outlives the instances.  The hub's deque is only a local mirror.
    nick:<nick>      the instance owning a nick; claimed atomically, TTL refreshed.
    who:<room>       sorted set "<nick> <instance>" scored by expiry time (Redis clock).
    rooms:<id>       hash room -> member count of one instance; expires with it.
    instances        sorted set of live instances scored by expiry time.

A message is ``<origin instance id>\\0<kind><payload>``.  The origin has
already delivered it locally, so every instance skips its own messages on
receipt and nobody gets a line twice.  Each sender's order holds because
one publisher greenlet drains a FIFO into pipelines over one connection and
one subscriber connection is read in order.  Publishing never blocks the
fan-out path: the hub only appends to a bounded queue.

Presence expires: entries carry an expiry score refreshed every TTL/3 by
the publisher greenlet, so the members of a SIGKILLed instance vanish from
/who, /rooms and the nick registry within --presence-ttl.

Redis outage, at-most-once (as Centrifugo with NATS): delivery inside each
instance goes on untouched; lines published while the backplane is down are
delivered locally and never relayed, neither later nor into the Redis
history (counted in ``chat_backplane_publish_errors_total{reason="down"}``).
Nothing is buffered for replay, so memory stays bounded whatever the outage
length.  /who, /rooms, /msg and nick claims fall back to this instance's
view.  The subscriber reconnects with capped, jittered exponential backoff,
resubscribes the rooms that have local members and rewrites this instance's
presence, so cross-instance fan-out resumes without restarting anything.
``/readyz`` says "backplane down"; it answers 503 only with
``--ready-requires-backplane`` (the default).
"""

from __future__ import annotations

import os
import random
import secrets
import socket
import time
from collections import deque
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import gevent
import gevent.event
import gevent.lock
import redis
import structlog
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from . import protocol
from .hub import ROOM_BACKLOG_LIMIT

if TYPE_CHECKING:
    from .hub import Hub, Member, Room

PREFIX = "chat:"
INSTANCES = PREFIX + "instances"
# Bounds of the publish queue; past either, lines are relayed no more (local delivery goes on).
QUEUE_MAX_ITEMS = 10_000
QUEUE_MAX_BYTES = 8 * 1024 * 1024
# Queued messages per pipeline round trip.
PIPELINE_BATCH = 500
# Members per ZADD / nick claim call.
CHUNK = 500
# Every Redis call gives up after this; a hung Redis then counts as down.
REDIS_TIMEOUT = 1.0
# Connections for sessions' queries (/who, joins, /nick); the publisher has its own.
POOL_SIZE = 32
# A joiner waits at most this long for its room's SUBSCRIBE to be confirmed.
SUBSCRIBE_WAIT = 1.0
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 3.0
# A room nobody speaks in for a week loses its history.
HISTORY_TTL = 7 * 24 * 3600
# Messages the subscriber delivers before it lets other greenlets run.
READ_BURST = 200

# kinds of message
_LINE, _NOTICE, _PRIVATE = b"h", b"n", b"m"

# KEYS: nick keys; ARGV: instance id, ttl.  Takes free nicks, refreshes our own,
# and returns the keys another instance holds.
_CLAIM = """
local taken = {}
for _, key in ipairs(KEYS) do
  local owner = redis.call('GET', key)
  if not owner then
    redis.call('SET', key, ARGV[1], 'EX', ARGV[2])
  elseif owner == ARGV[1] then
    redis.call('EXPIRE', key, ARGV[2])
  else
    taken[#taken + 1] = key
  end
end
return taken
"""

# KEYS: nick keys; ARGV: instance id.  Deletes only the keys we own.
_RELEASE = """
local n = 0
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    redis.call('DEL', key)
    n = n + 1
  end
end
return n
"""

_ERRORS = (RedisError, OSError)


def key(kind: str, name: str) -> str:
    """A Redis key or channel name of this service."""
    return f"{PREFIX}{kind}:{name}"


def default_instance_id() -> str:
    """Host name and pid, plus a random suffix: PID 1 in a restarted container repeats."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def _pool(url: str, size: int) -> redis.BlockingConnectionPool:
    pool = redis.BlockingConnectionPool.from_url(
        url,
        max_connections=size,
        timeout=REDIS_TIMEOUT,
        socket_timeout=REDIS_TIMEOUT,
        socket_connect_timeout=REDIS_TIMEOUT,
        socket_keepalive=True,
        retry=Retry(NoBackoff(), 0),  # the backplane reconnects itself, with backoff
        protocol=2,  # RESP2: pub/sub arrives as plain replies on the subscriber connection
    )
    if pool.connection_kwargs.get("protocol") not in (2, "2"):
        raise ValueError("--redis-url: the backplane speaks RESP2; drop protocol= from the URL")
    return pool


def _chunks(items: list[str]) -> Iterator[list[str]]:
    for start in range(0, len(items), CHUNK):
        yield items[start : start + CHUNK]


class RedisBackplane:
    """The hub's ``Backplane`` on Redis, and the cluster-wide ``Directory``.

    Three kinds of greenlet touch Redis: the subscriber (``_listen_forever``,
    the only reader of the pub/sub connection, and the one that decides the
    backplane is up), the publisher (``_publish_forever``, the only writer of
    messages and presence, so those writes stay ordered) and sessions, which
    block on short queries (/who, a join's history) in their own greenlet,
    never in the fan-out path.
    """

    def __init__(self, url: str, hub: Hub, *, instance_id: str | None = None, presence_ttl: int = 15) -> None:
        self.hub = hub
        self.instance_id = instance_id or default_instance_id()
        if "\0" in self.instance_id or not self.instance_id.strip():
            raise ValueError(f"unusable instance id {self.instance_id!r}")
        self.ttl = presence_ttl
        self.log = structlog.get_logger("chat_svc.backplane").bind(instance=self.instance_id)
        # Sessions' queries share a pool; the publisher has its own connection, so a
        # burst of joins cannot starve the fan-out relay of connections.
        self._pool = _pool(url, POOL_SIZE)
        self._writer_pool = _pool(url, 1)
        self.redis = redis.Redis(connection_pool=self._pool)
        self._writer = redis.Redis(connection_pool=self._writer_pool)
        self._claim = self.redis.register_script(_CLAIM)
        self._release = self.redis.register_script(_RELEASE)
        self._origin = self.instance_id.encode()
        self._prefix = self._origin + b"\0"
        self._inbox = key("inst", self.instance_id)
        self._room_channel = key("room", "").encode()
        # counters, read by the collector
        self.up = False
        self.published = 0
        self.received = 0
        self.reconnects = 0
        self.errors = {"redis_error": 0, "down": 0, "queue_full": 0}
        # publisher state
        self._queue: deque[tuple[str, bytes, str | None, bytes]] = deque()
        self._queued_bytes = 0
        self._full = False
        self._wake = gevent.event.Event()
        self._dirty: dict[Member, None] = {}
        self._shown: dict[Member, tuple[str, str]] = {}
        self._orphans: set[str] = set()
        self._resync = True
        self._offset = 0.0
        # subscriber state (per connection)
        self._sub: Any = None
        self._sub_lock = gevent.lock.Semaphore()
        self._subscribed: set[str] = set()
        self._confirmed: set[str] = set()
        self._waiters: dict[str, gevent.event.Event] = {}
        self._joining: dict[str, int] = {}
        self._check: set[str] = set()
        self._backlog: Room | None = None
        self._reset = False
        self._stopped = False
        self._greenlets: list[gevent.Greenlet] = []

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> None:
        """Connect in the background: the instance serves (degraded) while Redis is away."""
        self._greenlets = [gevent.spawn(self._listen_forever), gevent.spawn(self._publish_forever)]

    def stop(self, timeout: float = 2.0) -> None:
        """Flush what the leaving members changed, withdraw this instance, close."""
        deadline = time.monotonic() + timeout
        self._wake.set()
        while self.up and (self._queue or self._dirty) and time.monotonic() < deadline:
            gevent.sleep(0.01)
        self._stopped = True
        if self.up:
            try:
                pipe = self._writer.pipeline(transaction=False)
                pipe.zrem(INSTANCES, self.instance_id)
                pipe.delete(key("rooms", self.instance_id))
                for nick, room in self._shown.values():
                    pipe.zrem(key("who", room), self._entry(nick))
                nicks = [key("nick", nick) for nick, _ in self._shown.values()]
                if nicks:
                    self._release(keys=nicks, args=[self.instance_id], client=pipe)
                pipe.execute()
            except _ERRORS as exc:
                self.log.warning("backplane_withdraw_failed", error=str(exc))
        gevent.killall(self._greenlets, timeout=1.0)
        sub, self._sub = self._sub, None
        if sub is not None:
            sub.disconnect()
        self._pool.disconnect()
        self._writer_pool.disconnect()
        self.up = False

    def collector(self) -> Collector:
        return _Collector(self)

    # -- hub hooks (never block, except ``joining``) ------------------------

    def publish(self, room: str, data: bytes, history: bool) -> None:
        """Relay a room line (``history``: also kept in Redis) or notice; queued, or dropped and counted."""
        self._enqueue(
            key("room", room),
            self._prefix + (_LINE if history else _NOTICE) + data,
            room if history else None,
            data,
        )

    def room_active(self, room: str, active: bool) -> None:
        """First local member in (subscribe) or last one out (unsubscribe)."""
        if self.up:
            self._check.add(room)
            self._wake.set()

    def joining(self, member: Member, room: str) -> list[bytes] | None:
        """Before ``member`` enters ``room``: subscribe, then read the recent lines.

        Runs in the joiner's greenlet and may block for a round trip or two.
        The subscription is confirmed before the history is read, so a line
        published after the snapshot reaches the joiner live.  None means
        "use the hub's local history" (backplane down).
        """
        if not self.up:
            return None
        self._joining[room] = self._joining.get(room, 0) + 1
        lines: list[bytes] | None
        try:
            if room not in self._confirmed:
                waiter = self._waiters.setdefault(room, gevent.event.Event())
                if room not in self._subscribed:
                    self._subscribed.add(room)
                    try:
                        self._send_sub("SUBSCRIBE", key("room", room))
                    except BaseException:
                        self._subscribed.discard(room)
                        raise
                waiter.wait(SUBSCRIBE_WAIT)
            history = self.hub.history
            lines = list(self.redis.lrange(key("history", room), -history, -1)) if history else []
        except _ERRORS as exc:
            self.log.info("backplane_join_degraded", room=room, error=str(exc))
            lines = None
        finally:
            left = self._joining[room] - 1
            if left:
                self._joining[room] = left
            else:
                del self._joining[room]
            self._check.add(room)  # unsubscribes again if the join is abandoned
            self._wake.set()
        self._touch(member)
        return lines

    def left(self, member: Member) -> None:
        """``member`` left a room (moving or disconnecting): update presence soon."""
        self._touch(member)

    # -- Directory: cluster-wide answers (asked from session greenlets) -------

    def claim_nick(self, member: Member, nick: str) -> str | None:
        """/nick across the cluster: an error text, or None when the nick changed."""
        hub = self.hub
        if nick == member.nick or nick in hub.members or not self.up:
            return hub.claim_nick(member, nick)
        try:
            taken = self._claim(keys=[key("nick", nick)], args=[self.instance_id, self.ttl])
        except _ERRORS as exc:
            self.log.info("backplane_query_failed", query="claim_nick", error=str(exc))
            return hub.claim_nick(member, nick)
        if taken:
            return f"nick {nick} is taken"
        if hub.members.get(member.nick) is not member:  # disconnected while we asked
            self._orphans.add(nick)
            self._wake.set()
            return None
        error = hub.claim_nick(member, nick)
        self._touch(member)  # the presence update releases the old nick
        return error

    def whisper(self, member: Member, target: str, text: str) -> bool:
        """/msg to a member here, or of another instance through that instance's inbox."""
        if self.hub.whisper(member, target, text):
            return True
        if not self.up:
            return False
        try:
            owner = self.redis.get(key("nick", target))
        except _ERRORS as exc:
            self.log.info("backplane_query_failed", query="whisper", error=str(exc))
            return False
        if owner is None or owner == self._origin:
            return False
        line = protocol.private_line(member.nick, target, text)
        envelope = self._prefix + _PRIVATE + target.encode() + b"\0" + line
        self._enqueue(key("inst", owner.decode()), envelope, None, line)
        self.hub.send_to(member, line)
        return True

    def who(self, room: str) -> list[str]:
        """Nicks in ``room`` on every live instance; this instance's from the hub itself."""
        names: set[str] = set()
        if self.up:
            try:
                entries = self.redis.zrangebyscore(key("who", room), self._now(), "+inf")
            except _ERRORS as exc:
                self.log.info("backplane_query_failed", query="who", error=str(exc))
                entries = []
            for entry in entries:
                nick, _, owner = entry.decode("utf-8", "replace").partition(" ")
                if owner != self.instance_id:
                    names.add(nick)
        names.update(self.hub.who(room))
        return sorted(names)

    def room_counts(self) -> list[tuple[str, int]]:
        """Rooms and member counts summed over every live instance."""
        counts: dict[str, int] = {}
        if self.up:
            try:
                live = self.redis.zrangebyscore(INSTANCES, self._now(), "+inf")
                others = [name.decode() for name in live if name != self._origin]
                if others:
                    pipe = self.redis.pipeline(transaction=False)
                    for other in others:
                        pipe.hgetall(key("rooms", other))
                    for mapping in pipe.execute():
                        for name, count in mapping.items():
                            room = name.decode("utf-8", "replace")
                            counts[room] = counts.get(room, 0) + int(count)
            except _ERRORS as exc:
                self.log.info("backplane_query_failed", query="rooms", error=str(exc))
                counts = {}
        for room, count in self.hub.room_counts():
            counts[room] = counts.get(room, 0) + count
        return sorted(counts.items())

    # -- publishing -----------------------------------------------------------

    def _enqueue(self, channel: str, envelope: bytes, history_room: str | None, data: bytes) -> None:
        if not self.up:
            self.errors["down"] += 1
            return
        if len(self._queue) >= QUEUE_MAX_ITEMS or self._queued_bytes >= QUEUE_MAX_BYTES:
            self.errors["queue_full"] += 1
            if not self._full:
                self._full = True
                self.log.warning("backplane_queue_full", items=len(self._queue), bytes=self._queued_bytes)
            return
        self._queue.append((channel, envelope, history_room, data))
        self._queued_bytes += len(envelope)
        if not self._wake.is_set():
            self._wake.set()

    def _touch(self, member: Member) -> None:
        if self.up:
            self._dirty[member] = None
            self._wake.set()

    def _publish_forever(self) -> None:
        """The only writer of messages and presence: drains the queue, beats every TTL/3."""
        beat = max(0.2, self.ttl / 3)
        next_beat = 0.0
        while not self._stopped:
            self._wake.wait(max(0.0, next_beat - time.monotonic()) if self.up else None)
            self._wake.clear()
            if not self.up:
                self._discard()
                continue
            try:
                if self._check:
                    self._reconcile()
                if self._resync or time.monotonic() >= next_beat:
                    self._heartbeat()
                    next_beat = time.monotonic() + beat
                while self.up and (self._queue or self._dirty or self._orphans):
                    self._drain()
            except _ERRORS as exc:
                self._lost("publisher", exc)
            except Exception as exc:  # a bug must not silence the backplane for good
                self.log.exception("backplane_publisher_failed")
                self._lost("publisher", exc)
                gevent.sleep(BACKOFF_MAX)

    def _discard(self) -> None:
        """Backplane down: what was queued is not relayed (at-most-once)."""
        if self._queue:
            self.errors["down"] += len(self._queue)
            self._queue.clear()
            self._queued_bytes = 0
        self._full = False
        self._dirty.clear()
        self._orphans.clear()
        self._check.clear()

    def _drain(self) -> None:
        """One pipeline: presence changes first, then up to PIPELINE_BATCH messages in order."""
        pipe = self._writer.pipeline(transaction=False)
        if self._dirty or self._orphans:
            members = list(self._dirty)
            self._dirty.clear()
            self._presence(pipe, members, self._now() + self.ttl)
        batch: list[tuple[str, bytes, str | None, bytes]] = []
        while self._queue and len(batch) < PIPELINE_BATCH:
            item = self._queue.popleft()
            self._queued_bytes -= len(item[1])
            batch.append(item)
        if not self._queue:
            self._full = False
        histories: dict[str, list[bytes]] = {}
        for _, _, room, data in batch:
            if room is not None:
                histories.setdefault(room, []).append(data)
        for room, lines in histories.items():
            history_key = key("history", room)
            pipe.rpush(history_key, *lines)
            pipe.ltrim(history_key, -self.hub.history, -1)
            pipe.expire(history_key, HISTORY_TTL)
        first = len(pipe)
        for channel, envelope, _, _ in batch:
            pipe.publish(channel, envelope)
        try:
            results = pipe.execute(raise_on_error=False)
        except _ERRORS:
            self.errors["redis_error"] += len(batch)
            raise
        failed = [result for result in results if isinstance(result, Exception)]
        refused = sum(isinstance(result, Exception) for result in results[first:])
        self.published += len(batch) - refused
        self.errors["redis_error"] += refused
        if failed:
            self.log.warning("backplane_commands_failed", count=len(failed), error=str(failed[0]))

    def _state(self, member: Member) -> tuple[str, str] | None:
        room = member.room
        if room is None or self.hub.members.get(member.nick) is not member:
            return None
        return member.nick, room.name

    def _entry(self, nick: str) -> str:
        return f"{nick} {self.instance_id}"

    def _presence(self, pipe: Any, members: Iterable[Member], expires: float) -> list[int]:
        """Write what changed for ``members`` since last written; returns claim indexes."""
        hub = self.hub
        rooms: set[str] = set()
        release: list[str] = []
        claim: list[str] = []
        added: dict[str, dict[str, float]] = {}
        for member in members:
            before = self._shown.get(member)
            now = self._state(member)
            if before == now:
                continue
            if before is not None:
                pipe.zrem(key("who", before[1]), self._entry(before[0]))
                rooms.add(before[1])
                if before[0] not in hub.members:
                    release.append(key("nick", before[0]))
            if now is None:
                del self._shown[member]
            else:
                self._shown[member] = now
                added.setdefault(now[1], {})[self._entry(now[0])] = expires
                rooms.add(now[1])
                claim.append(key("nick", now[0]))
        release.extend(key("nick", nick) for nick in self._orphans if nick not in hub.members)
        self._orphans.clear()
        for chunk in _chunks(release):
            self._release(keys=chunk, args=[self.instance_id], client=pipe)
        for room, entries in added.items():
            pipe.zadd(key("who", room), entries)
            pipe.expire(key("who", room), self.ttl * 2)
        counts_key = key("rooms", self.instance_id)
        for room in rooms:
            local = hub.rooms.get(room)
            if local is not None and local.members:
                pipe.hset(counts_key, room, len(local.members))
            else:
                pipe.hdel(counts_key, room)
        if rooms:
            pipe.expire(counts_key, self.ttl)
        indexes = []
        for chunk in _chunks(claim):
            indexes.append(len(pipe))
            self._claim(keys=chunk, args=[self.instance_id, self.ttl], client=pipe)
        return indexes

    def _heartbeat(self) -> None:
        """Refresh everything this instance holds; after a reconnect, rewrite it."""
        seconds, micros = self._writer.time()
        self._offset = seconds + micros / 1e6 - time.time()
        now = self._now()
        expires = now + self.ttl
        pipe = self._writer.pipeline(transaction=False)
        pipe.zadd(INSTANCES, {self.instance_id: expires})
        pipe.zremrangebyscore(INSTANCES, "-inf", now)
        members = [*self._shown, *self.hub.members.values()]
        self._dirty.clear()
        indexes = self._presence(pipe, members, expires)
        by_room: dict[str, list[str]] = {}
        for nick, room in self._shown.values():
            by_room.setdefault(room, []).append(self._entry(nick))
        for room, entries in by_room.items():
            who_key = key("who", room)
            for chunk in _chunks(entries):
                pipe.zadd(who_key, dict.fromkeys(chunk, expires))
            pipe.zremrangebyscore(who_key, "-inf", now)
            pipe.expire(who_key, self.ttl * 2)
        counts_key = key("rooms", self.instance_id)
        pipe.delete(counts_key)
        counts: dict[str | bytes, int] = {
            name: len(room.members) for name, room in self.hub.rooms.items() if room.members
        }
        if counts:
            pipe.hset(counts_key, mapping=counts)
            pipe.expire(counts_key, self.ttl)
        nicks = [key("nick", nick) for nick, _ in self._shown.values()]
        for chunk in _chunks(nicks):
            indexes.append(len(pipe))
            self._claim(keys=chunk, args=[self.instance_id, self.ttl], client=pipe)
        results = pipe.execute(raise_on_error=False)
        self._resync = False
        taken = sorted({k.decode() for i in indexes if isinstance(results[i], list) for k in results[i]})
        if taken:
            self.log.warning("nick_conflict", nicks=[k.removeprefix(PREFIX + "nick:") for k in taken])

    def _now(self) -> float:
        """Wall time on Redis' clock, so instances with skewed clocks agree on expiry."""
        return time.time() + self._offset

    # -- subscribing ----------------------------------------------------------

    def _send_sub(self, *args: str) -> None:
        """Write a (UN)SUBSCRIBE on the subscriber connection; the listener reads the reply."""
        with self._sub_lock:
            conn = self._sub
            if conn is None:
                raise redis.ConnectionError("backplane subscriber not connected")
            conn.send_command(*args)

    def _reconcile(self) -> None:
        """Subscribe rooms that have local members, unsubscribe rooms that have none."""
        rooms, self._check = self._check, set()
        wanted = {room for room in rooms if room in self.hub.rooms or room in self._joining}
        subscribe = [room for room in wanted if room not in self._subscribed]
        unsubscribe = [room for room in rooms - wanted if room in self._subscribed]
        self._subscribed.update(subscribe)
        self._subscribed.difference_update(unsubscribe)
        self._confirmed.difference_update(unsubscribe)
        if subscribe:
            self._send_sub("SUBSCRIBE", *(key("room", room) for room in subscribe))
        if unsubscribe:
            self._send_sub("UNSUBSCRIBE", *(key("room", room) for room in unsubscribe))

    def _listen_forever(self) -> None:
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
                self._lost("subscriber", exc)
            finally:
                self._sub = None
                conn.disconnect()
                self._subscribed = set()
                self._confirmed = set()
                self._reset = False
            if self.up and not self._stopped:
                self._lost("subscriber", RuntimeError("reset"))
            if time.monotonic() - connected_at < 1.0:  # flapping: keep backing off
                gevent.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, BACKOFF_MAX)
            else:
                delay = BACKOFF_FIRST

    def _connect(self) -> Any:
        """A fresh subscriber connection with the inbox and every wanted room confirmed."""
        self._reset = False
        conn = self._pool.connection_class(**self._pool.connection_kwargs)
        try:
            conn.connect()
            rooms = set(self.hub.rooms) | set(self._joining)
            self._subscribed = rooms
            self._confirmed = set()
            channels = [self._inbox, *(key("room", room) for room in rooms)]
            conn.send_command("SUBSCRIBE", *channels)
            pending = len(channels)
            while pending:
                reply = conn.read_response()
                if reply[0] == b"subscribe":
                    pending -= 1
                self._dispatch(reply)
            self.redis.ping()
            self._writer.ping()
        except BaseException:
            conn.disconnect()
            raise
        self._sub = conn
        self._resync = True
        self._check.update(self.hub.rooms)  # rooms that appeared while we connected
        self.up = True
        self._wake.set()
        return conn

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

    def _lost(self, where: str, exc: BaseException) -> None:
        if self.up:
            self.log.warning("backplane_down", where=where, error=str(exc))
        self.up = False
        self._reset = True
        self._wake.set()
        for waiter in self._waiters.values():
            waiter.set()
        self._waiters.clear()

    def _dispatch(self, reply: list[Any]) -> None:
        kind = reply[0]
        if kind == b"message":
            self._receive(reply[1], reply[2])
        elif kind == b"subscribe":
            channel: bytes = reply[1]
            if channel.startswith(self._room_channel):
                room = channel[len(self._room_channel) :].decode("utf-8", "replace")
                if room in self._subscribed:
                    self._confirmed.add(room)
                    waiter = self._waiters.pop(room, None)
                    if waiter is not None:
                        waiter.set()

    def _receive(self, channel: bytes, payload: bytes) -> None:
        """Deliver another instance's message to the local members; skip our own."""
        origin, sep, body = payload.partition(b"\0")
        if not sep or not body or origin == self._origin:
            return
        kind, data = body[:1], body[1:]
        hub = self.hub
        if kind == _PRIVATE:
            target, _, line = data.partition(b"\0")
            if hub.deliver(target.decode("utf-8", "replace"), line):
                self.received += 1
            return
        if not channel.startswith(self._room_channel):
            return
        room = hub.rooms.get(channel[len(self._room_channel) :].decode("utf-8", "replace"))
        if room is None:
            return
        self.received += 1
        hub.deliver_local(room, data, None, history=kind == _LINE)
        if room.waiting > ROOM_BACKLOG_LIMIT:
            self._backlog = room


class _Collector(Collector):
    """The backplane's counters, read at scrape time (the hot path bumps plain ints)."""

    def __init__(self, backplane: RedisBackplane) -> None:
        self._bp = backplane

    def collect(self) -> Iterator[Metric]:
        bp = self._bp
        yield GaugeMetricFamily(
            "chat_backplane_up",
            "1 while subscribed to Redis and answering; 0 during an outage.",
            value=int(bp.up),
        )
        yield CounterMetricFamily(
            "chat_backplane_published",
            "Room lines, notices and /msg written to Redis.",
            value=bp.published,
        )
        yield CounterMetricFamily(
            "chat_backplane_received",
            "Messages from other instances delivered here.",
            value=bp.received,
        )
        yield CounterMetricFamily(
            "chat_backplane_reconnects",
            "Redis connections re-established after a loss.",
            value=bp.reconnects,
        )
        errors = CounterMetricFamily(
            "chat_backplane_publish_errors",
            "Messages not relayed to other instances (delivered locally only), by reason.",
            labels=["reason"],
        )
        for reason, count in bp.errors.items():
            errors.add_metric([reason], count)
        yield errors
        yield GaugeMetricFamily(
            "chat_backplane_queue",
            "Messages waiting for the publisher greenlet.",
            value=len(bp._queue),
        )
