"""``RedisBackplane``: what the service sees of the backplane.

The hub's hooks in (``publish``, ``room_active``, ``joining``, ``left``), the
cluster's ``directory``, ``bans`` and ``idempotency`` (for the operator API)
and a metrics ``collector`` out; the work is done by the subscriber's, the
publisher's and the ban mirror's greenlets.  Only ``joining`` may
block (in the joiner's greenlet); the other hooks only queue.

``joining`` keeps each room's mirror (the hub's RoomLog of the room) a copy
of the room's Redis log: it subscribes first (confirmed), then, only when
the mirror does not follow Redis yet, reads the log once and splices it with
what arrived meanwhile.  One read per room at a time, however many members
wait for it: a storm of reconnects into one room costs Redis one read, and
every resume after it is answered from memory.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import gevent
import gevent.event
import redis
import structlog
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..bans import BanList
from ..hub import Hub, Member, OnId
from ..roomlog import Gap, RoomLog
from . import keys
from .bans import RedisBans
from .cluster import client as cluster_client
from .cluster import is_cluster
from .connection import ERRORS, Client, pool
from .directory import RedisDirectory
from .idempotency import RedisIdempotency
from .instance import Instance, RoomBounds, default_instance_id
from .publisher import Publisher
from .shards import ShardedSubscriber
from .subscriber import Subscriber

# Connections for sessions' queries (/who, joins, /nick); the publisher has its own.
POOL_SIZE = 32
# Seconds a resume waits for the subscription to bring a line the member saw on another instance.
CATCH_UP_WAIT = 2.0
# Reads of a room's Redis log one join may wait for or send (each is one round trip).
SYNC_TRIES = 3


class RedisBackplane:
    """The hub's ``Backplane`` on Redis; the Service reads ``directory`` and ``up``."""

    def __init__(
        self,
        url: str,
        hub: Hub,
        *,
        instance_id: str | None = None,
        presence_ttl: int = 15,
        rooms: RoomBounds | None = None,
        bans: BanList | None = None,
    ) -> None:
        self.hub = hub
        instance_id = instance_id or default_instance_id()
        log = structlog.get_logger("chat_svc.backplane").bind(instance=instance_id)
        self.instance = instance = Instance(instance_id, hub, presence_ttl, log, rooms or RoomBounds())
        self.log = log
        wake = gevent.event.Event()  # the publisher's greenlet: work is waiting
        mode = is_cluster(url)
        self.cluster: Any = None  # a RedisCluster in cluster mode
        self.subscriber: Subscriber
        self._queries: Client
        writer: Client
        if mode:
            # one client for queries and the writer: it keeps a pool per node
            self.cluster = self._queries = writer = cluster_client(url, POOL_SIZE)
            scripts = [keys.SHARDED_PUBLISH, keys.READ, keys.CLAIM, keys.RELEASE]
            self.subscriber = sharded = ShardedSubscriber(instance, self.cluster, wake, scripts)
            sharded.on_moved = self._moved
        else:
            self._pool = pool(url, POOL_SIZE)
            self._writer_pool = pool(url, 1)
            self._queries = redis.Redis(connection_pool=self._pool)
            writer = redis.Redis(connection_pool=self._writer_pool)
            self.subscriber = Subscriber(instance, self._pool, (self._queries, writer), wake)
            self.subscriber.check_mode = mode is None
        log.info("backplane_mode", mode="cluster" if mode else "single" if mode is False else "unknown")
        self.publisher = Publisher(instance, writer, self.subscriber, wake)
        self.subscriber.sender_of = self.publisher.sender_of
        self.subscriber.on_lost = self.publisher.strand
        self.directory = RedisDirectory(instance, self._queries, self.subscriber, self.publisher)
        self._read = self._queries.register_script(keys.READ)
        self._syncing: dict[str, gevent.event.Event] = {}
        self.reads = 0
        mirror = bans if bans is not None else BanList()
        self.bans = RedisBans(instance, self._queries, self.subscriber, self.publisher, mirror)
        self.idempotency = RedisIdempotency(instance, self._queries, self.subscriber)
        self._greenlets: list[gevent.Greenlet] = []

    @property
    def up(self) -> bool:
        """Subscribed to Redis and answering; otherwise every instance works alone."""
        return self.subscriber.up

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background: the instance serves (degraded) while Redis is away."""
        self._greenlets = [gevent.spawn(g) for g in (self.subscriber.run, self.publisher.run, self.bans.run)]

    def stop(self, timeout: float = 2.0) -> None:
        """Flush what the leaving members changed, withdraw this instance, close."""
        self.publisher.flush(timeout)
        self.publisher.stop()
        self.subscriber.stop()
        self.bans.stop()
        if self.up:
            self.publisher.withdraw()
        gevent.killall(self._greenlets, timeout=timeout)
        self.subscriber.close()
        if self.cluster is not None:
            self.cluster.close()
        else:
            self._pool.disconnect()
            self._writer_pool.disconnect()

    def collector(self) -> Collector:
        return _Collector(self)

    # -- hub hooks ------------------------------------------------------------------

    def publish(
        self, room: str, data: bytes, chat: bool, sender: Member | None, t_read: float, on_id: OnId | None
    ) -> bool:
        """A room line or notice for every instance; False: Redis cannot take it, deliver it locally."""
        return self.publisher.publish(room, data, chat, sender, t_read, on_id)

    @property
    def congested(self) -> bool:
        return self.publisher.congested

    def room_active(self, room: str, active: bool) -> None:
        """First local member in (subscribe) or last one out (unsubscribe)."""
        if self.up:
            self.subscriber.check(room)

    def _moved(self, room: str) -> None:
        """``room``'s slot has a new master, maybe a replica without the newest lines: start a new epoch."""
        self.publisher.broken.add(room)
        room_log = self.hub.logs.get(room)
        if room_log is not None:
            room_log.synced = False

    def joining(self, member: Member, room: str, want: tuple[bytes, int] | None) -> Gap | None:
        """Before ``member`` enters ``room``: subscribe, and bring the room's mirror up to date.

        Runs in the joiner's greenlet and may block for a round trip or two.
        With Redis away the mirror is used as it is (the hub answers a resume
        from an unsynced mirror as incomplete).
        """
        if not self.subscriber.room_up(room):
            return None
        try:
            with self.subscriber.joining(room):
                room_log = self.hub.logs.open(room)
                self._await_subscription(room_log, want)
                for _ in range(SYNC_TRIES):
                    if not self._stale(room_log, want):
                        break
                    read = self._sync(room, room_log, want)
                    # a read another joiner had sent may predate the line this member saw
                    self._await_subscription(room_log, want)
                    if read:
                        break
                    # or have started after the id this member resumes from: look again
        except ERRORS as exc:
            self.log.info("backplane_join_degraded", room=room, error=str(exc))
        self.publisher.touch(member)
        return None

    @staticmethod
    def _await_subscription(room_log: RoomLog, want: tuple[bytes, int] | None) -> None:
        """A resume from a line this synced mirror has not heard yet: it is on its way, wait for it.

        Reading Redis instead would put lines into the mirror that the subscription then
        brings again, and the members already here must get them from the subscription.
        """
        if want is None or not room_log.synced or room_log.local or want[0] != room_log.epoch:
            return
        deadline = time.monotonic() + CATCH_UP_WAIT
        while room_log.synced and room_log.last < want[1] and time.monotonic() < deadline:
            gevent.sleep(0.005)

    @staticmethod
    def _stale(room_log: RoomLog, want: tuple[bytes, int] | None) -> bool:
        """Whether the mirror must be read from Redis first; only when it cannot answer itself."""
        if room_log.local:
            return False  # Redis came back, no line since: this instance's own lines are the room's newest
        if not room_log.synced:
            return True
        # synced, yet older than the mirror holds (trimmed by our budget) or newer (in flight to us)
        return want is not None and want[0] == room_log.epoch and not room_log.first - 1 <= want[1] <= room_log.last

    def _sync(self, room: str, room_log: RoomLog, want: tuple[bytes, int] | None) -> bool:
        """Read the room's Redis log and splice it into the mirror; one read per room at a time.

        The read starts where the mirror first lacks a line, or at the id a resume asks
        for when that is older, never merely after the mirror's newest line.  False:
        another joiner's read was running, this one only waited for it.
        """
        running = self._syncing.get(room)
        if running is not None:
            running.wait()
            return False
        done = self._syncing[room] = gevent.event.Event()
        try:
            before = (room_log.epoch, room_log.next)
            after = room_log.held_through()
            if want is not None and want[0] == room_log.epoch:
                after = min(after, want[1])
            reply = self._read(keys=[keys.meta(room), keys.log(room)], args=[room_log.epoch, after])
            self.reads += 1
            epoch, seq, entries = keys.read_reply(reply)
            room_log.merge(epoch, entries, seq, before, following=room in self.hub.rooms)
            return True
        finally:
            del self._syncing[room]
            done.set()

    def left(self, member: Member) -> None:
        """``member`` left a room (moving or disconnecting): update presence soon."""
        self.publisher.touch(member)


