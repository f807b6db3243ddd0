"""chat-svc benchmark: chat-svc side by side with the seed, the machine's C limit and ngircd.

    python -m bench              # full run, writes bench/results/full.json
    python -m bench --quick      # one run per point, shorter search
    python -m bench --smoke      # a few seconds per server, correctness only (tests/test_bench_smoke.py)

Each measurement starts a fresh server pinned to core 1 (`taskset -c 1`) and drives it with
bench/chatload.c (compiled here with gcc) pinned to core 0. The generator samples the server's
CPU and RSS from /proc, its own CPU with getrusage and the per-core busy time from /proc/stat,
so every run also says how much CPU *other* processes took on the two cores (the machine may be
shared). Runs disturbed by other load are repeated; tables quote medians.

Servers (``--servers``):
  chat-svc  this project (or ``--snapshot REV``: service/ as committed at REV)
  seed      the tutorial server chat-svc started from (bench/seed_server.py)
  c-epoll   bench/broadcaster.c: a minimal C epoll broadcaster that coalesces writes, the
            machine's limit for a line relay; ratios against it say how close chat-svc comes
  ngircd    a real IRC server (Debian package ngircd) driven with chatload --protocol irc

Scenarios (flood control off, 64-byte lines, all members in one room unless said):
  fanout    1000 members all sending at 100/300/1000/2000/3000 msg/s in total
  search    largest rate with p99 <= 50 ms and 0 loss, for every server; ratios
  idle      19,000 idle members, one broadcast reaching every one; RSS per member
  redis     two chat-svc instances sharing the room through a local redis-server
  shards    two instances, 1000 members in 10 rooms, one Redis against a 3-master Redis Cluster
            started here: deliveries, p99, loss, and the CPU of every chat-svc and redis-server
  profile   py-spy on chat-svc at 2000 msg/s: where the server's Python time goes
  crosscheck  (with --crosscheck-loadgen PATH) the same points measured by an
            independent load generator, to compare with chatload

Modules: machine (the host, its cores, pinning), generator (building and running the C load
generators), servers (server processes, their exit and log checks, Prometheus scrapes), measure
(one typed Run per measurement, medians per point), scenarios, shards (the shards scenario),
rediscluster (a Redis Cluster on loopback, shared with the tests), report, __main__.
"""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent


def log(msg: str) -> None:
    """Progress goes to stderr, so stdout carries only the report."""
    print(msg, file=sys.stderr, flush=True)
