"""Several chat-svc instances on one real redis-server, for the tests that cross instances."""

from __future__ import annotations

from collections.abc import Callable

from _chat import LineClient, ServerProcess, wait_for
from _redis import RedisServer

Start = Callable[..., ServerProcess]


def readyz(srv: ServerProcess) -> tuple[int, str]:
    status, body, _ = srv.get("/readyz")
    return status, body


def metrics(srv: ServerProcess) -> dict[str, float]:
    return srv.scrape()


def wait_ready(srv: ServerProcess, timeout: float = 10.0) -> None:
    wait_for(lambda: readyz(srv)[0] == 200, timeout, f"/readyz 200 on :{srv.port}")


def cluster(chat_server: Start, redis: RedisServer, count: int, *args: str) -> list[ServerProcess]:
    servers = [chat_server("--redis-url", redis.url, "--flood-rate", "0", *args) for _ in range(count)]
    for srv in servers:
        wait_ready(srv)
        # /readyz is 200 before the backplane is up with --ready-requires-backplane false;
        # a member joining then is local-only until the first connect resubscribes.
        wait_for(lambda srv=srv: metrics(srv)["chat_backplane_up"] == 1, 10, f"backplane up on :{srv.port}")
    return servers


def joined(srv: ServerProcess, nick: str, room: str) -> LineClient:
    """A member in ``room`` whose join has fully completed on its instance.

    The session answers "you joined" before the hub moves the member; commands
    run in order, so the /who answer proves the move (and its subscription) is done.
    """
    client = srv.member(nick, room)
    client.send("/who")
    client.expect(f"* in {room} ")
    return client