class _Collector(Collector):
    """The backplane's counters, read at scrape time (the hot path bumps plain ints)."""

    def __init__(self, backplane: RedisBackplane) -> None:
        self._bp = backplane

    def collect(self) -> Iterator[Metric]:
        bp, publisher, subscriber = self._bp, self._bp.publisher, self._bp.subscriber
        yield GaugeMetricFamily(
            "chat_backplane_up",
            "1 while subscribed to Redis and answering; 0 during an outage.",
            value=int(bp.up),
        )
        yield CounterMetricFamily(
            "chat_backplane_published",
            "Room lines, notices and /msg written to Redis.",
            value=publisher.published,
        )
        yield CounterMetricFamily(
            "chat_backplane_received",
            "Messages from other instances delivered here.",
            value=subscriber.received,
        )
        yield CounterMetricFamily(
            "chat_backplane_reconnects",
            "Redis connections re-established after a loss.",
            value=subscriber.reconnects,
        )
        errors = CounterMetricFamily(
            "chat_backplane_publish_errors",
            "Messages not relayed to other instances (delivered locally only), by reason.",
            labels=["reason"],
        )
        for reason, count in publisher.errors.items():
            errors.add_metric([reason], count)
        yield errors
        if isinstance(subscriber, ShardedSubscriber):
            yield GaugeMetricFamily(
                "chat_backplane_shards",
                "Masters of the Redis Cluster this instance follows (cluster mode only).",
                value=subscriber.shards,
            )
            yield GaugeMetricFamily(
                "chat_backplane_shards_up",
                "Of those, the shards whose sharded pub/sub connection is up; their rooms relay.",
                value=subscriber.shards_up,
            )
        yield GaugeMetricFamily(
            "chat_backplane_queue",
            "Messages waiting for the publisher greenlet.",
            value=publisher.queued,
        )
        yield CounterMetricFamily(
            "chat_backplane_log_reads",
            "Room logs read from Redis to bring a room's mirror up to date (joins and resumes after it are free).",
            value=bp.reads,
        )
