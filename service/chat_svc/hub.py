"""Rooms, members, fan-out and history; knows nothing about sockets.

Fan-out works like a sweeper over an append-only room log.  ``broadcast``
only appends the encoded line to the room's log (O(1), whatever the room
size).  One sweeper greenlet walks the members of each busy room and hands
each member everything it has not had yet in a single ``Outbox.push``, so
under load one ``send`` call carries many lines: the kernel's per-call cost,
which dominates fan-out on loopback, is paid per member per pass, not per
delivery.  The joined bytes are built once per pass and shared by every
member at the same position.  The sweeper yields to the event loop every
few dozen members, so new input is read during a pass and reaches the rest
of the room in that same pass: a line waits at most about one pass.
Members' positions (``rseq``) only move forward, so each sender's lines
keep their order, and a line is trimmed from the log once every member
has been handed it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Protocol

import gevent
import gevent.event
import structlog

from . import protocol
from .metrics import Counters
from .notices import NoticeLimiter
from .outbox import Outbox

if TYPE_CHECKING:
    from .identity import Identity

log = structlog.get_logger("chat_svc.hub")

# Members served between two looks at new input during a sweep.  The look is
# gevent.idle(), not sleep(0): sleep(0) only runs queued callbacks (the loop
# does not poll sockets while callbacks keep coming), so input would wait for
# the whole sweep; idle() returns after the loop has polled and served I/O.
YIELD_EVERY = 48
# Bytes a room may have waiting for the sweeper before readers in that room
# pause (overload backpressure: senders slow down, nothing is dropped).
ROOM_BACKLOG_LIMIT = 8 * 1024 * 1024
# How often held-back membership notices are summed up (NoticeLimiter's second).
NOTICE_PERIOD = 1.0


class Owner(Protocol):
    """Whoever serves a member's connection (its session): the hub can end it, not touch its socket."""

    def kill(self, reason: str) -> None:
        """End the connection for ``reason`` (a disconnect reason label); never blocks."""


class Member:
    """A chat participant as the hub sees it: a nick, a room, a position and an outbox.

    ``owner`` lets the hub end the connection (kick, ban, token expiry);
    ``identity`` is set once the member proved who it is with a JWT.
    """

    __slots__ = ("identity", "nick", "outbox", "owner", "room", "rseq")

    def __init__(self, nick: str, outbox: Outbox, owner: Owner | None = None) -> None:
        self.nick = nick
        self.outbox = outbox
        self.owner = owner
        self.identity: Identity | None = None
        self.room: Room | None = None
        self.rseq = 0


class Room:
    """Members of one room, the log of lines not yet handed to all, and recent history."""

    __slots__ = ("_snapshot", "base", "history", "lines", "members", "name", "senders", "times", "waiting")

    def __init__(self, name: str, history: int) -> None:
        self.name = name
        self.members: dict[Member, None] = {}
        self.lines: list[bytes] = []
        self.senders: list[Member | None] = []
        self.times: list[float] = []
        self.base = 0
        self.waiting = 0
        self.history: deque[bytes] = deque(maxlen=history)
        self._snapshot: tuple[Member, ...] | None = None

    @property
    def end(self) -> int:
        """Sequence number the next line will get."""
        return self.base + len(self.lines)

    def add(self, member: Member) -> None:
        self.members[member] = None
        self._snapshot = None

    def remove(self, member: Member) -> None:
        self.members.pop(member, None)
        self._snapshot = None

    def snapshot(self) -> tuple[Member, ...]:
        """The member list to iterate while the sweep may yield and members may leave."""
        if self._snapshot is None:
            self._snapshot = tuple(self.members)
        return self._snapshot


class Backplane(Protocol):
    """Cross-instance relay; the hub works alone when there is none."""

    def publish(self, room: str, data: bytes, history: bool) -> None:
        """Relay a line to the room on other instances; ``history``: a chat line, kept for joiners."""

    def room_active(self, room: str, active: bool) -> None:
        """First local member in (``active``) or last one out of ``room``."""

    def joining(self, member: Member, room: str) -> list[bytes] | None:
        """Before ``member`` enters ``room`` (may block): the cluster's recent lines, None = use local."""

    def left(self, member: Member) -> None:
        """``member`` left a room (to move or to go)."""


