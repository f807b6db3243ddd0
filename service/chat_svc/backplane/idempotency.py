"""The cluster's API idempotency keys: ``SET NX EX`` on a hashed key, then the answer with ``KEEPTTL``.

One command per step, so it needs no script and works on a Redis Cluster.
While Redis is away each instance falls back to its own keys (a publish
then only reaches this instance's members anyway).
"""

from __future__ import annotations

from ..idempotency import PENDING, TTL_S, LocalIdempotency
from . import keys
from .connection import ERRORS, Client
from .instance import Instance
from .subscriber import Subscriber


class RedisIdempotency:
    """The ``IdempotencyStore`` of a cluster."""

    def __init__(self, instance: Instance, queries: Client, subscriber: Subscriber) -> None:
        self.log = instance.log
        self._redis = queries
        self._subscriber = subscriber
        self._local = LocalIdempotency()

    def claim(self, key: str) -> str | None:
        if not self._subscriber.up:
            return self._local.claim(key)
        name = keys.idempotency(key)
        try:
            if self._redis.set(name, PENDING, nx=True, ex=TTL_S):
                return None
            found = self._redis.get(name)
        except ERRORS as exc:
            self.log.info("backplane_query_failed", query="idempotency", error=str(exc))
            return self._local.claim(key)
        # Gone between the two calls (expired, or abandoned): the caller asks again.
        return PENDING if found is None else found.decode()

    def record(self, key: str, answer: str) -> None:
        self._local.record(key, answer)
        if not self._subscriber.up:
            return
        try:
            self._redis.set(keys.idempotency(key), answer, xx=True, keepttl=True)
        except ERRORS as exc:
            self.log.info("backplane_query_failed", query="idempotency", error=str(exc))

    def abandon(self, key: str) -> None:
        self._local.abandon(key)
        if not self._subscriber.up:
            return
        try:
            self._redis.delete(keys.idempotency(key))
        except ERRORS as exc:
            self.log.info("backplane_query_failed", query="idempotency", error=str(exc))
