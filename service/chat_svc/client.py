"""``chat-client``: the terminal client for chat-svc.

Usage: ``chat-client [--reconnect] [--tls [--insecure | --ca-file PEM]] [HOST] [PORT]``
(defaults: ``localhost 9009``).

It behaves like the seed's ``chat_client.py`` (a ``[Me] `` prompt, lines typed are sent, lines
received are printed) but fixes what made the seed unpleasant to use:

* Incoming lines never garble the line being typed.  On a terminal the input line is edited
  with GNU readline; when a line arrives the current input line is cleared, the incoming line is
  printed, and the prompt plus the text typed so far (``readline.get_line_buffer()``) is
  redrawn underneath it.
* Ctrl-C and end of input exit cleanly (status 0, no traceback).  At end of input the client
  sends ``/quit`` and keeps printing what the server sends until the server closes the
  connection (bounded by ``QUIT_GRACE_SECONDS``), so a script piped into it sees every reply.
* Without a terminal on stdin (a pipe, a file) there is no prompt and nothing but received
  chat lines goes to stdout, so the client can be scripted.  Status lines (connected,
  disconnected, reconnected, unable to connect) go to stderr.
* ``--reconnect`` survives server restarts: capped, jittered exponential backoff, then the last
  ``/auth``, ``/nick`` and ``/join`` the user typed are replayed so the user lands where they
  were (a server with an access token would otherwise refuse the new connection).
* Received text has control characters (except tab) stripped before it is printed, so a peer
  can never drive the user's terminal with escape sequences, even if a server forgot to.

Exit status: 0 after Ctrl-C, end of input or ``/quit``; 1 when the server cannot be reached
(``Unable to connect``) or goes away without ``--reconnect`` (``Disconnected from chat
server``).

Concurrency design: this client deliberately does not use gevent (it must not monkey-patch the
user's process, and a blocking ``readline`` call cannot be made cooperative).  The main thread
owns the keyboard (``input()`` / ``stdin.readline()``); one network thread owns the socket and
multiplexes it with a self-pipe through ``selectors``, so a TLS socket is never read and written
from two threads at once (OpenSSL connections are not safe for that).

Waking the main thread when the session ends on its own (server gone) or on Ctrl-C:

* Without a terminal the main thread waits in ``select()`` on stdin and on the socket that
  Python's signal wake-up fd (``signal.set_wakeup_fd``) writes to; the network thread writes
  to it too.  Nothing can be missed.
* On a terminal the main thread is inside readline, which watches only the keyboard.  The
  network thread's news reaches it as ``SIGUSR1`` (whose handler raises), sent by a relay
  thread.  CPython's readline checks for signals only when its ``select()`` is interrupted, so
  a signal landing just before that ``select()`` starts would sit unnoticed until the next
  keypress; the relay therefore keeps nudging with ``SIGWINCH`` (readline's own C handler, so
  no second Python handler runs while an exception is pending) until the main thread reacts.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import selectors
import signal
import socket
import ssl
import sys
import threading
from collections import deque
from collections.abc import Callable, Sequence
from types import FrameType, ModuleType
from typing import Any, TextIO

DEFAULT_HOST = "localhost"
DEFAULT_PORT = 9009
PROMPT = "[Me] "
#: How long to keep printing server output after end of input before giving up on the close.
QUIT_GRACE_SECONDS = 3.0
CONNECT_TIMEOUT_SECONDS = 5.0
BACKOFF_INITIAL_SECONDS = 0.5
BACKOFF_MAX_SECONDS = 10.0
RECV_BYTES = 65536
#: A line longer than this (without a newline) is handled in pieces rather than buffered without
#: bound: neither a broken server nor an endless stdin line may make the client eat memory.
MAX_INCOMING_LINE_BYTES = 1 << 20

#: Commands whose last use is replayed after a reconnect, in this order (auth must come first).
_REPLAYED = ("/auth", "/nick", "/join")

DISCONNECTED_MESSAGE = "Disconnected from chat server"
UNABLE_MESSAGE = "Unable to connect"

# C0 controls except tab, DEL, and C1 controls (ESC-less CSI is \x9b, so C1 matters too).
_CONTROL_CHARS = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f]")
# ANSI: erase the whole current line and return to column 0.
_CLEAR_LINE = "\r\x1b[2K"


# Signals that must reach the main thread (see ChatClient.start).
_ASYNC_SIGNALS = {
    getattr(signal, name)
    for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGWINCH")
    if hasattr(signal, name)
}


def sanitize(text: str) -> str:
    """Remove control characters except tab, so received text cannot drive the terminal."""
    return _CONTROL_CHARS.sub("", text)


def encode_line(text: str) -> bytes:
    """Encode one outgoing line; bytes that were not valid UTF-8 on stdin go out unchanged."""
    text = text.rstrip("\r\n")
    try:
        return text.encode("utf-8", "surrogateescape") + b"\n"
    except UnicodeEncodeError:  # lone surrogates that did not come from surrogateescape
        return text.encode("utf-8", "replace") + b"\n"


def _load_readline() -> ModuleType | None:
    """Import readline if this platform has it; the client still works without it."""
    try:
        import readline
    except ImportError:  # pragma: no cover - e.g. Windows without pyreadline
        return None
    return readline


class _ServerGone(BaseException):
    """Raised in the main thread (from a signal handler) to abandon a blocking read.

    A ``BaseException`` like ``KeyboardInterrupt``, so no ``except Exception`` can swallow it.
    """


class Terminal:
    """Serialises every write so incoming lines and the user's input line never interleave."""

    def __init__(
        self,
        interactive: bool,
        readline: ModuleType | None,
        out: TextIO,
        err: TextIO,
    ) -> None:
        self.interactive = interactive
        self._readline = readline if interactive else None
        self._out = out
        self._err = err
        self._lock = threading.Lock()
        # Only while readline shows the prompt and waits for keys is there a partly typed line
        # on screen that an incoming line must be drawn around.  That is: inside input() and
        # after readline's pre-input hook has run.  The hook is ``deque.popleft`` of a token
        # pushed before each input() -- a C function on purpose: a Python hook would let a
        # Ctrl-C land inside it, and readline silently clears exceptions raised by hooks.
        self._in_input = False
        self._prompt_tokens: deque[int] = deque()
        self._closed = False
        self.output_broken = False

    @property
    def pre_input_hook(self) -> Callable[[], object]:
        """The readline pre-input hook (called once the prompt has been drawn)."""
        return self._prompt_tokens.popleft

    def begin_input(self) -> None:
        """Main thread, just before ``input()``: the prompt is about to be drawn."""
        with self._lock:
            self._prompt_tokens.clear()
            self._prompt_tokens.append(1)
            self._in_input = True

    def end_input(self) -> None:
        """Main thread, once ``input()`` has returned or raised: no input line on screen."""
        with self._lock:
            self._in_input = False

    @property
    def _reading(self) -> bool:
        return self._in_input and not self._prompt_tokens

    def line(self, text: str) -> None:
        """Print a received chat line on stdout."""
        self._emit(text, self._out, redraw=True)

    def status(self, text: str, *, redraw: bool = True) -> None:
        """Print a client status line on stderr (kept off stdout so scripts get chat only)."""
        self._emit(text, self._err, redraw=redraw)

    def close(self) -> None:
        """Stop all further output, so no thread writes to stdout while the process exits."""
        # Bounded: if a write is stuck on a blocked terminal, exit anyway.
        if self._lock.acquire(timeout=1.0):
            self._closed = True
            self._lock.release()
        else:
            self._closed = True

    def _emit(self, text: str, stream: TextIO, *, redraw: bool) -> None:
        with self._lock:
            if self._closed or self.output_broken:
                return
            try:
                if self.interactive and self._reading:
                    # Clear the half-typed input line, print above it, then redraw the prompt
                    # and what the user has typed so far, so their keystrokes continue in place.
                    self._out.write(_CLEAR_LINE)
                    self._out.flush()
                    stream.write(text + "\n")
                    stream.flush()
                    if redraw:
                        typed = self._readline.get_line_buffer() if self._readline else ""
                        self._out.write(PROMPT + typed)
                        self._out.flush()
                else:
                    stream.write(text + "\n")
                    stream.flush()
            except (BrokenPipeError, ValueError):
                # stdout closed (e.g. `chat-client | head -1`): nothing more can be shown.
                self.output_broken = True


