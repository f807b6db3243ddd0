"""Locust swarm for chat-svc (``locust -f loadtest``) and its capacity sweep.

The sweep runs as ``python -m loadtest._sweep``.

Locust loads every ``.py`` here whose name does not start with ``_``; only ``chat.py`` is a
locustfile, the rest are helpers.
"""
