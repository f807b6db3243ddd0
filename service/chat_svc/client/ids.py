"""Message ids on the client's side: strip them, remember the last one per room, spot replays.

With ``/ids`` on, every line of a room's log arrives as ``@<epoch>:<offset> <line>``
(docs/protocol.md).  The user never sees that prefix; the client keeps the newest id of each
room (:class:`Ledger`), so after a reconnect it can ``/resume`` from there and drop any line
it has already shown.  Offsets grow by one per line within an epoch, so "already shown" is
"same epoch, offset not above the last one".

A ``/resume`` answer arrives mixed with what the new connection's first room (``lobby``)
sends meanwhile, and both carry ids.  The replay is pushed in one piece right before
``* resumed ROOM: N lines``, so it is exactly the last N lines of the resumed epoch with
offsets above the one asked for (:class:`Replay`).
"""

from __future__ import annotations

import re
from collections import deque

_ID_PREFIX = re.compile(r"@([A-Za-z0-9]{1,16}):([0-9]{1,18}) ")

#: Candidate replay lines kept while a /resume is answered: only a broken server sends more
#: than its retention (1000 lines by default), and only the last N count.
MAX_REPLAY_LINES = 100_000

Id = tuple[str, int]


def split_id(text: str) -> tuple[Id | None, str]:
    """The line's id (None when it has none) and the line as the user sees it."""
    found = _ID_PREFIX.match(text)
    if found is None:
        return None, text
    return (found[1], int(found[2])), text[found.end() :]


def room_key(name: str) -> str:
    """One key per room however the server or the user spelled it (``#Dev`` is ``dev``)."""
    return name.removeprefix("#").casefold()


class Ledger:
    """The newest id shown in each room."""

    def __init__(self) -> None:
        self._last: dict[str, Id] = {}

    def last(self, room: str) -> Id | None:
        return self._last.get(room_key(room))

    def note(self, room: str, line_id: Id) -> bool:
        """Record ``line_id`` in ``room``; False when it was shown already (a duplicate)."""
        key = room_key(room)
        last = self._last.get(key)
        if last is not None and last[0] == line_id[0] and line_id[1] <= last[1]:
            return False
        self._last[key] = line_id
        return True


class Replay:
    """A ``/resume ROOM EPOCH:OFFSET`` the client sent, until the server answers it."""

    def __init__(self, room: str, since: Id) -> None:
        self.room = room
        self.since = since
        self._candidates: deque[tuple[Id, str]] = deque(maxlen=MAX_REPLAY_LINES)

    def offer(self, line_id: Id, text: str) -> None:
        """A line that arrived before the answer: kept if it can be part of the replay."""
        if line_id[0] == self.since[0] and line_id[1] > self.since[1]:
            self._candidates.append((line_id, text))

    def replayed(self, count: int) -> list[tuple[Id, str]]:
        """The ``count`` lines the answer ``* resumed ROOM: count lines`` closes."""
        return list(self._candidates)[-count:] if count > 0 else []
