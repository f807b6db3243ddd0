"""The network side: one thread that owns the socket, reconnecting when asked to.

The network thread multiplexes the socket with a self-pipe through ``selectors``, so a TLS
socket is never read and written from two threads at once (OpenSSL connections are not safe
for that).  The main thread only queues lines (:meth:`Connection.send_line`).  Received lines
go through :class:`~chat_svc.client.session.Session` (which learns nick and room from them)
to the terminal.
"""

from __future__ import annotations

import contextlib
import random
import selectors
import socket
import ssl
import threading

from chat_svc.client.session import Session
from chat_svc.client.terminal import Terminal
from chat_svc.client.wakeup import WakeUp
from chat_svc.text import clean

#: How long to keep printing server output after end of input before giving up on the close.
QUIT_GRACE_SECONDS = 3.0
CONNECT_TIMEOUT_SECONDS = 5.0
BACKOFF_INITIAL_SECONDS = 0.5
BACKOFF_MAX_SECONDS = 10.0
RECV_BYTES = 65536
#: The server's default ``--max-line-bytes``: a longer line would get the user disconnected.
DEFAULT_MAX_LINE_BYTES = 8192
#: A received line longer than this (without a newline) is printed in pieces rather than
#: buffered without bound: a broken server may not make the client eat memory.
MAX_INCOMING_LINE_BYTES = 1 << 20

DISCONNECTED_MESSAGE = "Disconnected from chat server"
NOT_CONNECTED_MESSAGE = "(not connected: line not sent)"


def encode_line(text: str) -> bytes:
    """Encode one outgoing line; bytes that were not valid UTF-8 on stdin go out unchanged."""
    text = text.rstrip("\r\n")
    try:
        return text.encode("utf-8", "surrogateescape") + b"\n"
    except UnicodeEncodeError:  # lone surrogates that did not come from surrogateescape
        return text.encode("utf-8", "replace") + b"\n"


def too_long_message(size: int, limit: int) -> str:
    """What the user is told instead of being disconnected by the server for a long line."""
    return f"(line not sent: {size} bytes is over the {limit}-byte line limit)"


