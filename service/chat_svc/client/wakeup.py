"""Getting the main thread's attention while it is blocked reading the keyboard.

The main thread owns the keyboard and, at a prompt, the screen (see
:mod:`chat_svc.client.terminal`).  Three things must reach it however it is blocked: lines
waiting to be printed, the session ending on its own (server gone), and Ctrl-C.

* Without a terminal it waits in ``select()`` on stdin and on :attr:`WakeUp.socket`, the
  socket Python's signal wake-up fd (``signal.set_wakeup_fd``) writes to.  The network thread
  writes to it too, so nothing can be missed.
* At a prompt it is inside readline, which watches only the keyboard.  CPython's readline loop
  runs Python signal handlers when its ``select()`` is interrupted by a signal, at a moment when
  readline is idle: that is where the ``SIGUSR1`` handler prints queued lines
  (:meth:`~chat_svc.client.terminal.Terminal.flush`) or raises :class:`ServerGone`.  A relay
  thread sends the ``SIGUSR1``.  A signal that lands while readline is handling a key (not in
  ``select()``) is only noted, and would sit unnoticed until the next keypress, so the relay
  keeps signalling every ``NUDGE_SECONDS`` until the main thread has done what was asked.

  One CPython quirk shapes the handlers: when a handler raises inside readline, ``input()``
  checks for signals once more with that exception still set, and a handler that makes any C
  call in that state fails with ``SystemError``.  So the handlers remember the exception they
  raised and, called again before the input loop has been left, raise it again using nothing
  but bytecode.  Ctrl-C gets such a handler too, instead of Python's default one.

Threads are started with the asynchronous signals blocked (a new thread inherits the creating
thread's mask), so the kernel delivers Ctrl-C's SIGINT to the main thread: delivered to another
thread it would only set Python's flag while the main thread slept inside readline.
"""

from __future__ import annotations

import contextlib
import selectors
import signal
import socket
import threading
import time
from types import FrameType
from typing import Any

from chat_svc.client.terminal import Terminal

#: How often the relay signals the main thread again while it has not reacted.
NUDGE_SECONDS = 0.05

# Bytes on the wake-up socket besides signal numbers (which are 1-64).
_GONE = 0
_LINES = 255
_WAKE = 254

# Signals that must reach the main thread (see module docstring).
_ASYNC_SIGNALS = {
    getattr(signal, name)
    for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGWINCH")
    if hasattr(signal, name)
}


class ServerGone(BaseException):
    """Raised in the main thread (from a signal handler) to abandon a blocking read.

    A ``BaseException`` like ``KeyboardInterrupt``, so no ``except Exception`` can swallow it.
    """


