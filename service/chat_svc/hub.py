"""Rooms, members, fan-out and history; knows nothing about sockets.

Fan-out is batched per room and per event-loop iteration: ``broadcast`` only
appends the encoded line to the room's pending list and asks the scheduler
for one flush.  By the time the flush runs, every reader that had input in
this iteration has added its lines, so each recipient gets all of them in a
single ``Outbox.push`` (one ``send`` call) and the bytes are joined once and
shared by every recipient.  Under load batches grow by themselves, which is
what keeps the number of ``send`` calls, and so the kernel's per-call cost,
far below one per delivery.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from . import protocol
from .outbox import Outbox


class Member:
    """A chat participant as the hub sees it: a nick, a room and an outbox."""

    __slots__ = ("__weakref__", "conn_id", "ip", "nick", "outbox", "room")

    def __init__(self, nick: str, ip: str, outbox: Outbox, conn_id: int = 0) -> None:
        self.nick = nick
        self.ip = ip
        self.outbox = outbox
        self.conn_id = conn_id
        self.room: Room | None = None


class Room:
    """Members of one room, their pending fan-out batch and the recent history."""

    __slots__ = ("_snapshot", "history", "members", "name", "pending")

    def __init__(self, name: str, history: int) -> None:
        self.name = name
        self.members: dict[Member, None] = {}
        self.pending: list[tuple[bytes, Member | None, float]] = []
        self.history: deque[bytes] = deque(maxlen=history)
        self._snapshot: tuple[Member, ...] | None = None

    def add(self, member: Member) -> None:
        self.members[member] = None
        self._snapshot = None

    def remove(self, member: Member) -> None:
        self.members.pop(member, None)
        self._snapshot = None

    def snapshot(self) -> tuple[Member, ...]:
        """The member list to iterate while fan-out may remove members."""
        if self._snapshot is None:
            self._snapshot = tuple(self.members)
        return self._snapshot


class Backplane(Protocol):
    """Cross-instance relay; the hub works alone when there is none."""

    def publish(self, room: str, data: bytes) -> None: ...

    def room_active(self, room: str, active: bool) -> None: ...


@dataclass
class Stats:
    """Hot-path counters kept as plain ints; exported at scrape time.

    Incrementing an int attribute costs a few nanoseconds, where a
    prometheus_client Counter takes a lock; these counts move millions of
    times per second.
    """

    deliveries: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    chat_messages: int = 0
    commands: int = 0
    private_messages: int = 0
    flood_delayed: int = 0


class Hub:
    """All rooms of this process and the nick registry.

    ``schedule`` runs a callable soon, after the current batch of input has
    been read (gevent's ``loop.run_callback`` in the server, a list in tests).
    """

    def __init__(
        self,
        schedule: Callable[[Callable[[], None]], object],
        stats: Stats,
        history: int = 20,
        notice_threshold: int = 200,
        observe_latency: Callable[[Iterable[float]], None] | None = None,
    ) -> None:
        self._schedule = schedule
        self.stats = stats
        self.history = history
        self.notice_threshold = notice_threshold
        self.members: dict[str, Member] = {}
        self.rooms: dict[str, Room] = {}
        self._dirty: list[Room] = []
        self._flush_scheduled = False
        self._observe_latency = observe_latency
        self.backplane: Backplane | None = None

    # -- membership -------------------------------------------------------

    def attach(self, member: Member, room_name: str) -> None:
        """Register a new member under its nick and put it in ``room_name``."""
        self.members[member.nick] = member
        self.send_to(member, protocol.welcome_line(member.nick, room_name))
        self._enter(member, room_name)

    def detach(self, member: Member) -> None:
        """Forget a member that disconnected; idempotent."""
        if self.members.get(member.nick) is member:
            del self.members[member.nick]
        room = member.room
        if room is not None:
            self._leave(member, room)
            member.room = None

    def move(self, member: Member, room_name: str) -> None:
        """/join: leave the current room (unless it is the same) and enter another."""
        room = member.room
        if room is not None:
            if room.name == room_name:
                self.send_to(member, protocol.info_line(f"you are already in {room_name}"))
                return
            self._leave(member, room)
        self._enter(member, room_name)

    def rename(self, member: Member, new: str) -> str | None:
        """/nick: returns an error text, or None when the nick changed."""
        if new == member.nick:
            return None
        if new in self.members:
            return f"nick {new} is taken"
        old = member.nick
        del self.members[old]
        member.nick = new
        self.members[new] = member
        room = member.room
        if room is not None:
            line = protocol.renamed_line(old, new)
            if len(room.members) <= self.notice_threshold:
                self.broadcast(room, line, member)
            self.send_to(member, line)
        return None

    def _enter(self, member: Member, room_name: str) -> None:
        room = self.rooms.get(room_name)
        if room is None:
            room = self.rooms[room_name] = Room(room_name, self.history)
            if self.backplane is not None:
                self.backplane.room_active(room_name, True)
        elif room.pending:
            self.flush_room(room)
        if room.history:
            self.send_to(member, protocol.history_block(list(room.history)))
        room.add(member)
        member.room = room
        if len(room.members) <= self.notice_threshold:
            self.broadcast(room, protocol.joined_line(member.nick, room_name), member)

    def _leave(self, member: Member, room: Room) -> None:
        if room.pending:
            self.flush_room(room)
        room.remove(member)
        if len(room.members) < self.notice_threshold:
            self.broadcast(room, protocol.left_line(member.nick, room.name), member)
        if not room.members:
            if room.pending:
                self.flush_room(room)
            del self.rooms[room.name]
            if self.backplane is not None:
                self.backplane.room_active(room.name, False)

    # -- fan-out ----------------------------------------------------------

    def say(self, member: Member, data: bytes, t_read: float) -> None:
        """A chat line or /me action from ``member`` to the rest of its room."""
        room = member.room
        if room is None:
            return
        room.history.append(data)
        self.broadcast(room, data, member, t_read)

    def broadcast(
        self, room: Room, data: bytes, sender: Member | None, t_read: float | None = None
    ) -> None:
        """Queue ``data`` for everyone in ``room`` but ``sender``; sent at the next flush."""
        if self.backplane is not None:
            self.backplane.publish(room.name, data)
        self.deliver_local(room, data, sender, t_read)

    def deliver_local(
        self, room: Room, data: bytes, sender: Member | None, t_read: float | None = None
    ) -> None:
        """Add ``data`` to this process's fan-out batch for ``room`` (no relay)."""
        if not room.pending:
            self._dirty.append(room)
            if not self._flush_scheduled:
                self._flush_scheduled = True
                self._schedule(self.flush)
        room.pending.append((data, sender, time.perf_counter() if t_read is None else t_read))

    def flush(self) -> None:
        """Hand every pending batch to its recipients' outboxes."""
        self._flush_scheduled = False
        dirty = self._dirty
        self._dirty = []
        for room in dirty:
            self.flush_room(room)

    def flush_room(self, room: Room) -> None:
        pending = room.pending
        if not pending:
            return
        room.pending = []
        members = room.snapshot()
        if len(pending) == 1:
            data, sender, _ = pending[0]
            for member in members:
                if member is not sender:
                    member.outbox.push(data)
            own = 1 if sender is not None and sender in room.members else 0
        else:
            batch = b"".join([entry[0] for entry in pending])
            senders = {entry[1] for entry in pending}
            own = 0
            for member in members:
                if member in senders:
                    others = [entry[0] for entry in pending if entry[1] is not member]
                    own += len(pending) - len(others)
                    if others:
                        member.outbox.push(b"".join(others))
                else:
                    member.outbox.push(batch)
        self.stats.deliveries += len(pending) * len(members) - own
        if self._observe_latency is not None:
            now = time.perf_counter()
            self._observe_latency([now - entry[2] for entry in pending])

    def send_to(self, member: Member, data: bytes) -> None:
        """Direct output to one member, kept in order with its room's output."""
        room = member.room
        if room is not None and room.pending:
            self.flush_room(room)
        member.outbox.push(data)

    # -- queries ----------------------------------------------------------

    def room_counts(self) -> list[tuple[str, int]]:
        return sorted((name, len(room.members)) for name, room in self.rooms.items())

    def who(self, room: Room) -> list[str]:
        return sorted(member.nick for member in room.members)

    def find(self, nick: str) -> Member | None:
        return self.members.get(nick)
