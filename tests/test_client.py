"""``chat-client`` against a real server: through a pipe, through a pty, TLS, reconnects.

The client is always run as a subprocess (the way users run it) and talks to a real chat-svc
process from the ``chat_server`` fixture; the other end of each conversation is a raw socket
client, so every assertion is about bytes that really crossed the loopback interface.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import ipaddress
import os
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from _streams import StreamWatcher
from chat_svc.client import encode_line, sanitize

ROOT = Path(__file__).resolve().parent.parent
CLIENT = [sys.executable, "-m", "chat_svc.client"]
WELCOME = re.compile(r"\* welcome to chat-svc, you are (\S+) in (?:room )?(\S+);")


def client_env(**extra: str) -> dict[str, str]:
    """Environment for client subprocesses: the source tree importable, no stray config."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "service"), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


class PipeClient:
    """chat-client with stdin, stdout and stderr as pipes: the scripted way to run it."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [*CLIENT, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=client_env(),
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.out = StreamWatcher(self.proc.stdout.fileno())
        self.err = StreamWatcher(self.proc.stderr.fileno())

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def close_stdin(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()

    def wait(self, timeout: float = 10.0) -> int:
        return self.proc.wait(timeout)

    def output(self) -> str:
        return f"stdout:\n{self.out.text!r}\nstderr:\n{self.err.text!r}"

    def nick(self) -> str:
        return self.out.wait_for(WELCOME).group(1)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


class PtyClient:
    """chat-client on a pseudo-terminal, with the pty as its controlling terminal.

    Being the controlling terminal matters: Ctrl-C typed on it must reach the client as
    SIGINT through the line discipline, exactly as on a real terminal.
    """

    def __init__(self, *args: str, inputrc: Path) -> None:
        self.master, slave = os.openpty()
        # Wide enough that nothing wraps: the assertions look at exact redraw sequences.
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 300, 0, 0))
        self.initial_attrs = termios.tcgetattr(slave)
        env = client_env(TERM="xterm", INPUTRC=str(inputrc), COLUMNS="300", LINES="50")
        self.proc = subprocess.Popen(
            [*CLIENT, *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            start_new_session=True,
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
        )
        os.close(slave)
        self.out = StreamWatcher(self.master)

    def output(self) -> str:
        return f"output:\n{self.out.text!r}"

    def type(self, data: bytes) -> None:
        os.write(self.master, data)

    def wait(self, timeout: float = 10.0) -> int:
        return self.proc.wait(timeout)

    def tty_attrs(self) -> list[Any]:
        # On Linux the master reports the attributes of the terminal the client sees.
        return termios.tcgetattr(self.master)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.out.wait_eof(5)
        os.close(self.master)


@pytest.fixture
def pipe_client() -> Any:
    """Factory for pipe-driven clients, all killed at teardown."""
    made: list[PipeClient] = []

    def make(*args: str) -> PipeClient:
        client = PipeClient(*args)
        made.append(client)
        return client

    yield make
    for client in made:
        client.kill()


@pytest.fixture
def pty_client(tmp_path: Path) -> Any:
    """Factory for pty-driven clients, all killed at teardown."""
    made: list[PtyClient] = []
    # Keep readline's output predictable: no bracketed-paste mode switches in the stream.
    inputrc = tmp_path / "inputrc"
    inputrc.write_text("set enable-bracketed-paste off\nset bell-style none\n")

    def make(*args: str) -> PtyClient:
        client = PtyClient(*args, inputrc=inputrc)
        made.append(client)
        return client

    yield make
    for client in made:
        client.kill()


def closed_port() -> int:
    """A loopback port with nothing listening on it (bound then released, never listened)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# --------------------------------------------------------------------------------- unit level


def test_sanitize_strips_controls_but_keeps_tab_and_text() -> None:
    assert sanitize("a\x1b[2Jb\x07c\x9b31m\td\x7fé✓") == "a[2Jbc31m\tdé✓"