class Hub:
    """All rooms of this process, the nick registry and the fan-out sweeper; the local ``Directory``.

    ``members`` and ``reserved`` are keyed by ``protocol.nick_key`` (nicks are
    unique regardless of case); ``member()`` and ``holder()`` look one up by any
    spelling.  ``generation``
    changes whenever membership does, so answers built from it (``/who``,
    ``/rooms``) can be reused until it moves.
    """

    def __init__(
        self,
        counters: Counters,
        history: int = 20,
        notice_threshold: int = 200,
        observe_latency: Callable[[Iterable[float]], None] | None = None,
        notice_rate: int = 0,
    ) -> None:
        self.counters = counters
        self.history = history
        self.notice_threshold = notice_threshold
        self.members: dict[str, Member] = {}
        # Identified members renamed away from their ``sub``: the sub stays theirs while they are here.
        self.reserved: dict[str, Member] = {}
        self.rooms: dict[str, Room] = {}
        self.backplane: Backplane | None = None
        self.generation = 0
        self.notices = NoticeLimiter(notice_rate)
        self._notice_ticker: gevent.Greenlet | None = None
        self._observe_latency = observe_latency
        self._busy: dict[Room, None] = {}
        self._wake = gevent.event.Event()
        gevent.spawn(self._sweep_forever)

    # -- membership -------------------------------------------------------

    def member(self, nick: str) -> Member | None:
        """The member called ``nick`` here, in any letter case."""
        return self.members.get(protocol.nick_key(nick))

    def holder(self, nick: str) -> Member | None:
        """Who has ``nick`` here (any case): the member called so, or the identified member whose sub it is."""
        key = protocol.nick_key(nick)
        return self.members.get(key) or self.reserved.get(key)

    def attach(self, member: Member, room_name: str) -> None:
        """Register a new member under its nick and put it in ``room_name``."""
        self.members[protocol.nick_key(member.nick)] = member
        member.outbox.push(protocol.welcome_line(member.nick, room_name))
        self._enter(member, room_name)

    def detach(self, member: Member) -> None:
        """Forget a member that disconnected; idempotent."""
        key = protocol.nick_key(member.nick)
        if self.members.get(key) is member:
            del self.members[key]
            self.generation += 1
        identity = member.identity
        if identity is not None and self.reserved.get(protocol.nick_key(identity.sub)) is member:
            del self.reserved[protocol.nick_key(identity.sub)]
        room = member.room
        if room is not None:
            self._leave(member, room)

    def move(self, member: Member, room_name: str) -> None:
        """/join: leave the current room and enter ``room_name``."""
        room = member.room
        if room is not None:
            self._leave(member, room)
        self._enter(member, room_name)

    def reserve(self, nick: str) -> str | None:
        """Before a member joins as ``nick``: an error text when it is taken here."""
        return f"nick {nick} is taken" if self.holder(nick) is not None else None

    def claim_nick(self, member: Member, new: str) -> str | None:
        """/nick on this instance: returns an error text, or None when the nick changed.

        A change of letter case only (``alice`` to ``Alice``) keeps the nick and is allowed.
        """
        if new == member.nick:
            return None
        if self.holder(new) not in (None, member):
            return f"nick {new} is taken"
        old = member.nick
        del self.members[protocol.nick_key(old)]
        member.nick = new
        self.members[protocol.nick_key(new)] = member
        self.generation += 1
        identity = member.identity
        if identity is not None:
            sub = protocol.nick_key(identity.sub)
            if protocol.nick_key(new) == sub:
                self.reserved.pop(sub, None)
            else:
                self.reserved[sub] = member
        room = member.room
        if room is not None:
            line = protocol.renamed_line(old, new)
            if len(room.members) <= self.notice_threshold:
                self._notice(room, line, member, "renamed")
            self.send_to(member, line)
        return None

    def _enter(self, member: Member, room_name: str) -> None:
        # The backplane may block here (subscribe, read Redis history): before any state changes.
        recent = self.backplane.joining(member, room_name) if self.backplane is not None else None
        room = self.rooms.get(room_name)
        if room is None:
            room = self.rooms[room_name] = Room(room_name, self.history)
            if recent:
                room.history.extend(recent)  # a new room's local mirror starts from the cluster's history
            if self.backplane is not None:
                self.backplane.room_active(room_name, True)
        if recent is None:
            recent = list(room.history)
        if recent:
            member.outbox.push(protocol.history_block(recent))
        room.add(member)
        member.room = room
        member.rseq = room.end
        self.generation += 1
        if len(room.members) <= self.notice_threshold:
            self._notice(room, protocol.joined_line(member.nick, room_name), member, "joined")

    def _leave(self, member: Member, room: Room) -> None:
        # Out of the room first: handing over what it is owed may fail the
        # member's socket, and that failure comes back here through detach().
        room.remove(member)
        member.room = None
        self.generation += 1
        self._catch_up(member, room)
        if len(room.members) < self.notice_threshold:
            self._notice(room, protocol.left_line(member.nick, room.name), member, "left")
        if not room.members and self.rooms.get(room.name) is room:
            del self.rooms[room.name]
            if self.backplane is not None:
                self.backplane.room_active(room.name, False)
        if self.backplane is not None:
            self.backplane.left(member)

    def _notice(self, room: Room, line: bytes, member: Member, kind: str) -> None:
        """A membership notice to the room, unless the room has had its share this second."""
        if self.notices.admit(room.name, kind):
            self.broadcast(room, line, member)
        if self._notice_ticker is None and self.notices.active:
            self._notice_ticker = gevent.spawn(self._tick_notices)

    def _tick_notices(self) -> None:
        """Each second, sum up what rooms held back; runs only while rooms have notices."""
        try:
            while self.notices.active:
                gevent.sleep(NOTICE_PERIOD)
                for name, counts in self.notices.tick():
                    self.counters.notices_held_back += counts.held_back
                    room = self.rooms.get(name)
                    if room is not None and len(room.members) <= self.notice_threshold:
                        line = protocol.notices_summary_line(name, counts.joined, counts.left, counts.renamed)
                        self.broadcast(room, line, None)
        finally:
            self._notice_ticker = None

    # -- fan-out ----------------------------------------------------------

    def say(self, member: Member, data: bytes, t_read: float) -> None:
        """A chat line or /me action from ``member`` to the rest of its room."""
        room = member.room
        if room is None:
            return
        while room.waiting > ROOM_BACKLOG_LIMIT and member.room is room:
            gevent.sleep(0.005)
        self.broadcast(room, data, member, t_read, history=True)

    def broadcast(
        self, room: Room, data: bytes, sender: Member | None, t_read: float | None = None, history: bool = False
    ) -> None:
        """Queue ``data`` for everyone in ``room`` but ``sender``, on every instance.

        ``history`` marks a chat line (kept and replayed to joiners) as opposed
        to a notice (joins, leaves, renames), which only goes out live.
        """
        if self.backplane is not None:
            self.backplane.publish(room.name, data, history)
        self.deliver_local(room, data, sender, t_read, history)

    def deliver_local(
        self, room: Room, data: bytes, sender: Member | None, t_read: float | None = None, history: bool = False
    ) -> None:
        """Append ``data`` to the room log for this process's members (no relay)."""
        if history:
            room.history.append(data)
        room.lines.append(data)
        room.senders.append(sender)
        room.times.append(time.perf_counter() if t_read is None else t_read)
        room.waiting += len(data)
        if room not in self._busy:
            self._busy[room] = None
            self._wake.set()

    def whisper(self, member: Member, target: str, text: str) -> bool:
        """/msg to a member of this instance: the line goes to both ends."""
        recipient = self.member(target)
        if recipient is None:
            return False
        line = protocol.private_line(member.nick, target, text)
        self.deliver_private(target, line)
        if recipient is not member:
            self.send_to(member, line)
        return True

    def deliver_private(self, nick: str, data: bytes) -> bool:
        """A private line to the member called ``nick`` (any case), counted as a delivery; False when not here."""
        recipient = self.member(nick)
        if recipient is None:
            return False
        self.send_to(recipient, data)
        self.counters.deliveries += 1
        return True

    def post(self, room_name: str, data: bytes) -> bool:
        """A line from outside the room (the operator API) to its members here; False when no such room."""
        room = self.rooms.get(room_name)
        if room is None:
            return False
        self.broadcast(room, data, None, history=True)
        return True

    def kick(self, nick: str, notice: bytes) -> bool:
        """``notice`` to the member holding ``nick``, then its connection ends (kicked); False when not here."""
        member = self.holder(nick)
        if member is None:
            return False
        self.end(member, notice, "kicked")
        return True

    def end(self, member: Member, notice: bytes, reason: str) -> None:
        """``notice`` to ``member``, then its connection ends for ``reason`` (kicked, banned, token expired)."""
        self.send_to(member, notice)
        if member.owner is not None:
            member.owner.kill(reason)

    def send_to(self, member: Member, data: bytes) -> None:
        """Direct output to one member, after the room lines it is already owed."""
        room = member.room
        if room is not None and member.rseq < room.end:
            self._catch_up(member, room)
        member.outbox.push(data)

    def _sweep_forever(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            while self._busy:
                busy = list(self._busy)
                self._busy.clear()
                for room in busy:
                    try:
                        self._sweep(room)
                    except Exception:
                        # A bug must cost one pass of one room, never fan-out itself.
                        log.exception("fanout_failed", room=room.name)

    def _sweep(self, room: Room) -> None:
        """One pass over a room: every member gets what it is owed, in one push each."""
        target = room.end
        cache: dict[int, tuple[int, bytes, set[Member | None], int]] = {}
        for index, member in enumerate(room.snapshot(), 1):
            if member.rseq < room.end and member.room is room:
                self._catch_up(member, room, cache)
            if not index % YIELD_EVERY:
                gevent.idle()
        self._trim(room, target)
        if room.lines and room not in self._busy:
            self._busy[room] = None

    def _catch_up(
        self,
        member: Member,
        room: Room,
        cache: dict[int, tuple[int, bytes, set[Member | None], int]] | None = None,
    ) -> None:
        start, end = member.rseq, room.end
        if start >= end:
            return
        offset = start - room.base
        entry = cache.get(start) if cache is not None else None
        if entry is None or entry[0] != end:
            lines = room.lines[offset:]
            entry = (end, b"".join(lines), set(room.senders[offset:]), len(lines))
            if cache is not None:
                cache[start] = entry
        _, data, senders, count = entry
        member.rseq = end
        if member in senders:
            others = [line for line, sender in zip(room.lines[offset:], room.senders[offset:], strict=True)
                      if sender is not member]
            if not others:
                return
            count = len(others)
            data = b"".join(others)
        self.counters.deliveries += count
        member.outbox.push(data)

    def _trim(self, room: Room, upto: int) -> None:
        """Drop lines every member has been handed; they have reached every queue."""
        cut = upto - room.base
        if cut <= 0:
            return
        if self._observe_latency is not None:
            now = time.perf_counter()
            self._observe_latency([now - t for t in room.times[:cut]])
        room.waiting -= sum(len(line) for line in room.lines[:cut])
        del room.lines[:cut], room.senders[:cut], room.times[:cut]
        room.base = upto

    # -- queries ----------------------------------------------------------

    def queued_bytes(self) -> list[int]:
        return [member.outbox.size for member in self.members.values()]

    def room_counts(self) -> list[tuple[str, int]]:
        return sorted((name, len(room.members)) for name, room in self.rooms.items())

    def who(self, room: str) -> list[str]:
        found = self.rooms.get(room)
        return sorted(member.nick for member in found.members) if found is not None else []

    def room_size(self, room: str) -> int:
        found = self.rooms.get(room)
        return len(found.members) if found is not None else 0
