"""The one set of helpers for talking to real chat-svc processes from tests.

Tests and other helper modules import from here, never from test files or conftest.py:
``free_port``/``wait_port``/``wait_for`` for bounded waiting, ``get``/``scrape`` for the
HTTP side (Prometheus text is parsed by ``prometheus_client.parser`` and nothing else),
``LineClient`` for the chat side and ``ServerProcess`` for the server itself.

A ``ServerProcess`` checks itself when it is done (``problems()``): exit status 0 and no
sign of a server-side bug in its log.  A bug in one session, one fan-out pass or the
shutdown is logged and survived by design, so without this check a broken server would
still pass the test that drove it into the bug.  A test that means to provoke one of
these says so first with ``expect_exit`` / ``expect_log`` / ``kill``.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import re
import select
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from _require import require_binary
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

ROOT = Path(__file__).resolve().parent.parent

# Signs of a bug the server survives: the events it logs with the exception, and a bare
# traceback (an exception that escaped a greenlet, printed by gevent to stderr).
BUG_EVENTS = ("session_failed", "fanout_failed", "shutdown_failed", "Traceback")
LOG_TAIL_LINES = 40

_log_numbers = itertools.count(1)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# The address ServerProcess's readiness check connects from: the server counts every
# connection per address from accept, and the check's must not take a place (or a connect
# token) from the tests' clients on 127.0.0.1 while the server has not noticed it closed yet.
PROBE_SOURCE = "127.0.0.99"


def terminate(proc: subprocess.Popen[Any], timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds; reaped either way."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


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


def wait_for(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.05) -> float:
    """Poll ``condition`` until it is truthy; the seconds it took.  The stand-in for a sleep."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(interval)
    return time.monotonic() - start


# ----------------------------------------------------------------------------- HTTP side