class WakeUp:
    """The wake-up socket, the ``SIGUSR1`` handler and, at a prompt, the relay thread."""

    def __init__(self, prompt_mode: bool) -> None:
        self._prompt_mode = prompt_mode
        self.terminal: Terminal | None = None
        self._main_ident = threading.main_thread().ident
        self._gone = threading.Event()
        self._exiting = threading.Event()
        # The relay saw SIGINT on the wake-up socket (the handler may not have run yet).
        self._interrupted = False
        # What the handlers raised into the main thread, and whether it has left its input loop
        # (plain attributes: the handlers may only read them, see the module docstring).
        self._raised: BaseException | None = None
        self._left = False
        # The SIGINT handler ran but could not raise yet (it interrupted a flush).
        self._interrupt_pending = False
        self._sig_r, self._sig_w = socket.socketpair()
        self._sig_r.setblocking(False)
        self._sig_w.setblocking(False)
        self._relay: threading.Thread | None = None

    @property
    def socket(self) -> socket.socket:
        """Readable when a signal was caught or the session is gone (pipe mode selects on it)."""
        return self._sig_r

    @property
    def gone(self) -> bool:
        """The session ended without the user asking: server gone (or stdout closed)."""
        return self._gone.is_set()

    # ---------------------------------------------------------------------------- main thread

    def install(self) -> tuple[Any, Any, int]:
        """Route ``SIGUSR1`` (and at a prompt ``SIGINT``) to the handlers here, and caught signals
        to the wake-up socket."""
        previous_usr1 = signal.signal(signal.SIGUSR1, self._on_signal)
        previous_int = signal.signal(signal.SIGINT, self._on_interrupt) if self._prompt_mode else None
        previous_fd = signal.set_wakeup_fd(self._sig_w.fileno(), warn_on_full_buffer=False)
        return previous_usr1, previous_int, previous_fd

    def restore(self, saved: tuple[Any, Any, int]) -> None:
        """Undo :meth:`install`, once the relay can no longer send ``SIGUSR1`` (whose default
        action would kill the process)."""
        previous_usr1, previous_int, previous_fd = saved
        self.leaving()
        if self._relay is not None:
            self._relay.join(1.0)
            if self._relay.is_alive():
                previous_usr1 = signal.SIG_IGN
        signal.set_wakeup_fd(previous_fd)
        signal.signal(signal.SIGUSR1, previous_usr1)
        if previous_int is not None:
            signal.signal(signal.SIGINT, previous_int)

    def start(self, *threads: threading.Thread) -> None:
        """Start ``threads`` (and, at a prompt, the relay) with the asynchronous signals blocked."""
        if self._prompt_mode:
            self._relay = threading.Thread(target=self._relay_main, name="chat-wake", daemon=True)
            threads = (*threads, self._relay)
        blockable = hasattr(signal, "pthread_sigmask")
        if blockable:
            old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _ASYNC_SIGNALS)
        try:
            for thread in threads:
                thread.start()
        finally:
            if blockable:
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)

    def leaving(self) -> None:
        """The input loop is over: stop signalling, and never raise :class:`ServerGone` again."""
        self._left = True
        self._exiting.set()
        self._send(_WAKE)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        """``SIGUSR1``: print what is queued; abandon the blocking read if the session is over.

        A handler can interrupt the main thread anywhere, also in the middle of a flush (its
        own or an earlier handler's): then it lets that flush finish, so the screen is never
        left half redrawn, and the relay's next signal does the rest.
        """
        raised = self._raised
        if raised is not None:
            if self._left:
                return
            raise raised  # maybe still set: no C call before this (see the module docstring)
        term = self.terminal
        if term is not None and term.flushing:
            return
        if self._interrupt_pending:
            self._raise(KeyboardInterrupt())
        if term is not None:
            term.flush()
        if self._gone.is_set() and not self._left and not (term is not None and term.pending):
            self._raise(ServerGone())

    def _on_interrupt(self, signum: int, frame: FrameType | None) -> None:
        """``SIGINT`` at a prompt: ``KeyboardInterrupt``, raised the same careful way."""
        raised = self._raised
        if raised is not None and not self._left:
            raise raised
        if self._left:
            raise KeyboardInterrupt()  # while exiting, as Python's own handler would
        self._interrupt_pending = True
        self._on_signal(signum, frame)

    def _raise(self, exc: BaseException) -> None:
        self._raised = exc
        raise exc

    # ------------------------------------------------------------------------- other threads

    def session_gone(self) -> None:
        """Network thread: the session ended on its own; get the main thread out of its read."""
        self._gone.set()
        self._send(_GONE)

    def lines_queued(self) -> None:
        """Network thread: lines wait for the main thread to print them."""
        self._send(_LINES)

    def _send(self, byte: int) -> None:
        with contextlib.suppress(OSError):  # full (a wake-up is pending anyway) or closed
            self._sig_w.send(bytes((byte,)))

    def _needs_main(self) -> bool:
        pending = self.terminal is not None and self.terminal.pending
        return self._gone.is_set() or self._interrupted or pending

    def _relay_main(self) -> None:
        """Prompt mode: signal the main thread until it has reacted (see module docstring)."""
        next_nudge = 0.0
        with selectors.DefaultSelector() as sel:
            sel.register(self._sig_r, selectors.EVENT_READ)
            while not self._exiting.is_set():
                timeout = None
                if self._needs_main():
                    now = time.monotonic()
                    if now >= next_nudge:
                        with contextlib.suppress(OSError, ValueError):
                            signal.pthread_kill(self._main_ident or 0, signal.SIGUSR1)
                        next_nudge = now + NUDGE_SECONDS
                    timeout = next_nudge - now
                else:
                    next_nudge = 0.0
                if not sel.select(timeout):
                    continue
                try:
                    data = self._sig_r.recv(4096)
                except BlockingIOError:
                    continue
                except OSError:
                    return
                if not data:
                    return
                if signal.SIGINT in data:
                    self._interrupted = True
