"""Watching a child process's output from a thread, for tests that wait on what it prints."""

from __future__ import annotations

import os
import re
import threading
import time


class StreamWatcher:
    """Collects everything a file descriptor produces, so tests can wait for a pattern."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buf = b""
        self._eof = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                chunk = os.read(self._fd, 65536)
            except OSError:  # a pty master reports EIO once the child side is gone
                chunk = b""
            with self._cond:
                if not chunk:
                    self._eof = True
                    self._cond.notify_all()
                    return
                self._buf += chunk
                self._cond.notify_all()

    @property
    def text(self) -> str:
        with self._cond:
            return self._buf.decode("utf-8", "replace")

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float = 10.0) -> re.Match[str]:
        """Wait until the output so far matches ``pattern`` (a regex or a literal string)."""
        regex = pattern if isinstance(pattern, re.Pattern) else re.compile(re.escape(pattern))
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                match = regex.search(self._buf.decode("utf-8", "replace"))
                if match:
                    return match
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._eof:
                    raise AssertionError(
                        f"{regex.pattern!r} not seen within {timeout}s; output so far:\n"
                        f"{self._buf.decode('utf-8', 'replace')!r}"
                    )
                self._cond.wait(remaining)

    def wait_eof(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._eof:
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"stream still open after {timeout}s"
                self._cond.wait(remaining)
