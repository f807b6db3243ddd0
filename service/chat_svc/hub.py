"""Rooms, members, fan-out, room logs and resume; knows nothing about sockets.

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

Ids: every line of a room's log also goes into its ``RoomLog`` (roomlog.py)
with an id.  While a room has members with ids on, each line is also kept
id-prefixed, built once per line; those members share one joined buffer per
position, the others another, so members without ids pay nothing for them.
A resume is atomic in one greenlet step: the replay is read from the room
log, which already holds every line still waiting in the sweep log, and the
member is placed at the sweep log's end in the same step, so nothing is
skipped or repeated at the seam.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Protocol

import gevent
import gevent.event
import structlog

from . import protocol
from .metrics import Counters
from .notices import NoticeLimiter
from .outbox import Outbox
from .roomlog import Entry, Gap, RoomLog, RoomLogs, line_id

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
# How often dormant room logs are looked at for expiry.
EXPIRE_EVERY = 1.0

# A member's position while a resume is being answered: past every line, so
# the sweep hands it nothing until the replay is placed.
HOLD = 1 << 62

# Called with a line's id ("<epoch>:<offset>") once it is known.
OnId = Callable[[str], None]
# How often held-back membership notices are summed up (NoticeLimiter's second).
NOTICE_PERIOD = 1.0


class Owner(Protocol):
    """Whoever serves a member's connection (its session): the hub can end it, not touch its socket."""

    def kill(self, reason: str) -> None:
        """End the connection for ``reason`` (a disconnect reason label); never blocks."""


class Member:
    """A chat participant as the hub sees it: a nick, a room, a position, an outbox, ids on or off.

    ``owner`` lets the hub end the connection (kick, ban, token expiry);
    ``identity`` is set once the member proved who it is with a JWT.
    """

    __slots__ = ("identity", "ids", "new_rooms", "nick", "outbox", "owner", "room", "rseq")

    def __init__(self, nick: str, outbox: Outbox, owner: Owner | None = None) -> None:
        self.nick = nick
        self.outbox = outbox
        self.owner = owner
        self.identity: Identity | None = None
        self.room: Room | None = None
        self.rseq = 0
        self.ids = False
        self.new_rooms: object = None  # the room-creation bucket, made on first use (commands)


class Room:
    """Members of one room, its sweep log (lines not yet handed to all) and its RoomLog."""

    __slots__ = ("_snapshot", "base", "id_members", "ided", "lines", "log", "members", "name", "senders", "times",
                 "waiting")  # fmt: skip

    def __init__(self, name: str, room_log: RoomLog) -> None:
        self.name = name
        self.log = room_log
        self.members: dict[Member, None] = {}
        self.lines: list[bytes] = []
        # the same lines with their id prefix, while members with ids are here (else None)
        self.ided: list[bytes | None] = []
        self.senders: list[Member | None] = []
        self.times: list[float] = []
        self.base = 0
        self.waiting = 0
        self.id_members = 0
        self._snapshot: tuple[Member, ...] | None = None

    @property
    def end(self) -> int:
        """Sequence number the next line will get."""
        return self.base + len(self.lines)

    def add(self, member: Member) -> None:
        self.members[member] = None
        self._snapshot = None
        if member.ids:
            self.id_members += 1

    def remove(self, member: Member) -> None:
        if member in self.members:
            del self.members[member]
            self._snapshot = None
            if member.ids:
                self.id_members -= 1

    def snapshot(self) -> tuple[Member, ...]:
        """The member list to iterate while the sweep may yield and members may leave."""
        if self._snapshot is None:
            self._snapshot = tuple(self.members)
        return self._snapshot


