"""The command line and the main thread's input loops."""

from __future__ import annotations

import argparse
import contextlib
import os
import selectors
import ssl
import sys
from collections.abc import Callable, Sequence

from chat_svc.client.connection import (
    BACKOFF_MAX_SECONDS,
    DEFAULT_MAX_LINE_BYTES,
    QUIT_GRACE_SECONDS,
    Connection,
    too_long_message,
)
from chat_svc.client.display import ReadlineDisplay
from chat_svc.client.session import Session
from chat_svc.client.terminal import ReadlineTerminal, Terminal
from chat_svc.client.wakeup import ServerGone, WakeUp

DEFAULT_HOST = "localhost"
DEFAULT_PORT = 9009
UNABLE_MESSAGE = "Unable to connect"


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
    parser.add_argument(
        "port", nargs="?", type=_whole_number("port", 1, 65535), default=DEFAULT_PORT, help="port (9009)"
    )
    parser.add_argument(
        "--reconnect",
        action="store_true",
        help="when the server goes away, reconnect with capped exponential backoff "
        f"(up to {BACKOFF_MAX_SECONDS:g}s), restore your /auth and nick, and resume your room: "
        "lines said while you were away are shown, each once",
    )
    parser.add_argument(
        "--max-line-bytes",
        type=_whole_number("line limit", 1),
        default=DEFAULT_MAX_LINE_BYTES,
        metavar="N",
        help="the server's line limit: a longer line is not sent (the server would disconnect "
        f"you for it) ({DEFAULT_MAX_LINE_BYTES}, the server's default)",
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


def _whole_number(what: str, low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse ``type``: a whole number from ``low`` to ``high``, named ``what`` in errors."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {what} {value!r}") from None
        if number < low or (high is not None and number > high):
            raise argparse.ArgumentTypeError(f"{what} out of range: {number}")
        return number

    return parse


def make_tls_context(insecure: bool, ca_file: str | None) -> ssl.SSLContext:
    """The default (verifying) client context, optionally loosened for self-signed test certs."""
    ctx = ssl.create_default_context(cafile=ca_file)
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _load_display() -> ReadlineDisplay | None:
    """GNU readline's display calls, if this platform has them; the client works without."""
    try:
        import readline
    except ImportError:  # pragma: no cover - e.g. Windows without pyreadline
        return None
    return ReadlineDisplay.load(readline)


def _typed(conn: Connection, text: str) -> bool:
    """Send one typed line; True once the user has asked to leave (and the server has answered)."""
    if text.strip():
        conn.send_line(text)
        if conn.quitting:
            conn.wait_finished(QUIT_GRACE_SECONDS)
            return True
    return False


def _read_terminal(conn: Connection, term: Terminal, session: Session) -> None:
    """Main-thread input loop at a prompt; returns at end of input or after the user's ``/quit``."""
    while True:
        term.flush()  # lines that arrived between two prompts go above the next one
        try:
            text = input(session.prompt())
        except EOFError:
            term.status("")  # leave the prompt line, so the shell starts a fresh one
            conn.quit_and_drain()
            return
        if _typed(conn, text):
            return


def _read_pipe(conn: Connection, term: Terminal, wakeup: WakeUp) -> None:
    """Input loop without a terminal: ``select()`` on stdin and the wake-up socket.

    Waiting in ``select()`` (not in a blocking ``readline()``) means a server that goes away,
    or a Ctrl-C, is noticed at once even while the other end of the pipe is silent.  Memory
    stays bounded whatever stdin holds: an over-long line is counted and skipped, not stored.
    """
    stdin_fd = sys.stdin.fileno()
    limit = conn.max_line_bytes
    pending = b""
    skipped = 0  # bytes of an over-long line seen so far
    with selectors.DefaultSelector() as sel:
        sel.register(stdin_fd, selectors.EVENT_READ)
        sel.register(wakeup.socket, selectors.EVENT_READ)
        while True:
            for key, _ in sel.select():
                if key.fileobj is wakeup.socket:
                    with contextlib.suppress(BlockingIOError, OSError):
                        wakeup.socket.recv(256)
                    if wakeup.gone:
                        raise ServerGone()
                    continue
                chunk = os.read(stdin_fd, 65536)
                if not chunk:
                    lines = [pending] if pending or skipped else []
                    pending = b""
                else:
                    *lines, pending = (pending + chunk).split(b"\n")
                for raw in lines:
                    if skipped:
                        term.status(too_long_message(skipped + len(raw.rstrip(b"\r")), limit))
                        skipped = 0
                        continue
                    if _typed(conn, raw.decode("utf-8", "surrogateescape").rstrip("\r")):
                        return
                if len(pending) > limit + 1:  # + 1: a CRLF line's \r may not have come yet
                    skipped += len(pending)
                    pending = b""
                if not chunk:
                    conn.quit_and_drain()
                    return


def run(argv: Sequence[str] | None = None) -> int:
    """Run the client and return its exit status (see the package docstring)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.insecure or args.ca_file) and not args.tls:
        parser.error("--insecure and --ca-file need --tls")
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    display = _load_display() if interactive else None
    wakeup = WakeUp(prompt_mode=interactive)
    session = Session(ids=args.reconnect)
    term = (
        ReadlineTerminal(sys.stdout, sys.stderr, display, session.prompt, wakeup.lines_queued)
        if display is not None
        else Terminal(sys.stdout, sys.stderr)
    )
    wakeup.terminal = term
    conn = Connection(
        args.host,
        args.port,
        tls=make_tls_context(args.insecure, args.ca_file) if args.tls else None,
        reconnect=args.reconnect,
        max_line_bytes=args.max_line_bytes,
        session=session,
        terminal=term,
        wakeup=wakeup,
    )

    try:
        conn.connect()
    except (OSError, ValueError) as exc:  # refused, unresolvable, timed out, TLS failure
        reason = (exc.strerror if isinstance(exc, OSError) else None) or str(exc)
        term.status(f"{UNABLE_MESSAGE} to {args.host}:{args.port} ({reason or type(exc).__name__})")
        return 1

    saved_signals = wakeup.install()
    try:
        if interactive:
            term.status(f"Connected to {args.host}:{args.port}. You can start sending messages")
        wakeup.start(conn.thread)
        try:
            if interactive:
                _read_terminal(conn, term, session)
            else:
                _read_pipe(conn, term, wakeup)
            wakeup.leaving()
        except (ServerGone, KeyboardInterrupt) as exc:
            wakeup.leaving()
            if isinstance(exc, KeyboardInterrupt) and interactive:
                term.status("")  # move off the ^C prompt line
            return conn.exit_code if isinstance(exc, ServerGone) else 0
        return 0
    finally:
        wakeup.leaving()
        conn.shutdown()
        term.close()
        wakeup.restore(saved_signals)


def main() -> None:
    """Console-script entry point (``chat-client``)."""
    try:
        code = run()
    except KeyboardInterrupt:  # Ctrl-C outside the input loop (e.g. while connecting)
        code = 0
    except ServerGone:  # the wake-up signal landed after the input loop had already ended
        code = 1
    try:
        sys.stdout.flush()
    except (BrokenPipeError, ValueError):
        # stdout is a closed pipe: point it at /dev/null so the interpreter's own final flush
        # does not print "Exception ignored ... BrokenPipeError" on the way out.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    raise SystemExit(code)
