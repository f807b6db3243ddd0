"""Where the user stands on the server, read from the server's own lines.

The client never guesses its nick or room: it learns them from the welcome line, from
``* OLD is now known as NEW`` about itself, from ``* you joined ROOM`` and from the answer to
a ``/resume``.  That knowledge feeds the prompt (``[alice@lobby] ``) and decides what to send
again after a reconnect.

Every received line passes through :meth:`Session.received` and every new connection starts
with :meth:`Session.connected`, so continuity across connections has exactly two places to
live.  With ids (``--reconnect``), ``connected`` sends ``/ids`` and swaps the ``/join`` for
``/resume ROOM EPOCH:OFFSET``; ``received`` strips the ``@epoch:offset `` prefix, remembers
the last id per room (:mod:`~chat_svc.client.ids`) and drops lines already shown.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

from chat_svc.client.ids import Id, Ledger, Replay, room_key, split_id

#: The server's welcome names the nick and room; parsed loosely because its wording may change
#: (``* welcome to chat-svc, you are NICK in ROOM; type /help`` today).
_WELCOME = re.compile(r"^\* welcome\b.*?\byou are (\S+) in (?:room )?([^\s;,]+)")
_RENAMED = re.compile(r"^\* (\S+) is now known as (\S+)$")
_JOINED = re.compile(r"^\* you (?:joined|are already in) (\S+)$")
_RESUMED = re.compile(r"^\* resumed (\S+): (\d+) lines$")
_INCOMPLETE = re.compile(r"^! resume incomplete (\S+): (.+)$")
#: Lines about a member: what it says, and its comings, goings and renames.
_SAID = re.compile(r"^(?:\* )?\[([^\]\s]+)\] ")
_CAME_OR_WENT = re.compile(r"^\* (\S+) (?:joined|left) \S+$")
IDS_ON = "* ids on"

#: How often to ask again for a nick that someone else took while we were away.
NICK_RETRY_SECONDS = 5.0

FALLBACK_PROMPT = "[Me] "


class Reading(NamedTuple):
    """What a received line means for the user: the lines to show (none: hide it), then notes."""

    shown: list[str]
    notes: list[str]


def _same_room(a: str, b: str) -> bool:
    """Room names as the server may echo them back (it may drop a leading ``#`` or fold case)."""
    return room_key(a) == room_key(b)


class Session:
    """The user's nick and room as the server last stated them, and how to get them back.

    Shared by the main thread (lines typed, the prompt) and the network thread (lines received,
    reconnects); a lock guards the updates, and the prompt reads only immutable strings.
    ``ids``: turn message ids on and resume after a reconnect (``--reconnect``).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, *, ids: bool = False) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self.ids = ids
        self.nick: str | None = None
        self.room: str | None = None
        self._welcomed = False
        # What to ask for after a reconnect: the last /auth typed, and the nick and room the
        # server confirmed (not merely what was typed: a refused /nick is not worth repeating).
        self._auth: str | None = None
        self._wanted_nick: str | None = None
        self._wanted_room: str | None = None
        # The room of the first welcome: where the user is until it joins another.
        self._start_room: str | None = None
        # Rooms asked for with /join and not yet confirmed.  Only those confirm a room: a member
        # called "you" could otherwise say "/me joined elsewhere" and move our prompt.
        self._asked_rooms: list[str] = []
        # Taking the nick back after a reconnect: the nick, how many automatic /nick are
        # unanswered, how many were refused, and when to ask again.
        self._reclaim: str | None = None
        self._reclaim_unanswered = 0
        self._reclaim_refusals = 0
        self._retry_at: float | None = None
        # Message ids: the last one per room, the /ids this session sent and not yet seen
        # answered, whether this connection has them on, and the /resume being answered.
        self._ledger = Ledger()
        self._ids_asked = 0
        self._ids_on = False
        self._replay: Replay | None = None
        # This connection's first nick (``ip:port``, from the welcome): its arrival is ours.
        self._connection_nick: str | None = None
        self._to_send: list[str] = []

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
        """Lines to send first on a new connection: ``/auth``, then what restores nick and room.

        With ids, a reconnect sends ``/ids`` before anything else, so every room line after its
        answer carries an id, and ``/resume`` where the user has seen an id (``/join`` where it
        has not), then ``/ids`` again: its answer closes a ``/resume`` the server refused.  A
        first connection asks for ids once welcomed: ``/auth`` may have to come first.
        """
        with self._lock:
            reconnect = self._start_room is not None
            self._welcomed = False
            self._asked_rooms.clear()
            self._reclaim = self._wanted_nick
            self._reclaim_unanswered = 1 if self._wanted_nick else 0
            self._reclaim_refusals = 0
            self._retry_at = None
            self._ids_asked = 0
            self._ids_on = False
            self._replay = None
            self._connection_nick = None
            self._to_send.clear()
            lines = [self._auth] if self._auth else []
            if self.ids and reconnect:
                lines.append(self._ask_ids())
            if self._wanted_nick:
                lines.append(f"/nick {self._wanted_nick}")
            room = self._wanted_room or self._start_room
            since = self._ledger.last(room) if self.ids and room else None
            if room and since:
                self._replay = Replay(room, since)
                lines += [f"/resume {room} {since[0]}:{since[1]}", self._ask_ids()]
            elif self._wanted_room:
                lines.append(f"/join {self._wanted_room}")
                self._asked_rooms.append(self._wanted_room)
            return lines

    def received(self, text: str) -> Reading:
        """Learn from one (already cleaned) server line."""
        notes: list[str] = []
        with self._lock:
            line_id, text = split_id(text)
            shown = self._read(text, notes) if line_id is None else self._room_line(line_id, text)
        return Reading(shown, notes)

    def due(self) -> list[str]:
        """Lines to send now: ``/ids`` once welcomed, another try at the nick when its time has come."""
        with self._lock:
            lines, self._to_send = self._to_send, []
            if self._reclaim is None or self._retry_at is None or self._clock() < self._retry_at:
                return lines
            self._retry_at = None
            self._reclaim_unanswered += 1
            return [*lines, f"/nick {self._reclaim}"]

    def next_due(self) -> float | None:
        """Seconds until :meth:`due` has something to send (None: nothing planned)."""
        if self._to_send:
            return 0.0
        retry_at = self._retry_at
        return None if retry_at is None else max(0.0, retry_at - self._clock())

    # ---------------------------------------------------------------------------- internals

    def _ask_ids(self) -> str:
        self._ids_asked += 1
        return "/ids"

    def _read(self, text: str, notes: list[str]) -> list[str]:
        if not self._welcomed:
            welcome = _WELCOME.match(text)
            if welcome:
                self._welcomed = True
                self.nick, self.room = welcome.groups()
                self._connection_nick = self.nick
                if self._start_room is None:
                    self._start_room = self.room
                    if self.ids:
                        self._to_send.append(self._ask_ids())
            return [text]
        if text == IDS_ON and self._ids_asked:
            self._ids_asked -= 1
            self._ids_on = True
            if not self._ids_asked and self._replay is not None:
                self._refused(notes)
            return []  # asked for by the client, not the user
        if self._replay is not None:
            answered = self._answer(text, notes)
            if answered is not None:
                return answered
            if not self._ids_on and not text.startswith("! "):
                return []  # the first room's history and lines: not where the user is going
        renamed = _RENAMED.match(text)
        if renamed and renamed.group(1) == self.nick:
            self._renamed(renamed.group(2), notes)
            return [text]
        joined = _JOINED.match(text)
        if joined:
            room = joined.group(1)
            asked = next((r for r in self._asked_rooms if _same_room(r, room)), None)
            if asked is not None:
                self._asked_rooms.remove(asked)
                self.room = self._wanted_room = room
            return [text]
        if text.startswith("! ") and self._reclaim_unanswered and self._reclaim in text.split():
            self._nick_refused(text, notes)
            return []  # the answer to a /nick the user did not type: said in plain words instead
        return [text]

    def _room_line(self, line_id: Id, text: str) -> list[str]:
        """A line of a room's log: held while a /resume is answered, else shown unless seen."""
        if self._replay is not None:
            self._replay.offer(line_id, text)
            return []
        if self.room is None or not self._ledger.note(self.room, line_id):
            return []
        return [text]

    def _answer(self, text: str, notes: list[str]) -> list[str] | None:
        """The server's answer to our /resume (None: ``text`` is not it): the replay, then a note."""
        replay = self._replay
        assert replay is not None
        resumed = _RESUMED.match(text)
        incomplete = None if resumed else _INCOMPLETE.match(text)
        found = resumed or incomplete
        if found is None or not _same_room(found.group(1), replay.room):
            return None
        self._replay = None
        self.room = found.group(1)
        if self._wanted_room is not None:
            self._wanted_room = self.room
        if incomplete:
            notes.append(f"* could not resume {self.room}: lines may be missing ({incomplete.group(2)})")
            return []
        shown = []
        for line_id, line in replay.replayed(int(found.group(2))):
            if self._ledger.note(self.room, line_id) and not self._ours(line):
                shown.append(line)
        notes.append(f"* resumed {len(shown)} lines")
        return shown

    def _ours(self, line: str) -> bool:
        """A replayed line about the user: what it said, its comings, goings and renames.

        The user saw these as it typed them (the server never echoes them live), or they are
        this reconnect's own arrival.
        """
        nicks = {self.nick, self._wanted_nick, self._connection_nick} - {None}
        for pattern in (_SAID, _CAME_OR_WENT):
            found = pattern.match(line)
            if found:
                return found.group(1) in nicks
        renamed = _RENAMED.match(line)
        return renamed is not None and not nicks.isdisjoint(renamed.groups())

    def _refused(self, notes: list[str]) -> None:
        """The /resume was refused (the server said why): the user stays where it was welcomed."""
        assert self._replay is not None
        notes.append(f"* could not resume {self._replay.room}: you are in {self.room}")
        self._replay = None

    def _renamed(self, new: str, notes: list[str]) -> None:
        self.nick = self._wanted_nick = new
        if new == self._reclaim:
            if self._reclaim_refusals:
                notes.append(f"* took back your nick {new}")
            self._reclaim = None
            self._reclaim_unanswered = 0
            self._retry_at = None

    def _nick_refused(self, text: str, notes: list[str]) -> None:
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
