"""The PROXY protocol (HAProxy's ``send-proxy`` and ``send-proxy-v2``): the real client behind a balancer.

Behind a TCP balancer every client has the balancer's address, and per-address
caps, throttles, logs and default nicks all break.  A balancer listed in
``--proxy-protocol-from`` starts each connection with a PROXY header naming the
client; parsing is the ``proxy-protocol`` package's (v1 text and v2 binary).
As the specification demands, nothing is guessed: a connection from a listed
balancer must start with a header, and a header from anywhere else is refused
(``looks_like_header`` lets the sniffer tell).

The header is read exactly, never a byte beyond it: with TLS the client's
handshake follows and must reach the TLS layer untouched.
"""

from __future__ import annotations

import socket
import struct
import time
from typing import Any

import gevent
from proxyprotocol import ProxyProtocolIncompleteError
from proxyprotocol.detect import ProxyProtocolDetect
from proxyprotocol.result import is_ipv4, is_ipv6

V1_SIGNATURE = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX = 107  # the specification's longest v1 line, CRLF included
_PARSER = ProxyProtocolDetect()


class ProxyHeaderError(Exception):
    """A balancer's connection did not start with a valid PROXY header."""


def looks_like_header(head: bytes) -> bool | None:
    """True when ``head`` starts with a PROXY signature, None while it still might, else False."""
    for signature in (V1_SIGNATURE, V2_SIGNATURE):
        if head.startswith(signature):
            return True
        if signature.startswith(head):
            return None
    return False


def read_header(sock: Any, deadline: float) -> tuple[str, int] | None:
    """The client address a balancer's header names; None for a balancer's own connection (LOCAL, UNKNOWN).

    Raises ``ProxyHeaderError`` when the header is missing, malformed, or not
    complete by ``deadline``.
    """
    data = b""
    while True:
        try:
            result = _PARSER.unpack(data)
        except ProxyProtocolIncompleteError as incomplete:
            want = incomplete.want_read
            if want.want_line:
                data += _recv_line(sock, deadline, V1_MAX - len(data))
            else:
                data += _recv_exactly(sock, deadline, want.want_bytes or 0)
            continue
        except (ValueError, struct.error) as exc:  # the package's syntax errors are ValueErrors
            raise ProxyHeaderError(f"bad PROXY header: {exc or type(exc).__name__}") from None
        if is_ipv4(result) or is_ipv6(result):
            return str(result.source[0]), int(result.source[1])
        return None


def _remaining(deadline: float) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise ProxyHeaderError("no complete PROXY header in time")
    return remaining


def _recv_exactly(sock: Any, deadline: float, count: int) -> bytes:
    data = b""
    while len(data) < count:
        data += _recv(sock, deadline, count - len(data))
    return data


def _recv_line(sock: Any, deadline: float, limit: int) -> bytes:
    """Up to and including the next LF, within ``limit`` bytes; peeks so as not to read past it."""
    while True:
        peeked = _recv(sock, deadline, limit, socket.MSG_PEEK)
        end = peeked.find(b"\n")
        if end >= 0:
            return _recv_exactly(sock, deadline, end + 1)
        if len(peeked) >= limit:
            raise ProxyHeaderError("PROXY v1 header longer than 107 bytes")
        # Only a listed balancer gets here, and it sends its header in one piece;
        # wait for the rest without spinning on the bytes already there.
        gevent.sleep(0.005)


def _recv(sock: Any, deadline: float, count: int, flags: int = 0) -> bytes:
    sock.settimeout(_remaining(deadline))
    try:
        data: bytes = sock.recv(count, flags)
    except TimeoutError:
        raise ProxyHeaderError("no complete PROXY header in time") from None
    except OSError as exc:
        raise ProxyHeaderError(f"connection failed before its PROXY header: {exc}") from None
    if not data:
        raise ProxyHeaderError("connection closed before its PROXY header")
    return data
