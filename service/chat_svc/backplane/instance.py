"""This instance as the backplane's parts see it: its id, its hub, its presence TTL, its rooms' bounds, its log."""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass
from typing import Any

from ..hub import Hub
from . import keys


def default_instance_id() -> str:
    """Host name and pid, plus a random suffix: PID 1 in a restarted container repeats."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


@dataclass(frozen=True)
class RoomBounds:
    """What each room's log in Redis may hold, and how long a quiet room's keys live."""

    lines: int = 1000
    bytes: int = 262144
    keep: float = 300.0

    @property
    def ttl(self) -> int:
        """Seconds of the room keys' TTL, refreshed by every line and while the room has members."""
        return max(1, round(self.keep))


@dataclass(frozen=True)
class Instance:
    id: str
    hub: Hub
    # Seconds this instance's presence (nicks, /who entries, room counts) lives without refresh.
    ttl: int
    log: Any
    rooms: RoomBounds = RoomBounds()

    def __post_init__(self) -> None:
        keys.check_instance_id(self.id)
