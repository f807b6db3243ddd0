"""The cluster's bans: one Redis hash, mirrored by every instance into the ``BanList`` it enforces.

A change is written and announced (``control`` channel) in one MULTI, then
applied here at once; the other instances reload the hash when they hear
of it, after every reconnect, and every ``RELOAD_EVERY`` seconds in case a
notice was lost (pub/sub is at most once).  Expiry uses Redis' clock, so
instances with skewed clocks lift a ban together.  While Redis is away the
mirror keeps being enforced, but bans cannot be changed: a change only one
instance knew of would be undone by the next reload.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gevent
import gevent.event
from redis.cluster import RedisCluster

from ..bans import Ban, BanList, Unavailable
from . import keys
from .connection import ERRORS, Client
from .instance import Instance
from .publisher import Publisher
from .subscriber import Subscriber

RELOAD_EVERY = 5.0


class RedisBans:
    """The ``BanStore`` of a cluster."""

    def __init__(
        self, instance: Instance, queries: Client, subscriber: Subscriber, publisher: Publisher, bans: BanList
    ) -> None:
        self.log = instance.log
        self._redis = queries
        self._subscriber = subscriber
        self._bans = bans
        bans.clock = publisher.now
        self.clock: Callable[[], float] = publisher.now
        self._changed = keys.envelope_prefix(instance.id, keys.BANS_CHANGED)
        self._wake = gevent.event.Event()
        subscriber.on_bans_changed = self._wake.set
        self._stopped = False

    def run(self) -> None:
        """Reload when told, and every RELOAD_EVERY seconds; the mirror stays as it is while Redis is away."""
        while not self._stopped:
            self._wake.wait(RELOAD_EVERY)
            self._wake.clear()
            if self._subscriber.up:
                try:
                    self.reload()
                except ERRORS as exc:
                    self.log.info("backplane_query_failed", query="bans", error=str(exc))

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()

    def reload(self) -> None:
        """Mirror the hash; drop the bans that ended (whoever reads first prunes)."""
        now = self.clock()
        bans, ended = [], []
        for field, value in self._redis.hgetall(keys.BANS).items():
            ban = Ban.decode(value)
            if ban is None or ban.expires <= now:
                ended.append(field)
            else:
                bans.append(ban)
        if ended:
            self._redis.hdel(keys.BANS, *ended)
        self._bans.replace(bans)

    # -- the BanStore ------------------------------------------------------------------

    def create(self, nick: str | None, ip: str | None, reason: str, ttl_s: int) -> Ban:
        ban = Ban.new(nick, ip, reason, ttl_s, self.clock())
        self._write(lambda pipe: pipe.hset(keys.BANS, ban.id, ban.encode()))
        self._bans.replace([*self._bans.active(), ban])
        return ban

    def delete(self, ban_id: str) -> bool:
        removed = self._write(lambda pipe: pipe.hdel(keys.BANS, ban_id))
        self._bans.replace(ban for ban in self._bans.active() if ban.id != ban_id)
        return bool(removed)

    def active(self) -> list[Ban]:
        """Fresh from Redis when it answers, else the mirror."""
        if self._subscriber.up:
            try:
                self.reload()
            except ERRORS as exc:
                self.log.info("backplane_query_failed", query="bans", error=str(exc))
        return self._bans.active()

    def _write(self, change: Callable[[Any], object]) -> object:
        """``change`` and the notice to the other instances, in one transaction; its result."""
        if not self._subscriber.up:
            raise Unavailable("bans cannot be changed while Redis is unreachable")
        try:
            if isinstance(self._redis, RedisCluster):  # cluster mode
                # the hash and the channel live on two shards: no transaction spans them; the
                # reload every RELOAD_EVERY s catches a notice lost between the two
                result = change(self._redis)
                self._redis.spublish(keys.CONTROL, self._changed)  # type: ignore[attr-defined]
                return result
            pipe = self._redis.pipeline(transaction=True)
            change(pipe)
            pipe.publish(keys.CONTROL, self._changed)
            return pipe.execute()[0]
        except ERRORS as exc:
            self.log.info("backplane_query_failed", query="bans", error=str(exc))
            raise Unavailable("bans cannot be changed while Redis is unreachable") from None
