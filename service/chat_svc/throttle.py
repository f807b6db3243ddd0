"""Per-address throttles: a token bucket for each client IP, and the networks exempt from them.

Ergo and InspIRCd throttle connects and failed logins per address; so do we,
with the same ``TokenBucket`` that meters a member's lines.  An address gets a
bucket when it first needs one, and loses it once the bucket has refilled (a
full bucket says nothing a fresh one would not), so the table only holds the
addresses that were busy within the last ``burst / rate`` seconds.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from .flood import TokenBucket

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Networks:
    """A set of networks an address may belong to (``--throttle-exempt``, ``--proxy-protocol-from``)."""

    def __init__(self, cidrs: Iterable[str] | None) -> None:
        self._networks: tuple[Network, ...] = tuple(ipaddress.ip_network(c, strict=False) for c in cidrs or ())

    def __bool__(self) -> bool:
        return bool(self._networks)

    def __contains__(self, ip: str) -> bool:
        if not self._networks:
            return False
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self._networks)


class AddressBuckets:
    """One ``TokenBucket`` per client address; ``rate`` 0 turns the throttle off."""

    def __init__(self, burst: int, rate: float, exempt: Networks) -> None:
        self.burst = burst
        self.rate = rate
        self.exempt = exempt
        self._buckets: dict[str, TokenBucket] = {}

    def _bucket(self, ip: str, create: bool = True) -> TokenBucket | None:
        if not self.rate or ip in self.exempt:
            return None
        bucket = self._buckets.get(ip)
        if bucket is None and create:
            bucket = self._buckets[ip] = TokenBucket(self.burst, self.rate)
        return bucket

    def try_take(self, ip: str) -> bool:
        """Spend one of ``ip``'s tokens; False (and nothing spent) when it has none left."""
        bucket = self._bucket(ip)
        return bucket is None or bucket.try_take()

    def wait(self, ip: str) -> float:
        """Seconds until ``ip`` has a token again (0.0: now)."""
        bucket = self._bucket(ip, create=False)
        return 0.0 if bucket is None else bucket.wait()

    def take(self, ip: str) -> None:
        """Charge ``ip`` one token, even into debt (a failure already happened)."""
        bucket = self._bucket(ip)
        if bucket is not None:
            bucket.take()

    def prune(self) -> None:
        """Forget the addresses whose buckets have refilled; called once a second or so."""
        for ip in [ip for ip, bucket in self._buckets.items() if bucket.full()]:
            del self._buckets[ip]

    def __len__(self) -> int:
        return len(self._buckets)
