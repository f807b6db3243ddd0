"""Connecting to Redis: pools, time limits, and the errors that mean Redis is away."""

from __future__ import annotations

from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

# Every Redis call gives up after this; a hung Redis then counts as down.
REDIS_TIMEOUT = 1.0

# What a Redis call raises when Redis is unreachable, slow or refuses.
ERRORS = (RedisError, OSError)


def pool(url: str, size: int) -> redis.BlockingConnectionPool:
    """Connections that fail fast and never retry on their own: the backplane reconnects itself, with backoff."""
    made = redis.BlockingConnectionPool.from_url(
        url,
        max_connections=size,
        timeout=REDIS_TIMEOUT,
        socket_timeout=REDIS_TIMEOUT,
        socket_connect_timeout=REDIS_TIMEOUT,
        socket_keepalive=True,
        retry=Retry(NoBackoff(), 0),
        protocol=2,  # RESP2: pub/sub arrives as plain replies on the subscriber connection
    )
    if made.connection_kwargs.get("protocol") not in (2, "2"):
        raise ValueError("--redis-url: the backplane speaks RESP2; drop protocol= from the URL")
    return made


# What the backplane's parts query: a redis.Redis, or a RedisCluster in cluster mode
# (types-redis knows little of redis-py's cluster client, hence Any).
Client = Any
