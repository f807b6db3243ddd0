"""Who may hold a place on the chat port: caps in total and per client address, from accept on.

Every accepted socket holds places from the moment it is accepted until it
closes, so a connection still in its TLS handshake, being sniffed, sending
HTTP headers or not yet authenticated counts like a member (NATS counts
connections from accept too):

- ``connection_slots`` (an ``Admission``): every open socket, per address
  behind --max-per-ip;
- the ``WaitingRoom``: sockets not admitted yet, behind --max-pending and the
  descriptors left over;
- ``member_slots`` (an ``Admission``): chat members, behind --max-clients as
  the ``FdBudget`` lowers it.

An ``Arrival`` is what one connection holds of the first two.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

FULL = "server full"
FULL_FOR_ADDRESS = "server full: too many connections from your address"

# Descriptors the process needs besides chat-port sockets: 3 standard streams,
# 2 listeners, the event loop's own (epoll, eventfd, signalfd, resolver
# pipes), up to 33 Redis connections (a pool of 32 the queries and the
# subscriber share, one writer), up to 32 on --metrics-port
# (httpfront.METRICS_PORT_CONNECTIONS), and slack for transient ones (/proc
# reads by the process collector, TLS context files).
FD_RESERVE = 100
# Descriptors kept for connections that are not members yet when members fill
# the rest, so that a full server can still accept, say '! server full' and
# answer HTTP probes on the chat port.  Never more than a quarter of what the
# reserve leaves, so a small limit still admits members.
PENDING_HEADROOM = 256


@dataclass(frozen=True)
class FdBudget:
    """How the open-files limit is shared out; logged at start as ``fd_budget``."""

    fd_limit: int
    sockets: int  # chat-port sockets at most (members and pending)
    members: int  # the effective --max-clients

    @classmethod
    def plan(cls, fd_limit: int, max_clients: int) -> FdBudget:
        sockets = max(2, fd_limit - FD_RESERVE)
        headroom = min(PENDING_HEADROOM, max(1, sockets // 4))
        return cls(fd_limit, sockets, max(1, min(max_clients, sockets - headroom)))


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


# A connection that has waited this long for its client (twice the default sniff
# window) since the server got to it is stuck: only such a one is dropped to make room.
STUCK_AFTER = 0.5


class WaitingRoom:
    """Connections accepted but not admitted yet, at most ``limit`` and at most ``room()`` at once.

    When the room is full, a newcomer takes the place of the oldest stuck
    connection (served for over ``STUCK_AFTER`` seconds and still not
    admitted) of the address holding the most places: one address trickling
    headers into every place loses its own first, and a newcomer from anywhere
    else gets in at once.  Time a connection spent queued behind the server's
    own work (its greenlet not started yet, in a burst the server is slower
    to take in than it arrives) does not count: that one is not stuck, and
    dropping it would only make the server drop the next.  While no one is
    stuck the room is simply ``full``: the listener stops accepting until a
    place frees, and the burst waits in the kernel's backlog, where it costs
    nothing (a benchmark or a NAT'd office connecting all at once).
    """

    __slots__ = ("_by_ip", "count", "limit", "room")

    def __init__(self, limit: int, room: Callable[[], int]) -> None:
        self.limit = limit
        self.room = room
        self.count = 0
        # Each address's waiting arrivals, oldest first (dicts keep insertion order).
        self._by_ip: dict[str, dict[Arrival, None]] = {}

    def full(self) -> bool:
        """No place, and no one stuck to give one up: do not accept now."""
        return self._crowded() and self._stuck() is None

    def enter(self, arrival: Arrival) -> Arrival | None:
        """Seat ``arrival``; when the room is full, unseat and return the stuck one it replaces."""
        victim = self._stuck() if self._crowded() else None
        if victim is not None:
            self.leave(victim)
        self._by_ip.setdefault(arrival.ip, {})[arrival] = None
        self.count += 1
        return victim

    def _crowded(self) -> bool:
        return self.count >= min(self.limit, self.room())

    def _stuck(self) -> Arrival | None:
        """The oldest stuck arrival of the address holding the most places, if any is stuck."""
        cutoff = time.monotonic() - STUCK_AFTER
        oldest = (next(iter(seated)) for seated in self._by_ip.values())
        stuck = [arrival for arrival in oldest if arrival.served <= cutoff]
        # The address holding the most places first; between equals, the longest waiting.
        return max(stuck, key=lambda arrival: (len(self._by_ip[arrival.ip]), -arrival.served), default=None)

    def move(self, arrival: Arrival, ip: str) -> None:
        """Seat ``arrival`` under another address (the real client's, from a PROXY header)."""
        if self.leave(arrival):
            arrival.ip = ip
            self._by_ip.setdefault(ip, {})[arrival] = None
            self.count += 1
        else:
            arrival.ip = ip

    def leave(self, arrival: Arrival) -> bool:
        """Unseat ``arrival`` if it is seated; True if it was."""
        seated = self._by_ip.get(arrival.ip)
        if seated is None or arrival not in seated:
            return False
        del seated[arrival]
        if not seated:
            del self._by_ip[arrival.ip]
        self.count -= 1
        return True


class Arrival:
    """What one accepted connection holds: a waiting place until admitted, its address's slot until closed.

    ``sock`` is the connection's current socket (the TLS one once wrapped):
    dropping the arrival closes it, and whatever the connection was waiting
    for fails.  ``deadline`` ends the pre-admission phase (--admission-timeout)
    whatever the client does.
    """

    __slots__ = ("_room", "_slots", "_slotted", "deadline", "dropped", "ip", "port", "served", "since", "sock")

    def __init__(self, address: tuple[str, int], sock: Any, room: WaitingRoom, slots: Admission, budget: float) -> None:
        self.ip, self.port = address[0], address[1]
        self.sock = sock
        self._room = room
        self._slots = slots
        self._slotted = False
        self.since = time.monotonic()
        self.deadline = self.since + budget if budget else float("inf")
        # When its greenlet started: from then on, what it waits for is its client.
        self.served = float("inf")
        self.dropped = False

    @property
    def address(self) -> tuple[str, int]:
        return self.ip, self.port

    def remaining(self) -> float | None:
        """Seconds left of the pre-admission budget; None when there is no budget."""
        if self.deadline == float("inf"):
            return None
        return max(0.0, self.deadline - time.monotonic())

    def serve(self) -> None:
        """The server got to the connection (its greenlet runs): the room's stuck clock starts."""
        self.served = time.monotonic()

    def claim(self, address: tuple[str, int]) -> str | None:
        """Take the connection's place under its client address (--max-per-ip), or say why not."""
        self._room.move(self, address[0])
        self.port = address[1]
        refusal = self._slots.acquire(self.ip)
        self._slotted = refusal is None
        return refusal

    def admitted(self) -> None:
        """The connection became a member: it no longer waits."""
        self._room.leave(self)

    def drop(self) -> None:
        """Unseated by the room to make space: close the connection."""
        self.dropped = True
        self.sock.close()

    def release(self) -> None:
        """Give back everything held; called once the socket is closed (again is harmless)."""
        self._room.leave(self)
        if self._slotted:
            self._slotted = False
            self._slots.release(self.ip)
