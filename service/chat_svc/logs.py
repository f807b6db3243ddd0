"""Structured logging setup: JSON lines for machines, colours for people.

Per-connection context (conn_id, peer) is bound with structlog.contextvars;
each greenlet has its own context, so a binding made in one connection's
greenlet never leaks into another's.  The level filter is applied when the
logger is built, so a filtered-out ``debug`` call costs one no-op call.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Hashable
from typing import Any

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure(log_format: str = "auto", level: str = "info") -> None:
    """Install the processors; ``auto`` means JSON unless stdout is a terminal."""
    # One event per line, visible at once: a container's stdout is a pipe,
    # which Python would otherwise block-buffer.
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    as_json = log_format == "json" or (log_format == "auto" and not sys.stdout.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: list[Any]
    if as_json:
        renderer = [structlog.processors.dict_tracebacks, structlog.processors.JSONRenderer()]
    else:
        renderer = [structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())]
    structlog.configure(
        processors=[*shared, *renderer],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=True,
    )



class Coalesced:
    """An event logged at most once per key per ``interval``, carrying how often it happened.

    Under attack the same event repeats thousands of times a second (refused
    connects, wrong /auth guesses, EMFILE); one line per line of attack would
    cost more than the attack.  The first occurrence of a key is logged at
    once; later ones are counted and logged together by ``flush``, which the
    service calls about once a second.  A key quiet for an interval is
    forgotten, so the table holds only what happened recently.
    """

    def __init__(self, logger: Any, event: str, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.event = event
        self.interval = interval
        self._clock = clock
        self._tallies: dict[Hashable, _Tally] = {}

    def note(self, key: Hashable, what: str = "count", **context: Any) -> None:
        """Count one ``what`` for ``key``; ``context`` (from the key's first note) is logged with the counts."""
        tally = self._tallies.get(key)
        if tally is None:
            tally = self._tallies[key] = _Tally(context)
        tally.counts[what] = tally.counts.get(what, 0) + 1
        now = self._clock()
        if tally.logged_at is None or now - tally.logged_at >= self.interval:
            self._emit(tally, now)

    def flush(self) -> None:
        """Log every key whose interval has passed with counts pending; forget the quiet ones."""
        now = self._clock()
        for key, tally in list(self._tallies.items()):
            if tally.logged_at is not None and now - tally.logged_at < self.interval:
                continue
            if tally.counts:
                self._emit(tally, now)
            else:
                del self._tallies[key]

    def _emit(self, tally: _Tally, now: float) -> None:
        self.logger.info(self.event, **tally.context, **tally.counts, interval_s=self.interval)
        tally.counts = {}
        tally.logged_at = now


class _Tally:
    __slots__ = ("context", "counts", "logged_at")

    def __init__(self, context: dict[str, Any]) -> None:
        self.context = context
        self.counts: dict[str, int] = {}
        self.logged_at: float | None = None
