"""Idempotency keys of the operator API: a retried publish delivers nothing and gets the first answer.

A request with an ``Idempotency-Key`` first *claims* the key (marking it
pending), then does its work and *records* its answer; a request that finds
the key recorded replays that answer.  A request that fails without
delivering anything *abandons* the key, so a retry can still succeed.  Keys
live ``TTL_S`` (Centrifugo keeps its publish idempotency keys for the same
five minutes).  This module is a single process's store; the backplane
keeps the cluster's in Redis with the same three calls.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

TTL_S = 300
# What a claimed key holds until its answer is recorded.
PENDING = ""
# The most keys one process remembers; past it the oldest are forgotten early.
MAX_KEYS = 100_000


class IdempotencyStore(Protocol):
    def claim(self, key: str) -> str | None:
        """None when ``key`` is now ours; else its recorded answer, or PENDING while another request holds it."""

    def record(self, key: str, answer: str) -> None:
        """The answer of the request that claimed ``key``."""

    def abandon(self, key: str) -> None:
        """The claiming request delivered nothing: free ``key`` for a retry."""


class LocalIdempotency:
    """Keys in a dict in claim order, which is also expiry order (one TTL for all)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, ttl_s: float = TTL_S) -> None:
        self._clock = clock
        self._ttl = ttl_s
        self._keys: dict[str, tuple[float, str]] = {}

    def claim(self, key: str) -> str | None:
        now = self._clock()
        self._expire(now)
        found = self._keys.get(key)
        if found is not None:
            return found[1]
        self._keys[key] = (now + self._ttl, PENDING)
        return None

    def record(self, key: str, answer: str) -> None:
        found = self._keys.get(key)
        if found is not None:
            self._keys[key] = (found[0], answer)

    def abandon(self, key: str) -> None:
        self._keys.pop(key, None)

    def _expire(self, now: float) -> None:
        keys = self._keys
        while keys:
            oldest = next(iter(keys))
            if keys[oldest][0] > now and len(keys) < MAX_KEYS:
                return
            del keys[oldest]
