"""The chat line protocol: what a client's line means and how server lines look.

Pure functions only: no sockets, no rooms.  Every line the server writes is
built here, so the wire format is defined in one place (and in README.md).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

NICK_RE = re.compile(r"[A-Za-z0-9_.\-]{1,32}")
ROOM_RE = re.compile(r"#?[A-Za-z0-9_.\-]{1,32}")


@dataclass(frozen=True, slots=True)
class Command:
    """A parsed slash command; ``arg`` is the rest of the line, stripped."""

    name: str
    arg: str


def parse(line: str) -> Command | str | None:
    """Classify one decoded line.

    Returns a Command for ``/name args``, the chat text for anything else, and
    None for a blank line (ignored, as a bare Enter should be).
    """
    if not line.strip():
        return None
    if line.startswith("//"):
        return line[1:]
    if line.startswith("/"):
        name, _, arg = line[1:].partition(" ")
        return Command(name.lower(), arg.strip())
    return line


def valid_nick(name: str) -> bool:
    return NICK_RE.fullmatch(name) is not None


def valid_room(name: str) -> bool:
    return ROOM_RE.fullmatch(name) is not None


RESUME_RE = re.compile(r"(\S+) ([A-Za-z0-9]{1,16}):([0-9]{1,18})")


def parse_resume(arg: str) -> tuple[str, bytes, int] | None:
    """``ROOM EPOCH:OFFSET`` of a /resume; None when it is not that shape."""
    match = RESUME_RE.fullmatch(arg)
    if match is None:
        return None
    return match[1], match[2].encode(), int(match[3])


def encode(text: str) -> bytes:
    """One server line as bytes; the single place lines get their terminator."""
    return (text + "\n").encode("utf-8", "replace")


def chat_line(nick: str, text: str) -> bytes:
    return encode(f"[{nick}] {text}")


def action_line(nick: str, action: str) -> bytes:
    return encode(f"* {nick} {action}")


def private_line(sender: str, recipient: str, text: str) -> bytes:
    return encode(f"[{sender} -> {recipient}] {text}")


def joined_line(nick: str, room: str) -> bytes:
    return encode(f"* {nick} joined {room}")


def left_line(nick: str, room: str) -> bytes:
    return encode(f"* {nick} left {room}")


def renamed_line(old: str, new: str) -> bytes:
    return encode(f"* {old} is now known as {new}")


def welcome_line(nick: str, room: str) -> bytes:
    return encode(f"* welcome to chat-svc, you are {nick} in room {room}; type /help for commands")


def info_line(text: str) -> bytes:
    return encode(f"* {text}")


def error_line(text: str) -> bytes:
    return encode(f"! {text}")


def resumed_line(room: str, count: int) -> bytes:
    """After a complete replay; the count is always followed by "lines", so clients match one pattern."""
    return encode(f"* resumed {room}: {count} lines")


def resume_incomplete_line(room: str, reason: str) -> bytes:
    return error_line(f"resume incomplete {room}: {reason}")


RESTARTING = encode("* server restarting, reconnect")
IDS_ON = encode("* ids on")

HISTORY_PREFIX = b"[history] "


def history_block(entries: Sequence[tuple[bytes, int, bytes, bool]], ids: bool = False) -> bytes:
    """Recent room lines, each marked so clients can tell them from live ones; with ids, each keeps its own."""
    if ids:
        return b"".join(b"@%b:%d [history] %b" % (epoch, offset, line) for epoch, offset, line, _ in entries)
    return b"".join(HISTORY_PREFIX + entry[2] for entry in entries)
