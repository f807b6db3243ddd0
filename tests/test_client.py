"""``chat-client`` against a real server: through a pipe, through a pty, TLS, reconnects.

The client is always run as a subprocess (the way users run it) and talks to a real chat-svc
process from the ``chat_server`` fixture; the other end of each conversation is a raw socket
client, so every assertion is about bytes that really crossed the loopback interface.  On a pty,
what the user sees is checked on a VT100 screen model (pyte) fed with the client's output.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from _backplane import cluster, joined
from _chat import ROOT, LineClient, free_port, make_cert, wait_for
from _require import require_module
from _streams import StreamWatcher
from chat_svc.client.connection import encode_line
from chat_svc.client.session import NICK_RETRY_SECONDS, Session

CLIENT = [sys.executable, "-m", "chat_svc.client"]
# The server's wording may change; the client reads it as loosely (see client/session.py).
WELCOME = re.compile(r"\* welcome\b.*?\byou are (\S+) in (?:room )?([^\s;,]+)")
TOO_LONG = "(line not sent: {size} bytes is over the {limit}-byte line limit)"


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

    def send(self, line: str | bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((line.encode() if isinstance(line, str) else line) + b"\n")
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

    def __init__(self, *args: str, inputrc: Path, columns: int = 80, rows: int = 200) -> None:
        self.columns, self.rows = columns, rows
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
        self.initial_attrs = termios.tcgetattr(slave)
        env = client_env(TERM="xterm", INPUTRC=str(inputrc), COLUMNS=str(columns), LINES=str(rows))
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
        view = memoryview(data)
        while view:  # a pty takes a long paste in pieces
            view = view[os.write(self.master, view) :]

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


AnyClient = TypeVar("AnyClient", PipeClient, PtyClient)


class Screen:
    """What a person would see on the client's terminal: its output replayed on pyte."""

    def __init__(self, pyte: Any, client: PtyClient) -> None:
        self._pyte = pyte
        self._client = client

    def _render(self) -> Any:
        screen = self._pyte.Screen(self._client.columns, self._client.rows)
        self._pyte.Stream(screen).feed(self._client.out.text)
        return screen

    def rows(self) -> list[str]:
        """Screen rows down to the last non-blank one, without trailing blanks."""
        rows = [row.rstrip() for row in self._render().display]
        while rows and not rows[-1]:
            rows.pop()
        return rows

    def cursor(self) -> tuple[int, int]:
        """(column, row) of the cursor."""
        screen = self._render()
        return screen.cursor.x, screen.cursor.y

    def wait(self, check: Callable[[list[str], tuple[int, int]], bool], what: str, timeout: float = 10.0) -> list[str]:
        """Wait until ``check(rows, cursor)`` holds; returns the rows."""
        deadline = time.monotonic() + timeout
        while True:
            screen = self._render()
            rows = [row.rstrip() for row in screen.display]
            while rows and not rows[-1]:
                rows.pop()
            cursor = (screen.cursor.x, screen.cursor.y)
            if check(rows, cursor):
                return rows
            if time.monotonic() > deadline:
                shown = "\n".join(rows)
                raise AssertionError(f"screen never showed {what}; cursor at {cursor}, screen:\n{shown}")
            time.sleep(0.05)


