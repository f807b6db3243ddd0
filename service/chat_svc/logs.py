"""Structured logging setup: JSON lines for machines, colours for people.

Per-connection context (conn_id, peer) is bound with structlog.contextvars;
each greenlet has its own context, so a binding made in one connection's
greenlet never leaks into another's.  The level filter is applied when the
logger is built, so a filtered-out ``debug`` call costs one no-op call.
"""

from __future__ import annotations

import logging
import sys
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

