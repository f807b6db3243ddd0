"""This instance as the backplane's parts see it: its id, its hub, its presence TTL, its log."""

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
class Instance:
    id: str
    hub: Hub
    # Seconds this instance's presence (nicks, /who entries, room counts) lives without refresh.
    ttl: int
    log: Any

    def __post_init__(self) -> None:
        keys.check_instance_id(self.id)
