"""Where the user stands on the server, read from the server's own lines.

The client never guesses its nick or room: it learns them from the welcome line, from
``* OLD is now known as NEW`` about itself and from ``* you joined ROOM``.  That knowledge
feeds the prompt (``[alice@lobby] ``) and decides what to send again after a reconnect.

Every received line passes through :meth:`Session.received` and every new connection starts
with :meth:`Session.connected`, so continuity across connections has exactly two places to
live.  Message ids (issue 12) will fit there: ``connected`` sends ``/ids`` and swaps the
``/join`` for ``/resume ROOM EPOCH:OFFSET``; ``received`` strips the ``@epoch:offset `` prefix,
remembers the last id per room and drops lines at or below it.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

#: The server's welcome names the nick and room; parsed loosely because its wording may change
#: (``* welcome to chat-svc, you are NICK in ROOM; type /help`` today).
_WELCOME = re.compile(r"^\* welcome\b.*?\byou are (\S+) in (?:room )?([^\s;,]+)")
_RENAMED = re.compile(r"^\* (\S+) is now known as (\S+)$")
_JOINED = re.compile(r"^\* you (?:joined|are already in) (\S+)$")

#: How often to ask again for a nick that someone else took while we were away.
NICK_RETRY_SECONDS = 5.0

FALLBACK_PROMPT = "[Me] "


class Reading(NamedTuple):
    """What a received line means for the user: the line to show (None: hide it), then notes."""

    shown: str | None
    notes: list[str]


def _same_room(a: str, b: str) -> bool:
    """Room names as the server may echo them back (it may drop a leading ``#`` or fold case)."""
    return a.lstrip("#").casefold() == b.lstrip("#").casefold()


class Session:
    """The user's nick and room as the server last stated them, and how to get them back.

    Shared by the main thread (lines typed, the prompt) and the network thread (lines received,
    reconnects); a lock guards the updates, and the prompt reads only immutable strings.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self.nick: str | None = None
        self.room: str | None = None
        self._welcomed = False
        # What to ask for after a reconnect: the last /auth typed, and the nick and room the
        # server confirmed (not merely what was typed: a refused /nick is not worth repeating).
        self._auth: str | None = None
        self._wanted_nick: str | None = None
        self._wanted_room: str | None = None
        # Rooms asked for with /join and not yet confirmed.  Only those confirm a room: a member
        # called "you" could otherwise say "/me joined elsewhere" and move our prompt.
        self._asked_rooms: list[str] = []
        # Taking the nick back after a reconnect: the nick, how many automatic /nick are
        # unanswered, how many were refused, and when to ask again.
        self._reclaim: str | None = None
        self._reclaim_unanswered = 0
        self._reclaim_refusals = 0
        self._retry_at: float | None = None

    def prompt(self) -> str:
        """``[nick@room] `` once the server has said who and where we are, else ``[Me] ``."""
        nick, room = self.nick, self.room
        return f"[{nick}@{room}] " if nick and room else FALLBACK_PROMPT

    def typed(self, text: str) -> None:
        """Note a line the user is sending (called just before it is queued)."""
        command, _, arg = text.partition(" ")  # parsed as the server parses it
        command, arg = command.lower(), arg.strip()
        if not arg:
            return
        with self._lock:
            if command == "/auth":
                self._auth = text
            elif command == "/join":
                self._asked_rooms.append(arg)
            elif command == "/nick" and self._reclaim is not None and arg != self._reclaim:
                self._reclaim = None  # the user picked another nick: stop asking for the old one
                self._retry_at = None

    def connected(self) -> list[str]:
        """Lines to send first on a new connection: ``/auth``, then the nick and room to restore."""
        with self._lock:
            self._welcomed = False
            self._asked_rooms.clear()
            self._reclaim = self._wanted_nick
            self._reclaim_unanswered = 1 if self._wanted_nick else 0
            self._reclaim_refusals = 0
            self._retry_at = None
            lines = [self._auth] if self._auth else []
            if self._wanted_nick:
                lines.append(f"/nick {self._wanted_nick}")
            if self._wanted_room:
                lines.append(f"/join {self._wanted_room}")
                self._asked_rooms.append(self._wanted_room)
            return lines

    def received(self, text: str) -> Reading:
        """Learn from one (already cleaned) server line."""
        notes: list[str] = []
        with self._lock:
            shown = self._read(text, notes)
        return Reading(shown, notes)

    def due(self) -> list[str]:
        """Lines to send now: another try at the nick, when its time has come."""
        with self._lock:
            if self._reclaim is None or self._retry_at is None or self._clock() < self._retry_at:
                return []
            self._retry_at = None
            self._reclaim_unanswered += 1
            return [f"/nick {self._reclaim}"]

    def next_due(self) -> float | None:
        """Seconds until :meth:`due` has something to send (None: nothing planned)."""
        retry_at = self._retry_at
        return None if retry_at is None else max(0.0, retry_at - self._clock())

    # ---------------------------------------------------------------------------- internals

    def _read(self, text: str, notes: list[str]) -> str | None:
        if not self._welcomed:
            welcome = _WELCOME.match(text)
            if welcome:
                self._welcomed = True
                self.nick, self.room = welcome.groups()
            return text
        renamed = _RENAMED.match(text)
        if renamed and renamed.group(1) == self.nick:
            self._renamed(renamed.group(2), notes)
            return text
        joined = _JOINED.match(text)
        if joined:
            room = joined.group(1)
            asked = next((r for r in self._asked_rooms if _same_room(r, room)), None)
            if asked is not None:
                self._asked_rooms.remove(asked)
                self.room = self._wanted_room = room
            return text
        if text.startswith("! ") and self._reclaim_unanswered and self._reclaim in text.split():
            self._refused(text, notes)
            return None  # the answer to a /nick the user did not type: said in plain words instead
        return text

    def _renamed(self, new: str, notes: list[str]) -> None:
        self.nick = self._wanted_nick = new
        if new == self._reclaim:
            if self._reclaim_refusals:
                notes.append(f"* took back your nick {new}")
            self._reclaim = None
            self._reclaim_unanswered = 0
            self._retry_at = None

    def _refused(self, text: str, notes: list[str]) -> None:
        """An automatic ``/nick`` was refused: say why once, then keep trying if it was taken."""
        nick = self._reclaim
        self._reclaim_unanswered -= 1
        self._reclaim_refusals += 1
        taken = "taken" in text or "in use" in text
        if self._reclaim_refusals == 1:
            reason = "taken" if taken else text[2:]
            notes.append(f"* could not take back your nick {nick}: {reason}")
            if taken:
                notes.append(f"* trying again every {NICK_RETRY_SECONDS:g} s; /nick NAME picks another nick")
        if taken:
            if not self._reclaim_unanswered:
                self._retry_at = self._clock() + NICK_RETRY_SECONDS
        else:
            self._reclaim = None
        return None