def killed_at_teardown(start: Callable[..., AnyClient]) -> Iterator[Callable[..., AnyClient]]:
    """A fixture's body: yields ``start``, then kills every client it started."""
    made: list[AnyClient] = []

    def make(*args: str, **kwargs: Any) -> AnyClient:
        client = start(*args, **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        client.kill()


@pytest.fixture
def pipe_client() -> Iterator[Callable[..., PipeClient]]:
    """Factory for pipe-driven clients, all killed at teardown."""
    yield from killed_at_teardown(PipeClient)


@pytest.fixture
def pty_client(tmp_path: Path) -> Iterator[Callable[..., PtyClient]]:
    """Factory for pty-driven clients (80 columns unless asked), all killed at teardown."""
    # Keep readline's output predictable: no bracketed-paste mode switches in the stream.
    inputrc = tmp_path / "inputrc"
    inputrc.write_text("set enable-bracketed-paste off\nset bell-style none\n")
    yield from killed_at_teardown(functools.partial(PtyClient, inputrc=inputrc))


@pytest.fixture
def screen_of() -> Callable[[PtyClient], Screen]:
    """``screen_of(client)``: the client's terminal as a person sees it (needs pyte)."""
    pyte = require_module("pyte")
    return lambda client: Screen(pyte, client)


@pytest.fixture
def carol(chat_server: Any, pty_client: Any, screen_of: Any) -> Any:
    """``carol(*server_args, columns=, rows=)``: a server, ``bob`` on it (a raw socket) and a
    chat-client at its prompt on a pty, renamed to ``carol``; returns (bob, client, screen)."""

    def start(*server_args: str, **size: int) -> tuple[Any, PtyClient, Screen]:
        srv = chat_server(*server_args)
        bob = srv.member("bob")
        client = pty_client(srv.host, str(srv.port), **size)
        screen = screen_of(client)
        nick = client.out.wait_for(WELCOME).group(1)
        screen.wait(lambda rows, _: rows[-1] == f"[{nick}@lobby]", "the prompt with nick and room")
        bob.expect(f"* {nick} joined lobby")
        client.type(b"/nick carol\r")
        screen.wait(lambda rows, _: rows[-1] == "[carol@lobby]", "the prompt after /nick")
        bob.expect(f"* {nick} is now known as carol")
        return bob, client, screen

    return start


@contextlib.contextmanager
def frozen(client: PipeClient) -> Iterator[None]:
    """Stop the client process (SIGSTOP) for the block: it cannot reconnect meanwhile."""
    client.proc.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        client.proc.send_signal(signal.SIGCONT)


# --------------------------------------------------------------------------------- unit level


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
    assert "--reconnect" in result.stdout and "--tls" in result.stdout and "--max-line-bytes" in result.stdout


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


def welcomed(session: Session, nick: str = "10.0.0.1:5", room: str = "lobby") -> Session:
    line = f"* welcome to chat-svc, you are {nick} in room {room}; type /help for commands"
    assert session.received(line).shown == [line]
    return session


def test_session_reads_nick_and_room_from_the_server() -> None:
    session = Session()
    assert session.prompt() == "[Me] "
    welcomed(session)
    assert session.prompt() == "[10.0.0.1:5@lobby] "
    session.typed("/nick alice")
    session.received("* 10.0.0.1:5 is now known as alice")
    session.received("* bob is now known as carol")  # somebody else
    session.typed("/join #den")
    session.received("* you joined #den")
    assert session.prompt() == "[alice@#den] "
    # Without a /join of ours, "* you joined ..." is somebody called "you" doing /me.
    session.received("* you joined elsewhere")
    assert session.prompt() == "[alice@#den] "
    # A later welcome (a /me by somebody called "welcome") changes nothing.
    session.received("* welcome to chat-svc, you are mallory in room pit; type /help")
    assert session.prompt() == "[alice@#den] "


@pytest.mark.parametrize(
    "line",
    [
        "* welcome to chat-svc, you are 10.0.0.1:5 in room lobby; type /help for commands",
        "* welcome, you are 10.0.0.1:5 in lobby; /help lists commands",
        "* welcome to chat-svc, you are 10.0.0.1:5 in lobby, type /help",
        "* welcome to chat-svc: you are 10.0.0.1:5 in room lobby",
    ],
)
def test_session_reads_the_welcome_loosely(line: str) -> None:
    session = Session()
    session.received(line)
    assert (session.nick, session.room) == ("10.0.0.1:5", "lobby")


def test_session_replays_only_what_the_server_confirmed() -> None:
    session = Session()
    assert session.connected() == []  # a first connection restores nothing
    welcomed(session)
    session.typed("/auth s3cret")
    session.typed("/nick alice")
    session.received("* 10.0.0.1:5 is now known as alice")
    session.typed("/nick bob")
    session.received("! nick bob is taken")  # refused: not worth repeating
    session.typed("/join den")
    session.received("* you joined den")
    session.typed("/join bad room!")
    session.received("! invalid room name")
    assert session.connected() == ["/auth s3cret", "/nick alice", "/join den"]


def test_session_takes_back_a_taken_nick() -> None:
    now = [100.0]
    session = welcomed(Session(clock=lambda: now[0]))
    session.typed("/nick alice")
    session.received("* 10.0.0.1:5 is now known as alice")
    assert session.connected() == ["/nick alice"]
    welcomed(session, "10.0.0.1:6")
    refused = session.received("! nick alice is taken")
    assert refused.shown == []  # answered in plain words instead
    assert refused.notes == [
        "* could not take back your nick alice: taken",
        f"* trying again every {NICK_RETRY_SECONDS:g} s; /nick NAME picks another nick",
    ]
    assert session.due() == []
    assert session.next_due() == NICK_RETRY_SECONDS
    now[0] += NICK_RETRY_SECONDS
    assert session.due() == ["/nick alice"]
    assert session.received("! nick alice is taken") == ([], [])  # said once only
    now[0] += NICK_RETRY_SECONDS
    assert session.due() == ["/nick alice"]
    back = session.received("* 10.0.0.1:6 is now known as alice")
    assert back.notes == ["* took back your nick alice"]
    assert session.prompt() == "[alice@lobby] "
    assert session.next_due() is None


def test_session_stops_asking_when_the_user_picks_another_nick() -> None:
    now = [0.0]
    session = welcomed(Session(clock=lambda: now[0]))
    session.typed("/nick alice")
    session.received("* 10.0.0.1:5 is now known as alice")
    session.connected()
    welcomed(session, "10.0.0.1:6")
    session.received("! nick alice is taken")
    session.typed("/nick alice2")
    now[0] += NICK_RETRY_SECONDS
    assert session.due() == []
    # The user's own failures are theirs to see.
    assert session.received("! nick alice2 is taken").shown == ["! nick alice2 is taken"]


def test_session_with_ids_strips_them_and_drops_lines_already_shown() -> None:
    session = Session(ids=True)
    assert session.connected() == []  # /auth may have to come first: ids once welcomed
    welcomed(session)
    assert session.due() == ["/ids"]
    assert session.received("* ids on") == ([], [])  # the client asked, not the user
    assert session.received("@k3v9:5 [bob] hi").shown == ["[bob] hi"]
    assert session.received("@k3v9:5 [bob] hi").shown == []
    assert session.received("@k3v9:4 [history] [bob] older").shown == []
    assert session.received("@Z1:1 * carol joined lobby").shown == ["* carol joined lobby"]  # a new epoch
    session.typed("/ids")
    assert session.received("* ids on").shown == ["* ids on"]  # the user asked this time


def resumed_session() -> Session:
    """alice in den, having seen den's line k3v9:10, on a new connection that resumes it."""
    session = welcomed(Session(ids=True))
    session.due()
    session.received("* ids on")
    session.typed("/nick alice")
    session.received("* 10.0.0.1:5 is now known as alice")
    session.typed("/join den")
    session.received("* you joined den")
    assert session.received("@k3v9:10 [history] [bob] seen").shown == ["[history] [bob] seen"]
    assert session.connected() == ["/ids", "/nick alice", "/resume den k3v9:10", "/ids"]
    welcomed(session, "10.0.0.1:6")
    return session


def test_session_resume_shows_the_replay_once_without_the_users_own_lines() -> None:
    session = resumed_session()
    assert session.received("[history] [zed] lobby history").shown == []  # lobby's, before ids
    assert session.received("* ids on") == ([], [])
    assert session.received("* 10.0.0.1:6 is now known as alice").shown == ["* 10.0.0.1:6 is now known as alice"]
    assert session.received("@Lb:3 [zed] lobby talk").shown == []  # still lobby
    replay = ["@k3v9:11 [alice] typed before the drop", "@k3v9:12 * alice left den", "@k3v9:13 [bob] missed",
              "@k3v9:14 * bob is now known as rob", "@k3v9:15 * [rob] waves"]  # fmt: skip
    assert all(session.received(line) == ([], []) for line in replay)  # held until the answer
    assert session.received("* resumed den: 5 lines") == (
        ["[bob] missed", "* bob is now known as rob", "* [rob] waves"],
        ["* resumed 3 lines"],
    )
    assert session.prompt() == "[alice@den] "
    assert session.received("* ids on") == ([], [])
    assert session.received("@k3v9:15 * [rob] waves").shown == []
    assert session.received("@k3v9:16 [rob] live").shown == ["[rob] live"]
    assert session.connected()[2] == "/resume den k3v9:16"


def test_session_resume_into_the_first_room_drops_its_own_arrival() -> None:
    session = welcomed(Session(ids=True))
    session.due()
    session.received("* ids on")
    session.received("@Lb:7 [zed] hi")
    assert session.connected() == ["/ids", "/resume lobby Lb:7", "/ids"]
    welcomed(session, "10.0.0.1:6")
    session.received("* ids on")
    session.received("@Lb:8 * 10.0.0.1:6 joined lobby")
    session.received("@Lb:9 [zed] while away")
    assert session.received("* resumed lobby: 2 lines") == (["[zed] while away"], ["* resumed 1 lines"])


def test_session_resume_incomplete_says_lines_may_be_missing_then_shows_the_history() -> None:
    session = resumed_session()
    session.received("* ids on")
    assert session.received("! resume incomplete den: epoch changed") == (
        [],
        ["* could not resume den: lines may be missing (epoch changed)"],
    )
    assert session.received("@New1:1 [history] [bob] after the restart").shown == ["[history] [bob] after the restart"]
    assert session.prompt() == "[10.0.0.1:6@den] "


def test_session_resume_refused_leaves_the_user_where_it_was_welcomed() -> None:
    session = resumed_session()
    session.received("* ids on")
    refusal = "! too many new rooms: try again in 5 s"
    assert session.received(refusal).shown == [refusal]
    assert session.received("* ids on") == ([], ["* could not resume den: you are in lobby"])
    assert session.received("@Lb:4 [zed] lobby talk").shown == ["[zed] lobby talk"]


# ---------------------------------------------------------------------------------- pipe mode


def talk_both_ways(peer: LineClient, client: PipeClient, there: str, back: str) -> str:
    """``client`` joins a just-connected ``peer``'s room, says ``there`` and prints ``back``; its nick."""
    welcome = WELCOME.search(peer.expect("* welcome"))
    assert welcome, "the welcome names the peer"
    peer_nick = welcome.group(1)
    nick = client.nick()
    peer.expect(f"* {nick} joined lobby")
    client.send(there)
    peer.expect(f"[{nick}] {there}")
    peer.send(back)
    client.out.wait_for(f"[{peer_nick}] {back}\n")
    return nick


def test_pipe_client_sends_and_receives(chat_server: Any, pipe_client: Any) -> None:
    srv = chat_server()
    peer = srv.connect()
    client = pipe_client(srv.host, str(srv.port))
    nick = talk_both_ways(peer, client, "hello from the pipe", "hello back, ünïcödé")

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
    client = pipe_client("127.0.0.1", str(free_port()))  # nothing listens there
    assert client.wait(10) == 1, client.output()
    assert "Unable to connect" in client.err.text
    assert "Traceback" not in client.err.text


def test_reconnect_still_fails_fast_when_the_first_connect_fails(pipe_client: Any) -> None:
    """--reconnect is for a server that goes away, not for a typo in HOST or PORT."""
    client = pipe_client("--reconnect", "127.0.0.1", str(free_port()))
    assert client.wait(10) == 1, client.output()
    assert "Unable to connect to 127.0.0.1:" in client.err.text
    assert "reconnecting" not in client.err.text


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


def test_over_long_line_is_refused_locally_and_the_session_goes_on(chat_server: Any, pipe_client: Any) -> None:
    srv = chat_server()
    peer = srv.member("watcher")
    client = pipe_client(srv.host, str(srv.port))
    nick = client.nick()
    peer.expect(f"* {nick} joined lobby")
    client.send("x" * 9000)  # the server's default limit is 8192: it would disconnect us
    client.err.wait_for(TOO_LONG.format(size=9000, limit=8192))
    client.send("y" * 8192)  # exactly the limit is fine
    client.send("still here")
    assert peer.read_until_re("still here$", timeout=10) == [f"[{nick}] " + "y" * 8192, f"[{nick}] still here"]
    client.close_stdin()
    assert client.wait(10) == 0, client.output()


def test_max_line_bytes_follows_the_server(chat_server: Any, pipe_client: Any) -> None:
    """With the server's limit lowered, --max-line-bytes keeps the client on the right side of it.

    An endless line on stdin is skipped without being stored, and still reported with its size.
    """
    srv = chat_server("--max-line-bytes", "100")
    peer = srv.member("watcher")
    client = pipe_client("--max-line-bytes", "100", srv.host, str(srv.port))
    nick = client.nick()
    client.send("a" * 101)
    client.send("b" * 3_000_000)
    client.send("a" * 100 + "\r")
    client.send("done")
    client.err.wait_for(TOO_LONG.format(size=101, limit=100))
    client.err.wait_for(TOO_LONG.format(size=3_000_000, limit=100))
    assert peer.read_until_re("done$", timeout=10)[-2:] == [f"[{nick}] " + "a" * 100, f"[{nick}] done"]
    client.close_stdin()
    assert client.wait(10) == 0, client.output()


def test_reconnect_after_server_restart(chat_server: Any, pipe_client: Any) -> None:
    """After a restart the client sends /auth, /nick and /join again: the user is back in place."""
    token = "s3cret-token"
    srv = chat_server("--token", token)
    port = srv.port
    client = pipe_client("--reconnect", srv.host, str(port))
    client.send(f"/auth {token}")
    client.nick()
    client.send("/nick phoenix")
    client.out.wait_for("is now known as phoenix")
    client.send("/join den")
    client.out.wait_for("* you joined den")
    before_restart = len(client.out.text)
    srv.stop()
    client.err.wait_for("Disconnected from chat server")

    srv2 = chat_server("--token", token, port=port)
    assert srv2.port == port
    client.err.wait_for(f"Reconnected to {srv.host}:{port}", timeout=20)
    assert client.proc.poll() is None, client.output()

    # The new server demands /auth; the room sees the client under the chosen nick, in den,
    # without the user typing anything.
    wait_for(lambda: "* you joined den" in client.out.text[before_restart:], 10, "/join replay")
    assert "is now known as phoenix" in client.out.text[before_restart:]
    peer = srv2.connect()
    peer.send(f"/auth {token}")
    peer.join("watcher", "den")
    peer.send("/who")
    assert peer.expect("* in den").endswith(": phoenix, watcher")
    client.send("back again")
    peer.expect("[phoenix] back again")
    client.close_stdin()
    assert client.wait(10) == 0, client.output()


def reconnecting(chat_server: Any, pipe_client: Any, nick: str) -> tuple[Any, PipeClient]:
    """A server, and a ``--reconnect`` pipe client on it renamed to ``nick``."""
    srv = chat_server()
    client = pipe_client("--reconnect", srv.host, str(srv.port))
    client.nick()
    client.send(f"/nick {nick}")
    client.out.wait_for(f"is now known as {nick}")
    return srv, client


def test_lines_typed_while_disconnected_are_not_sent(chat_server: Any, pipe_client: Any) -> None:
    srv, client = reconnecting(chat_server, pipe_client, "phoenix")
    port = srv.port
    srv.stop()
    client.err.wait_for("Disconnected from chat server; reconnecting...")
    client.send("typed while away")
    client.err.wait_for("(not connected: line not sent)")
    with frozen(client):  # the watcher is in the room before the client can come back
        srv2 = chat_server(port=port)
        peer = srv2.member("watcher")
    client.err.wait_for(f"Reconnected to {srv.host}:{port}", timeout=20)
    client.send("typed after")
    received = peer.read_until_re("typed after$", timeout=10)
    assert "[phoenix] typed after" in received
    assert not [line for line in received if "typed while away" in line], received


def test_reconnect_takes_back_a_nick_taken_meanwhile(chat_server: Any, pipe_client: Any) -> None:
    srv, client = reconnecting(chat_server, pipe_client, "alice")
    port = srv.port
    welcomes = len(WELCOME.findall(client.out.text))
    with frozen(client):  # someone takes the nick before the client is back
        srv.stop()
        srv2 = chat_server(port=port)
        squatter = srv2.member("alice")
    client.err.wait_for("* could not take back your nick alice: taken\n", timeout=20)
    client.err.wait_for(f"* trying again every {NICK_RETRY_SECONDS:g} s; /nick NAME picks another nick\n")
    # stdout has its own reader: wait for the new connection's welcome there, not the old one's.
    wait_for(lambda: len(WELCOME.findall(client.out.text)) > welcomes, 10, "the new connection's welcome")
    new_nick = WELCOME.findall(client.out.text)[-1][0]
    assert new_nick != "alice"
    peer = srv2.member("watcher")
    client.send("who am i")
    peer.expect(f"[{new_nick}] who am i")

    squatter.close()
    client.err.wait_for("* took back your nick alice\n", timeout=NICK_RETRY_SECONDS + 10)
    peer.expect(f"* {new_nick} is now known as alice")
    client.send("me again")
    peer.expect("[alice] me again")
    assert "! nick alice is taken" not in client.out.text, "the refusal of an automatic /nick is explained instead"


def said_by(client: PipeClient, nick: str) -> list[str]:
    """What ``nick`` said, in the order the client printed it."""
    prefix = f"[{nick}] "
    return [line[len(prefix) :] for line in client.out.text.splitlines() if line.startswith(prefix)]


def test_reconnect_after_a_single_instance_restart_says_lines_may_be_missing(
    chat_server: Any, pipe_client: Any
) -> None:
    """Done-when 4, one instance: its log dies with it, so the resume is incomplete, and the user
    is told; every line said before and after the restart is shown once, none with its id."""
    srv, client = reconnecting(chat_server, pipe_client, "alice")
    bob = srv.member("bob")
    for n in range(5):
        bob.send(f"before {n}")
    client.out.wait_for("[bob] before 4\n")
    port = srv.port
    srv.stop()
    srv2 = chat_server(port=port)
    client.err.wait_for("* could not resume lobby: lines may be missing (epoch changed)\n", timeout=20)
    bob2 = srv2.member("bob")
    for n in range(5):
        bob2.send(f"after {n}")
    client.out.wait_for("[bob] after 4\n")
    assert said_by(client, "bob") == [f"before {n}" for n in range(5)] + [f"after {n}" for n in range(5)]
    assert "@" not in client.out.text and "ids on" not in client.out.text, client.output()
    assert "* server restarting, reconnect" in client.out.text


class Talker(threading.Thread):
    """A member that says ``line 0``, ``line 1``, ... every ``interval`` until stopped."""

    def __init__(self, member: LineClient, interval: float = 0.03) -> None:
        super().__init__(daemon=True)
        self.member = member
        self.interval = interval
        self.said = 0
        self._stop_talking = threading.Event()

    def run(self) -> None:
        while not self._stop_talking.wait(self.interval):
            self.member.send(f"line {self.said}")
            self.said += 1

    def stop(self) -> int:
        self._stop_talking.set()
        self.join(5)
        return self.said


@pytest.mark.redis
def test_reconnect_resumes_on_a_restarted_instance_with_no_line_missing_or_twice(
    redis_server: Any, chat_server: Any, pipe_client: Any
) -> None:
    """Done-when 4 with Redis: the client is on instance a, the talker on b keeps talking while a
    is stopped and started again on its port; the new a replays from Redis what the client
    missed.  Every line is printed exactly once, in order, without its id."""
    a, b = cluster(chat_server, redis_server, 2)
    client = pipe_client("--reconnect", a.host, str(a.port))
    client.nick()
    client.send("/nick alice")
    client.send("/join den")
    client.out.wait_for("* you joined den\n")
    talker = Talker(joined(b, "talker", "den"))
    talker.start()
    client.out.wait_for("[talker] line 20\n")
    port = a.port
    a.stop()
    client.err.wait_for("Disconnected from chat server; reconnecting...")
    said_while_away = talker.said
    a2 = restarted(chat_server, redis_server, port)
    resumed = client.err.wait_for(re.compile(r"\* resumed (\d+) lines\n"), timeout=20)
    client.out.wait_for(f"[talker] line {talker.said + 20}\n")
    total = talker.stop()
    client.out.wait_for(f"[talker] line {total - 1}\n")
    assert int(resumed[1]) > 0 and talker.said > said_while_away
    assert said_by(client, "talker") == [f"line {n}" for n in range(total)], client.output()
    lines = client.out.text.splitlines()
    assert len(lines) == len(set(lines)), "a line shown twice"
    assert not [line for line in lines if line.startswith("@")], client.output()
    assert "could not resume" not in client.err.text
    # alice is back in den, under her nick, on the new a
    watcher = joined(a2, "watcher", "den")
    client.send("back")
    watcher.expect("[alice] back")


def restarted(chat_server: Any, redis_server: Any, port: int) -> Any:
    """An instance of the cluster started again on ``port``."""
    srv = chat_server("--redis-url", redis_server.url, "--flood-rate", "0", port=port)
    wait_for(lambda: srv.scrape()["chat_backplane_up"] == 1, 10, f"backplane up on :{port}")
    return srv


# ----------------------------------------------------------------------------------- pty mode


def test_pty_prompt_and_no_garbling(carol: Any) -> None:
    peer, client, screen = carol()

    client.type(b"half a thou")
    screen.wait(lambda rows, _: rows[-1] == "[carol@lobby] half a thou", "the typed text")
    peer.send("interrupting!")
    # The incoming line goes above; prompt and typed text are redrawn below it.
    screen.wait(
        lambda rows, cursor: (
            rows[-2:] == ["[bob] interrupting!", "[carol@lobby] half a thou"]
            and cursor == (len("[carol@lobby] half a thou"), len(rows) - 1)
        ),
        "the incoming line above the redrawn input line",
    )
    client.type(b"ght\r")
    # What the user typed reaches the server intact, despite the interruption.
    peer.expect("[carol] half a thought")

    client.type(b"\x03")  # Ctrl-C
    assert client.wait(10) == 0, client.output()
    client.out.wait_eof(5)
    assert "Traceback" not in client.out.text
    assert "KeyboardInterrupt" not in client.out.text


def test_pty_cursor_stays_where_the_user_left_it(carol: Any) -> None:
    """Issue 14: type abcdefgh, Left three times, a line arrives, type XY: abcdeXYfgh everywhere."""
    peer, client, screen = carol()
    client.type(b"abcdefgh\x1b[D\x1b[D\x1b[D")
    prompt_cursor = len("[carol@lobby] abcde")
    screen.wait(lambda rows, cursor: cursor[0] == prompt_cursor, "the cursor moved left")
    peer.send("hello while you type")
    screen.wait(
        lambda rows, cursor: (
            rows[-2:] == ["[bob] hello while you type", "[carol@lobby] abcdefgh"]
            and cursor == (prompt_cursor, len(rows) - 1)
        ),
        "the line redrawn with the cursor after abcde",
    )
    client.type(b"XY")
    screen.wait(lambda rows, _: rows[-1] == "[carol@lobby] abcdeXYfgh", "XY inserted where the cursor was")
    client.type(b"\r")
    peer.expect("[carol] abcdeXYfgh")


def test_pty_long_input_line_leaves_no_stale_rows(carol: Any) -> None:
    """Issue 14: a half line wider than the terminal is cleared on all its rows before a redraw."""
    peer, client, screen = carol(columns=80)
    typed = "the quick brown fox jumps over the lazy dog " * 4  # three rows with the prompt
    client.type(typed.encode())
    wide = "[carol@lobby] " + typed
    expected = [wide[i : i + 80].rstrip() for i in range(0, len(wide), 80)]
    screen.wait(lambda rows, _: rows[-3:] == expected, "the typed text on three rows")
    for n in range(3):
        peer.send(f"incoming {n}")
    rows = screen.wait(
        lambda rows, _: rows[-6:] == ["[bob] incoming 0", "[bob] incoming 1", "[bob] incoming 2", *expected],
        "three incoming lines above the three-row input line",
    )
    assert sum(row == expected[0] for row in rows) == 1, "\n".join(rows)

    client.type(b"\x01")  # Ctrl-A: the cursor goes to the first row
    screen.wait(lambda rows, cursor: cursor == (len("[carol@lobby] "), len(rows) - 3), "the cursor at the start")
    peer.send("one more")
    screen.wait(
        lambda rows, cursor: rows[-4:] == ["[bob] one more", *expected] and cursor == (14, len(rows) - 3),
        "the redraw with the cursor still on the first row",
    )
    client.type(b"\r")
    peer.expect("[carol] " + typed.rstrip())


def test_pty_replies_never_split_the_prompt(carol: Any) -> None:
    """Issue 14: /who replies and a busy room while readline draws the prompt, many times over."""
    peer, client, screen = carol("--flood-rate", "0", columns=120, rows=2000)
    stop = threading.Event()

    def chatter() -> None:
        n = 0
        while not stop.wait(0.004):
            peer.send(f"noise {n}")
            n += 1

    talker = threading.Thread(target=chatter)
    talker.start()
    try:
        for _ in range(50):
            client.type(b"/who\r")
            time.sleep(0.03)
    finally:
        stop.set()
        talker.join()
    peer.send("the end")
    rows = screen.wait(lambda rows, _: rows[-2:] == ["[bob] the end", "[carol@lobby]"], "the end of the storm")
    start = max(i for i, row in enumerate(rows) if row.endswith(" is now known as carol"))
    expected = re.compile(r"\[bob\] noise \d+|\[bob\] the end|\* in lobby \(2\): bob, carol|\[carol@lobby\]( /who)?")
    odd = [row for row in rows[start + 1 :] if not expected.fullmatch(row)]
    assert not odd, "\n".join(odd)
    assert sum(row == "* in lobby (2): bob, carol" for row in rows) == 50
    assert sum(row == "[carol@lobby] /who" for row in rows) == 50


def test_pty_pasted_over_long_line_is_refused(carol: Any) -> None:
    peer, client, screen = carol()
    client.type(b"x" * 9000)
    screen.wait(lambda rows, _: rows[-1].endswith("x" * 40), "the pasted text", timeout=30)
    client.type(b"\r")
    screen.wait(
        lambda rows, _: rows[-2:] == [TOO_LONG.format(size=9000, limit=8192), "[carol@lobby]"],
        "the refusal and a fresh prompt",
        timeout=30,
    )
    client.type(b"still here\r")
    received = peer.read_until_re("still here$", timeout=10)
    assert received[-1] == "[carol] still here"
    assert not [line for line in received if line.startswith("[carol] ")][:-1], "nothing else was sent"
    assert client.proc.poll() is None


def test_pty_ctrl_c_while_lines_arrive(chat_server: Any, pty_client: Any, screen_of: Any) -> None:
    """Ctrl-C lands while the client is busy printing: still a clean exit 0, no traceback."""
    srv = chat_server("--flood-rate", "0")
    peer = srv.member("bob")
    client = pty_client(srv.host, str(srv.port))
    screen = screen_of(client)
    nick = client.out.wait_for(WELCOME).group(1)
    client.type(b"typing")
    screen.wait(lambda rows, _: rows[-1] == f"[{nick}@lobby] typing", "the typed text")
    for n in range(200):
        peer.send(f"noise {n}")
    client.out.wait_for("noise 20")
    client.type(b"\x03")
    assert client.wait(10) == 0, client.output()
    client.out.wait_eof(5)
    assert "Traceback" not in client.out.text and "Error" not in client.out.text, client.output()


def test_pty_end_of_input_exits_cleanly(chat_server: Any, pty_client: Any) -> None:
    srv = chat_server()
    peer = srv.connect()
    peer.expect("* welcome")
    client = pty_client(srv.host, str(srv.port))
    nick = client.out.wait_for(WELCOME).group(1)
    client.out.wait_for(f"[{nick}@lobby] ")
    time.sleep(0.3)
    client.type(b"\x04")  # Ctrl-D on an empty line
    assert client.wait(10) == 0, client.output()
    peer.expect(f"* {nick} left lobby")
    assert "Traceback" not in client.out.text


def test_pty_server_gone_restores_terminal(chat_server: Any, pty_client: Any, screen_of: Any) -> None:
    srv = chat_server()
    client = pty_client(srv.host, str(srv.port))
    screen = screen_of(client)
    nick = client.out.wait_for(WELCOME).group(1)
    client.type(b"typing when")
    screen.wait(lambda rows, _: rows[-1] == f"[{nick}@lobby] typing when", "the typed text")
    srv.stop()
    assert client.wait(10) == 1, client.output()
    client.out.wait_eof(5)
    assert "Traceback" not in client.out.text
    # The last word is the disconnect, and the cursor waits on a fresh line for the shell.
    rows = screen.rows()
    assert rows[-1] == "Disconnected from chat server", "\n".join(rows)
    assert screen.cursor() == (0, len(rows))
    # readline put the terminal in raw-ish mode; it must be back to canonical mode with echo.
    attrs = client.tty_attrs()
    lflag = attrs[3]
    assert lflag & termios.ICANON and lflag & termios.ECHO
    assert lflag == client.initial_attrs[3]


# ------------------------------------------------------------------------------------------ TLS


def test_tls_round_trip(chat_server: Any, pipe_client: Any, tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path)
    srv = chat_server("--tls-cert", str(cert), "--tls-key", str(key))
    peer = srv.connect(timeout=10)  # over TLS, trusting cert
    try:
        client = pipe_client("--tls", "--insecure", "127.0.0.1", str(srv.port))
        talk_both_ways(peer, client, "over tls", "and back")
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
