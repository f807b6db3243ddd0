"""Locustfile for chat-svc: ``locust -f loadtest --host tcp://127.0.0.1:9009``.

Only re-exports ``ChatUser``; the user, its options and the fan-out judge live in
``loadtest/_swarm.py`` (a ``_`` name, so Locust does not load it as a second locustfile).
"""

import sys
from pathlib import Path

# Locust puts this directory (not the repo root) on sys.path; make `loadtest` importable
# as a package wherever locust is started from.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from loadtest._swarm import ChatUser  # noqa: E402

__all__ = ["ChatUser"]
