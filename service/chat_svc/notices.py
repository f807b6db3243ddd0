"""Join, leave and rename notices per room, bounded under churn.

Every notice costs a line to every member of its room.  A client that
connects and disconnects in a loop (1820 cycles/s were measured) would send
each lobby member thousands of lines a second, all of them noise.  So a room
shows at most ``rate`` notices a second; the rest are only counted, and when
the second is over the room gets one summary line instead
(``* lobby: 37 more joined, 12 more left``).  Seconds are counted by one
ticker for all rooms, so the state is a counter per room that had notices
in the current second, and nothing at all for a quiet server.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

KINDS = ("joined", "left", "renamed")


@dataclass(slots=True)
class Counts:
    """One room's notices in the current second: how many were shown, how many of each kind were not."""

    shown: int = 0
    joined: int = 0
    left: int = 0
    renamed: int = 0

    @property
    def held_back(self) -> int:
        return self.joined + self.left + self.renamed


class NoticeLimiter:
    """At most ``rate`` membership notices per room per second (0 = no limit)."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._rooms: dict[str, Counts] = {}

    @property
    def active(self) -> bool:
        """True while some room had notices in this second (the ticker must run)."""
        return bool(self._rooms)

    def admit(self, room: str, kind: str) -> bool:
        """True: show this notice.  False: it is counted for the room's summary line."""
        if not self.rate:
            return True
        counts = self._rooms.get(room)
        if counts is None:
            counts = self._rooms[room] = Counts()
        if counts.shown < self.rate:
            counts.shown += 1
            return True
        setattr(counts, kind, getattr(counts, kind) + 1)
        return False

    def tick(self) -> Iterator[tuple[str, Counts]]:
        """End the second: the rooms that held notices back, with their counts; then start afresh."""
        rooms, self._rooms = self._rooms, {}
        for room, counts in rooms.items():
            if counts.held_back:
                yield room, counts
