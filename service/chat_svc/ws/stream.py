"""A WebSocket connection as a chat session sees it: line bytes in, framed lines out.

Input: wsproto's ``Connection`` parses the client's frames (masking,
fragmentation, UTF-8, control frames); the text of data messages goes to the
session's line framer.  A message holds whole lines: its last line may omit
the ``\\n``.  Output: every buffer the member's outbox is handed (whole lines,
coalesced by the hub) becomes one text message.  Server frames are unmasked,
so one frame serves every member handed the same buffer: the fan-out sweep
shares one buffer among the members at the same position, and ``FrameCache``
frames it once for all of them.
"""

from __future__ import annotations

from collections.abc import Callable

from wsproto.connection import Connection, ConnectionState
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage
from wsproto.frame_protocol import CloseReason, FrameProtocol

from ..budget import OutboundBudget
from ..outbox import DROP_NOTICES, Outbox, Sink

# Server-to-client frames carry no mask and no per-connection state (every
# message is one final frame), so one serializer frames for every member.
_SERVER_FRAMES = FrameProtocol(client=False, extensions=[])

# Why a session ended -> the close frame that tells the client.
CLOSE_FRAMES: dict[str, tuple[int, str]] = {
    "quit": (CloseReason.NORMAL_CLOSURE, "bye"),
    "shutdown": (CloseReason.GOING_AWAY, "server shutting down"),
    "flood": (CloseReason.POLICY_VIOLATION, "excess flood"),
    "line_too_long": (CloseReason.POLICY_VIOLATION, "line too long"),
    "slow_consumer": (CloseReason.POLICY_VIOLATION, "send queue exceeded"),
    "outbound_budget": (CloseReason.TRY_AGAIN_LATER, "server memory budget reached"),
    "idle_timeout": (CloseReason.POLICY_VIOLATION, "idle timeout"),
    "auth_failed": (CloseReason.POLICY_VIOLATION, "authentication failed"),
    "ping_timeout": (CloseReason.POLICY_VIOLATION, "ping timeout"),
    "kicked": (CloseReason.POLICY_VIOLATION, "kicked"),
    "banned": (CloseReason.POLICY_VIOLATION, "banned"),
    "token_expired": (CloseReason.POLICY_VIOLATION, "token expired"),
    "frame_too_big": (CloseReason.MESSAGE_TOO_BIG, "frame too big"),
    "server_full": (CloseReason.TRY_AGAIN_LATER, "server full"),
    "error": (CloseReason.INTERNAL_ERROR, "internal error"),
}


def close_frame(code: int, reason: str) -> bytes:
    return bytes(_SERVER_FRAMES.close(code, reason))


class FrameCache:
    """Text frames of the last few buffers, by identity.

    During a sweep pass most members are handed the very same buffer, with
    the odd sender's own (different) buffer in between; remembering the last
    ``size`` buffers frames the shared one once per pass.  Entries hold their
    buffer, so an id in the cache cannot belong to another object.
    """

    __slots__ = ("_entries", "size")

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._entries: dict[int, tuple[bytes, bytes]] = {}

    def frame(self, data: bytes) -> bytes:
        entries = self._entries
        key = id(data)
        entry = entries.pop(key, None)
        if entry is None:
            entry = (data, bytes(_SERVER_FRAMES.send_data(data.decode("utf-8", "replace"))))
            if len(entries) >= self.size:
                del entries[next(iter(entries))]
        entries[key] = entry
        return entry[1]


FRAMES = FrameCache()


class WsOutbox(Outbox):
    """An outbox whose every push is one text message (control frames go in as they are)."""

    __slots__ = ()

    def push(self, data: bytes) -> None:
        Outbox.push(self, FRAMES.frame(data))

    def push_frame(self, frame: bytes) -> None:
        Outbox.push(self, frame)

    def overflow_notice(self, reason: str, torn: bool) -> bytes:
        # Nothing may follow a partly written frame.
        if torn:
            return b""
        return FRAMES.frame(DROP_NOTICES[reason]) + close_frame(*CLOSE_FRAMES[reason])


class WsStream:
    """One client's WebSocket: parses its frames, answers pings, ends with a close frame.

    Slotted and small: an idle member's whole cost is its session, its
    outbox and this (wsproto's connection object included).
    """

    __slots__ = ("_conn", "_live", "_open_line", "_reply", "ended", "heard", "kill", "outbox", "pinged")
    name = "ws"

    def __init__(self, conn: Connection, live: set[WsStream]) -> None:
        self._conn = conn
        # The server's open WebSocket streams (the keepalive walks them).
        self._live = live
        self._open_line = False
        # The close frame owed for a close the client started or a frame wsproto refused.
        self._reply: tuple[int, str] | None = None
        self.ended: str | None = None
        self.heard = True
        self.pinged = False
        self.outbox: WsOutbox | None = None
        # Set while the stream is open: from ``open`` to ``farewell``.
        self.kill: Callable[[str], None] | None = None

    def open(
        self,
        sink: Sink,
        limit: int,
        on_overflow: Callable[[str], None],
        on_error: Callable[[], None],
        kill: Callable[[str], None],
        budget: OutboundBudget | None = None,
    ) -> Outbox:
        self.outbox = WsOutbox(sink, limit, on_overflow, on_error, budget)
        self.kill = kill
        self._live.add(self)
        return self.outbox

    def decode(self, data: bytes) -> bytes:
        if self.ended is not None:
            return b""
        self.heard = True
        conn = self._conn
        conn.receive_data(data)
        lines: list[bytes] = []
        for event in conn.events():
            if isinstance(event, (TextMessage, BytesMessage)):
                chunk = event.data.encode() if isinstance(event.data, str) else bytes(event.data)
                if chunk:
                    lines.append(chunk)
                    self._open_line = not chunk.endswith(b"\n")
                if event.message_finished and self._open_line:
                    lines.append(b"\n")
                    self._open_line = False
            elif isinstance(event, Ping):
                self._push(bytes(_SERVER_FRAMES.pong(event.payload)))
            elif isinstance(event, CloseConnection):
                self._closed_by(event)
                break
        return b"".join(lines)

    def _closed_by(self, event: CloseConnection) -> None:
        if self._conn.state is ConnectionState.REMOTE_CLOSING:
            # The client said goodbye; the reply echoes its code.
            self.ended = "eof"
            code = CloseReason.NORMAL_CLOSURE if event.code == CloseReason.NO_STATUS_RCVD else event.code
            self._reply = (code, "")
        elif event.code == CloseReason.MESSAGE_TOO_BIG:
            self.ended = "frame_too_big"
        else:
            # wsproto refused a frame (bad framing, invalid UTF-8, ...) and says why.
            self.ended = "protocol_error"
            self._reply = (event.code, event.reason or "protocol error")

    def ping(self) -> None:
        """The keepalive's turn: ping a client silent since last time, drop one silent since the ping."""
        if self.heard:
            self.heard = self.pinged = False
        elif not self.pinged:
            self.pinged = True
            self._push(bytes(_SERVER_FRAMES.ping(b"")))
        elif self.kill is not None:
            self.kill("ping_timeout")

    def farewell(self, reason: str) -> None:
        if self.kill is None:
            return
        self.kill = None
        self._live.discard(self)
        if reason in ("eof", "protocol_error"):
            # A close the client started is answered; a vanished client is owed nothing.
            if self._reply is not None:
                self._push(close_frame(*self._reply))
        else:
            self._push(close_frame(*CLOSE_FRAMES.get(reason, CLOSE_FRAMES["error"])))

    def _push(self, frame: bytes) -> None:
        if self.outbox is not None:
            self.outbox.push_frame(frame)
