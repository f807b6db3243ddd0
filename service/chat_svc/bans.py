"""Bans by nick and by client address, with a time to live.

Every instance enforces bans from its own ``BanList`` (a dict lookup at
connect and at /nick, nothing when there are no bans), so enforcing costs
no Redis round trip.  A single process keeps its bans there and nowhere
else; with Redis the list is a mirror of the cluster's, refreshed when any
instance changes it (``backplane.bans``).  Both sides expose the same
``create``/``delete``/``active`` to the operator API.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from .protocol import nick_key

# A ban lives at most a year; an operator can always make a new one.
MAX_TTL_S = 365 * 24 * 3600


class Unavailable(Exception):
    """The store behind the cluster's bans cannot be reached; nothing was changed."""


def normalize_ip(text: str) -> str:
    """One address, or a network in CIDR form, written the way peers' addresses are; ValueError if neither."""
    network = ipaddress.ip_network(text.strip(), strict=False)
    if network.num_addresses == 1:
        return str(network.network_address)
    return str(network)


@dataclass(frozen=True, slots=True)
class Ban:
    """One ban: a nick, an address or network, or both (either matching is enough)."""

    id: str
    nick: str | None
    ip: str | None
    reason: str
    # Wall-clock seconds (Redis' clock in a cluster) when the ban ends.
    expires: float

    @classmethod
    def new(cls, nick: str | None, ip: str | None, reason: str, ttl_s: int, now: float) -> Ban:
        return cls(secrets.token_hex(8), nick, ip, reason, now + ttl_s)

    def public(self, now: float) -> dict[str, Any]:
        """What the operator API shows."""
        ttl = max(0, round(self.expires - now))
        return {"id": self.id, "nick": self.nick, "ip": self.ip, "reason": self.reason, "ttl_s": ttl}

    def matches(self, nick: str, ip: str, sub: str | None) -> bool:
        """Whether a member (its nick, its address, its identity's sub) falls under this ban."""
        if self.nick is not None:
            banned = nick_key(self.nick)  # nicks are one whatever their case
            if banned == nick_key(nick) or (sub is not None and banned == nick_key(sub)):
                return True
        if self.ip is None:
            return False
        if self.ip == ip:
            return True
        try:
            return "/" in self.ip and ipaddress.ip_address(ip) in ipaddress.ip_network(self.ip)
        except ValueError:
            return False

    def encode(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def decode(cls, data: str | bytes) -> Ban | None:
        """A ban stored by any instance; None when it is not one (never raises)."""
        try:
            fields = json.loads(data)
            nick, ip = fields["nick"], fields["ip"]
            if not all(value is None or isinstance(value, str) for value in (nick, ip)):
                return None
            return cls(
                str(fields["id"]),
                nick,
                normalize_ip(ip) if ip is not None else None,
                str(fields["reason"]),
                float(fields["expires"]),
            )
        except (ValueError, KeyError, TypeError):
            return None


class BanStore(Protocol):
    """The bans as the operator API changes them: this process's, or the cluster's."""

    # The clock bans expire by (Redis' in a cluster, so every instance agrees).
    clock: Callable[[], float]

    def create(self, nick: str | None, ip: str | None, reason: str, ttl_s: int) -> Ban:
        """Add a ban, enforce it at once; raises Unavailable when it cannot be stored."""

    def delete(self, ban_id: str) -> bool:
        """Lift a ban; False when there is no such ban.  Raises Unavailable."""

    def active(self) -> list[Ban]:
        """Bans in force, soonest to end first."""


class BanList:
    """The bans this instance enforces, and the store of a single process.

    ``on_added`` is called for each ban new to this list (the service kicks
    the members it matches); it is set once the sessions exist.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.on_added: Callable[[Ban], None] | None = None
        self._bans: dict[str, Ban] = {}
        self._nicks: dict[str, Ban] = {}
        self._ips: dict[str, Ban] = {}
        self._networks: list[tuple[Any, Ban]] = []

    def __len__(self) -> int:
        return len(self._bans)

    # -- enforcing ------------------------------------------------------------------

    def for_ip(self, ip: str) -> Ban | None:
        """The ban keeping the address ``ip`` out, if any."""
        if not self._bans:
            return None
        ban = self._ips.get(ip)
        if ban is None and self._networks:
            try:
                address = ipaddress.ip_address(ip)
            except ValueError:
                return None
            ban = next((b for network, b in self._networks if address in network), None)
        return self._live(ban)

    def for_nick(self, nick: str) -> Ban | None:
        """The ban on ``nick``, if any."""
        if not self._bans:
            return None
        return self._live(self._nicks.get(nick_key(nick)))

    def _live(self, ban: Ban | None) -> Ban | None:
        if ban is not None and ban.expires <= self.clock():
            self._prune()
            return None
        return ban

    # -- the store of a single process ------------------------------------------------

    def create(self, nick: str | None, ip: str | None, reason: str, ttl_s: int) -> Ban:
        ban = Ban.new(nick, ip, reason, ttl_s, self.clock())
        self.replace([*self._bans.values(), ban])
        return ban

    def delete(self, ban_id: str) -> bool:
        if ban_id not in self._bans:
            return False
        self.replace(ban for ban in self._bans.values() if ban.id != ban_id)
        return True

    def active(self) -> list[Ban]:
        self._prune()
        return sorted(self._bans.values(), key=lambda ban: (ban.expires, ban.id))

    # -- keeping it -------------------------------------------------------------------

    def replace(self, bans: Iterable[Ban]) -> None:
        """Make ``bans`` the list in force; ``on_added`` for each one not known before."""
        now = self.clock()
        known = self._bans
        self._bans = {ban.id: ban for ban in bans if ban.expires > now}
        # The longest-lasting ban wins each nick and address.
        ordered = sorted(self._bans.values(), key=lambda ban: ban.expires)
        self._nicks = {nick_key(ban.nick): ban for ban in ordered if ban.nick is not None}
        self._ips = {ban.ip: ban for ban in ordered if ban.ip is not None and "/" not in ban.ip}
        self._networks = [(ipaddress.ip_network(ban.ip), ban) for ban in ordered if ban.ip and "/" in ban.ip]
        if self.on_added is not None:
            for ban in ordered:
                if ban.id not in known:
                    self.on_added(ban)

    def _prune(self) -> None:
        now = self.clock()
        if any(ban.expires <= now for ban in self._bans.values()):
            self.replace(self._bans.values())
