"""A WebSocket to chat-svc's ``/ws`` as a swarm ``Stream``: the same lines, in frames.

wsproto (the server's own WebSocket library, a dependency of chat-svc) does the handshake
and the framing; gevent's socket does the I/O. ``sendall`` sends one text message per
call (the client hands it whole lines), ``recv`` returns the text of the server's
messages as bytes, so ``ChatClient`` reads lines exactly as it does over TCP.
"""

from __future__ import annotations

import contextlib
import socket as _stdsocket
from typing import Any

from gevent import socket
from gevent.lock import BoundedSemaphore
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)


class WebSocketStream:
    """One member's WebSocket; ``recv`` returns b"" once the server closed it."""

    def __init__(self, sock: Any, ws: WSConnection, pending: bytes) -> None:
        self.sock = sock
        self.ws = ws
        self._pending = pending
        self._closed = False
        # The reader answers pings while the user sends: one writer at a time.
        self._write = BoundedSemaphore()

    @classmethod
    def connect(cls, host: str, port: int, timeout: float) -> WebSocketStream:
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.setsockopt(_stdsocket.IPPROTO_TCP, _stdsocket.TCP_NODELAY, 1)
        ws = WSConnection(ConnectionType.CLIENT)
        try:
            sock.sendall(ws.send(Request(host=f"{host}:{port}", target="/ws")))
            pending = b""
            accepted = False
            while not accepted:
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("closed during the WebSocket handshake")
                ws.receive_data(data)
                for event in ws.events():
                    if isinstance(event, AcceptConnection):
                        accepted = True
                    elif isinstance(event, RejectConnection):
                        raise ConnectionError(f"WebSocket upgrade refused with HTTP {event.status_code}")
                    elif isinstance(event, TextMessage):  # the welcome may come with the 101
                        pending += event.data.encode()
        except BaseException:
            sock.close()
            raise
        sock.settimeout(None)
        return cls(sock, ws, pending)

    def sendall(self, data: bytes) -> None:
        if self.ws.state is not ConnectionState.OPEN:
            raise ConnectionError("the WebSocket is closed")
        self._send(self.ws.send(TextMessage(data=data.decode("utf-8", "replace"))))

    def recv(self, size: int) -> bytes:
        while not self._pending and not self._closed:
            data = self.sock.recv(size)
            if not data:
                self._closed = True
                break
            self.ws.receive_data(data)
            for event in self.ws.events():
                if isinstance(event, TextMessage):
                    self._pending += event.data.encode()
                elif isinstance(event, BytesMessage):
                    self._pending += bytes(event.data)
                elif isinstance(event, Ping):
                    self._send(self.ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    if self.ws.state is ConnectionState.REMOTE_CLOSING:
                        with contextlib.suppress(OSError):
                            self._send(self.ws.send(event.response()))
                    self._closed = True
        out, self._pending = self._pending, b""
        return out

    def close(self) -> None:
        if not self._closed and self.ws.state is ConnectionState.OPEN:
            with contextlib.suppress(OSError):
                self._send(self.ws.send(CloseConnection(code=1000)))
        self._closed = True
        self.sock.close()

    def _send(self, data: bytes) -> None:
        with self._write:
            self.sock.sendall(data)
