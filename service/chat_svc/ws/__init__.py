"""WebSocket chat on the chat port (``GET /ws``): the same line protocol, framed.

``upgrade`` answers the opening handshake; ``stream`` is what a session gets
in place of a plain byte stream (the ``Framing`` it decodes through and the
outbox that frames).  ``WebSockets`` holds what one server shares: the
upgrade policy, the open streams and the keepalive that pings them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gevent

from .stream import WsStream
from .upgrade import ACCEPTED, FrameLimit, Origins, handshake, wanted

__all__ = ["WebSockets", "WsStream", "wanted"]

# Streams pinged between two looks at the event loop.
_PING_BATCH = 500


class WebSockets:
    """The chat port's ``/ws`` endpoint: who may upgrade, the open streams, and their keepalive."""

    def __init__(
        self,
        origins: str,
        frame_limit: int,
        ping_interval: float,
        count_upgrade: Callable[[str], None] = lambda outcome: None,
    ) -> None:
        self.origins = Origins(origins)
        self.limit = FrameLimit(frame_limit)
        self.ping_interval = ping_interval
        self.count_upgrade = count_upgrade
        self.live: set[WsStream] = set()

    wanted = staticmethod(wanted)

    @property
    def open_streams(self) -> int:
        return len(self.live)

    def accept(self, sock: Any, head: bytes) -> WsStream | None:
        """Answer the upgrade request starting with ``head``; the stream, or None when refused."""
        outcome, conn = handshake(sock, head, self.origins, self.limit)
        self.count_upgrade(outcome)
        if outcome != ACCEPTED or conn is None:
            return None
        return WsStream(conn, self.live)

    def start(self) -> None:
        if self.ping_interval:
            gevent.spawn(self._keep_alive)

    def _keep_alive(self) -> None:
        """One timer for every stream, not one per member: each interval, every stream gets its turn."""
        while True:
            gevent.sleep(self.ping_interval)
            for index, stream in enumerate(list(self.live), 1):
                stream.ping()
                if not index % _PING_BATCH:
                    gevent.sleep(0)
