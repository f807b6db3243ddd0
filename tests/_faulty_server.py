"""A tiny chat server speaking chat-svc's line protocol that drops or repeats deliveries on purpose.

Why: the swarm's loss/duplicate checks must be shown to *fail* when the server misbehaves,
and the real server has no fault switch. This fixture implements just what the swarm
uses (welcome line, ``[nick] text`` relay to the other room members, /nick, /join, /msg,
/quit, ``! error`` for unknown commands) and, with ``--drop-every N``, silently skips
every Nth delivery of a chat line (``--dup-every N`` sends every Nth one twice).

Run: ``python tests/_faulty_server.py --port 0 --drop-every 50``; it prints
``LISTENING <port>`` once ready, and ``STATS dropped=.. duplicated=.. relayed=..`` on
SIGTERM/SIGINT. Standalone on purpose: it imports nothing from the project.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import socket
import sys

import gevent
import gevent.event
from gevent.server import StreamServer


class Hub:
    """All rooms and clients, plus the fault counters."""

    def __init__(self, drop_every: int, dup_every: int) -> None:
        self.drop_every = drop_every
        self.dup_every = dup_every
        self.rooms: dict[str, set[Client]] = {}
        self.nicks: dict[str, Client] = {}
        self.n = 0
        self.dropped = 0
        self.duplicated = 0
        self.relayed = 0

    def deliver(self, target: Client, line: str) -> None:
        """Send a chat line to one member, applying the configured faults."""
        self.n += 1
        if self.drop_every and self.n % self.drop_every == 0:
            self.dropped += 1
            return
        self.relayed += 1
        target.send(line)
        if self.dup_every and self.n % self.dup_every == 0:
            self.duplicated += 1
            target.send(line)


class Client:
    """One connection."""

    def __init__(self, hub: Hub, sock, addr) -> None:  # type: ignore[no-untyped-def]
        self.hub = hub
        self.sock = sock
        self.nick = f"{addr[0]}:{addr[1]}"
        self.room = "lobby"

    def send(self, line: str) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall((line + "\n").encode())

    def to_room(self, line: str, include_self: bool = False) -> None:
        for c in list(self.hub.rooms.get(self.room, ())):
            if include_self or c is not self:
                c.send(line)

    def handle(self, text: str) -> bool:
        """Process one input line; False means close the connection."""
        hub = self.hub
        if not text.startswith("/"):
            for c in list(hub.rooms.get(self.room, ())):
                if c is not self:
                    hub.deliver(c, f"[{self.nick}] {text}")
            return True
        cmd, _, arg = text.partition(" ")
        arg = arg.strip()
        if cmd == "/quit":
            return False
        if cmd == "/nick" and arg:
            if arg in hub.nicks:
                self.send(f"! nick {arg} is taken")
                return True
            hub.nicks.pop(self.nick, None)
            self.to_room(f"* {self.nick} is now known as {arg}", include_self=True)
            self.nick = arg
            hub.nicks[arg] = self
        elif cmd == "/join" and arg:
            self.leave()
            self.room = arg
            hub.rooms.setdefault(arg, set()).add(self)
            self.to_room(f"* {self.nick} joined {arg}", include_self=True)
        elif cmd == "/msg" and " " in arg:
            to, _, body = arg.partition(" ")
            target = hub.nicks.get(to)
            if target is None:
                self.send(f"! no such nick {to}")
            else:
                target.send(f"[{self.nick} -> {to}] {body}")
                if target is not self:
                    self.send(f"[{self.nick} -> {to}] {body}")
        else:
            self.send(f"! unknown command {cmd}")
        return True

    def leave(self) -> None:
        members = self.hub.rooms.get(self.room)
        if members and self in members:
            members.discard(self)
            self.to_room(f"* {self.nick} left {self.room}")


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM/SIGINT, then print the fault counters."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--drop-every", type=int, default=0)
    ap.add_argument("--dup-every", type=int, default=0)
    opts = ap.parse_args(argv)
    hub = Hub(opts.drop_every, opts.dup_every)

    def serve(sock, addr) -> None:  # type: ignore[no-untyped-def]
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c = Client(hub, sock, addr)
        hub.nicks[c.nick] = c
        hub.rooms.setdefault(c.room, set()).add(c)
        c.send(f"* welcome to chat-svc, you are {c.nick} in {c.room}; type /help")
        buf = b""
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                buf += data
                *lines, buf = buf.split(b"\n")
                if not all(c.handle(ln.rstrip(b"\r").decode("utf-8", "replace")) for ln in lines):
                    break
        except OSError:
            pass
        finally:
            c.leave()
            hub.nicks.pop(c.nick, None)
            sock.close()

    server = StreamServer((opts.host, opts.port), serve)
    server.start()
    print(f"LISTENING {server.server_port}", flush=True)
    stop = gevent.event.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(sig, stop.set)
    stop.wait()
    server.stop(timeout=1)
    stats = f"dropped={hub.dropped} duplicated={hub.duplicated} relayed={hub.relayed}"
    print(f"STATS {stats}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
