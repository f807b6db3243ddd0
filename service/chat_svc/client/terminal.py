"""Putting received lines and client messages on screen without garbling the user's input.

Two kinds of output:

* :class:`Terminal` writes at once, from whichever thread has something to say, one line at
  a time under a lock.  That is all a pipe needs (no prompt, nothing being typed), and the
  fallback where GNU readline's display calls are missing.
* :class:`ReadlineTerminal` is for a person typing at a prompt.  readline draws the prompt and
  the input line from the main thread whenever a key arrives, so any other thread writing to
  the screen races with it: a line printed while readline draws splits the prompt, and
  guessing what is on screen puts the cursor in the wrong place.  So only the main thread
  writes, at a moment when readline is idle: lines are queued, and the main thread prints them
  from :meth:`ReadlineTerminal.flush`, which :mod:`chat_svc.client.wakeup` runs while readline
  waits for a key.  readline then clears all the rows of its line and draws it again itself.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import TextIO

from chat_svc.client.display import ReadlineDisplay


class Terminal:
    """Immediate, serialised output: received lines on ``out``, client messages on ``err``.

    Status messages go to stderr so that a script reading stdout gets chat lines only.
    """

    def __init__(self, out: TextIO, err: TextIO) -> None:
        self._out = out
        self._err = err
        self._lock = threading.Lock()
        self._closed = False
        #: stdout is gone (``chat-client | head -1``): nothing more can be shown.
        self.output_broken = False

    def line(self, text: str) -> None:
        """Show a received chat line (stdout)."""
        self._show(text, self._out)

    def status(self, text: str, *, last: bool = False) -> None:
        """Show a client message (stderr); ``last``: the session is over, draw no prompt again."""
        self._show(text, self._err, last)

    def flush(self) -> None:
        """Print what is queued; nothing ever is here (see :class:`ReadlineTerminal`)."""

    @property
    def pending(self) -> bool:
        """Whether lines wait for the main thread to print them."""
        return False

    @property
    def flushing(self) -> bool:
        """Whether the main thread is inside :meth:`flush` (a signal handler may interrupt it)."""
        return False

    def close(self) -> None:
        """Stop all output, so no thread writes while the process exits."""
        # Bounded: if a write is stuck on a blocked terminal, exit anyway.
        if self._lock.acquire(timeout=1.0):
            self._closed = True
            self._lock.release()
        else:
            self._closed = True

    def _show(self, text: str, stream: TextIO, last: bool = False) -> None:
        with self._lock:
            if not self._closed:
                self._write(text, stream)

    def _write(self, text: str, stream: TextIO) -> None:
        if self.output_broken:
            return
        try:
            stream.write(text + "\n")
            stream.flush()
        except (BrokenPipeError, ValueError):
            self.output_broken = True


class ReadlineTerminal(Terminal):
    """Output for a person at a readline prompt: queued, and printed by the main thread only.

    ``wake`` is called when a line is queued by another thread; it must get the main thread to
    call :meth:`flush` soon, even while that thread is blocked inside ``input()``.
    """

    def __init__(
        self,
        out: TextIO,
        err: TextIO,
        display: ReadlineDisplay,
        prompt: Callable[[], str],
        wake: Callable[[], None],
    ) -> None:
        super().__init__(out, err)
        self._display = display
        self._prompt = prompt
        self._wake = wake
        self._queue: deque[tuple[str, TextIO, bool]] = deque()
        self._main = threading.main_thread()
        # Main thread only.  flush() also runs from a signal handler, which can interrupt the
        # main thread anywhere, including inside flush() itself: the flag makes that a no-op
        # (the interrupted flush prints what is left).
        self._flushing = False

    @property
    def pending(self) -> bool:
        return bool(self._queue)

    @property
    def flushing(self) -> bool:
        return self._flushing

    def _show(self, text: str, stream: TextIO, last: bool = False) -> None:
        if self._closed:
            return
        self._queue.append((text, stream, last))
        if threading.current_thread() is self._main:
            self.flush()
        else:
            self._wake()

    def flush(self) -> None:
        """Main thread: print queued lines, above readline's prompt and line if they are shown."""
        if self._flushing or threading.current_thread() is not self._main:
            return
        self._flushing = True
        try:
            if not self._queue:
                return
            if self._closed:
                self._queue.clear()
                return
            shown = self._display.line_shown()
            if shown:
                self._display.clear()
            redraw = True
            while self._queue:
                text, stream, last = self._queue.popleft()
                self._write(text, stream)
                redraw = redraw and not last
            if shown and redraw and not self.output_broken:
                self._display.redraw(self._prompt())
            elif shown:
                self._display.leave()
        finally:
            self._flushing = False

    def close(self) -> None:
        """Print what is still queued (main thread), then stop all output."""
        self.flush()
        self._closed = True
