"""The backplane's writer: room lines, presence and the heartbeat, from one greenlet.

That greenlet is the only writer of messages and presence, so those writes
stay ordered: it sends a FIFO in pipelines over a connection of its own
(a burst of joins on the query pool cannot starve the relay).  Publishing
never blocks the fan-out path: the hub only appends to the queue, which is
bounded; a sender waits while it is full (``congested``), and a notice that
finds it full is delivered locally instead.

A room line is published by the ``PUBLISH`` script, which gives it the
room's next offset in the same step; every instance, this one included,
delivers it when it comes back on the room's channel.  The line's sender
waits in ``_pending`` under its tag until then, so it does not hear itself.

When Redis cannot take a line (down, queue full, the script failed) the line
is delivered locally with an id of a local epoch, and the room's Redis log
is marked broken: it is deleted once Redis answers again, so a later resume
across the gap gets a new epoch and answers incomplete, never silently.

Presence expires: entries carry an expiry score refreshed every TTL/3, so
the members of a SIGKILLed instance vanish from /who, /rooms and the nick
registry within --presence-ttl, and the survivors delete what it left.
While Redis is away nothing is queued (at-most-once): memory stays bounded
whatever the outage length.
"""

from __future__ import annotations

import hashlib
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import gevent
import gevent.event
import redis

from ..hub import Member, OnId
from ..roomlog import new_epoch
from . import keys
from .cluster import ShardedPipeline, owner, slot_chunks
from .connection import ERRORS, Client
from .instance import Instance
from .shards import ShardedSubscriber
from .subscriber import BACKOFF_MAX, Subscriber

# Bounds of the publish queue; past either, senders wait and notices are delivered locally.
QUEUE_MAX_ITEMS = 10_000
QUEUE_MAX_BYTES = 8 * 1024 * 1024
# Queued messages per pipeline round trip.
PIPELINE_BATCH = 500
# Members per ZADD / nick claim call.
CHUNK = 500


def _chunks(items: list[str]) -> Iterator[list[str]]:
    for start in range(0, len(items), CHUNK):
        yield items[start : start + CHUNK]


class RoomLine:
    """A room line on its way through Redis; ``tag`` finds it again when it comes back."""

    __slots__ = ("chat", "data", "on_id", "room", "sender", "t_read", "tag")

    def __init__(
        self, room: str, data: bytes, chat: bool, sender: Member | None, t_read: float, on_id: OnId | None, tag: int
    ) -> None:
        self.room = room
        self.data = data
        self.chat = chat
        self.sender = sender
        self.t_read = t_read
        self.on_id = on_id
        self.tag = tag


