"""Bytes into lines: the only place that knows where one line ends.

The framer is fed whatever ``recv`` returned and hands back complete lines
without their terminator (``\\n`` or ``\\r\\n``).  It never holds more than
``limit`` bytes of an unfinished line between calls, so a client that streams
bytes without a newline costs at most ``limit`` bytes before it is cut off.
"""

from __future__ import annotations


class LineFramer:
    """Incremental line splitter with a per-line byte limit.

    Once a line longer than ``limit`` is seen, ``overflowed`` turns true and the
    framer returns nothing more: the caller is expected to drop the client.
    Splitting uses ``bytes.split`` so the cost per chunk is a few C calls, not
    a Python loop over characters.
    """

    __slots__ = ("_partial", "limit", "overflowed")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._partial = b""
        self.overflowed = False

    @property
    def pending(self) -> int:
        """Bytes held of the unfinished line."""
        return len(self._partial)

    def feed(self, data: bytes) -> list[bytes]:
        if self.overflowed:
            return []
        if self._partial:
            data = self._partial + data
        lines = data.split(b"\n")
        partial = lines.pop()
        limit = self.limit
        for index, line in enumerate(lines):
            if line.endswith(b"\r"):
                line = line[:-1]
                lines[index] = line
            if len(line) > limit:
                self._overflow()
                return lines[:index]
        if len(partial) > limit + 1 or (len(partial) == limit + 1 and not partial.endswith(b"\r")):
            self._overflow()
            return lines
        self._partial = partial
        return lines

    def _overflow(self) -> None:
        self.overflowed = True
        self._partial = b""
