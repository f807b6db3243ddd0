"""Fixtures only: real chat-svc and redis-server processes.  The helpers live in _chat.py."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from _chat import ServerProcess
from _redis import RedisServer

# A shell that starts a job in the background (`.ci/run &`, nohup, some CI
# runners) makes it ignore SIGINT, and an ignored signal stays ignored in every
# child: the Ctrl-C tests of chat-client and locust would then hang.  A handled
# signal resets to the default in children, so handle it here.
signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def chat_server(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Factory: ``chat_server("--history", "5")`` starts a real server; all stop at teardown.

    At teardown each server must have exited 0 (or as declared with ``srv.expect_exit``,
    or been killed with ``srv.kill()``) and logged no bug sign (``_chat.BUG_EVENTS`` or an
    exception) beyond those declared with ``srv.expect_log``; otherwise the test errors
    with the server's log tail.  Logs are kept in the test's tmp_path.
    """
    started: list[ServerProcess] = []

    def start(
        *args: str,
        env: dict[str, str] | None = None,
        port: int | None = None,
        wait: bool = True,
        log_pipe: bool = False,
        prefix: tuple[str, ...] = (),
    ) -> ServerProcess:
        server = ServerProcess(
            args, env=env, port=port, log_dir=tmp_path, wait=wait, log_pipe=log_pipe, prefix=prefix
        )
        started.append(server)
        return server

    yield start
    problems = []
    for server in started:
        server.stop()
        problems += server.problems()
    if problems:
        pytest.fail("\n\n".join(problems), pytrace=False)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server on a free loopback port; fails under CI=true if missing, skips elsewhere.

    ``.url``, ``.kill()`` (SIGKILL), ``.start()`` (again, on the same port), ``.stop()``.
    """
    server = RedisServer()
    yield server
    server.stop()