class Backplane(Protocol):
    """Cross-instance relay; the hub works alone when there is none."""

    def publish(
        self, room: str, data: bytes, chat: bool, sender: Member | None, t_read: float, on_id: OnId | None
    ) -> bool:
        """Take a room line for every instance (ids come from Redis); False: deliver it locally now."""

    @property
    def congested(self) -> bool:
        """The relay queue is full: senders should wait."""

    def room_active(self, room: str, active: bool) -> None:
        """First local member in (``active``) or last one out of ``room``."""

    def joining(self, member: Member, room: str, want: tuple[bytes, int] | None) -> Gap | None:
        """Before ``member`` enters ``room`` (may block): bring the room's log up to date.

        ``want``: the id a resume asks to continue from.  Returns a Gap when
        the resume cannot be answered whatever the log holds.
        """

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
        logs: RoomLogs | None = None,
        notice_rate: int = 0,
    ) -> None:
        self.counters = counters
        self.history = history
        self.notice_threshold = notice_threshold
        self.logs = logs if logs is not None else RoomLogs()
        self.members: dict[str, Member] = {}
        # Identified members renamed away from their ``sub``: the sub stays theirs while they are here.
        self.reserved: dict[str, Member] = {}
        self.rooms: dict[str, Room] = {}
        self.backplane: Backplane | None = None
        # Set by the lame-duck drain: members leaving then cause no leave notices
        # (every member leaving every other's room is N² lines at the worst moment).
        self.draining = False
        self.generation = 0
        self.notices = NoticeLimiter(notice_rate)
        self._notice_ticker: gevent.Greenlet | None = None
        self._observe_latency = observe_latency
        self._busy: dict[Room, None] = {}
        self._wake = gevent.event.Event()
        gevent.spawn(self._sweep_forever)
        gevent.spawn(self._expire_forever)

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

    def resume(self, member: Member, room_name: str, epoch: bytes, offset: int) -> tuple[bool, int]:
        """/resume: enter (or stay in) ``room_name`` and replay what came after ``epoch:offset``.

        Returns (complete, lines replayed).  Incomplete: the member is told
        why, then gets the history block, as a joiner does.
        """
        room = member.room
        if room is not None and room.name != room_name:
            self._leave(member, room)
        elif room is not None:
            # Staying: what the room still owes the member is in the replay (or,
            # when incomplete, the history), so nothing more is handed to it now.
            member.rseq = HOLD
        self._turn_on_ids(member)
        return self._enter(member, room_name, (epoch, offset))

    def release(self, member: Member) -> None:
        """Hand ``member`` nothing more from its room, not even when it leaves; it may still speak there (the drain)."""
        room = member.room
        if room is not None:
            room.remove(member)
            member.rseq = HOLD

    def enable_ids(self, member: Member) -> None:
        """/ids: from the next line on, lines of the room log reach ``member`` with their id."""
        room = member.room
        if room is not None and not member.ids:
            self._catch_up(member, room)  # lines already owed go out as they were queued
        self._turn_on_ids(member)

    def _turn_on_ids(self, member: Member) -> None:
        """Count ``member`` among its room's id members; its position must be past every plain-only line."""
        if member.ids:
            return
        room = member.room
        if room is not None:
            room.remove(member)
        member.ids = True
        if room is not None:
            room.add(member)

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

    def knows_room(self, room_name: str) -> bool:
        """Whether this process holds anything of ``room_name`` (members or a retained log)."""
        return room_name in self.rooms or self.logs.get(room_name) is not None

    def _enter(self, member: Member, room_name: str, want: tuple[bytes, int] | None = None) -> tuple[bool, int]:
        room_log = self.logs.open(room_name)
        gap: Gap | None = None
        if self.backplane is not None:
            # May block (subscribe, read Redis): before anything here changes.
            gap = self.backplane.joining(member, room_name, want)
            if self.member(member.nick) is not member:  # disconnected meanwhile
                if room_name not in self.rooms:
                    self.logs.dormant(room_log)
                return False, 0
        # From here on nothing yields: the replay and the member's place in the sweep log agree.
        room = self.rooms.get(room_name)
        if room is None:
            room = self.rooms[room_name] = Room(room_name, room_log)
            if self.backplane is not None:
                self.backplane.room_active(room_name, True)
        outcome = (False, 0)
        if want is not None:
            answer = gap if gap is not None else self._since(room_log, *want)
            if isinstance(answer, Gap):
                member.outbox.push(protocol.resume_incomplete_line(room_name, answer.reason))
                self.counters.resumes_incomplete += 1
            else:
                replay = [line_id(entry) + entry[2] for entry in answer]
                replay.append(protocol.resumed_line(room_name, len(answer)))
                member.outbox.push(b"".join(replay))
                self.counters.resumes_complete += 1
                self.counters.resume_lines += len(answer)
                outcome = (True, len(answer))
        if want is None or not outcome[0]:
            recent = room_log.history(self.history)
            if recent:
                member.outbox.push(protocol.history_block(recent, member.ids))
        staying = member.room is room
        member.rseq = room.end
        if not staying:
            room.add(member)
            member.room = room
            self.generation += 1
            if len(room.members) <= self.notice_threshold:
                self._notice(room, protocol.joined_line(member.nick, room_name), member, "joined")
        return outcome

    def _since(self, room_log: RoomLog, epoch: bytes, offset: int) -> list[Entry] | Gap:
        if not (room_log.local or room_log.synced) and epoch == room_log.epoch:
            return Gap("backplane down")
        return room_log.since(epoch, offset)

    def _leave(self, member: Member, room: Room) -> None:
        # Out of the room first: handing over what it is owed may fail the
        # member's socket, and that failure comes back here through detach().
        room.remove(member)
        member.room = None
        self.generation += 1
        self._catch_up(member, room)
        if len(room.members) < self.notice_threshold and not self.draining:
            self._notice(room, protocol.left_line(member.nick, room.name), member, "left")
        if not room.members and self.rooms.get(room.name) is room:
            del self.rooms[room.name]
            if not room.log.local:
                room.log.synced = False  # the subscription ends: the mirror stops following
            self.logs.dormant(room.log)
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

    def _expire_forever(self) -> None:
        while True:
            gevent.sleep(EXPIRE_EVERY)
            self.logs.expire()

    # -- fan-out ----------------------------------------------------------

    def say(self, member: Member, data: bytes, t_read: float, on_id: OnId | None = None) -> None:
        """A chat line or /me action from ``member`` to the rest of its room."""
        room = member.room
        if room is None:
            return
        backplane = self.backplane
        while (room.waiting > ROOM_BACKLOG_LIMIT or (backplane is not None and backplane.congested)) and (
            member.room is room
        ):
            gevent.sleep(0.005)
        self.broadcast(room, data, member, t_read, chat=True, on_id=on_id)

    def broadcast(
        self,
        room: Room,
        data: bytes,
        sender: Member | None,
        t_read: float | None = None,
        chat: bool = False,
        on_id: OnId | None = None,
    ) -> None:
        """Queue ``data`` for everyone in ``room`` but ``sender``, on every instance.

        ``chat`` marks a chat line (replayed to joiners as history) as opposed
        to a notice (joins, leaves, renames).  Both are lines of the room's log
        and get an id; ``on_id`` hears it once it is known (with Redis, once
        Redis has assigned it).
        """
        t_read = time.perf_counter() if t_read is None else t_read
        backplane = self.backplane
        if backplane is not None and backplane.publish(room.name, data, chat, sender, t_read, on_id):
            return  # Redis assigns the id; the line comes back to every instance, this one included
        self.deliver_local(room, data, sender, t_read, chat, on_id)

    def deliver_local(
        self,
        room: Room,
        data: bytes,
        sender: Member | None,
        t_read: float | None = None,
        chat: bool = False,
        on_id: OnId | None = None,
    ) -> None:
        """A line whose id this process assigns (single instance, or Redis away), into the room."""
        entry = room.log.append(data, chat)
        self.deliver(room, entry, sender, t_read)
        if on_id is not None:
            on_id(f"{entry[0].decode()}:{entry[1]}")

    def deliver_remote(
        self, room: Room, epoch: bytes, offset: int, data: bytes, chat: bool, sender: Member | None, t_read: float
    ) -> None:
        """A line with the id Redis gave it (from the subscription), into the room, unless it is there already."""
        entry = room.log.add(epoch, offset, data, chat)
        if entry is not None:
            self.deliver(room, entry, sender, t_read)

    def remember_remote(self, room_name: str, epoch: bytes, offset: int, data: bytes, chat: bool) -> None:
        """A line from the subscription for a room with no member here yet (one is joining): into its log only.

        The joiner reads the Redis log meanwhile; a line published after that read and heard
        before the joiner is in must still be in the log its replay and the next resumes use.
        """
        room_log = self.logs.get(room_name)
        if room_log is not None and not room_log.local:
            room_log.add(epoch, offset, data, chat)

    def deliver(self, room: Room, entry: Entry, sender: Member | None, t_read: float | None) -> None:
        """Append a line of the room log to the sweep log for this process's members."""
        data = entry[2]
        room.lines.append(data)
        room.ided.append(line_id(entry) + data if room.id_members else None)
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

    def post(self, room_name: str, data: bytes, on_id: OnId | None = None) -> bool:
        """A line from outside the room (the operator API) to its members here; False when no such room.

        ``on_id`` hears the line's id once it is known (at once on a single
        instance; with Redis, once Redis has given it).
        """
        room = self.rooms.get(room_name)
        if room is None:
            return False
        self.broadcast(room, data, None, chat=True, on_id=on_id)
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
        plain: dict[int, tuple[int, bytes, set[Member | None], int]] = {}
        ided: dict[int, tuple[int, bytes, set[Member | None], int]] = {}
        for index, member in enumerate(room.snapshot(), 1):
            if member.rseq < room.end and member.room is room:
                self._catch_up(member, room, ided if member.ids else plain)
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
        source: list[bytes] | list[bytes | None] = room.ided if member.ids else room.lines
        entry = cache.get(start) if cache is not None else None
        if entry is None or entry[0] != end:
            lines = source[offset:]
            entry = (end, b"".join(lines), set(room.senders[offset:]), len(lines))  # type: ignore[arg-type]
            if cache is not None:
                cache[start] = entry
        _, data, senders, count = entry
        member.rseq = end
        if member in senders:
            others = [
                line
                for line, sender in zip(source[offset:], room.senders[offset:], strict=True)
                if sender is not member
            ]
            if not others:
                return
            count = len(others)
            data = b"".join(others)  # type: ignore[arg-type]
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
        del room.lines[:cut], room.ided[:cut], room.senders[:cut], room.times[:cut]
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
