"""Locustfile for chat-svc: ``locust -f loadtest --host tcp://127.0.0.1:9009``.

Only re-exports ``ChatUser``. Everything else lives in ``_`` modules, which Locust does
not load as locustfiles: ``_user`` (the User), ``_client`` (the line protocol, firing
request events), ``_options`` (flags and web form), ``_swarm`` (the run across Locust's
processes), ``_recorder``/``_ledger``/``_verdict`` (verification) and ``_webui``.
"""

import sys
from pathlib import Path

# Locust puts this directory (not the repo root) on sys.path; make `loadtest` importable
# as a package wherever locust is started from.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from loadtest._user import ChatUser  # noqa: E402

__all__ = ["ChatUser"]