class ChatClient:
    """One chat session: the network thread plus the main thread's input loop."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        tls: ssl.SSLContext | None,
        reconnect: bool,
        terminal: Terminal,
    ) -> None:
        self.host = host
        self.interactive = terminal.interactive
        self.port = port
        self.tls = tls
        self.reconnect = reconnect
        self.term = terminal
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
        self._replay: dict[str, bytes] = {}
        self._thread: threading.Thread | None = None
        self._main_ident = threading.main_thread().ident
        self._signalled = False
        # The session ended without the user asking (server gone, stdout closed).
        self._gone = threading.Event()
        # The main thread has left the input loop: stop nudging it.
        self._exiting = threading.Event()
        # Python's signal wake-up fd writes each caught signal's number here, and the network
        # thread writes byte 0 when the session is gone; the main thread (pipe mode) or the relay
        # thread (terminal mode) reads it.
        self._sig_r, self._sig_w = socket.socketpair()
        self._sig_r.setblocking(False)
        self._sig_w.setblocking(False)
        self._relay: threading.Thread | None = None

    # ----------------------------------------------------------------------------- connecting

    def open_connection(self) -> socket.socket:
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
        self._sock = self.open_connection()
        self._connected.set()

    def start(self) -> None:
        """Start the network thread (daemon: a stuck socket must never keep the process alive).

        The thread is created with the asynchronous signals blocked (a new thread inherits the
        creating thread's mask), so the kernel always delivers Ctrl-C's SIGINT to the main
        thread.  Delivered to the network thread instead, it would only set Python's flag while
        the main thread stayed asleep inside readline until the next keypress.
        """
        self._thread = threading.Thread(target=self._network_main, name="chat-net", daemon=True)
        if self.interactive:
            self._relay = threading.Thread(target=self._relay_main, name="chat-sig", daemon=True)
        blockable = hasattr(signal, "pthread_sigmask")
        if blockable:
            old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _ASYNC_SIGNALS)
        try:
            self._thread.start()
            if self._relay is not None:
                self._relay.start()
        finally:
            if blockable:
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)

    @property
    def wakeup_socket(self) -> socket.socket:
        """Readable when a signal was caught or the session is gone (pipe mode selects on it)."""
        return self._sig_r

    @property
    def gone(self) -> bool:
        """The session ended without the user asking: server gone (or stdout closed)."""
        return self._gone.is_set()

    def install_signal_handling(self) -> tuple[Any, int]:
        """Main thread: SIGUSR1 raises :class:`_ServerGone`; caught signals are reported."""
        previous_handler = signal.signal(signal.SIGUSR1, self.on_wakeup_signal)
        previous_fd = signal.set_wakeup_fd(self._sig_w.fileno(), warn_on_full_buffer=False)
        return previous_handler, previous_fd

    def restore_signal_handling(self, saved: tuple[Any, int]) -> None:
        """Main thread: undo :meth:`install_signal_handling`."""
        signal.set_wakeup_fd(saved[1])
        signal.signal(signal.SIGUSR1, saved[0])

    # ------------------------------------------------------------------------ main-thread API

    def send_line(self, text: str) -> bool:
        """Queue one line for the server; returns False (and says so) when not connected."""
        if not self._connected.is_set():
            self.term.status("(not connected: line not sent)")
            return False
        command = text.split(maxsplit=1)[0].lower() if text.strip() else ""
        if command in _REPLAYED and len(text.split()) > 1:
            self._replay[command] = encode_line(text)
        if command == "/quit":
            self._quitting.set()
        data = encode_line(text)
        with self._outq_lock:
            self._outq.append(data)
        self._wake()
        return True

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

    def leaving(self) -> None:
        """Main thread: the input loop is over; wake-up signals must not interrupt the exit."""
        self._exiting.set()

    def shutdown(self) -> None:
        """Stop the network thread and close the socket (bounded, for a prompt exit)."""
        self._exiting.set()
        self._stop.set()
        self._wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(1.0)

    def on_wakeup_signal(self, signum: int, frame: FrameType | None) -> None:
        """SIGUSR1 handler: abandon readline's blocking read once the session is over."""
        if self._gone.is_set() and not self._exiting.is_set() and not self._signalled:
            self._signalled = True
            raise _ServerGone()

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
                # most likely blocked reading the keyboard; tell it (or the relay thread).
                self._gone.set()
                with contextlib.suppress(OSError):
                    self._sig_w.send(b"\0")

    def _relay_main(self) -> None:
        """Terminal mode: get the main thread out of readline after Ctrl-C or a lost session.

        See the module docstring for why one signal is not always enough.
        """
        nudge_for = {0, int(signal.SIGINT)}
        with selectors.DefaultSelector() as sel:
            sel.register(self._sig_r, selectors.EVENT_READ)
            while not self._exiting.is_set():
                sel.select()
                try:
                    data = self._sig_r.recv(256)
                except BlockingIOError:
                    continue
                except OSError:
                    return
                if not data:
                    return
                if nudge_for.isdisjoint(data):
                    continue  # SIGWINCH (ours or a real resize), ...
                if self._gone.is_set():
                    self._signal_main(signal.SIGUSR1)
                while not self._exiting.wait(0.2):
                    self._signal_main(signal.SIGWINCH)
                return

    def _signal_main(self, signum: int) -> None:
        if self._main_ident is not None:
            with contextlib.suppress(OSError, ValueError):
                signal.pthread_kill(self._main_ident, signum)

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
                self.term.status(DISCONNECTED_MESSAGE, redraw=False)
                self.exit_code = 1
                return
            self.term.status(DISCONNECTED_MESSAGE + "; reconnecting...")
            with self._outq_lock:
                self._outq.clear()  # lines meant for the old session are stale now
            new_sock = self._reconnect_with_backoff()
            if new_sock is None:
                return
            self._sock = new_sock
            self._connected.set()
            self.term.status(f"Reconnected to {self.host}:{self.port}")
            # Put the user back under the nickname and in the room they had chosen.
            with self._outq_lock:
                for command in _REPLAYED:
                    if command in self._replay:
                        self._outq.append(self._replay[command])

    def _reconnect_with_backoff(self) -> socket.socket | None:
        """Retry until connected or stopped; jitter keeps restarted servers from a stampede."""
        delay = BACKOFF_INITIAL_SECONDS
        while not self._stop.is_set() and not self._quitting.is_set():
            if self._stop.wait(delay * random.uniform(0.8, 1.2)):
                return None
            try:
                return self.open_connection()
            except OSError:
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
                events = selectors.EVENT_READ
                if (outbuf and not write_needs_read) or read_needs_write:
                    events |= selectors.EVENT_WRITE
                sel.modify(sock, events)
                for key, mask in sel.select():
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
        text = raw.decode("utf-8", "replace").rstrip("\r")
        self.term.line(sanitize(text))


# ---------------------------------------------------------------------------------- front end


def build_parser() -> argparse.ArgumentParser:
    """The command line: seed-compatible positional HOST PORT plus optional flags."""
    parser = argparse.ArgumentParser(
        prog="chat-client",
        description="Interactive terminal client for chat-svc. Type lines to send them; "
        "/help lists the server's commands; Ctrl-C or Ctrl-D leaves. "
        "With stdin not a terminal it reads lines to send from stdin (no prompt), sends /quit "
        "at end of input and prints the server's replies until it closes.",
    )
    parser.add_argument("host", nargs="?", default=DEFAULT_HOST, help="server host (localhost)")
    parser.add_argument("port", nargs="?", type=_port, default=DEFAULT_PORT, help="port (9009)")
    parser.add_argument(
        "--reconnect",
        action="store_true",
        help="when the server goes away, reconnect with capped exponential backoff "
        f"(up to {BACKOFF_MAX_SECONDS:g}s) and replay the last /auth, /nick and /join",
    )
    parser.add_argument("--tls", action="store_true", help="connect with TLS")
    trust = parser.add_mutually_exclusive_group()
    trust.add_argument(
        "--insecure",
        action="store_true",
        help="with --tls: skip certificate and hostname verification (self-signed test certs)",
    )
    trust.add_argument("--ca-file", metavar="PEM", help="with --tls: trust this CA / self-signed certificate")
    return parser


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {value!r}") from None
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"port out of range: {port}")
    return port


