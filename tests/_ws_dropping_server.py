"""chat-svc with one planted fault: every Nth buffer of swarm lines to a WebSocket member is dropped.

Why: the swarm must be shown to *fail* when WebSocket members miss lines that TCP members
get. This is the real server (same command line) with its WebSocket outbox patched:
``python tests/_ws_dropping_server.py --drop-every N -- <chat-svc flags>``. Only buffers
holding the swarm's probe lines (``[nick] lt <seq> ...``) are dropped, so joins still work.
"""

from __future__ import annotations

import argparse
import itertools
import sys

from chat_svc.__main__ import main
from chat_svc.ws import stream


def plant(every: int) -> None:
    count = itertools.count(1)
    push = stream.WsOutbox.push

    def dropping_push(self: stream.WsOutbox, data: bytes) -> None:
        if b"] lt " in data and next(count) % every == 0:
            return
        push(self, data)

    stream.WsOutbox.push = dropping_push  # type: ignore[method-assign]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drop-every", type=int, required=True)
    parser.add_argument("server_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    plant(args.drop_every)
    sys.argv = ["chat-svc", *[a for a in args.server_args if a != "--"]]
    main()
