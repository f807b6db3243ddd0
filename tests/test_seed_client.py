"""The seed's own ``chat_client.py`` (ported to Python 3, kept in tests/) still works with chat-svc.

The seed client sends whatever ``readline()`` gives it and writes whatever ``recv()`` returns
straight to stdout, so these tests prove the wire protocol is plain enough for it: lines it
types reach a raw-socket member, and lines that member sends arrive whole on its screen.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from _streams import StreamWatcher

SEED_CLIENT = Path(__file__).resolve().parent / "seed_chat_client.py"
WELCOME = re.compile(r"\* welcome to chat-svc, you are (\S+) in (?:room )?(\S+);")


@pytest.fixture
def seed_client() -> Any:
    """Start the seed client as the seed's README does: ``python chat_client.py HOST PORT``."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(host: str, port: int) -> tuple[subprocess.Popen[bytes], StreamWatcher]:
        proc = subprocess.Popen(
            [sys.executable, str(SEED_CLIENT), host, str(port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        procs.append(proc)
        return proc, StreamWatcher(proc.stdout.fileno())

    yield start
    for proc in procs:
        if proc.poll() is None:
            # The seed client cannot be stopped politely: at end of input its select() loop
            # spins on an always-readable stdin, exactly as the original did.
            proc.kill()
        proc.wait(5)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()


def type_line(proc: subprocess.Popen[bytes], text: str) -> None:
    assert proc.stdin is not None
    proc.stdin.write(text.encode() + b"\n")
    proc.stdin.flush()


def test_seed_client_exchanges_lines_with_raw_socket_client(chat_server: Any, seed_client: Any) -> None:
    srv = chat_server()
    peer = srv.connect()
    peer_nick = WELCOME.search(peer.expect("* welcome")).group(1)

    proc, out = seed_client(srv.host, srv.port)
    out.wait_for("Connected to remote host. You can start sending messages")
    seed_nick = out.wait_for(WELCOME).group(1)
    assert seed_nick.startswith("127.0.0.1:"), "the seed's identity: <ip>:<port>"
    peer.expect(f"* {seed_nick} joined lobby")

    # seed -> raw socket: one line at a time (the seed reads stdin with a buffered readline()
    # after select(), so several lines queued at once would sit in its buffer).
    for text in ("hello from the seed client", "second line, ünïcödé"):
        type_line(proc, text)
        assert peer.expect(f"[{seed_nick}]") == f"[{seed_nick}] {text}"

    # raw socket -> seed: every line arrives whole, in order, each followed by the seed's prompt.
    sent = [f"line {i} from the raw client" for i in range(5)]
    for text in sent:
        peer.send(text)
    out.wait_for(f"[{peer_nick}] {sent[-1]}\n")
    received = re.findall(rf"\[{re.escape(peer_nick)}\] (.*)\n", out.text)
    assert received == sent
    assert "[Me] " in out.text

    # The seed's /nick works too: the raw client sees the new name on the next line.
    type_line(proc, "/nick seedling")
    peer.expect(f"* {seed_nick} is now known as seedling")
    type_line(proc, "renamed")
    assert peer.expect("[seedling]") == "[seedling] renamed"
    assert proc.poll() is None, "the seed client is still running"


def test_seed_client_sees_server_go_away(chat_server: Any, seed_client: Any) -> None:
    srv = chat_server()
    proc, out = seed_client(srv.host, srv.port)
    out.wait_for(WELCOME)
    srv.stop()
    out.wait_for("Disconnected from chat server")
    assert proc.wait(10) == 0
    assert "Traceback" not in out.text