def make_tls_context(insecure: bool, ca_file: str | None) -> ssl.SSLContext:
    """The default (verifying) client context, optionally loosened for self-signed test certs."""
    ctx = ssl.create_default_context(cafile=ca_file)
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _read_lines(client: ChatClient, term: Terminal, readline: ModuleType | None) -> None:
    """Main-thread input loop; returns at end of input or after the user's ``/quit``."""
    if term.interactive:
        if readline is not None:
            # Called once readline has drawn the prompt: only from then on is there an input
            # line on screen that incoming lines must be drawn around.
            readline.set_pre_input_hook(term.pre_input_hook)
        while True:
            term.begin_input()
            try:
                text = input(PROMPT)
            except EOFError:
                term.end_input()
                term.status("")  # leave the prompt line, so the shell starts a fresh one
                client.quit_and_drain()
                return
            finally:
                term.end_input()
            if not text.strip():
                continue
            client.send_line(text)
            if client.quitting:
                client.wait_finished(QUIT_GRACE_SECONDS)
                return
    else:
        _read_pipe(client)


def _read_pipe(client: ChatClient) -> None:
    """Input loop without a terminal: ``select()`` on stdin and the wake-up socket.

    Waiting in ``select()`` (not in a blocking ``readline()``) means a server that goes away,
    or a Ctrl-C, is noticed at once even while the other end of the pipe is silent.
    """
    stdin_fd = sys.stdin.fileno()
    pending = b""
    with selectors.DefaultSelector() as sel:
        sel.register(stdin_fd, selectors.EVENT_READ)
        sel.register(client.wakeup_socket, selectors.EVENT_READ)
        while True:
            for key, _ in sel.select():
                if key.fileobj is client.wakeup_socket:
                    with contextlib.suppress(BlockingIOError, OSError):
                        client.wakeup_socket.recv(256)
                    if client.gone:
                        raise _ServerGone()
                    continue
                chunk = os.read(stdin_fd, 65536)
                if not chunk:
                    if pending.strip():
                        client.send_line(pending.decode("utf-8", "surrogateescape"))
                    if not client.quitting:
                        client.quit_and_drain()
                    else:
                        client.wait_finished(QUIT_GRACE_SECONDS)
                    return
                pending += chunk
                *lines, pending = pending.split(b"\n")
                if len(pending) > MAX_INCOMING_LINE_BYTES:  # bounded memory, whatever stdin is
                    lines.append(pending)
                    pending = b""
                for raw in lines:
                    text = raw.decode("utf-8", "surrogateescape").rstrip("\r")
                    if not text.strip():
                        continue
                    client.send_line(text)
                    if client.quitting:
                        client.wait_finished(QUIT_GRACE_SECONDS)
                        return


