"""The backplane's reader on a Redis Cluster: one sharded pub/sub connection per master.

A room's channel lives in the room's slot, so its lines are SPUBLISHed to
the one master holding that slot, and read here on that master's connection
(SSUBSCRIBE, only while the room has local members, as with one Redis).
Each master's connection has a greenlet of its own that reads it in order
and decides whether that shard is up; a room can relay while its shard is
up, whatever the others do.

A shard lost costs only its rooms: their lines on their way are delivered
here (``on_lost`` with the shard's rooms), their mirrors stop following
Redis (a resume across the gap answers incomplete), and new lines stay local
until the shard is back.  A refresh of the cluster's slots (after any shard
failed to connect, on MOVED and SUNSUBSCRIBE pushes, and every
``REFRESH_EVERY`` seconds) finds a promoted replica: a shard for it is made,
the old master's retired, and every local room whose slot changed master is
marked broken (its log deleted, a new epoch), because an asynchronous
replica may lack the newest lines.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import gevent
import gevent.event
import gevent.lock
import redis
from redis.cluster import RedisCluster

from ..hub import ROOM_BACKLOG_LIMIT
from . import keys
from .cluster import owner
from .connection import REDIS_TIMEOUT
from .instance import Instance
from .subscriber import BACKOFF_FIRST, BACKOFF_MAX, READ_BURST, Subscriber

# Slots are re-read this often when all is well, and at most this often otherwise.
REFRESH_EVERY = 10.0
REFRESH_GAP = 0.5


class Shard:
    """One master: its sharded pub/sub connection and the channels subscribed on it."""

    def __init__(self, name: str, host: str, port: int) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.conn: Any = None
        self.up = False
        self.retired = False
        self.reset = False
        self.subscribed: set[str] = set()
        self.confirmed: set[str] = set()
        # (S)SUBSCRIBE/(S)UNSUBSCRIBE sent and not answered yet: an error reply is the oldest one's
        self.inflight: deque[str] = deque()
        self.lock = gevent.lock.Semaphore()


class ShardedSubscriber(Subscriber):
    """``Subscriber`` over every master of a cluster; ``up`` while any shard is."""

    def __init__(self, instance: Instance, cluster: RedisCluster, wake: gevent.event.Event, scripts: list[str]) -> None:
        super().__init__(instance, None, (), wake)
        self.cluster = cluster
        self._scripts = scripts
        self._shards: dict[str, Shard] = {}
        self._greenlets: dict[str, gevent.Greenlet] = {}
        self._refresh = gevent.event.Event()
        self._always = (self._inbox, keys.CONTROL)
        # a room whose slot moved to another master: the publisher deletes its log (a new epoch)
        self.on_moved: Callable[[str], None] = lambda room: None

    # -- the per-shard view --------------------------------------------------------

    @property
    def shards(self) -> int:
        return len(self._shards)

    @property
    def shards_up(self) -> int:
        return sum(shard.up for shard in self._shards.values())

    def shard_of(self, channel: str) -> Shard | None:
        name = owner(self.cluster, channel)
        return None if name is None else self._shards.get(name)

    def channel_up(self, channel: str) -> bool:
        shard = self.shard_of(channel)
        return shard is not None and shard.up

    def room_up(self, room: str) -> bool:
        return self.channel_up(keys.room_channel(room))

    def _update_up(self) -> None:
        self.up = any(shard.up for shard in self._shards.values())

    def redis_time(self) -> tuple[int, int]:
        """Redis' clock, from any shard that is up."""
        for shard in list(self._shards.values()):
            if shard.up:
                node = self.cluster.get_node(node_name=shard.name)
                if node is not None:
                    seconds, micros = self.cluster.get_redis_connection(node).time()
                    return seconds, micros
        raise redis.ConnectionError("no shard of the cluster is up")

    def load_scripts(self) -> None:
        """SCRIPT LOAD on every shard that is up (one that is down loads on its reconnect)."""
        for shard in list(self._shards.values()):
            node = self.cluster.get_node(node_name=shard.name)
            if shard.up and node is not None:
                for script in self._scripts:
                    self.cluster.get_redis_connection(node).script_load(script)

    # -- asked by other greenlets ------------------------------------------------------

    def _subscribe_for_join(self, room: str) -> None:
        """As with one Redis, on the room's shard (a shard that is down is waited for by nobody)."""
        channel = keys.room_channel(room)
        shard = self.shard_of(channel)
        if shard is not None and shard.up and channel not in shard.confirmed:
            self._await_subscription(
                room, shard.subscribed, channel, lambda: self._send_to(shard, "SSUBSCRIBE", [channel])
            )

    def reconcile(self) -> None:
        """Each pending room subscribed on its shard while it has local members, and nowhere else."""
        rooms, self.pending = self.pending, set()
        subscribe: dict[Shard, list[str]] = {}
        unsubscribe: dict[Shard, list[str]] = {}
        for room in rooms:
            channel = keys.room_channel(room)
            home = self.shard_of(channel) if room in self.hub.rooms or room in self._joining else None
            for shard in self._shards.values():
                if shard is home and shard.up and channel not in shard.subscribed:
                    subscribe.setdefault(shard, []).append(channel)
                elif shard is not home and channel in shard.subscribed:
                    unsubscribe.setdefault(shard, []).append(channel)
        for shard, channels in unsubscribe.items():
            shard.subscribed.difference_update(channels)
            shard.confirmed.difference_update(channels)
            self._send_to(shard, "SUNSUBSCRIBE", channels, quiet=True)
        for shard, channels in subscribe.items():
            shard.subscribed.update(channels)
            self._send_to(shard, "SSUBSCRIBE", channels, quiet=True)

    def lost(self, where: str, exc: BaseException) -> None:
        """Something other than a shard's reader failed: every shard reconnects (as one Redis would)."""
        self.log.warning("backplane_down", where=where, error=str(exc))
        for shard in list(self._shards.values()):
            self._shard_lost(shard, exc)
            shard.reset = True

    def close(self) -> None:
        gevent.killall(list(self._greenlets.values()), timeout=1.0)
        for shard in list(self._shards.values()):
            conn, shard.conn = shard.conn, None
            if conn is not None:
                conn.disconnect()
            shard.up = False
        self.up = False

    def stop(self) -> None:
        super().stop()
        self._refresh.set()

    def _send_to(self, shard: Shard, command: str, channels: list[str], quiet: bool = False) -> None:
        """One command per channel (each SSUBSCRIBE names one slot); the shard's reader reads the replies."""
        with shard.lock:
            conn = shard.conn
            if conn is None:
                if quiet:
                    return  # the shard subscribes what it should when it reconnects
                raise redis.ConnectionError(f"backplane shard {shard.name} not connected")
            conn.send_packed_command([part for channel in channels for part in conn.pack_command(command, channel)])
            shard.inflight.extend(channels)

    def _shard_lost(self, shard: Shard, exc: BaseException, rooms: Callable[[str], bool] | None = None) -> None:
        """``shard`` failed: its rooms go local, in one step (as ``Subscriber.lost`` does for one Redis).

        ``rooms`` tells its rooms when the slots no longer do (a retired master).
        """
        if shard.up:
            self.log.warning("backplane_shard_down", shard=shard.name, error=str(exc))
        shard.up = False
        self._update_up()

        def on_shard(room: str) -> bool:
            if rooms is not None:
                return rooms(room)
            return self.shard_of(keys.room_channel(room)) is shard

        for room_log in self.hub.logs:
            if on_shard(room_log.name):
                room_log.synced = False
        if self.on_lost is not None:
            self.on_lost(on_shard)
        for room in [room for room in self._waiters if on_shard(room)]:
            self._waiters.pop(room).set()
        self._refresh.set()
        self._wake.set()

    # -- the greenlets --------------------------------------------------------------------

    def run(self) -> None:
        """Follow the cluster's masters, a shard and its reader for each; refresh when asked or now and then."""
        while not self._stopped:
            try:
                self._follow_topology()
            except Exception as exc:
                self.log.info("backplane_topology_failed", error=str(exc))
            self._refresh.wait(REFRESH_EVERY)
            self._refresh.clear()
            gevent.sleep(REFRESH_GAP)

    def _follow_topology(self) -> None:
        before = {room: owner(self.cluster, keys.room_channel(room)) for room in self.hub.rooms}
        self.cluster.nodes_manager.initialize()
        masters = {node.name: node for node in self.cluster.get_primaries()}
        for name, node in masters.items():
            if name not in self._shards:
                shard = self._shards[name] = Shard(name, node.host, node.port)
                self._greenlets[name] = gevent.spawn(self._run_shard, shard)
        for name in [name for name in self._shards if name not in masters]:
            shard = self._shards.pop(name)
            shard.retired = True
            self.log.info("backplane_shard_retired", shard=name)
            gone = {room for room, was in before.items() if was == name}
            self._shard_lost(shard, RuntimeError("no longer a master"), gone.__contains__)
            conn, shard.conn = shard.conn, None
            if conn is not None:
                conn.disconnect()
            self._greenlets.pop(name).kill(block=False)
        moved = [room for room, was in before.items() if owner(self.cluster, keys.room_channel(room)) != was]
        for room in moved:
            self.on_moved(room)
        if moved:
            self.log.warning("backplane_rooms_moved", rooms=len(moved))
        self.pending.update(self.hub.rooms)
        self._wake.set()

    def _run_shard(self, shard: Shard) -> None:
        """Connect, subscribe, read; on any loss mark the shard down, ask for a slots refresh, reconnect."""
        delay = BACKOFF_FIRST
        connected_before = False
        while not self._stopped and not shard.retired:
            try:
                conn = self._connect_shard(shard)
            except Exception as exc:
                if delay == BACKOFF_FIRST:
                    self.log.warning("backplane_shard_unreachable", shard=shard.name, error=str(exc))
                self._refresh.set()
                gevent.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            if connected_before:
                self.reconnects += 1
            connected_before = True
            connected_at = time.monotonic()
            self.log.info("backplane_shard_up", shard=shard.name, channels=len(shard.subscribed))
            try:
                self._read_shard(shard, conn)
            except Exception as exc:
                self._shard_lost(shard, exc)
            finally:
                shard.conn = None
                conn.disconnect()
                shard.subscribed = set()
                shard.confirmed = set()
                shard.inflight.clear()
                shard.reset = False
            if shard.up and not self._stopped:
                self._shard_lost(shard, RuntimeError("reset"))
            if time.monotonic() - connected_at < 1.0:
                gevent.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, BACKOFF_MAX)
            else:
                delay = BACKOFF_FIRST

    def _wanted(self, shard: Shard) -> list[str]:
        rooms = set(self.hub.rooms) | set(self._joining)
        channels = [*self._always, *(keys.room_channel(room) for room in rooms)]
        return [channel for channel in channels if self.shard_of(channel) is shard]

    def _connect_shard(self, shard: Shard) -> Any:
        """A fresh connection to ``shard`` with the scripts loaded and its channels confirmed."""
        shard.reset = False
        conn = redis.Connection(
            host=shard.host,
            port=shard.port,
            socket_timeout=REDIS_TIMEOUT,
            socket_connect_timeout=REDIS_TIMEOUT,
            socket_keepalive=True,
            protocol=2,  # type: ignore[call-arg]
        )
        try:
            conn.connect()
            for script in self._scripts:
                conn.send_command("SCRIPT", "LOAD", script)
                conn.read_response()
            channels = self._wanted(shard)
            shard.subscribed = set(channels)
            shard.confirmed = set()
            shard.inflight.clear()
            shard.conn = conn  # _send_to writes on it; nobody else reads it yet
            self._send_to(shard, "SSUBSCRIBE", channels)
            while shard.inflight:
                self._read_one(shard, conn)
        except BaseException:
            shard.conn = None
            conn.disconnect()
            raise
        self.connects += 1
        shard.up = True
        self._update_up()
        self.pending.update(self.hub.rooms)
        self._wake.set()
        if self.on_bans_changed is not None:
            self.on_bans_changed()
        return conn

    def _read_shard(self, shard: Shard, conn: Any) -> None:
        burst = 0
        while not self._stopped and not shard.reset and not shard.retired:
            if not conn.can_read(timeout=1.0):
                continue
            self._read_one(shard, conn)
            burst += 1
            if burst >= READ_BURST:
                burst = 0
                gevent.sleep(0)
            while self._backlog is not None and self._backlog.waiting > ROOM_BACKLOG_LIMIT:
                gevent.sleep(0.005)
            self._backlog = None

    def _read_one(self, shard: Shard, conn: Any) -> None:
        """One reply or push; an error answers the oldest command in flight (MOVED: the slot has moved)."""
        try:
            reply = conn.read_response()
        except redis.exceptions.ResponseError as exc:
            channel = shard.inflight.popleft() if shard.inflight else None
            if channel is not None:
                shard.subscribed.discard(channel)
                self._moved(channel)
            self.log.info("backplane_shard_refused", shard=shard.name, channel=channel, error=str(exc))
            return
        kind = reply[0]
        if kind == b"smessage":
            self.receive(reply[1], reply[2], shard.name)
            return
        channel = reply[1].decode("utf-8", "replace") if isinstance(reply[1], bytes) else None
        if kind == b"ssubscribe" and channel is not None:
            self._answered(shard, channel)
            if channel in shard.subscribed:
                shard.confirmed.add(channel)
                room = keys.room_of(reply[1])
                waiter = self._waiters.pop(room, None) if room is not None else None
                if waiter is not None:
                    waiter.set()
        elif kind == b"sunsubscribe" and channel is not None:
            asked = self._answered(shard, channel)
            if not asked and channel in shard.subscribed:  # the node gave the slot away (failover, resharding)
                shard.subscribed.discard(channel)
                shard.confirmed.discard(channel)
                self._moved(channel)

    @staticmethod
    def _answered(shard: Shard, channel: str) -> bool:
        try:
            shard.inflight.remove(channel)
        except ValueError:
            return False
        return True

    def _moved(self, channel: str) -> None:
        """``channel``'s slot is served elsewhere now: refresh the slots, then subscribe it there."""
        room = keys.room_of(channel.encode())
        if room is not None:
            self.pending.add(room)
        self._refresh.set()
