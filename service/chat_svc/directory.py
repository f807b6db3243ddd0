"""Who is where: the questions about members that have a local and a cluster answer.

A single process answers from its own hub (``Hub`` implements this).  With
``--redis-url`` the backplane answers for every instance, falling back to the
local answer while Redis is away.  The service picks one at start-up, so
commands never ask which mode they run in.  Cluster-wide operator actions
(kick, ban, publish) belong behind this same seam.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .hub import Member


class Directory(Protocol):
    def claim_nick(self, member: Member, nick: str) -> str | None:
        """/nick: give ``member`` the nick ``nick``; an error text when it is taken, else None."""

    def whisper(self, member: Member, target: str, text: str) -> bool:
        """/msg: deliver to ``target`` and echo to ``member``; False when no such nick is online."""

    def room_counts(self) -> list[tuple[str, int]]:
        """Rooms with members and how many, sorted by name."""

    def who(self, room: str) -> list[str]:
        """Nicks in ``room``, sorted."""
