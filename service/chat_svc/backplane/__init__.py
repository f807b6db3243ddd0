"""Redis backplane: several chat-svc instances behind one TCP load balancer share rooms.

Why Redis pub/sub rather than a cluster protocol of our own: it is the engine
Centrifugo, Socket.IO and Flask-SocketIO scale out on, operators already know
how to run and watch it, and Redis Cluster's sharded pub/sub is the road
beyond one Redis.  The service imports this package (and redis) only with
``--redis-url``; without it the service stays a single process with
in-memory rooms.

The parts, along the backplane's own seams:

- ``keys``: key names, Lua scripts and the message envelope (pure);
- ``connection``: pools, time limits and the errors that mean Redis is away;
- ``publisher``: the one greenlet that writes lines and presence, in order;
- ``subscriber``: the one greenlet that reads, and decides the backplane is up;
- ``directory``: /nick, /msg, /who and /rooms across the cluster;
- ``front``: ``RedisBackplane``, the hub's hooks, the directory and metrics.

Redis outage, at-most-once (as Centrifugo with NATS): delivery inside each
instance goes on untouched; lines published while the backplane is down are
delivered locally and never relayed, neither later nor into the Redis
history (counted in ``chat_backplane_publish_errors_total{reason="down"}``).
Nothing is buffered for replay, so memory stays bounded whatever the outage
length.  /who, /rooms, /msg and nick claims fall back to this instance's
view.  Once Redis is back, the subscriber resubscribes and the publisher
rewrites this instance's presence, so cross-instance fan-out resumes without
restarting anything.  ``/readyz`` says "backplane down"; it answers 503 only
with ``--ready-requires-backplane true`` (not the default: docs/scaling.md).
"""

from .front import RedisBackplane

__all__ = ["RedisBackplane"]
