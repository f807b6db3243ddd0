"""Listening sockets that survive running out of descriptors: pause accepting, say so once, resume.

When ``accept()`` fails with EMFILE (or ENFILE, ENOBUFS, ENOMEM) the waiting
connection stays in the kernel's backlog, so the listener stays readable and
an event loop that simply retries spins.  gevent's ``BaseServer`` already
backs off, but prints a traceback to stderr for every failure.  Here the
listener stops accepting for ``min_delay`` seconds, doubling up to
``max_delay`` while failures continue and starting again from ``min_delay``
after the next accept succeeds, and reports each pause through ``on_pause``
(the service counts it and logs it at most once per interval).  The
descriptor budget (``admission.FdBudget``) is what keeps the chat port from
getting here; this is what happens if something else eats the descriptors.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

from gevent.server import StreamServer

OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class PausingServer(StreamServer):
    """A ``StreamServer`` whose accept pauses on descriptor exhaustion instead of failing loudly."""

    on_pause: Callable[[str, float], None] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._backoff = self.min_delay
        self._resume: Any = None

    def do_read(self) -> Any:
        try:
            accepted = super().do_read()
        except OSError as exc:
            if exc.errno not in OUT_OF_RESOURCES:
                raise
            self._pause(errno.errorcode.get(exc.errno or 0, str(exc.errno)))
            return None
        if accepted is not None:
            self._backoff = self.min_delay
        return accepted

    def _pause(self, error: str) -> None:
        delay = self._backoff
        self._backoff = min(self.max_delay, delay * 2)
        self.stop_accepting()
        self.try_again_in(delay)
        if self.on_pause is not None:
            self.on_pause(error, delay)

    def try_again_in(self, delay: float) -> None:
        """Start accepting again after ``delay`` seconds (once, however often asked meanwhile)."""
        if self._resume is None:
            self._resume = self.loop.timer(delay)
            self._resume.start(self._start_again)

    def _start_again(self) -> None:
        timer, self._resume = self._resume, None
        timer.close()
        if self.started:
            self.start_accepting()
