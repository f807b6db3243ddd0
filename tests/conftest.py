"""A real server process on a free port, and a line client to talk to it."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# A shell that starts a job in the background (`.ci/run &`, nohup, some CI
# runners) makes it ignore SIGINT, and an ignored signal stays ignored in every
# child: the Ctrl-C tests of chat-client and locust would then hang.  A handled
# signal resets to the default in children, so handle it here.
signal.signal(signal.SIGINT, signal.default_int_handler)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# The address the readiness check connects from: the server counts every connection per
# address from accept, and the check's must not take a place (or a connect token) from
# the tests' clients on 127.0.0.1 while the server has not noticed it closed yet.
PROBE_SOURCE = "127.0.0.99"


def wait_port(
    host: str, port: int, timeout: float = 10.0, proc: subprocess.Popen[bytes] | None = None, source: str | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.5, source_address=(source, 0) if source else None):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port}")


class LineClient:
    """A raw-socket chat client that reads whole lines, for assertions."""

    def __init__(self, host: str, port: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.timeout = timeout
        self._buffer = b""

    def send(self, text: str | bytes) -> None:
        data = text.encode() if isinstance(text, str) else text
        if not data.endswith(b"\n"):
            data += b"\n"
        self.sock.sendall(data)

    def recv_line(self, timeout: float | None = None) -> str:
        """The next line without its newline; raises TimeoutError or EOFError."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no line within timeout; partial {self._buffer[:200]!r}")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                raise EOFError(f"connection closed; partial {self._buffer[:200]!r}")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode("utf-8", "replace")

    def expect(self, prefix: str, timeout: float | None = None) -> str:
        """Skip lines until one starts with ``prefix``; return it."""
        return self._expect(lambda line: line.startswith(prefix), prefix, timeout)

    def expect_re(self, pattern: str, timeout: float | None = None) -> str:
        """Skip lines until one matches the regex ``pattern`` (re.search); return it."""
        compiled = re.compile(pattern)
        return self._expect(lambda line: compiled.search(line) is not None, pattern, timeout)

    def _expect(self, match: Callable[[str], bool], what: str, timeout: float | None) -> str:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        seen = []
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = self.recv_line(max(remaining, 0.001))
            except (TimeoutError, EOFError) as exc:
                raise AssertionError(f"expected {what!r}; saw {seen!r} ({exc})") from exc
            if match(line):
                return line
            seen.append(line)

    def lines_for(self, seconds: float) -> list[str]:
        """Every line that arrives within ``seconds``."""
        lines = []
        deadline = time.monotonic() + seconds
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return lines
            try:
                lines.append(self.recv_line(remaining))
            except (TimeoutError, EOFError):
                return lines

    def join(self, nick: str | None = None, room: str | None = None) -> LineClient:
        """Wait for the welcome, then set nick and room and wait for the answers."""
        self.expect("* welcome")
        if nick:
            self.send(f"/nick {nick}")
            self.expect_re(f"is now known as {re.escape(nick)}$")
        if room:
            self.send(f"/join {room}")
            self.expect(f"* you joined {room}")
        return self

    def closed(self, timeout: float = 5.0) -> bool:
        """True once the server has closed the connection (lines before EOF are dropped)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.recv_line(deadline - time.monotonic())
            except EOFError:
                return True
            except TimeoutError:
                return False
            except OSError:
                return True
        return False

    def close(self) -> None:
        self.sock.close()


class ServerProcess:
    """A chat-svc process started with the given flags on a free port.

    ``prefix`` runs it under another command, e.g. ``("prlimit", "--nofile=700")``.
    """

    def __init__(
        self,
        args: tuple[str, ...],
        env: dict[str, str] | None = None,
        port: int | None = None,
        prefix: tuple[str, ...] = (),
    ) -> None:
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.metrics_port: int | None = None
        argv = [*prefix, sys.executable, "-m", "chat_svc", "--host", self.host, "--port", str(self.port), *args]
        if "--metrics-port" in args:
            self.metrics_port = int(args[args.index("--metrics-port") + 1])
        if "--log-format" not in args:
            argv += ["--log-format", "json"]
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"chat-svc-{self.port}-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        full_env = {**os.environ, **(env or {})}
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=full_env)
        self.clients: list[LineClient] = []
        wait_port(self.host, self.port, proc=self.proc, source=PROBE_SOURCE)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def connect(self, timeout: float = 5.0) -> LineClient:
        client = LineClient(self.host, self.port, timeout)
        self.clients.append(client)
        return client

    def member(self, nick: str | None = None, room: str | None = None) -> LineClient:
        """A connected client that has been welcomed (and renamed / moved)."""
        client = self.connect()
        client.send(f"/nick {nick}" if nick else "/help")
        client.expect("* welcome")
        if nick:
            client.expect_re(f"is now known as {re.escape(nick)}$")
        else:
            client.expect("* commands")
        if room:
            client.send(f"/join {room}")
            client.expect(f"* you joined {room}")
        return client

    def log_text(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.proc.send_signal(signum)

    def stop(self) -> int | None:
        for client in self.clients:
            client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture
def chat_server() -> Iterator[Callable[..., ServerProcess]]:
    """Factory: ``chat_server("--history", "5")`` starts a real server; all stop at teardown."""
    started: list[ServerProcess] = []

    def start(
        *args: str, env: dict[str, str] | None = None, port: int | None = None, prefix: tuple[str, ...] = ()
    ) -> ServerProcess:
        server = ServerProcess(tuple(args), env=env, port=port, prefix=prefix)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


# ----------------------------------------------------------------------------- redis (issue 5)
# Appended for the Redis backplane tests; the process wrapper lives in tests/_redis.py.

from _redis import RedisServer  # noqa: E402


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server on a free loopback port; fails under CI=true if missing, skips elsewhere.

    ``.url``, ``.kill()`` (SIGKILL), ``.start()`` (again, on the same port), ``.stop()``.
    """
    server = RedisServer()
    yield server
    server.stop()
