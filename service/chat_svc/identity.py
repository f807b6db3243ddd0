"""Who a member is: the shared token, per-user JWTs, and the watch that ends expired ones.

A member is a *guest* (an ``ip:port`` nick, or whatever it takes with
/nick) or *identified*: it presented a JWT whose ``sub`` became its nick.
The identity travels on the hub's ``Member`` so commands can ask it (may
this member rename, join that room?) without knowing about tokens.
"""

from __future__ import annotations

import heapq
import hmac
import itertools
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import gevent
import gevent.event

from . import jwtauth, protocol
from .jwtauth import AuthFailed, JwtKey

if TYPE_CHECKING:
    from prometheus_client import Counter

    from .hub import Member

# Why /auth failed, besides the JWT reasons in jwtauth: the label values of chat_auth_failures_total.
WRONG_TOKEN = "wrong_token"
MISSING = "missing"
WRONG_SUB = "wrong_sub"
NICK_TAKEN = "nick_taken"
AUTH_FAILURE_REASONS = (
    WRONG_TOKEN,
    MISSING,
    jwtauth.MALFORMED,
    jwtauth.BAD_SIGNATURE,
    jwtauth.BAD_ALGORITHM,
    jwtauth.EXPIRED,
    jwtauth.NOT_YET_VALID,
    jwtauth.BAD_CLAIMS,
    WRONG_SUB,
    NICK_TAKEN,
)
# A token may allow at most this many rooms (it is one line of at most --max-line-bytes anyway).
MAX_ROOMS = 1000


@dataclass(frozen=True, slots=True)
class Identity:
    """What a verified JWT says about its member."""

    sub: str
    nick_change: bool = False
    # The allow-list of the ``rooms`` claim, in the token's order; None = every room.
    rooms: tuple[str, ...] | None = None
    # Wall-clock seconds of ``exp``; None = the token never expires.
    expires: float | None = None

    def allows(self, room: str) -> bool:
        return self.rooms is None or room in self.rooms

    def start_room(self, default: str) -> str:
        """Where the member starts: ``default`` unless its allow-list leaves it out."""
        return default if self.allows(default) else self.rooms[0]  # type: ignore[index]

    @classmethod
    def from_claims(cls, claims: Mapping[str, Any]) -> Identity:
        """Check the claims chat-svc reads; AuthFailed(bad_claims) when one is unusable."""
        sub, nick_change, rooms, exp = (claims.get(k) for k in ("sub", "nick_change", "rooms", "exp"))
        if not isinstance(sub, str) or not protocol.valid_nick(sub):
            raise AuthFailed(jwtauth.BAD_CLAIMS)
        if nick_change is not None and not isinstance(nick_change, bool):
            raise AuthFailed(jwtauth.BAD_CLAIMS)
        if rooms is not None:
            if not isinstance(rooms, list) or not 0 < len(rooms) <= MAX_ROOMS:
                raise AuthFailed(jwtauth.BAD_CLAIMS)
            names = [protocol.room_name(room) if isinstance(room, str) else None for room in rooms]
            if None in names:
                raise AuthFailed(jwtauth.BAD_CLAIMS)
            rooms = tuple(dict.fromkeys(names))  # as /join names them: "#Dev" is "dev"
        return cls(sub, bool(nick_change), rooms, float(exp) if exp is not None else None)


class Authenticator:
    """Checks what follows ``/auth``: the shared ``--token``, or a JWT when ``--jwt-key-file`` is set.

    ``required``: ``/auth`` must be the first line (``--token`` or
    ``--require-auth``).  Without it a JWT is welcome at any time and a
    member that never sends one stays a guest.
    """

    def __init__(
        self,
        token: str | None,
        key_file: str | None,
        *,
        audience: str | None = None,
        issuer: str | None = None,
        require: bool = False,
        failures: Mapping[str, Counter] | None = None,
    ) -> None:
        self.token = token
        self.key_file = key_file
        self.audience = audience
        self.issuer = issuer
        self.required = require or token is not None
        self.failures = failures
        self.key: JwtKey | None = JwtKey.load(key_file) if key_file else None

    @property
    def accepts_jwt(self) -> bool:
        return self.key is not None

    def reload(self) -> None:
        """Read ``--jwt-key-file`` again (SIGHUP: key rotation); the old key stays if the new one is unusable."""
        if self.key_file:
            self.key = JwtKey.load(self.key_file)

    def check(self, presented: str) -> Identity | None:
        """The identity a JWT proves, None for the shared token; AuthFailed (counted) otherwise."""
        try:
            if self.key is not None and jwtauth.looks_like_jwt(presented):
                claims = jwtauth.decode(presented, self.key, self.audience, self.issuer)
                return Identity.from_claims(claims)
            if self.token is not None and hmac.compare_digest(presented.encode(), self.token.encode()):
                return None
            raise AuthFailed(WRONG_TOKEN if self.token is not None or self.key is None else jwtauth.MALFORMED)
        except AuthFailed as failed:
            self.count(failed.reason)
            raise

    def count(self, reason: str) -> None:
        if self.failures is not None:
            self.failures[reason].inc()


class ExpiryWatch:
    """Ends identified members whose token expired: one heap and one greenlet, no timer per member.

    A refresh (a new ``/auth <jwt>``) replaces the member's Identity; the
    old heap entry then no longer matches and is skipped when it comes due.
    Stale entries are dropped whenever they outnumber the live ones, so
    refreshing in a loop cannot grow the heap without bound.
    """

    def __init__(self, on_expired: Callable[[Member], None], clock: Callable[[], float] = time.time) -> None:
        self._on_expired = on_expired
        self._clock = clock
        self._heap: list[tuple[float, int, Member, Identity]] = []
        self._seq = itertools.count()
        self._wake = gevent.event.Event()
        self._greenlet: gevent.Greenlet | None = None
        self._compacted = 0

    def watch(self, member: Member) -> None:
        """``member`` was just given its identity; end it when that expires."""
        identity = member.identity
        if identity is None or identity.expires is None:
            return
        entry = (identity.expires, next(self._seq), member, identity)
        heapq.heappush(self._heap, entry)
        if len(self._heap) > 64 + 2 * self._compacted:
            self._heap = [e for e in self._heap if e[2].identity is e[3]]
            heapq.heapify(self._heap)
            self._compacted = len(self._heap)
        if self._greenlet is None:
            self._greenlet = gevent.spawn(self._run)
        elif self._heap[0] is entry:
            self._wake.set()

    def __len__(self) -> int:
        return len(self._heap)

    def _run(self) -> None:
        while True:
            heap = self._heap
            now = self._clock()
            while heap and heap[0][0] <= now:
                _, _, member, identity = heapq.heappop(heap)
                if member.identity is identity:
                    self._on_expired(member)
            self._wake.clear()
            self._wake.wait(min(heap[0][0] - now, 60.0) if heap else None)
