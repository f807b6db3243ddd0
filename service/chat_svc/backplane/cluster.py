"""Redis Cluster mode: detecting it, the cluster client, and pipelines that one dead shard cannot fail whole.

``--redis-url`` may name any node of a Redis Cluster; ``INFO cluster`` says
which kind of Redis it is.  In a cluster every key of a room shares the
room's slot (``{room}`` hash tags, see ``keys``), so a room lives on one
shard, and the global keys (instances, bans, nicks, idem:*) are single keys
on whichever shard owns them; no command or script spans two slots.

redis-py's cluster pipeline sends each node its share but raises for the
whole batch when one node cannot be reached (and refuses EVALSHA);
``ShardedPipeline`` runs one plain pipeline per shard instead, in parallel,
so a dead shard fails only its own commands and the others' lines keep
flowing.  A command answered MOVED fails (its line is treated as lost in an
outage) and moves the slot in the client's map, so the next batch goes to
the new master.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import gevent
import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import MovedError, SlotNotCoveredError
from redis.retry import Retry

from .connection import ERRORS, REDIS_TIMEOUT

# Keys per script call: a script's keys must share a slot, so nick claims go per slot.
CHUNK = 500


def is_cluster(url: str) -> bool | None:
    """Whether ``url`` is a node of a Redis Cluster; None when it does not answer (decided on a later connect)."""
    probe = redis.Redis.from_url(url, socket_timeout=REDIS_TIMEOUT, socket_connect_timeout=REDIS_TIMEOUT)
    try:
        return bool(probe.info("cluster").get("cluster_enabled"))
    except ERRORS:
        return None
    finally:
        probe.close()


def client(url: str, connections: int) -> RedisCluster:
    """A cluster client that fails fast and retries nothing itself (the backplane reconnects); MOVED/ASK it follows."""
    return RedisCluster.from_url(
        url,
        max_connections=connections,
        socket_timeout=REDIS_TIMEOUT,
        socket_connect_timeout=REDIS_TIMEOUT,
        socket_keepalive=True,
        retry=Retry(NoBackoff(), 0),
        require_full_coverage=False,
        protocol=2,
    )


def owner(cluster: RedisCluster, key: str) -> str | None:
    """The name (host:port) of the master holding ``key``'s slot, as the client last saw the cluster."""
    try:
        node = cluster.nodes_manager.get_node_from_slot(key_slot(key.encode()))  # type: ignore[arg-type]
        return str(node.name)
    except SlotNotCoveredError:
        return None


def slot_chunks(names: Sequence[str]) -> Iterator[list[str]]:
    """``names`` (keys) in groups of one slot, at most CHUNK each: what one script call may touch."""
    by_slot: dict[int, list[str]] = {}
    for name in names:
        by_slot.setdefault(key_slot(name.encode()), []).append(name)
    for group in by_slot.values():
        for start in range(0, len(group), CHUNK):
            yield group[start : start + CHUNK]


def _first_key(command: str, args: tuple[Any, ...]) -> str:
    key = args[2] if command in ("evalsha", "eval") else args[0]
    return key.decode() if isinstance(key, bytes) else str(key)


class ShardedPipeline:
    """Queues commands like a non-transactional pipeline; ``execute`` runs one pipeline per shard.

    Every command here has its key first (a script's first key); the results
    come back in the order queued, a failed shard's as its exception.
    """

    def __init__(self, cluster: RedisCluster) -> None:
        self._cluster = cluster
        self._commands: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def __len__(self) -> int:
        return len(self._commands)

    def __getattr__(self, command: str) -> Any:
        def queue(*args: Any, **kwargs: Any) -> ShardedPipeline:
            self._commands.append((command, args, kwargs))
            return self

        return queue

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        groups: dict[str | None, list[int]] = {}
        for index, (command, args, _) in enumerate(self._commands):
            groups.setdefault(owner(self._cluster, _first_key(command, args)), []).append(index)
        results: list[Any] = [None] * len(self._commands)

        def run(name: str | None, indexes: list[int]) -> None:
            try:
                node = self._cluster.get_node(node_name=name) if name is not None else None
                if node is None:
                    raise SlotNotCoveredError(f"no master known for the slot (node {name})")
                pipe = self._cluster.get_redis_connection(node).pipeline(transaction=False)
                for index in indexes:
                    command, args, kwargs = self._commands[index]
                    getattr(pipe, command)(*args, **kwargs)
                answers = pipe.execute(raise_on_error=False)
            except ERRORS as exc:
                answers = [exc] * len(indexes)
            for index, answer in zip(indexes, answers, strict=True):
                results[index] = answer
                if isinstance(answer, MovedError):
                    self._cluster.nodes_manager.move_slot(answer)  # type: ignore[attr-defined]  # next batch: the new master

        if len(groups) == 1:
            run(*next(iter(groups.items())))
        else:
            gevent.joinall([gevent.spawn(run, name, indexes) for name, indexes in groups.items()], raise_error=True)
        self._commands = []
        if raise_on_error:
            for result in results:
                if isinstance(result, Exception):
                    raise result
        return results
