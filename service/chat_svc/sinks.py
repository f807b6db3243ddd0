"""Writers: the only code that writes to client sockets, one sink per connection.

An Outbox pushes into its sink and asks it to write the rest later
(``kick``).  ``TcpSink`` writes with the raw non-blocking socket and, when the
kernel is full, lets an io watcher call back on writability: no greenlet per
writer, no switch per delivery.  TLS cannot do partial non-blocking writes
cleanly, so ``TlsSink`` writes through a short-lived writer greenlet instead.
A sink that frames what it writes (a WebSocket one) can frame each buffer it
is handed as one message: buffers are whole lines, already coalesced, as long
as the sink takes each one whole and finishes a partly written frame itself.
"""

from __future__ import annotations

import socket
from typing import Any

import gevent

from .gevent_seams import raw_socket
from .metrics import Counters
from .outbox import Outbox

_WRITE = 2


class TcpSink:
    """Non-blocking writes to a plain TCP socket; the rest is written on writability callbacks."""

    __slots__ = ("_fd", "_raw", "_watcher", "counters", "kernel_buffer")
    parkable = True

    def __init__(self, sock: Any, counters: Counters) -> None:
        self._raw = raw_socket(sock)
        self._fd = sock.fileno()
        self._watcher: Any = None
        self.counters = counters
        # What the kernel holds once this socket's send buffer is full (Linux
        # reports twice the --sndbuf-bytes asked for: its bookkeeping is included).
        self.kernel_buffer: int = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)

    def send_nowait(self, data: bytes) -> int:
        try:
            sent: int = self._raw.send(data)
        except BlockingIOError:
            return 0
        self.counters.bytes_out += sent
        return sent

    def kick(self, outbox: Outbox) -> None:
        if self._watcher is None:
            self._watcher = gevent.get_hub().loop.io(self._fd, _WRITE)
        self._watcher.start(self._writable, outbox)

    def _writable(self, outbox: Outbox) -> None:
        if outbox.closed:
            self.close()
            return
        data = outbox.take()
        try:
            sent = self.send_nowait(data)
        except OSError:
            self.close()
            outbox.fail()
            return
        if sent < len(data):
            outbox.unsend(data[sent:], sent > 0)
        elif not outbox.size:
            self._watcher.stop()
            outbox.all_sent()

    def close(self) -> None:
        watcher = self._watcher
        if watcher is not None:
            self._watcher = None
            watcher.stop()
            watcher.close()


class TlsSink:
    """Writes through gevent's SSL socket from a writer greenlet that lives while data waits."""

    __slots__ = ("_sock", "_writer", "counters")
    parkable = False
    # Every push queues here (the writer greenlet writes), so a queue says
    # nothing about the kernel's buffer: not charged to the outbound budget.
    kernel_buffer = 0

    def __init__(self, sock: Any, counters: Counters) -> None:
        self._sock = sock
        self._writer: gevent.Greenlet | None = None
        self.counters = counters

    def send_nowait(self, data: bytes) -> int:
        return 0

    def kick(self, outbox: Outbox) -> None:
        if self._writer is None:
            self._writer = gevent.spawn(self._write_until_empty, outbox)

    def _write_until_empty(self, outbox: Outbox) -> None:
        try:
            while outbox.size and not outbox.closed:
                data = outbox.take()
                self._sock.sendall(data)
                self.counters.bytes_out += len(data)
            outbox.all_sent()
        except OSError:
            outbox.fail()
        finally:
            self._writer = None

    def close(self) -> None:
        writer = self._writer
        if writer is not None and writer is not gevent.getcurrent():
            writer.kill(block=False)
