"""Past the seed's select() ceiling: 2000 members in one room all hear one broadcast."""

from __future__ import annotations

import resource
import selectors
import socket
import time

import pytest


def read_until(socks: list[socket.socket], token: bytes, timeout: float) -> set[int]:
    """Indexes of the sockets that received a line containing ``token`` in time."""
    selector = selectors.DefaultSelector()
    buffers = {}
    for index, sock in enumerate(socks):
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, index)
        buffers[index] = b""
    done: set[int] = set()
    deadline = time.monotonic() + timeout
    while len(done) < len(socks) and time.monotonic() < deadline:
        for key, _ in selector.select(0.2):
            index = key.data
            try:
                chunk = key.fileobj.recv(65536)  # type: ignore[union-attr]
            except BlockingIOError:
                continue
            if not chunk:
                selector.unregister(key.fileobj)
                continue
            buffers[index] += chunk
            if token in buffers[index]:
                done.add(index)
                selector.unregister(key.fileobj)
            else:
                buffers[index] = buffers[index][-4096:]
    selector.close()
    return done


@pytest.mark.slow
def test_two_thousand_members_in_one_room_all_receive_a_broadcast(chat_server):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4500:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    srv = chat_server("--flood-rate", "0")
    count = 2000
    socks = []
    for n in range(count):
        sock = socket.create_connection((srv.host, srv.port), timeout=10)
        sock.sendall(f"/nick m{n}\n".encode())
        socks.append(sock)
    welcomed = read_until(socks, b"is now known as m", 60)
    assert len(welcomed) == count
    for sock in socks:
        sock.setblocking(True)
    socks[0].sendall(b"/who\n")
    socks[0].settimeout(10)
    seen = b""
    while b"* in lobby (" not in seen or not seen.endswith(b"\n"):
        seen += socks[0].recv(1 << 20)
    who = seen[seen.index(b"* in lobby (") :].decode().rstrip("\n")
    assert who.startswith("* in lobby (2000): m0, m1, m10, m100, m1000, ")
    names, _, more = who.split(": ", 1)[1].rpartition(" and ")
    assert more == "1800 more" and len(names.split(", ")) == 200  # one line, whatever the room size
    socks[0].sendall(b"hello two thousand\n")
    received = read_until(socks[1:], b"[m0] hello two thousand\n", 60)
    assert len(received) == count - 1
    for sock in socks:
        sock.close()
