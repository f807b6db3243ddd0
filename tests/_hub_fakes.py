"""A sink that records writes, and hub members on it: the hub and commands without sockets."""

from __future__ import annotations

import gevent
from chat_svc.hub import Hub, Member
from chat_svc.outbox import Outbox


class RecordingSink:
    """Accepts ``capacity`` bytes per call (None = everything) and records each write."""

    parkable = True
    kernel_buffer = 0

    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = capacity
        self.writes: list[bytes] = []
        self.kicked = 0
        self.closed = False

    def send_nowait(self, data: bytes) -> int:
        taken = len(data) if self.capacity is None else min(self.capacity, len(data))
        if taken:
            self.writes.append(data if taken == len(data) else data[:taken])
        return taken

    def kick(self, outbox: Outbox) -> None:
        self.kicked += 1

    def close(self) -> None:
        self.closed = True

    def text(self) -> list[str]:
        return b"".join(self.writes).decode().splitlines()

    def take_text(self) -> list[str]:
        """The lines written since the last call."""
        lines = self.text()
        self.writes.clear()
        return lines


def make_member(
    hub: Hub,
    nick: str,
    sink: RecordingSink,
    limit: int = 1 << 20,
    dropped: list[str] | None = None,
    room: str = "lobby",
) -> Member:
    dropped = dropped if dropped is not None else []
    member = Member(nick, Outbox(sink, limit, lambda _reason: dropped.append(nick), lambda: dropped.append(nick)))
    hub.attach(member, room)
    return member


def settle() -> None:
    """Let the hub's sweeper run a pass."""
    gevent.sleep(0.01)