def test_encode_line_terminates_and_passes_undecodable_bytes_through() -> None:
    assert encode_line("hi\r\n") == b"hi\n"
    raw = b"caf\xe9"  # Latin-1 on a UTF-8 stdin arrives as surrogate escapes
    assert encode_line(raw.decode("utf-8", "surrogateescape")) == raw + b"\n"


def test_client_does_not_import_gevent() -> None:
    code = "import sys, chat_svc.client; sys.exit('gevent' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], env=client_env(), timeout=30).returncode == 0


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "chat-client"
    if not script.exists():
        script_path = shutil.which("chat-client")
        assert script_path, "chat-client console script missing: pip install -e . first"
        script = Path(script_path)
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    assert "--reconnect" in result.stdout and "--tls" in result.stdout


def test_insecure_needs_tls() -> None:
    result = subprocess.run(
        [*CLIENT, "--insecure", "127.0.0.1", "1"],
        capture_output=True,
        text=True,
        env=client_env(),
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 2
    assert "--tls" in result.stderr


# ---------------------------------------------------------------------------------- pipe mode


def test_pipe_client_sends_and_receives(chat_server: Any, pipe_client: Any) -> None:
    srv = chat_server()
    peer = srv.connect()
    peer_nick = WELCOME.search(peer.expect("* welcome")).group(1)

    client = pipe_client(srv.host, str(srv.port))
    nick = client.nick()
    peer.expect(f"* {nick} joined lobby")

    client.send("hello from the pipe")
    peer.expect(f"[{nick}] hello from the pipe")

    peer.send("hello back, ünïcödé")
    client.out.wait_for(f"[{peer_nick}] hello back, ünïcödé\n")

    # End of input: the client sends /quit, prints until the server closes, exits 0.
    client.close_stdin()
    assert client.wait(10) == 0, client.output()
    peer.expect(f"* {nick} left lobby")
    assert "[Me]" not in client.out.text, "no prompt when stdin is not a terminal"
    assert "Traceback" not in client.err.text
    assert "Disconnected" not in client.err.text, "a requested /quit is not a disconnect"


def test_pipe_client_keeps_printing_after_end_of_input(chat_server: Any, pipe_client: Any) -> None:
    """A one-shot script (`printf '/who\\n' | chat-client`) gets the reply before exiting."""
    srv = chat_server()
    client = pipe_client(srv.host, str(srv.port))
    nick = client.nick()
    client.send("/nick scripted")
    client.send("/who")
    client.close_stdin()
    assert client.wait(10) == 0, client.output()
    # The reply to /who (a line naming us, after the rename notice) arrived after stdin ended.
    lines = client.out.text.splitlines()
    renamed = next(i for i, line in enumerate(lines) if line.endswith(f"{nick} is now known as scripted"))
    assert any("scripted" in line for line in lines[renamed + 1 :]), client.output()


def test_pipe_client_ctrl_c_exits_cleanly(chat_server: Any, pipe_client: Any) -> None:
    srv = chat_server()
    client = pipe_client(srv.host, str(srv.port))
    client.nick()
    client.proc.send_signal(signal.SIGINT)
    assert client.wait(10) == 0, client.output()
    assert "Traceback" not in client.err.text


def test_unable_to_connect_exits_1(pipe_client: Any) -> None:
    client = pipe_client("127.0.0.1", str(closed_port()))
    assert client.wait(10) == 1, client.output()
    assert "Unable to connect" in client.err.text
    assert "Traceback" not in client.err.text


def test_disconnected_when_server_stops(chat_server: Any, pipe_client: Any) -> None:
    srv = chat_server()
    client = pipe_client(srv.host, str(srv.port))
    client.nick()
    srv.stop()
    # stdin stays open: the client must notice the server on its own, not wait for input.
    client.err.wait_for("Disconnected from chat server")
    assert client.wait(10) == 1, client.output()
    assert "Traceback" not in client.err.text


def test_incoming_control_characters_are_stripped(pipe_client: Any) -> None:
    """Defence in depth: even a server that forgets to strip cannot drive the terminal."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)
        client = pipe_client("127.0.0.1", str(listener.getsockname()[1]))
        conn, _ = listener.accept()
        with conn:
            # OSC title change, bell, clear screen, a UTF-8 encoded C1 CSI, NUL, tab, CRLF.
            conn.sendall(b"evil \x1b]0;pwned\x07\x1b[2J\xc2\x9b31m\tend\x00!\r\nnext\n")
            client.out.wait_for("next\n")
    client.wait(10)
    assert "evil ]0;pwned[2J31m\tend!\nnext\n" in client.out.text
    assert not re.search("[\x00-\x08\x0b-\x1f\x7f-\x9f]", client.out.text)


def test_reconnect_after_server_restart(chat_server: Any, pipe_client: Any) -> None:
    token = "s3cret-token"
    srv = chat_server("--token", token)
    port = srv.port
    client = pipe_client("--reconnect", srv.host, str(port))
    client.send(f"/auth {token}")
    client.nick()
    client.send("/nick phoenix")
    client.out.wait_for("is now known as phoenix")
    before_restart = len(client.out.text)
    srv.stop()
    client.err.wait_for("Disconnected from chat server")

    srv2 = chat_server("--token", token, port=port)
    assert srv2.port == port
    client.err.wait_for(f"Reconnected to {srv.host}:{port}", timeout=20)
    assert client.proc.poll() is None, client.output()

    # The client replays /auth (the new server demands it) and /nick, so the room sees it
    # under the name the user chose, without the user typing anything.
    wait_until(lambda: "is now known as phoenix" in client.out.text[before_restart:], 10, "nick replay")
    peer = srv2.connect()
    peer.send(f"/auth {token}")
    peer.expect("* welcome")
    client.send("back again")
    peer.expect("[phoenix] back again")
    client.close_stdin()
    assert client.wait(10) == 0, client.output()


# ----------------------------------------------------------------------------------- pty mode


def test_pty_prompt_and_no_garbling(chat_server: Any, pty_client: Any) -> None:
    srv = chat_server()
    peer = srv.connect()
    peer_nick = WELCOME.search(peer.expect("* welcome")).group(1)
    client = pty_client(srv.host, str(srv.port))
    nick = client.out.wait_for(WELCOME).group(1)
    client.out.wait_for("[Me] ")
    peer.expect(f"* {nick} joined lobby")
    time.sleep(0.3)  # let readline settle at the prompt

    client.type(b"half a thou")
    client.out.wait_for("[Me] half a thou")
    peer.send("interrupting!")
    # The half-typed line is erased, the incoming line printed, and prompt + typed text redrawn.
    client.out.wait_for(
        re.compile(
            re.escape(f"\r\x1b[2K[{peer_nick}] interrupting!\r\n[Me] half a thou"),
        )
    )
    client.type(b"ght\r")
    # What the user typed reaches the server intact, despite the interruption.
    peer.expect(f"[{nick}] half a thought")

    client.type(b"\x03")  # Ctrl-C
    assert client.wait(10) == 0, client.output()
    client.out.wait_eof(5)
    assert "Traceback" not in client.out.text
    assert "KeyboardInterrupt" not in client.out.text


def test_pty_end_of_input_exits_cleanly(chat_server: Any, pty_client: Any) -> None:
    srv = chat_server()
    peer = srv.connect()
    peer.expect("* welcome")
    client = pty_client(srv.host, str(srv.port))
    nick = client.out.wait_for(WELCOME).group(1)
    client.out.wait_for("[Me] ")
    time.sleep(0.3)
    client.type(b"\x04")  # Ctrl-D on an empty line
    assert client.wait(10) == 0, client.output()
    peer.expect(f"* {nick} left lobby")
    assert "Traceback" not in client.out.text


def test_pty_server_gone_restores_terminal(chat_server: Any, pty_client: Any) -> None:
    srv = chat_server()
    client = pty_client(srv.host, str(srv.port))
    client.out.wait_for(WELCOME)
    client.out.wait_for("[Me] ")
    time.sleep(0.3)
    client.type(b"typing when")
    client.out.wait_for("typing when")
    srv.stop()
    client.out.wait_for("Disconnected from chat server")
    assert client.wait(10) == 1, client.output()
    assert "Traceback" not in client.out.text
    # readline put the terminal in raw-ish mode; it must be back to canonical mode with echo.
    attrs = client.tty_attrs()
    lflag = attrs[3]
    assert lflag & termios.ICANON and lflag & termios.ECHO
    assert lflag == client.initial_attrs[3]


# ------------------------------------------------------------------------------------------ TLS


def make_self_signed(directory: Path) -> tuple[Path, Path]:
    """A throwaway certificate for localhost / 127.0.0.1 (cryptography, else the openssl CLI)."""
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        openssl = shutil.which("openssl")
        if openssl is None:
            if os.environ.get("CI") == "true":
                pytest.fail("neither the cryptography package nor openssl is available")
            pytest.skip("needs the cryptography package or the openssl CLI")
        subprocess.run(
            [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-days", "2", "-subj", "/CN=localhost",
             "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
             "-keyout", str(key_path), "-out", str(cert_path)],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        return cert_path, key_path
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


class TlsPeer:
    """A minimal raw TLS line client (the fixture's line client speaks plain TCP)."""

    def __init__(self, host: str, port: int, cafile: Path) -> None:
        ctx = ssl.create_default_context(cafile=str(cafile))
        raw = socket.create_connection((host, port), timeout=10)
        self.sock = ctx.wrap_socket(raw, server_hostname="localhost")
        self.buf = b""

    def send(self, line: str) -> None:
        self.sock.sendall(line.encode() + b"\n")

    def expect(self, prefix: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self.buf:
                raw, self.buf = self.buf.split(b"\n", 1)
                line = raw.decode("utf-8", "replace").rstrip("\r")
                if line.startswith(prefix):
                    return line
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no line starting {prefix!r} within {timeout}s"
            self.sock.settimeout(remaining)
            chunk = self.sock.recv(65536)
            assert chunk, f"connection closed before a line starting {prefix!r}"
            self.buf += chunk

    def close(self) -> None:
        self.sock.close()


def test_tls_round_trip(chat_server: Any, pipe_client: Any, tmp_path: Path) -> None:
    cert, key = make_self_signed(tmp_path)
    srv = chat_server("--tls-cert", str(cert), "--tls-key", str(key))
    peer = TlsPeer("127.0.0.1", srv.port, cert)
    peer_nick = WELCOME.search(peer.expect("* welcome")).group(1)
    try:
        client = pipe_client("--tls", "--insecure", "127.0.0.1", str(srv.port))
        nick = client.nick()
        peer.expect(f"* {nick} joined lobby")
        client.send("over tls")
        peer.expect(f"[{nick}] over tls")
        peer.send("and back")
        client.out.wait_for(f"[{peer_nick}] and back\n")
        client.close_stdin()
        assert client.wait(10) == 0, client.output()

        # The same server, verified properly against the certificate as a trusted CA.
        verified = pipe_client("--tls", "--ca-file", str(cert), "localhost", str(srv.port))
        verified.nick()
        verified.close_stdin()
        assert verified.wait(10) == 0

        # Without --insecure a self-signed certificate is refused, as it must be.
        strict = pipe_client("--tls", "127.0.0.1", str(srv.port))
        assert strict.wait(15) == 1
        assert "Unable to connect" in strict.err.text
        assert "CERTIFICATE_VERIFY_FAILED" in strict.err.text
    finally:
        peer.close()
