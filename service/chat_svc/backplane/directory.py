"""The cluster's ``Directory``: nicks, /msg, /who, /rooms, API posts and kicks across every live instance.

Asked from session greenlets, which may block on one short Redis query;
never from the fan-out path.  While Redis is away every answer falls back to
this instance's own view (the hub's), so commands keep working, locally.
"""

from __future__ import annotations

import time

from .. import protocol
from ..hub import Member, OnId
from . import keys
from .connection import ERRORS, Client
from .instance import Instance
from .publisher import Publisher
from .subscriber import Subscriber


class RedisDirectory:
    def __init__(self, instance: Instance, queries: Client, subscriber: Subscriber, publisher: Publisher) -> None:
        self.hub = instance.hub
        self.log = instance.log
        self._redis = queries
        self._subscriber = subscriber
        self._publisher = publisher
        self._instance_id = instance.id
        self._ttl = instance.ttl
        self._claim = queries.register_script(keys.CLAIM)

    def claim_nick(self, member: Member, nick: str) -> str | None:
        """/nick across the cluster: an error text, or None when the nick changed."""
        hub = self.hub
        if nick == member.nick or hub.holder(nick) is not None or not self._subscriber.up:
            return hub.claim_nick(member, nick)
        try:
            taken = self._claim(
                keys=[keys.nick(nick)], args=[self._instance_id, self._publisher.now_ms(), self._ttl * 1000]
            )
        except ERRORS as exc:
            self.log.info("backplane_query_failed", query="claim_nick", error=str(exc))
            return hub.claim_nick(member, nick)
        if taken:
            return f"nick {nick} is taken"
        if hub.member(member.nick) is not member:  # disconnected while we asked
            self._publisher.orphan(nick)
            return None
        error = hub.claim_nick(member, nick)
        self._publisher.touch(member)  # the presence update releases the old nick
        return error

    def reserve(self, nick: str) -> str | None:
        """Claim ``nick`` for a member about to join here (a JWT's sub): an error text when taken anywhere."""
        hub = self.hub
        error = hub.reserve(nick)
        if error or not self._subscriber.up:
            return error
        try:
            taken = self._claim(
                keys=[keys.nick(nick)], args=[self._instance_id, self._publisher.now_ms(), self._ttl * 1000]
            )
        except ERRORS as exc:
            self.log.info("backplane_query_failed", query="reserve", error=str(exc))
            return hub.reserve(nick)
        if taken:
            return f"nick {nick} is taken"
        return hub.reserve(nick)  # a member here may have taken it while we asked

    def whisper(self, member: Member, target: str, text: str) -> bool:
        """/msg to a member here, or of another instance through that instance's inbox."""
        if self.hub.whisper(member, target, text):
            return True
        owner = self._owner(target, "whisper")
        if owner is None:
            return False
        line = protocol.private_line(member.nick, target, text)
        self._publisher.send_private(owner, target, line)
        self.hub.send_to(member, line)
        return True

    def kick(self, nick: str, notice: bytes) -> bool:
        """Kick a member here, or ask its instance to (through that instance's inbox)."""
        if self.hub.kick(nick, notice):
            return True
        owner = self._owner(nick, "kick")
        if owner is None:
            return False
        self._publisher.send_kick(owner, nick, notice)
        return True

    def post(self, room: str, line: bytes, on_id: OnId | None = None) -> bool:
        """An API line into ``room``: through the hub when it has members here, else straight to Redis.

        ``on_id`` hears the line's id once Redis has given it.
        """
        if self.hub.post(room, line, on_id):
            return True
        if self.room_size(room) == 0:
            return False
        return self._publisher.publish(room, line, True, None, time.perf_counter(), on_id)

    def room_size(self, room: str) -> int:
        """Members of ``room`` here plus the counts other live instances published."""
        size = self.hub.room_size(room)
        if not self._subscriber.up:
            return size
        try:
            others = self._other_instances()
            if others:
                pipe = self._redis.pipeline(transaction=False)
                for other in others:
                    pipe.hget(keys.room_counts(other), room)
                size += sum(int(count) for count in pipe.execute() if count)
        except ERRORS as exc:
            self.log.info("backplane_query_failed", query="room_size", error=str(exc))
        return size

    def _owner(self, nick: str, query: str) -> str | None:
        """The other instance holding ``nick``; None when nobody (or this instance) does, or Redis is away."""
        if not self._subscriber.up:
            return None
        try:
            owner = keys.nick_owner(self._redis.get(keys.nick(nick)), self._publisher.now_ms())
        except ERRORS as exc:
            self.log.info("backplane_query_failed", query=query, error=str(exc))
            return None
        if owner is None or owner == self._instance_id:
            return None
        return owner

    def _other_instances(self) -> list[str]:
        live = self._redis.zrangebyscore(keys.INSTANCES, self._publisher.now(), "+inf")
        return [name.decode() for name in live if name.decode() != self._instance_id]

    def who(self, room: str) -> list[str]:
        """Nicks in ``room`` on every live instance; this instance's from the hub itself."""
        names: set[str] = set()
        if self._subscriber.up:
            try:
                entries = self._redis.zrangebyscore(keys.who(room), self._publisher.now(), "+inf")
            except ERRORS as exc:
                self.log.info("backplane_query_failed", query="who", error=str(exc))
                entries = []
            for entry in entries:
                nick, owner = keys.open_who_entry(entry)
                if owner != self._instance_id:
                    names.add(nick)
        names.update(self.hub.who(room))
        return sorted(names)

    def room_counts(self) -> list[tuple[str, int]]:
        """Rooms and member counts summed over every live instance."""
        counts: dict[str, int] = {}
        if self._subscriber.up:
            try:
                others = self._other_instances()
                if others:
                    pipe = self._redis.pipeline(transaction=False)
                    for other in others:
                        pipe.hgetall(keys.room_counts(other))
                    for mapping in pipe.execute():
                        for name, count in mapping.items():
                            room = name.decode("utf-8", "replace")
                            counts[room] = counts.get(room, 0) + int(count)
            except ERRORS as exc:
                self.log.info("backplane_query_failed", query="rooms", error=str(exc))
                counts = {}
        for room, count in self.hub.room_counts():
            counts[room] = counts.get(room, 0) + count
        return sorted(counts.items())
