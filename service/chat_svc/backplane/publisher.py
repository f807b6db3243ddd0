"""The backplane's writer: relayed lines, presence and the heartbeat, from one greenlet.

That greenlet is the only writer of messages and presence, so those writes
stay ordered: it sends a FIFO in pipelines over a connection of its own
(a burst of joins on the query pool cannot starve the relay).  Publishing
never blocks the fan-out path: the hub only appends to the queue, which is
bounded; past its bounds lines are relayed no more (local delivery goes on).

Presence expires: entries carry an expiry score refreshed every TTL/3, so
the members of a SIGKILLed instance vanish from /who, /rooms and the nick
registry within --presence-ttl.  While Redis is away nothing is queued and
what was queued is dropped (at-most-once): memory stays bounded whatever
the outage length.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

import gevent
import gevent.event
import redis

from ..hub import Member
from . import keys
from .connection import ERRORS
from .instance import Instance
from .subscriber import BACKOFF_MAX, Subscriber

# Bounds of the publish queue; past either, lines are relayed no more (local delivery goes on).
QUEUE_MAX_ITEMS = 10_000
QUEUE_MAX_BYTES = 8 * 1024 * 1024
# Queued messages per pipeline round trip.
PIPELINE_BATCH = 500
# Members per ZADD / nick claim call.
CHUNK = 500


def _chunks(items: list[str]) -> Iterator[list[str]]:
    for start in range(0, len(items), CHUNK):
        yield items[start : start + CHUNK]


class Publisher:
    """The queue of messages to relay and the presence this instance has written."""

    def __init__(
        self, instance: Instance, writer: redis.Redis, subscriber: Subscriber, wake: gevent.event.Event
    ) -> None:
        instance_id = instance.id
        self.hub = instance.hub
        self.log = instance.log
        self.ttl = instance.ttl
        self.instance_id = instance_id
        self._writer = writer
        self._subscriber = subscriber
        self._wake = wake
        self._claim = writer.register_script(keys.CLAIM)
        self._release = writer.register_script(keys.RELEASE)
        self._line = keys.envelope_prefix(instance_id, keys.LINE)
        self._notice = keys.envelope_prefix(instance_id, keys.NOTICE)
        self._private = keys.envelope_prefix(instance_id, keys.PRIVATE)
        self._kick = keys.envelope_prefix(instance_id, keys.KICK)
        # read by the collector
        self.published = 0
        self.errors = {"redis_error": 0, "down": 0, "queue_full": 0}
        # (channel, envelope, room whose history keeps the line or None, line)
        self._queue: deque[tuple[str, bytes, str | None, bytes]] = deque()
        self._queued_bytes = 0
        self._full = False
        # presence: members changed since last written, what was written, nicks to release
        self._dirty: dict[Member, None] = {}
        self._shown: dict[Member, tuple[str, str]] = {}
        self._orphans: set[str] = set()
        self._synced = 0  # the subscriber's ``connects`` when presence was last rewritten
        self._offset = 0.0
        self._stopped = False

    @property
    def queued(self) -> int:
        """Messages waiting for the publisher's greenlet."""
        return len(self._queue)

    # -- asked by other greenlets (never block) -------------------------------------

    def publish(self, room: str, data: bytes, history: bool) -> None:
        """A room line (``history``: also kept in Redis) or notice for the other instances."""
        if history:
            self._enqueue(keys.room_channel(room), self._line + data, room, data)
        else:
            self._enqueue(keys.room_channel(room), self._notice + data, None, data)

    def send_private(self, owner: str, target: str, line: bytes) -> None:
        """A /msg line for ``target``, a member of the instance ``owner``."""
        self._enqueue(keys.inbox(owner), self._private + keys.private_payload(target, line), None, line)

    def send_kick(self, owner: str, target: str, notice: bytes) -> None:
        """Kick ``target``, a member of the instance ``owner``: it gets ``notice``, then is disconnected."""
        self._enqueue(keys.inbox(owner), self._kick + keys.private_payload(target, notice), None, notice)

    def touch(self, member: Member) -> None:
        """``member`` joined, left or was renamed: write its presence soon."""
        if self._subscriber.up:
            self._dirty[member] = None
            self._wake.set()

    def orphan(self, nick: str) -> None:
        """A nick claimed for a member that left meanwhile: release it soon."""
        self._orphans.add(nick)
        self._wake.set()

    def now(self) -> float:
        """Wall time on Redis' clock, so instances with skewed clocks agree on expiry."""
        return time.time() + self._offset

    def _enqueue(self, channel: str, envelope: bytes, history_room: str | None, data: bytes) -> None:
        if not self._subscriber.up:
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

    # -- the writing greenlet ---------------------------------------------------------

    def run(self) -> None:
        """Send what is queued and what changed, reconcile subscriptions, beat every TTL/3."""
        subscriber = self._subscriber
        beat = max(0.2, self.ttl / 3)
        next_beat = 0.0
        while not self._stopped:
            self._wake.wait(max(0.0, next_beat - time.monotonic()) if subscriber.up else None)
            self._wake.clear()
            if not subscriber.up:
                self._discard()
                continue
            try:
                if subscriber.pending:
                    subscriber.reconcile()
                if self._synced != subscriber.connects or time.monotonic() >= next_beat:
                    self._heartbeat()
                    next_beat = time.monotonic() + beat
                while subscriber.up and (self._queue or self._dirty or self._orphans):
                    self._send_batch()
            except ERRORS as exc:
                subscriber.lost("publisher", exc)
            except Exception as exc:  # a bug must not silence the backplane for good
                self.log.exception("backplane_publisher_failed")
                subscriber.lost("publisher", exc)
                gevent.sleep(BACKOFF_MAX)

    def flush(self, timeout: float) -> None:
        """Wait up to ``timeout`` for what is queued and changed to be sent (shutdown)."""
        deadline = time.monotonic() + timeout
        self._wake.set()
        while self._subscriber.up and (self._queue or self._dirty) and time.monotonic() < deadline:
            gevent.sleep(0.01)

    def stop(self) -> None:
        self._stopped = True

    def withdraw(self) -> None:
        """Remove this instance and its members' presence from Redis (a clean shutdown)."""
        try:
            pipe = self._writer.pipeline(transaction=False)
            pipe.zrem(keys.INSTANCES, self.instance_id)
            pipe.delete(keys.room_counts(self.instance_id))
            for nick, room in self._shown.values():
                pipe.zrem(keys.who(room), keys.who_entry(nick, self.instance_id))
            nicks = [keys.nick(nick) for nick, _ in self._shown.values()]
            if nicks:
                self._release(keys=nicks, args=[self.instance_id], client=pipe)
            pipe.execute()
        except ERRORS as exc:
            self.log.warning("backplane_withdraw_failed", error=str(exc))

    def _discard(self) -> None:
        """Backplane down: what was queued is not relayed (at-most-once)."""
        if self._queue:
            self.errors["down"] += len(self._queue)
            self._queue.clear()
            self._queued_bytes = 0
        self._full = False
        self._dirty.clear()
        self._orphans.clear()
        self._subscriber.pending.clear()

    def _send_batch(self) -> None:
        """One pipeline: presence changes first, then up to PIPELINE_BATCH messages in order."""
        pipe = self._writer.pipeline(transaction=False)
        if self._dirty or self._orphans:
            members = list(self._dirty)
            self._dirty.clear()
            self._presence(pipe, members, self.now() + self.ttl)
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
            history_key = keys.history(room)
            pipe.rpush(history_key, *lines)
            pipe.ltrim(history_key, -self.hub.history, -1)
            pipe.expire(history_key, keys.HISTORY_TTL)
        first = len(pipe)
        for channel, envelope, _, _ in batch:
            pipe.publish(channel, envelope)
        try:
            results = pipe.execute(raise_on_error=False)
        except ERRORS:
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
        if room is None or self.hub.member(member.nick) is not member:
            return None
        return member.nick, room.name

    def _presence(self, pipe: Any, members: Iterable[Member], expires: float) -> list[int]:
        """Write what changed for ``members`` since last written; returns claim indexes."""
        hub, me = self.hub, self.instance_id
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
                pipe.zrem(keys.who(before[1]), keys.who_entry(before[0], me))
                rooms.add(before[1])
                if hub.holder(before[0]) is None:
                    release.append(keys.nick(before[0]))
            if now is None:
                del self._shown[member]
                # An identified member renamed away from its sub held that too (hub.reserved).
                sub = member.identity.sub if member.identity is not None else None
                if sub is not None and before is not None and sub != before[0] and hub.holder(sub) is None:
                    release.append(keys.nick(sub))
            else:
                self._shown[member] = now
                added.setdefault(now[1], {})[keys.who_entry(now[0], me)] = expires
                rooms.add(now[1])
                claim.append(keys.nick(now[0]))
        release.extend(keys.nick(nick) for nick in self._orphans if hub.holder(nick) is None)
        self._orphans.clear()
        for chunk in _chunks(release):
            self._release(keys=chunk, args=[me], client=pipe)
        for room, entries in added.items():
            pipe.zadd(keys.who(room), entries)
            pipe.expire(keys.who(room), self.ttl * 2)
        counts_key = keys.room_counts(me)
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
            self._claim(keys=chunk, args=[me, self.ttl], client=pipe)
        return indexes

    def _heartbeat(self) -> None:
        """Refresh everything this instance holds; after a reconnect, rewrite it."""
        connects = self._subscriber.connects
        me = self.instance_id
        seconds, micros = self._writer.time()
        self._offset = seconds + micros / 1e6 - time.time()
        now = self.now()
        expires = now + self.ttl
        pipe = self._writer.pipeline(transaction=False)
        pipe.zadd(keys.INSTANCES, {me: expires})
        pipe.zremrangebyscore(keys.INSTANCES, "-inf", now)
        members = [*self._shown, *self.hub.members.values()]
        self._dirty.clear()
        indexes = self._presence(pipe, members, expires)
        by_room: dict[str, list[str]] = {}
        for nick, room in self._shown.values():
            by_room.setdefault(room, []).append(keys.who_entry(nick, me))
        for room, entries in by_room.items():
            who_key = keys.who(room)
            for chunk in _chunks(entries):
                pipe.zadd(who_key, dict.fromkeys(chunk, expires))
            pipe.zremrangebyscore(who_key, "-inf", now)
            pipe.expire(who_key, self.ttl * 2)
        counts_key = keys.room_counts(me)
        pipe.delete(counts_key)
        counts: dict[str | bytes, int] = {
            name: len(room.members) for name, room in self.hub.rooms.items() if room.members
        }
        if counts:
            pipe.hset(counts_key, mapping=counts)
            pipe.expire(counts_key, self.ttl)
        nicks = [keys.nick(nick) for nick, _ in self._shown.values()]
        nicks.extend(keys.nick(sub) for sub in self.hub.reserved)
        for chunk in _chunks(nicks):
            indexes.append(len(pipe))
            self._claim(keys=chunk, args=[me, self.ttl], client=pipe)
        results = pipe.execute(raise_on_error=False)
        self._synced = connects
        taken = sorted({k.decode() for i in indexes if isinstance(results[i], list) for k in results[i]})
        if taken:
            self.log.warning("nick_conflict", nicks=[keys.nick_of(k) for k in taken])