def get(
    port: int,
    path: str,
    method: str = "GET",
    *,
    host: str = "127.0.0.1",
    context: ssl.SSLContext | None = None,
    timeout: float = 5.0,
) -> tuple[int, str, dict[str, str]]:
    """(status, body, headers) of one request; https when a TLS ``context`` is given."""
    scheme = "https" if context is not None else "http"
    request = urllib.request.Request(f"{scheme}://{host}:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            return response.status, response.read().decode(), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(), dict(error.headers)


def metric_samples(text: str) -> list[Sample]:
    """Every sample line of an exposition (``name`` as written, e.g. with ``_total``/``_bucket``)."""
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def parse_metrics(text: str) -> dict[str, float]:
    """Samples keyed ``name`` or ``name{label=value,...}`` (labels sorted, values unquoted)."""
    samples = {}
    for sample in metric_samples(text):
        labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
        samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def scrape(port: int, *, context: ssl.SSLContext | None = None) -> dict[str, float]:
    """GET /metrics the way Prometheus does, checking the exposition's content type."""
    status, body, headers = get(port, "/metrics", context=context)
    assert status == 200, (status, body)
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4"), headers
    return parse_metrics(body)


def prometheus_api(port: int, path: str, **params: str) -> Any:
    """The ``data`` of a Prometheus server's ``/api/v1/<path>`` answer, which must be a success.

    Raises ``OSError`` (urllib's errors) while that server is not up yet, for callers that poll.
    """
    url = f"http://127.0.0.1:{port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=5) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]


def delta(before: dict[str, float], after: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def tls_client_context(cert: Path | str) -> ssl.SSLContext:
    """Trusts exactly ``cert`` (self-signed, CN=localhost) when connecting by IP address."""
    context = ssl.create_default_context(cafile=str(cert))
    context.check_hostname = False
    return context


def make_cert(directory: Path) -> tuple[Path, Path]:
    """A self-signed CA certificate for localhost and 127.0.0.1, and its key.

    The subjectAltName lets a client that checks host names (chat-client without
    --insecure) trust it as a CA.  openssl; fails under CI=true when it is missing.
    """
    openssl = require_binary("openssl")
    cert, key = directory / "cert.pem", directory / "key.pem"
    argv = [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"]
    subprocess.run([*argv, "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


# ----------------------------------------------------------------------------- chat side


class LineClient:
    """A raw-socket chat client that reads whole lines, for assertions."""

    def __init__(
        self,
        host: str,
        port: int,
        timeout: float = 5.0,
        context: ssl.SSLContext | None = None,
        source: str | None = None,
    ) -> None:
        """``source`` connects from another local address (127.0.0.2 stands in for another client IP)."""
        sock = socket.create_connection((host, port), timeout=timeout, source_address=(source, 0) if source else None)
        self.sock = context.wrap_socket(sock) if context is not None else sock
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
            self._fill(remaining)
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode("utf-8", "replace")

    def _fill(self, timeout: float) -> None:
        """Add what arrives within ``timeout`` to the buffer; EOFError once the server closed."""
        self.sock.settimeout(timeout)
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            return
        except ConnectionResetError as exc:
            raise EOFError(f"connection reset; partial {self._buffer[:200]!r}") from exc
        if not chunk:
            raise EOFError(f"connection closed; partial {self._buffer[:200]!r}")
        self._buffer += chunk

    def expect(self, prefix: str, timeout: float | None = None) -> str:
        """Skip lines until one starts with ``prefix``; return it."""
        __tracebackhide__ = True
        return self.read_until(prefix, timeout)[-1]

    def expect_re(self, pattern: str, timeout: float | None = None) -> str:
        """Skip lines until one matches the regex ``pattern`` (re.search); return it."""
        __tracebackhide__ = True
        return self.read_until_re(pattern, timeout)[-1]

    def read_until(self, prefix: str, timeout: float | None = None) -> list[str]:
        """Every line up to and including the first that starts with ``prefix``."""
        __tracebackhide__ = True
        return self._read_until(lambda line: line.startswith(prefix), prefix, timeout)

    def read_until_re(self, pattern: str, timeout: float | None = None) -> list[str]:
        """Every line up to and including the first that matches the regex ``pattern`` (re.search)."""
        __tracebackhide__ = True
        compiled = re.compile(pattern)
        return self._read_until(lambda line: compiled.search(line) is not None, pattern, timeout)

    def _read_until(self, match: Callable[[str], bool], what: str, timeout: float | None) -> list[str]:
        __tracebackhide__ = True
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        seen = []
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = self.recv_line(max(remaining, 0.001))
            except (TimeoutError, EOFError) as exc:
                raise AssertionError(f"expected {what!r}; saw {seen[-50:]!r} ({exc})") from exc
            seen.append(line)
            if match(line):
                return seen

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

    def lines_until_closed(self, timeout: float = 5.0) -> list[str]:
        """Every line the server sent before it closed the connection (the last is its reason).

        Fails when the connection is still open after ``timeout``.
        """
        lines = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                lines.append(self.recv_line(max(deadline - time.monotonic(), 0.001)))
            except EOFError:
                return lines
            except TimeoutError as exc:
                raise AssertionError(f"still open after {timeout}s; lines so far {lines[-20:]!r}") from exc
            except OSError:
                return lines

    def closed(self, timeout: float = 5.0) -> bool:
        """True once the server has closed the connection; ``lines_until_closed`` keeps the lines."""
        try:
            self.lines_until_closed(timeout)
        except AssertionError:
            return False
        return True

    def close(self) -> None:
        self.sock.close()


# ----------------------------------------------------------------------------- server side


class LogPipe:
    """A server's output through a pipe the test can stop draining.

    A process whose log writes go to a pipe nobody reads blocks in write(2): its whole
    event loop stops, as when a container's log collector hangs.  That is the one real
    way to stall a running server from outside.  ``hold()`` stops copying the pipe to
    the log file and fills it, so the server's next log line blocks; ``release()``
    copies again (the filler is dropped).
    """

    def __init__(self, sink: BinaryIO) -> None:
        self._read, self.write_fd = os.pipe()
        fcntl.fcntl(self._read, fcntl.F_SETPIPE_SZ, 4096)  # one page: little filler needed
        self.capacity = fcntl.fcntl(self._read, fcntl.F_GETPIPE_SZ)
        self._sink = sink
        self._cond = threading.Condition()
        self._held = False
        self._parked = False
        self._filler = 0
        self._thread = threading.Thread(target=self._copy, daemon=True)
        self._thread.start()

    def _copy(self) -> None:
        while True:
            with self._cond:
                while self._held:
                    self._parked = True
                    self._cond.notify_all()
                    self._cond.wait()
                self._parked = False
            if select.select([self._read], [], [], 0.05)[0] and not self._drain_once():
                os.close(self._read)
                return

    def _drain_once(self) -> bool:
        data = os.read(self._read, 65536)
        if not data:
            return False
        skip = min(self._filler, len(data))
        self._filler -= skip
        self._sink.write(data[skip:])
        self._sink.flush()
        return True

    def hold(self) -> None:
        """Stop draining and fill the pipe.  Only while the server is SIGSTOPped or silent."""
        with self._cond:
            self._held = True
            while not self._parked:
                self._cond.wait()
        while select.select([self._read], [], [], 0)[0] and self._drain_once():
            pass
        self._filler += os.write(self.write_fd, b"#" * self.capacity)

    def release(self) -> None:
        with self._cond:
            self._held = False
            self._cond.notify_all()

    def close(self) -> None:
        """Once the server has exited: copy the rest and stop."""
        self.release()
        os.close(self.write_fd)
        self._thread.join(10)


class ServerProcess:
    """A chat-svc process started with the given flags, on a free port unless one is given.

    Its output (JSON logs) goes to a file in ``log_dir`` (pytest's tmp_path from the
    fixture); with ``log_pipe`` through a ``LogPipe`` (``self.log_pipe``) on the way.
    ``wait=False`` returns without waiting for the port, for a server that is expected
    to fail at start-up.  ``prefix`` runs it under another command, e.g.
    ``("prlimit", "--nofile=700")``.
    """

    def __init__(
        self,
        args: Sequence[str],
        env: dict[str, str] | None = None,
        port: int | None = None,
        log_dir: Path | None = None,
        wait: bool = True,
        log_pipe: bool = False,
        prefix: Sequence[str] = (),
    ) -> None:
        args = tuple(args)
        self.host = "127.0.0.1"
        # Without a port to use, the server binds port 0 and says which one it got
        # (server_started): a port picked here and bound later can be taken in between
        # by anything else on the machine that connects or listens.
        learn_port = port is None and wait and "--log-format" not in args
        self.port = port or (0 if learn_port else free_port())
        self.metrics_port: int | None = None
        if "--metrics-port" in args:
            self.metrics_port = int(args[args.index("--metrics-port") + 1])
        self.tls_context: ssl.SSLContext | None = None
        if "--tls-cert" in args:
            self.tls_context = tls_client_context(args[args.index("--tls-cert") + 1])
        argv = [*prefix, sys.executable, "-m", "chat_svc", "--host", self.host, "--port", str(self.port), *args]
        if "--log-format" not in args:
            argv += ["--log-format", "json"]
        for drain in ("--drain-delay", "--drain-spread"):  # a test's teardown need not wait out a drain
            if drain not in args:
                argv += [drain, "0"]
        directory = log_dir if log_dir is not None else Path(tempfile.gettempdir())
        self.log_path = directory / f"chat-svc-{next(_log_numbers)}-{self.port}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        self.log_pipe = LogPipe(self._log) if log_pipe else None
        stdout = self.log_pipe.write_fd if self.log_pipe is not None else self._log
        self.proc = subprocess.Popen(argv, stdout=stdout, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        self.clients: list[LineClient] = []
        self.expected_exit = 0
        self.expected_events: set[str] = set()
        self.killed = False
        self.draining = False  # the test sent SIGTERM or SIGINT itself
        self.stop_timed_out = False
        if learn_port:
            started = self._started()
            self.port = int(str(started["address"]).rpartition(":")[2])
            if self.metrics_port == 0:
                self.metrics_port = int(str(started["metrics_port"]))
        if wait:
            wait_port(self.host, self.port, proc=self.proc, source=PROBE_SOURCE)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _started(self, timeout: float = 15.0) -> dict[str, object]:
        """The ``server_started`` event: the ports bound (port 0 = the kernel's choice)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.log_events():
                if event.get("event") == "server_started":
                    return event
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}\n{self.log_tail()}")
            time.sleep(0.02)
        raise TimeoutError(f"no server_started within {timeout}s\n{self.log_tail()}")

    # -- what the test expects of it --------------------------------------

    def expect_exit(self, code: int) -> None:
        """The exit status this test expects instead of 0."""
        self.expected_exit = code

    def expect_log(self, *events: str) -> None:
        """Bug signs (``BUG_EVENTS``, or any event logged with an exception) this test provokes on purpose."""
        self.expected_events.update(events)

    # -- talking to it ----------------------------------------------------

    def connect(self, timeout: float = 5.0, tls: bool | None = None) -> LineClient:
        """A new connection; over TLS when the server serves TLS, unless ``tls=False``."""
        use_tls = self.tls_context is not None if tls is None else tls
        client = LineClient(self.host, self.port, timeout, self.tls_context if use_tls else None)
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

    def get(self, path: str, method: str = "GET") -> tuple[int, str, dict[str, str]]:
        """An HTTP request on the chat port (over TLS when it serves TLS)."""
        return get(self.port, path, method, host=self.host, context=self.tls_context)

    def scrape(self) -> dict[str, float]:
        """/metrics on the chat port, parsed."""
        return scrape(self.port, context=self.tls_context)

    def log_text(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def log_events(self) -> list[dict[str, object]]:
        """The JSON log lines, parsed (anything else the process printed is skipped)."""
        events = []
        for line in self.log_text().splitlines():
            if line.startswith("{"):
                try:
                    events.append(json.loads(line))
                except ValueError:
                    continue
        return events

    def wait_log(self, event: str, timeout: float = 10.0) -> dict[str, object]:
        """The first log event named ``event``, once it has been written."""
        found: list[dict[str, object]] = []

        def logged() -> bool:
            found[:] = [e for e in self.log_events() if e.get("event") == event]
            return bool(found)

        wait_for(logged, timeout, f"log event {event!r} on :{self.port}\n{self.log_tail()}")
        return found[0]

    def log_tail(self, lines: int = LOG_TAIL_LINES, width: int = 400) -> str:
        return "\n".join(line[:width] for line in self.log_text().splitlines()[-lines:])

    def rss_kb(self, field: str = "VmRSS") -> int:
        """Resident memory (``VmHWM`` for its peak so far)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
        raise RuntimeError(f"no {field}")

    # -- stopping it ------------------------------------------------------

    def signal(self, signum: int = signal.SIGTERM) -> None:
        if signum == signal.SIGKILL:
            self.killed = True
        if signum in (signal.SIGTERM, signal.SIGINT):
            self.draining = True
        self.proc.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL, and wait: the exit status is then not the server's to answer for."""
        self.signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int | None:
        """SIGTERM and wait (SIGKILL after 10 s); the exit status."""
        for client in self.clients:
            client.close()
        if self.draining:  # the test signalled it: let its drain end (another signal would cut it short, status 1)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.stop_timed_out = True
                self.proc.kill()
                self.proc.wait()
        if self.log_pipe is not None:
            self.log_pipe.close()
            self.log_pipe = None
        self._log.close()
        return self.proc.returncode

    def problems(self) -> list[str]:
        """What is wrong with how this (stopped) server ended; empty when all is well."""
        found = []
        if self.stop_timed_out:
            found.append("did not exit within 10 s of SIGTERM (killed)")
        code = self.proc.returncode
        if not (self.killed and code == -signal.SIGKILL) and code != self.expected_exit:
            found.append(f"exit status {code}, expected {self.expected_exit} (declare others with expect_exit)")
        for line in self.log_text().splitlines():
            sign = self._bug_sign(line)
            if sign is not None and sign not in self.expected_events:
                found.append(f"logged {sign!r} (declare it with expect_log if the test provokes it): {line[:300]}")
        if not found:
            return []
        return [f"chat-svc on :{self.port} ({self.log_path}):\n  " + "\n  ".join(found) + "\n"
                f"--- last {LOG_TAIL_LINES} log lines ---\n{self.log_tail()}"]

    @staticmethod
    def _bug_sign(line: str) -> str | None:
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if isinstance(record, dict):
                event = str(record.get("event"))
                return event if event in BUG_EVENTS or "exception" in record else None
        return next((sign for sign in BUG_EVENTS if sign in line), None)


def pump(sock: socket.socket, data: bytes, chunk: int = 1 << 16, pause: float = 0.0) -> threading.Thread:
    """Write ``data`` from a thread (``pause`` s between chunks) until done or cut off."""

    def run() -> None:
        view = memoryview(data)
        try:
            for offset in range(0, len(view), chunk):
                sock.sendall(view[offset : offset + chunk])
                time.sleep(pause)
        except OSError:
            pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread
