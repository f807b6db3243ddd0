"""Flood control: a token bucket that answers "how long must this line wait".

The caller (a connection's reader, the only code that touches its bucket)
sleeps for the returned delay without reading the socket: that is IRC's
"fakelag".  The flooder slows down to the configured rate while everyone
else is unaffected, and the kernel's receive buffer pushes back on it.
A line that costs the server more (a listing, a room change) spends more
tokens, as Ergo charges expensive commands more: whatever a client sends,
it gets at most ``rate`` tokens' worth of the server per second.
The clock is injected so the tests need no real time to pass.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class TokenBucket:
    """``burst`` lines at once, then ``rate`` lines per second."""

    __slots__ = ("_clock", "_last", "_tokens", "burst", "rate", "throttled_since")

    def __init__(self, burst: int, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.burst = float(burst)
        self.rate = rate
        self._clock = clock
        self._tokens = float(burst)
        self._last = clock()
        self.throttled_since: float | None = None

    def take(self, cost: float = 1.0) -> float:
        """Spend ``cost`` tokens; return the seconds to wait first (0.0 = go now).

        The tokens are spent even when a wait is returned, so a caller that
        waits and then proceeds has paid for its line exactly once.
        """
        now = self._clock()
        tokens = self._refill(now) - cost
        self._tokens = tokens
        if tokens >= 0.0:
            self.throttled_since = None
            return 0.0
        if self.throttled_since is None:
            self.throttled_since = now
        return -tokens / self.rate

    def try_take(self) -> bool:
        """Spend one token if there is one; a refusal costs nothing (a refused connect is not charged)."""
        tokens = self._refill(self._clock())
        if tokens < 1.0:
            return False
        self._tokens = tokens - 1.0
        return True

    def wait(self) -> float:
        """Seconds until a token is there, without spending one."""
        tokens = self._refill(self._clock())
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate

    def full(self) -> bool:
        """True once the bucket has refilled: it then says nothing a fresh one would not."""
        return self._refill(self._clock()) >= self.burst

    def _refill(self, now: float) -> float:
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        return self._tokens

    def throttled_for(self) -> float:
        """Seconds this client has been over its rate without a break."""
        if self.throttled_since is None:
            return 0.0
        return self._clock() - self.throttled_since
