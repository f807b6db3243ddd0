"""Who is where: the questions about members that have a local and a cluster answer.

A single process answers from its own hub (``Hub`` implements this).  With
``--redis-url`` the backplane answers for every instance, falling back to the
local answer while Redis is away.  The service picks one at start-up, so
commands and the operator API never ask which mode they run in.  Bans and
idempotency keys are kept elsewhere (``bans``, ``idempotency``), with a
Redis twin of each in the backplane.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .hub import Member, OnId


class Directory(Protocol):
    def claim_nick(self, member: Member, nick: str) -> str | None:
        """/nick: give ``member`` the nick ``nick``; an error text when it is taken, else None."""

    def reserve(self, nick: str) -> str | None:
        """A member is about to join as ``nick`` (a JWT's sub): an error text when it is taken, else None."""

    def whisper(self, member: Member, target: str, text: str) -> bool:
        """/msg: deliver to ``target`` and echo to ``member``; False when no such nick is online."""

    def room_counts(self) -> list[tuple[str, int]]:
        """Rooms with members and how many, sorted by name."""

    def who(self, room: str) -> list[str]:
        """Nicks in ``room``, sorted."""

    def room_size(self, room: str) -> int:
        """Members of ``room`` on every instance; 0 when there is no such room."""

    def post(self, room: str, line: bytes, on_id: OnId | None = None) -> bool:
        """The operator API says ``line`` in ``room`` on every instance; False when there is no such room.

        ``on_id`` hears the line's id (``epoch:offset``) once it is known.
        """

    def kick(self, nick: str, notice: bytes) -> bool:
        """``notice`` to the member holding ``nick``, then close it, wherever it is; False when nobody has it."""
