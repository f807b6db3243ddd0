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

#: The server's welcome names the nick and room; parsed loosely because its wording may change
#: (``* welcome to chat-svc, you are NICK in room ROOM; type /help for commands`` today).
_WELCOME = re.compile(r"^\* welcome\b.*?\byou are (\S+) in (?:room )?([^\s;,]+)")
_RENAMED = re.compile(r"^\* (\S+) is now known as (\S+)$")
_JOINED = re.compile(r"^\* you (?:joined|are already in) (\S+)$")

FALLBACK_PROMPT = "[Me] "


def _same_room(a: str, b: str) -> bool:
    """Room names as the server may echo them back (it may drop a leading ``#`` or fold case)."""
    return a.lstrip("#").casefold() == b.lstrip("#").casefold()


class Session:
    """The user's nick and room as the server last stated them, and how to get them back.

    Shared by the main thread (lines typed, the prompt) and the network thread (lines received,
    reconnects); a lock guards the updates, and the prompt reads only immutable strings.
    """

    def __init__(self) -> None:
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

    def connected(self) -> list[str]:
        """Lines to send first on a new connection: ``/auth``, then the nick and room to restore."""
        with self._lock:
            self._welcomed = False
            self._asked_rooms.clear()
            lines = [self._auth] if self._auth else []
            if self._wanted_nick:
                lines.append(f"/nick {self._wanted_nick}")
            if self._wanted_room:
                lines.append(f"/join {self._wanted_room}")
                self._asked_rooms.append(self._wanted_room)
            return lines

    def received(self, text: str) -> None:
        """Learn from one (already cleaned) server line."""
        with self._lock:
            self._read(text)

    # ---------------------------------------------------------------------------- internals

    def _read(self, text: str) -> None:
        if not self._welcomed:
            welcome = _WELCOME.match(text)
            if welcome:
                self._welcomed = True
                self.nick, self.room = welcome.groups()
            return
        renamed = _RENAMED.match(text)
        if renamed and renamed.group(1) == self.nick:
            self.nick = self._wanted_nick = renamed.group(2)
            return
        joined = _JOINED.match(text)
        if joined:
            room = joined.group(1)
            asked = next((r for r in self._asked_rooms if _same_room(r, room)), None)
            if asked is not None:
                self._asked_rooms.remove(asked)
                self.room = self._wanted_room = room
