"""A WebSocket chat client for tests: wsproto's client side over a real socket.

``WsClient`` reads and writes lines like ``conftest.LineClient`` (so the same
``expect``/``join`` helpers work), and also lets a test send raw frames,
pings and closes, and see the close code the server sent.
"""

from __future__ import annotations

import socket
import ssl
import time

from _chat import LineClient
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)


class Refused(Exception):
    """The server answered the upgrade with an HTTP status instead of 101."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"upgrade refused: {status} {body!r}")
        self.status = status
        self.body = body


class WsClient(LineClient):
    """One WebSocket connection to ``/ws``; messages are split into lines as they arrive."""

    def __init__(
        self,
        host: str,
        port: int,
        timeout: float = 5.0,
        origin: str | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        raw = socket.create_connection((host, port), timeout=timeout)
        self.sock = tls.wrap_socket(raw, server_hostname=host) if tls is not None else raw
        self.timeout = timeout
        self._buffer = b""
        self.messages: list[str] = []
        self._message = ""
        self.pongs: list[bytes] = []
        self.pings: list[bytes] = []
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self.ws = WSConnection(ConnectionType.CLIENT)
        headers = [(b"origin", origin.encode())] if origin else []
        request = Request(host=f"{host}:{port}", target="/ws", extra_headers=headers)
        self.sock.sendall(self.ws.send(request))
        status, body = 0, b""
        deadline = time.monotonic() + timeout
        accepted = False
        while not accepted:
            self.ws.receive_data(self._recv(deadline))
            # Frames that came with the 101 are events right behind the acceptance.
            for event in self.ws.events():
                if isinstance(event, AcceptConnection):
                    accepted = True
                elif isinstance(event, RejectConnection):
                    status = event.status_code
                    if not event.has_body:
                        raise Refused(status, b"")
                elif isinstance(event, RejectData):
                    body += event.data
                    if event.body_finished:
                        raise Refused(status, body)
                else:
                    self._handle(event)

    def _recv(self, deadline: float) -> bytes | None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("nothing from the server in time")
        self.sock.settimeout(remaining)
        data = self.sock.recv(65536)
        return data or None

    def _handle(self, event: object) -> None:
        if isinstance(event, TextMessage):
            # wsproto hands over a frame's payload as it arrives; a message is whole at message_finished.
            assert event.message_finished or not event.frame_finished, "server messages come in one frame"
            self._message += event.data
            if event.message_finished:
                self.messages.append(self._message)
                self._buffer += self._message.encode()
                self._message = ""
        elif isinstance(event, BytesMessage):
            raise AssertionError("server sent a binary message")
        elif isinstance(event, Ping):
            self.pings.append(event.payload)
            self.sock.sendall(self.ws.send(event.response()))
        elif isinstance(event, Pong):
            self.pongs.append(event.payload)
        elif isinstance(event, CloseConnection):
            self.close_code, self.close_reason = event.code, event.reason

    def pump(self, timeout: float) -> bool:
        """Read what arrives within ``timeout``; False once the connection is closed."""
        if self.ws.state is ConnectionState.CLOSED or self.close_code is not None:
            return False
        try:
            data = self._recv(time.monotonic() + timeout)
        except TimeoutError:
            return True
        except OSError:
            data = None
        self.ws.receive_data(data)
        for event in self.ws.events():
            self._handle(event)
        return data is not None and self.close_code is None

    def _fill(self, timeout: float) -> None:
        if not self.pump(timeout) and b"\n" not in self._buffer:
            raise EOFError(f"connection closed ({self.close_code} {self.close_reason}); partial {self._buffer!r}")

    def send(self, text: str | bytes) -> None:
        """One text message holding ``text`` (a newline is added when missing)."""
        data = text.decode() if isinstance(text, bytes) else text
        if not data.endswith("\n"):
            data += "\n"
        self.sock.sendall(self.ws.send(TextMessage(data=data)))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def ping(self, payload: bytes = b"hi") -> None:
        self.sock.sendall(self.ws.send(Ping(payload=payload)))

    def close_with(self, code: int = 1000, reason: str = "") -> None:
        self.sock.sendall(self.ws.send(CloseConnection(code=code, reason=reason)))

    def wait_closed(self, timeout: float = 5.0) -> tuple[int | None, str | None]:
        """Read until the server's close frame (or the socket's end); its code and reason."""
        deadline = time.monotonic() + timeout
        while self.close_code is None and time.monotonic() < deadline:
            if not self.pump(deadline - time.monotonic()):
                break
        return self.close_code, self.close_reason


def mask_frame(opcode: int, payload: bytes, fin: bool = True, key: bytes = b"\x01\x02\x03\x04") -> bytes:
    """One client frame written out by hand, for frames wsproto's client will not produce (huge, split)."""
    head = bytes([(0x80 if fin else 0) | opcode])
    length = len(payload)
    if length < 126:
        head += bytes([0x80 | length])
    elif length < 1 << 16:
        head += bytes([0x80 | 126]) + length.to_bytes(2, "big")
    else:
        head += bytes([0x80 | 127]) + length.to_bytes(8, "big")
    masked = bytes(byte ^ key[index % 4] for index, byte in enumerate(payload))
    return head + key + masked
