"""The WebSocket opening handshake on the chat port: who may upgrade, and the answer.

wsproto's ``H11Handshake`` parses the request (with h11) and writes the
101 or the refusal; nothing here parses HTTP by hand.  A refused request
gets a plain-text reason: 400/426 when it is not a WebSocket upgrade (wsproto
picks which), 403 when its page's Origin is not allowed.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from wsproto import ConnectionType
from wsproto.connection import Connection
from wsproto.events import AcceptConnection, RejectConnection, RejectData, Request
from wsproto.extensions import Extension
from wsproto.frame_protocol import CloseReason, FrameDecoder, FrameProtocol, Opcode, RsvBits
from wsproto.handshake import H11Handshake
from wsproto.utilities import RemoteProtocolError

PATH = b"/ws"
SAME_HOST = "same-host"
ANY = "*"


def wanted(head: bytes) -> bool:
    """Whether a sniffed HTTP request line asks for the WebSocket path (``GET /ws``, any query)."""
    parts = head.split(b"\n", 1)[0].split(b" ")
    return len(parts) == 3 and parts[1].split(b"?", 1)[0] == PATH


class Origins:
    """The ``--ws-origins`` allow-list.

    Browsers send the page's Origin with every WebSocket request and let any
    page connect anywhere, so a server that does not check it can be used by
    any site its users visit.  A request without an Origin does not come
    from a browser page and is accepted.
    """

    def __init__(self, spec: str) -> None:
        items = set(spec.split(","))
        self.any = ANY in items
        self.same_host = SAME_HOST in items
        self.listed = items - {ANY, SAME_HOST}

    def allow(self, origin: str | None, host: str) -> bool:
        if origin is None or self.any:
            return True
        origin = origin.strip().lower().rstrip("/")
        if origin in self.listed:
            return True
        # The page's host is the one it connects to, on any port: the page may
        # come from --metrics-port, or through a port mapping.
        page_host = _hostname(origin)
        return self.same_host and page_host is not None and page_host == _hostname("//" + host)


def _hostname(url: str) -> str | None:
    try:
        return urlsplit(url).hostname
    except ValueError:
        return None


class FrameLimit(Extension):
    """Refuses a frame whose header announces more than ``limit`` bytes, before any of it is read.

    wsproto asks every enabled extension about each frame header it parses;
    this one is never offered or negotiated, it only uses that hook.  The
    refusal surfaces as wsproto's own close event with code 1009.
    """

    name = "x-chat-svc-frame-limit"

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def enabled(self) -> bool:
        return True

    def offer(self) -> bool:
        return False

    def frame_inbound_header(
        self, proto: FrameDecoder | FrameProtocol, opcode: Opcode, rsv: RsvBits, payload_length: int
    ) -> CloseReason | RsvBits:
        if payload_length > self.limit:
            return CloseReason.MESSAGE_TOO_BIG
        return RsvBits(False, False, False)


ACCEPTED, BAD_REQUEST, FORBIDDEN, GONE = "accepted", "bad_request", "origin", "gone"


def handshake(sock: Any, head: bytes, origins: Origins, limit: FrameLimit) -> tuple[str, Connection | None]:
    """Read the upgrade request (``head`` already read) and answer it; the outcome and the connection.

    The caller bounds the time (socket timeout and an overall timeout); h11
    bounds the size of the request headers.
    """
    shake = H11Handshake(ConnectionType.SERVER)
    data = head
    request: Request | None = None
    while request is None:
        try:
            shake.receive_data(data)
            for event in shake.events():
                if isinstance(event, Request):
                    request = event
        except RemoteProtocolError as exc:
            hint = exc.event_hint if isinstance(exc.event_hint, RejectConnection) else RejectConnection()
            _refuse(sock, shake, hint.status_code, list(hint.headers), f"{exc}: this is a WebSocket endpoint")
            return BAD_REQUEST, None
        if request is None:
            data = sock.recv(4096)
            if not data:
                return GONE, None
    origin = next((value.decode("latin-1") for name, value in request.extra_headers if name == b"origin"), None)
    if not origins.allow(origin, request.host):
        _refuse(sock, shake, 403, [], "origin not allowed")
        return FORBIDDEN, None
    sock.sendall(shake.send(AcceptConnection(extensions=[limit])))
    return ACCEPTED, shake.connection


def _refuse(sock: Any, shake: H11Handshake, status: int, headers: list[tuple[bytes, bytes]], text: str) -> None:
    body = (text + "\n").encode()
    headers += [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]
    headers.append((b"connection", b"close"))
    sock.sendall(
        shake.send(RejectConnection(status_code=status, headers=headers, has_body=True))
        + shake.send(RejectData(data=body))
    )