def run(argv: Sequence[str] | None = None) -> int:
    """Run the client and return its exit status (see the module docstring)."""
    args = build_parser().parse_args(argv)
    if (args.insecure or args.ca_file) and not args.tls:
        build_parser().error("--insecure and --ca-file need --tls")
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    readline = _load_readline() if interactive else None
    term = Terminal(interactive, readline, sys.stdout, sys.stderr)
    tls = make_tls_context(args.insecure, args.ca_file) if args.tls else None
    client = ChatClient(args.host, args.port, tls=tls, reconnect=args.reconnect, terminal=term)

    try:
        client.connect()
    except (OSError, ValueError) as exc:  # refused, unresolvable, timed out, TLS failure
        reason = (exc.strerror if isinstance(exc, OSError) else None) or str(exc)
        term.status(f"{UNABLE_MESSAGE} to {args.host}:{args.port} ({reason or type(exc).__name__})")
        return 1

    saved_signals = client.install_signal_handling()
    try:
        if interactive:
            term.status(f"Connected to {args.host}:{args.port}. You can start sending messages")
        client.start()
        try:
            _read_lines(client, term, readline)
            client.leaving()
        except (_ServerGone, KeyboardInterrupt) as exc:
            client.leaving()
            if isinstance(exc, KeyboardInterrupt) and interactive:
                term.status("", redraw=False)  # move off the ^C prompt line
            return client.exit_code if isinstance(exc, _ServerGone) else 0
        return 0
    finally:
        client.shutdown()
        term.close()
        client.restore_signal_handling(saved_signals)


def main() -> None:
    """Console-script entry point (``chat-client``)."""
    try:
        code = run()
    except KeyboardInterrupt:  # Ctrl-C outside the input loop (e.g. while connecting)
        code = 0
    except _ServerGone:  # the wake-up signal landed after the input loop had already ended
        code = 1
    try:
        sys.stdout.flush()
    except (BrokenPipeError, ValueError):
        # stdout is a closed pipe: point it at /dev/null so the interpreter's own final flush
        # does not print "Exception ignored ... BrokenPipeError" on the way out.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    raise SystemExit(code)


if __name__ == "__main__":
    main()