class Connection:
    """One chat session: the network thread, its outbound queue and the reconnect policy."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        tls: ssl.SSLContext | None,
        reconnect: bool,
        max_line_bytes: int,
        session: Session,
        terminal: Terminal,
        wakeup: WakeUp,
    ) -> None:
        self.host = host
        self.port = port
        self.tls = tls
        self.reconnect = reconnect
        self.max_line_bytes = max_line_bytes
        self.session = session
        self.term = terminal
        self.wakeup = wakeup
        self.exit_code = 0
        self._sock: socket.socket | None = None
        self._connected = threading.Event()
        self._finished = threading.Event()
        self._stop = threading.Event()
        # Set before sending /quit: from then on, the server closing is the expected outcome.
        self._quitting = threading.Event()
        self._outq: list[bytes] = []
        self._outq_lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.thread = threading.Thread(target=self._network_main, name="chat-net", daemon=True)

    # ----------------------------------------------------------------------------- connecting

    def open_socket(self) -> socket.socket:
        """Connect (and do the TLS handshake) with a timeout; raises OSError on failure."""
        raw = socket.create_connection((self.host, self.port), timeout=CONNECT_TIMEOUT_SECONDS)
        try:
            # Find a dead server even when the user is only reading.
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            if self.tls is None:
                return raw
            return self.tls.wrap_socket(raw, server_hostname=self.host)
        except BaseException:
            raw.close()
            raise

    def connect(self) -> None:
        """First connection: failing here is fatal (``Unable to connect``), even with reconnect.

        A client that silently waits for a server that was never there hides typos in HOST/PORT.
        """
        self._sock = self.open_socket()
        self._begin()

    def _begin(self) -> None:
        """A new connection: queue what restores the user's place, then accept typed lines."""
        with self._outq_lock:
            self._outq[:] = [encode_line(line) for line in self.session.connected()]
        self._connected.set()

    # ------------------------------------------------------------------------ main-thread API

    def send_line(self, text: str) -> None:
        """Queue one line for the server, or say why it is not sent."""
        if not self._connected.is_set():
            self.term.status(NOT_CONNECTED_MESSAGE)
            return
        data = encode_line(text)
        if len(data) - 1 > self.max_line_bytes:
            self.term.status(too_long_message(len(data) - 1, self.max_line_bytes))
            return
        self.session.typed(text)
        if text.partition(" ")[0].lower() == "/quit":  # parsed as the server parses it
            self._quitting.set()
        with self._outq_lock:
            self._outq.append(data)
        self._wake()

    def quit_and_drain(self) -> None:
        """Send ``/quit`` and keep printing server output until it closes (bounded wait)."""
        self._quitting.set()
        if self._connected.is_set():
            self.send_line("/quit")
            self._finished.wait(QUIT_GRACE_SECONDS)

    def wait_finished(self, timeout: float) -> bool:
        """Wait for the network thread to end (after a user ``/quit``)."""
        return self._finished.wait(timeout)

    @property
    def quitting(self) -> bool:
        """Whether the user asked to leave (``/quit`` typed or end of input)."""
        return self._quitting.is_set()

    def shutdown(self) -> None:
        """Stop the network thread and close the socket (bounded, for a prompt exit)."""
        self._stop.set()
        self._wake()
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(1.0)

    # ---------------------------------------------------------------------- network thread

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"x")

    def _network_main(self) -> None:
        try:
            self._network_loop()
        finally:
            self._finished.set()
            sock, self._sock = self._sock, None
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()
            if not self._stop.is_set() and not self._quitting.is_set():
                # The session ended on its own (server gone, stdout closed): the main thread is
                # most likely blocked reading the keyboard.
                self.wakeup.session_gone()

    def _network_loop(self) -> None:
        while True:
            sock = self._sock
            assert sock is not None
            self._pump(sock)
            self._connected.clear()
            self._sock = None
            with contextlib.suppress(OSError):
                sock.close()
            if self._stop.is_set() or self._quitting.is_set():
                return
            if self.term.output_broken:
                self.exit_code = 0
                return
            if not self.reconnect:
                self.term.status(DISCONNECTED_MESSAGE, last=True)
                self.exit_code = 1
                return
            self.term.status(DISCONNECTED_MESSAGE + "; reconnecting...")
            new_sock = self._reconnect_with_backoff()
            if new_sock is None:
                return
            self._sock = new_sock
            self._begin()  # lines queued for the old connection are dropped: they are stale
            self.term.status(f"Reconnected to {self.host}:{self.port}")

    def _reconnect_with_backoff(self) -> socket.socket | None:
        """Retry until connected or stopped; jitter keeps restarted servers from a stampede."""
        delay = BACKOFF_INITIAL_SECONDS
        while not self._stop.is_set() and not self._quitting.is_set():
            if self._stop.wait(delay * random.uniform(0.8, 1.2)):
                return None
            try:
                return self.open_socket()
            except (OSError, ValueError):
                delay = min(delay * 2, BACKOFF_MAX_SECONDS)
        return None

    def _pump(self, sock: socket.socket) -> None:
        """Move bytes between the socket, the print path and the outbound queue until EOF.

        The ``*_needs_*`` flags handle TLS, where a read can need the socket writable and a
        write can need it readable; on a plain socket they never become true.
        """
        sock.setblocking(False)
        inbuf = bytearray()
        outbuf = bytearray()
        read_needs_write = False
        write_needs_read = False
        with selectors.DefaultSelector() as sel:
            sel.register(self._wake_r, selectors.EVENT_READ)
            sel.register(sock, selectors.EVENT_READ)
            while not self._stop.is_set():
                with self._outq_lock:
                    for data in self._outq:
                        outbuf += data
                    self._outq.clear()
                for line in self.session.due():
                    outbuf += encode_line(line)
                events = selectors.EVENT_READ
                if (outbuf and not write_needs_read) or read_needs_write:
                    events |= selectors.EVENT_WRITE
                sel.modify(sock, events)
                for key, mask in sel.select(self.session.next_due()):
                    if key.fileobj is self._wake_r:
                        with contextlib.suppress(BlockingIOError, OSError):
                            while self._wake_r.recv(4096):
                                pass
                        continue
                    readable = bool(mask & selectors.EVENT_READ)
                    writable = bool(mask & selectors.EVENT_WRITE)
                    if readable or (read_needs_write and writable):
                        read_needs_write = False
                        try:
                            if not self._read_available(sock, inbuf):
                                return
                        except ssl.SSLWantWriteError:
                            read_needs_write = True
                        except OSError:  # reset by peer, TLS failure: the session is over
                            self._flush_partial(inbuf)
                            return
                        if self.term.output_broken:
                            return
                    if outbuf and (writable or (write_needs_read and readable)):
                        write_needs_read = False
                        try:
                            sent = sock.send(outbuf)
                            del outbuf[:sent]
                        except ssl.SSLWantReadError:
                            write_needs_read = True
                        except (ssl.SSLWantWriteError, BlockingIOError):
                            pass
                        except OSError:
                            return

    def _read_available(self, sock: socket.socket, inbuf: bytearray) -> bool:
        """Read what is ready and print complete lines; returns False at end of stream."""
        while True:
            try:
                chunk = sock.recv(RECV_BYTES)
            except (ssl.SSLWantReadError, BlockingIOError):
                return True
            if not chunk:
                self._flush_partial(inbuf)
                return False
            inbuf += chunk
            self._print_lines(inbuf)
            # A TLS record may hold more decrypted data than one recv returned; select() would
            # not report it, so keep reading while OpenSSL has some pending.
            if not isinstance(sock, ssl.SSLSocket) or not sock.pending():
                return True

    def _print_lines(self, inbuf: bytearray) -> None:
        start = 0
        while True:
            end = inbuf.find(b"\n", start)
            if end < 0:
                break
            self._print_raw(bytes(inbuf[start:end]))
            start = end + 1
        del inbuf[:start]
        if len(inbuf) > MAX_INCOMING_LINE_BYTES:
            self._print_raw(bytes(inbuf))
            inbuf.clear()

    def _flush_partial(self, inbuf: bytearray) -> None:
        if inbuf:
            self._print_raw(bytes(inbuf))
            inbuf.clear()

    def _print_raw(self, raw: bytes) -> None:
        # clean() strips control characters (a trailing \r among them), so no peer can drive
        # the user's terminal with escape sequences, even through a server that forgot to.
        shown, notes = self.session.received(clean(raw))
        for line in shown:
            self.term.line(line)
        for note in notes:
            self.term.status(note)
