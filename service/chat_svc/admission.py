"""Who may hold a place on the chat port: caps in total and per client address.

The service keeps two: one for every open socket on the chat port (taken by
the transport when it accepts) and one for every chat member (taken by the
session before it joins, behind --max-clients and --max-per-ip).  Both are
used the same way, so a cap at accept time (or one on connections still
sniffing or authenticating) is a matter of configuring the first one.
"""

from __future__ import annotations

FULL = "server full"
FULL_FOR_ADDRESS = "server full: too many connections from your address"


class Admission:
    """Places held now, in total and (when capped) per address; 0 = no cap."""

    __slots__ = ("_per_ip", "closed", "count", "limit", "per_ip_limit")

    def __init__(self, limit: int = 0, per_ip_limit: int = 0) -> None:
        self.limit = limit
        self.per_ip_limit = per_ip_limit
        self.count = 0
        self.closed: str | None = None
        self._per_ip: dict[str, int] = {}

    def acquire(self, ip: str) -> str | None:
        """Take a place for ``ip``, or say why not (the text the client is told)."""
        if self.closed is not None:
            return self.closed
        if self.limit and self.count >= self.limit:
            return FULL
        if self.per_ip_limit:
            held = self._per_ip.get(ip, 0)
            if held >= self.per_ip_limit:
                return FULL_FOR_ADDRESS
            self._per_ip[ip] = held + 1
        self.count += 1
        return None

    def release(self, ip: str) -> None:
        """Give back a place ``acquire`` gave ``ip``; exactly once per place."""
        self.count -= 1
        if self.per_ip_limit:
            left = self._per_ip[ip] - 1
            if left:
                self._per_ip[ip] = left
            else:
                del self._per_ip[ip]

    def close(self, reason: str) -> None:
        """Refuse every later ``acquire`` with ``reason`` (shutting down); places held stay held."""
        self.closed = reason

