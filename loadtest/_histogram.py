"""Latency histogram shared by the recorder (per process) and the ledger (swarm-wide)."""

from __future__ import annotations

import math


class LatencyHistogram:
    """Exact-count, log-bucketed latency histogram that merges across processes.

    Every delivery is counted here (cheap: one ``log`` and one dict increment) while
    only a sample is fired as a Locust request event, so thresholds are judged on all
    deliveries without paying Locust's per-event cost. Buckets are 1/64 of an e-fold of
    microseconds (about 1.6 % wide); percentiles report the bucket's upper edge, so they
    err on the pessimistic side.
    """

    SCALE = 64

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.total = 0
        self.max_us = 0

    def add_us(self, us: int) -> None:
        """Count one latency given in microseconds."""
        us = max(us, 1)
        k = int(math.log(us) * self.SCALE)
        self.counts[k] = self.counts.get(k, 0) + 1
        self.total += 1
        if us > self.max_us:
            self.max_us = us

    def merge_wire(self, wire: list[list[int]], max_us: int = 0) -> None:
        """Add counts shipped by ``to_wire`` from another process."""
        for k, n in wire:
            self.counts[k] = self.counts.get(k, 0) + n
            self.total += n
        self.max_us = max(self.max_us, max_us)

    def to_wire(self) -> list[list[int]]:
        """Counts as ``[[bucket, count], ...]`` (msgpack-friendly)."""
        return [[k, n] for k, n in self.counts.items()]

    def percentile_ms(self, q: float) -> float | None:
        """Latency in ms below which a fraction ``q`` of deliveries fall (None when empty)."""
        if self.total == 0:
            return None
        rank = max(1, math.ceil(q * self.total))
        seen = 0
        for k in sorted(self.counts):
            seen += self.counts[k]
            if seen >= rank:
                return min(math.exp((k + 1) / self.SCALE), float(self.max_us)) / 1000.0
        return self.max_us / 1000.0