class Publisher:
    """The queue of messages to relay and the presence this instance has written."""

    def __init__(self, instance: Instance, writer: Client, subscriber: Subscriber, wake: gevent.event.Event) -> None:
        instance_id = instance.id
        self.hub = instance.hub
        self.log = instance.log
        self.ttl = instance.ttl
        self.rooms = instance.rooms
        self.instance_id = instance_id
        self._writer = writer
        self._subscriber = subscriber
        self._wake = wake
        self._claim = writer.register_script(keys.CLAIM)
        self._release = writer.register_script(keys.RELEASE)
        # On a Redis Cluster: lines by SPUBLISH, one pipeline per shard, nick scripts per slot.
        self._sharded = subscriber if isinstance(subscriber, ShardedSubscriber) else None
        self._publish_script = keys.SHARDED_PUBLISH if self._sharded else keys.PUBLISH
        self._publish_sha = hashlib.sha1(self._publish_script.encode()).hexdigest()  # what SCRIPT LOAD answers
        self._relay = "spublish" if self._sharded else "publish"
        self._prefixes = {True: keys.envelope_prefix(instance_id, keys.LINE),
                          False: keys.envelope_prefix(instance_id, keys.NOTICE)}  # fmt: skip
        self._private = keys.envelope_prefix(instance_id, keys.PRIVATE)
        self._kick = keys.envelope_prefix(instance_id, keys.KICK)
        # read by the collector
        self.published = 0
        self.errors = {"redis_error": 0, "down": 0, "queue_full": 0}
        # room lines and (channel, envelope) private messages, in order
        self._queue: deque[RoomLine | tuple[str, bytes]] = deque()
        self._queued_bytes = 0
        self._full = False
        self._tag = 0
        # room lines sent, by tag, until they come back on the room's channel
        self._pending: dict[int, RoomLine] = {}
        # on a cluster: the tags sent to each shard, in order
        self._lanes: dict[str | None, deque[int]] = {}
        # rooms whose Redis log missed a line: deleted once Redis answers
        self.broken: set[str] = set()
        # presence: members changed since last written, what was written, nicks to release
        self._dirty: dict[Member, None] = {}
        self._shown: dict[Member, tuple[str, str]] = {}
        self._orphans: set[str] = set()
        self._synced = 0  # the subscriber's ``connects`` when presence was last rewritten
        self._offset = 0.0
        self._next_room_refresh = 0.0
        self._stopped = False

    @property
    def queued(self) -> int:
        """Messages waiting for the publisher's greenlet."""
        return len(self._queue)

    @property
    def congested(self) -> bool:
        """Full: a sender waits (Redis away is not congestion: lines are then delivered locally)."""
        return self._subscriber.up and self._over_bounds()

    def _over_bounds(self) -> bool:
        return len(self._queue) >= QUEUE_MAX_ITEMS or self._queued_bytes >= QUEUE_MAX_BYTES

    # -- asked by other greenlets (never block) -------------------------------------

    def publish(
        self, room: str, data: bytes, chat: bool, sender: Member | None, t_read: float, on_id: OnId | None
    ) -> bool:
        """A room line for every instance; False: not taken, the caller delivers it locally."""
        if not self._subscriber.room_up(room):
            self.errors["down"] += 1
            self.broken.add(room)
            return False
        if self._over_bounds():
            self._refuse_full(room)
            return False
        self._tag += 1
        self._queue.append(RoomLine(room, data, chat, sender, t_read, on_id, self._tag))
        self._queued_bytes += len(data)
        if not self._wake.is_set():
            self._wake.set()
        return True

    def send_private(self, owner: str, target: str, line: bytes) -> None:
        """A /msg line for ``target``, a member of the instance ``owner``."""
        self._to_inbox(owner, self._private + keys.private_payload(target, line))

    def send_kick(self, owner: str, target: str, notice: bytes) -> None:
        """Kick ``target``, a member of the instance ``owner``: it gets ``notice``, then is disconnected."""
        self._to_inbox(owner, self._kick + keys.private_payload(target, notice))

    def _to_inbox(self, owner: str, envelope: bytes) -> None:
        if not self._subscriber.channel_up(keys.inbox(owner)):
            self.errors["down"] += 1
            return
        if self._over_bounds():
            self._refuse_full(None)
            return
        self._queue.append((keys.inbox(owner), envelope))
        self._queued_bytes += len(envelope)
        self._wake.set()

    def _refuse_full(self, room: str | None) -> None:
        self.errors["queue_full"] += 1
        if room is not None:
            self.broken.add(room)
        if not self._full:
            self._full = True
            self.log.warning("backplane_queue_full", items=len(self._queue), bytes=self._queued_bytes)

    def sender_of(self, tag: int, lane: str) -> RoomLine | None:
        """Our line ``tag`` came back: it, and forget older tags (they are not coming: failed or unsubscribed).

        On a cluster "older" means older on the same shard (``lane``): each shard's lines come back in
        order, but one shard's may overtake another's.
        """
        pending = self._pending
        if self._sharded is not None:
            sent = self._lanes.get(lane)
            while sent and sent[0] <= tag:
                older = sent.popleft()
                if older != tag:
                    pending.pop(older, None)
            return pending.pop(tag, None)
        while pending:
            first = next(iter(pending))
            if first >= tag:
                break
            del pending[first]
        return pending.pop(tag, None)

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

    def now_ms(self) -> int:
        return int(self.now() * 1000)

    def strand(self, rooms: Callable[[str], bool] | None = None) -> None:
        """Redis (or the shard of ``rooms``) is gone: deliver here, with local ids, every line sent but not
        back and every one queued.

        Runs in the step that marks the backplane down, before any later line
        is delivered locally, so each sender's lines keep their order.
        """
        if rooms is not None:
            self._strand_rooms(rooms)
            return
        lines = [*self._pending.values(), *(item for item in self._queue if isinstance(item, RoomLine))]
        self.errors["down"] += len(self._pending) + len(self._queue)
        self._pending.clear()
        self._lanes.clear()
        self._queue.clear()
        self._queued_bytes = 0
        self._full = False
        for line in lines:
            self._deliver_here(line)

    def _strand_rooms(self, rooms: Callable[[str], bool]) -> None:
        """``strand`` for the rooms of one lost shard; the other rooms' lines go on."""
        pending = [tag for tag, line in self._pending.items() if rooms(line.room)]
        lines = [self._pending.pop(tag) for tag in pending]
        kept: deque[RoomLine | tuple[str, bytes]] = deque()
        for item in self._queue:
            if isinstance(item, RoomLine) and rooms(item.room):
                lines.append(item)
                self._queued_bytes -= len(item.data)
            else:
                kept.append(item)
        self.errors["down"] += len(lines)
        self._queue = kept
        for line in lines:
            self._deliver_here(line)

    def _deliver_here(self, line: RoomLine) -> None:
        self.broken.add(line.room)
        room = self.hub.rooms.get(line.room)
        if room is not None:
            self.hub.deliver_local(room, line.data, line.sender, line.t_read, line.chat, line.on_id)

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
                while subscriber.up and (self._queue or self._dirty or self._orphans or self.broken):
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
            pipe = self._pipeline()
            pipe.zrem(keys.INSTANCES, self.instance_id)
            pipe.delete(keys.room_counts(self.instance_id))
            for nick, room in self._shown.values():
                pipe.zrem(keys.who(room), keys.who_entry(nick, self.instance_id))
            nicks = [keys.nick(nick) for nick, _ in self._shown.values()]
            for chunk in self._key_chunks(nicks):
                self._release(keys=chunk, args=[self.instance_id], client=pipe)
            pipe.execute()
        except ERRORS as exc:
            self.log.warning("backplane_withdraw_failed", error=str(exc))

    def _discard(self) -> None:
        """Backplane down: presence changes are rewritten in full once it is back."""
        self._dirty.clear()
        self._orphans.clear()
        self._subscriber.pending.clear()

    def _send_batch(self) -> None:
        """One pipeline: presence changes, broken rooms' logs, then up to PIPELINE_BATCH messages in order."""
        pipe = self._pipeline()
        if self._dirty or self._orphans:
            members = list(self._dirty)
            self._dirty.clear()
            self._presence(pipe, members, self.now() + self.ttl)
        if self.broken:
            # DEL before the lines queued after the break: they start the room's next epoch
            for room in self.broken:
                pipe.delete(keys.meta(room), keys.log(room))
            self.broken.clear()
        batch: list[RoomLine | tuple[str, bytes]] = []
        while self._queue and len(batch) < PIPELINE_BATCH:
            item = self._queue.popleft()
            self._queued_bytes -= len(item.data) if isinstance(item, RoomLine) else len(item[1])
            batch.append(item)
        if not self._queue:
            self._full = False
        first = len(pipe)
        rooms, epoch = self.rooms, new_epoch()  # a fresh epoch for any room that has none (one per batch)
        for item in batch:
            if isinstance(item, RoomLine):
                self._pending[item.tag] = item  # before sending: the line may come back before the reply
                if self._sharded is not None:
                    lane = owner(self._sharded.cluster, keys.meta(item.room))
                    self._lanes.setdefault(lane, deque()).append(item.tag)
                # EVALSHA straight away: a Script object in a pipeline costs a SCRIPT EXISTS round trip per
                # batch; the script is loaded on every (re)connect (_heartbeat runs first then)
                pipe.evalsha(self._publish_sha, 2, keys.meta(item.room), keys.log(item.room), epoch,
                             keys.LINE if item.chat else keys.NOTICE, item.data, self._prefixes[item.chat], item.tag,
                             rooms.lines, rooms.bytes, rooms.ttl, keys.room_channel(item.room))  # fmt: skip
            else:
                getattr(pipe, self._relay)(*item)
        results = pipe.execute(raise_on_error=False)
        failed = [result for result in results if isinstance(result, Exception)]
        if any(isinstance(result, redis.exceptions.NoScriptError) for result in failed):
            self._load_script()  # flushed under us: these lines go out locally, later ones again
        for item, result in zip(batch, results[first:], strict=True):
            if isinstance(result, Exception):
                self.errors["redis_error"] += 1
                if isinstance(item, RoomLine) and self._pending.pop(item.tag, None) is not None:
                    self._deliver_here(item)
                continue
            self.published += 1
            if isinstance(item, RoomLine) and item.on_id is not None:
                item.on_id(f"{result[0].decode()}:{result[1]}")
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
        for chunk in self._key_chunks(release):
            self._release(keys=chunk, args=[me], client=pipe)
        for room, entries in added.items():
            pipe.zadd(keys.who(room), entries)
        counts_key = keys.room_counts(me)
        for room in rooms:
            local = hub.rooms.get(room)
            if local is not None and local.members:
                pipe.hset(counts_key, room, len(local.members))
            else:
                pipe.hdel(counts_key, room)
        indexes = []
        for chunk in self._key_chunks(claim):
            indexes.append(len(pipe))
            self._claim(keys=chunk, args=[me, self.now_ms(), self.ttl * 1000], client=pipe)
        return indexes

    def _heartbeat(self) -> None:
        """Refresh everything this instance holds; after a reconnect, rewrite it; clean up after the dead."""
        connects = self._subscriber.connects
        me = self.instance_id
        seconds, micros = self._sharded.redis_time() if self._sharded else self._writer.time()
        self._offset = seconds + micros / 1e6 - time.time()
        if self._synced != connects and not self._sharded:
            self._load_script()  # a restarted Redis has no scripts (each shard loads them on connect)
        now = self.now()
        expires = now + self.ttl
        pipe = self._pipeline()
        pipe.zrangebyscore(keys.INSTANCES, "-inf", now)
        pipe.zadd(keys.INSTANCES, {me: expires})
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
        counts_key = keys.room_counts(me)
        pipe.delete(counts_key)
        counts: dict[str | bytes, int] = {
            name: len(room.members) for name, room in self.hub.rooms.items() if room.members
        }
        if counts:
            pipe.hset(counts_key, mapping=counts)
        nicks = [keys.nick(nick) for nick, _ in self._shown.values()]
        nicks.extend(keys.nick(sub) for sub in self.hub.reserved)
        for chunk in self._key_chunks(nicks):
            indexes.append(len(pipe))
            self._claim(keys=chunk, args=[me, self.now_ms(), self.ttl * 1000], client=pipe)
        if time.monotonic() >= self._next_room_refresh or self._synced != connects:
            # a room with members keeps its log however quiet it is
            self._next_room_refresh = time.monotonic() + max(1.0, self.rooms.keep / 4)
            for name in self.hub.rooms:
                pipe.expire(keys.meta(name), self.rooms.ttl)
                pipe.expire(keys.log(name), self.rooms.ttl)
        results = pipe.execute(raise_on_error=False)
        self._synced = connects
        taken = sorted({k.decode() for i in indexes if isinstance(results[i], list) for k in results[i]})
        if taken:
            self.log.warning("nick_conflict", nicks=[keys.nick_of(k) for k in taken])
        dead = results[0] if isinstance(results[0], list) else []
        for instance in {name.decode() for name in dead} - {me}:
            try:
                self._bury(instance, now)
            except ERRORS as exc:
                if self._sharded is None:
                    raise
                # a shard of the dead instance's keys is down: the next beat tries again
                self.log.info("backplane_bury_failed", dead=instance, error=str(exc))

    def _pipeline(self) -> Any:
        """A non-transactional pipeline; on a cluster, one per shard, so a dead shard fails only its commands."""
        if self._sharded is not None:
            return ShardedPipeline(self._sharded.cluster)
        return self._writer.pipeline(transaction=False)

    def _key_chunks(self, names: list[str]) -> Iterator[list[str]]:
        """Keys for one script call each: on a cluster, one slot per call."""
        return slot_chunks(names) if self._sharded is not None else _chunks(names)

    def _load_script(self) -> None:
        if self._sharded is not None:
            self._sharded.load_scripts()
        else:
            self._writer.script_load(keys.PUBLISH)

    def _bury(self, instance: str, now: float) -> None:
        """Delete what an instance that stopped beating left: its /who entries, nicks and room counts."""
        rooms = [name.decode("utf-8", "replace") for name in self._writer.hkeys(keys.room_counts(instance))]
        pipe = self._pipeline()
        for room in rooms:
            pipe.zrangebyscore(keys.who(room), "-inf", now)
        stale = pipe.execute()
        pipe = self._pipeline()
        nicks: list[str] = []
        for room, entries in zip(rooms, stale, strict=True):
            theirs = [entry for entry in entries if keys.open_who_entry(entry)[1] == instance]
            if theirs:
                pipe.zrem(keys.who(room), *theirs)
                nicks.extend(keys.nick(keys.open_who_entry(entry)[0]) for entry in theirs)
        for chunk in self._key_chunks(nicks):
            self._release(keys=chunk, args=[instance], client=pipe)
        pipe.delete(keys.room_counts(instance))
        pipe.zrem(keys.INSTANCES, instance)
        pipe.execute()
        self.log.info("backplane_instance_buried", dead=instance, rooms=len(rooms), nicks=len(nicks))
