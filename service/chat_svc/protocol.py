"""The chat line protocol: what a client's line means and how server lines look.

Pure functions only: no sockets, no rooms.  Every line the server writes is
built here, so the wire format is defined in one place (and in docs/protocol.md).

No line a member causes may be byte-identical to one the server writes on its
own account, or a member could speak as the server.  Member lines have three
shapes: ``[NICK] text``, ``[NICK -> NICK] text`` and ``* [NICK] action``
(``/me``); the server's own lines start with ``! ``, ``[history] `` or ``* ``
followed by anything but ``[``.  The notices that name a member
(``* NICK joined ROOM``) would collide when a nick equals the first word of a
server notice (``* you joined dev``, ``* server shutting down``), so those
words are reserved as nicks.  Nicks are unique regardless of case, as on IRC.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

NICK_RE = re.compile(r"[A-Za-z0-9_.\-]{1,32}")
ROOM_RE = re.compile(r"#?[A-Za-z0-9_.\-]{1,32}")

# The first words of the server's own notices (and the history marker), in
# lower case: a member with one of these nicks could write a line identical
# to the server's (``* you joined dev`` as a join notice of nick ``you``).
RESERVED_NICKS = frozenset(
    {
        "history", "server", "you", "welcome", "bye", "in", "ids", "resumed", "rooms", "commands", "authenticated",
        "admin", "root",
    }
)


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


def reserved_nick(name: str) -> bool:
    return nick_key(name) in RESERVED_NICKS


def nick_key(name: str) -> str:
    """The form nicks are compared in: ``Alice`` and ``alice`` are one nick (the display keeps its case)."""
    return name.lower()


def room_name(name: str) -> str | None:
    """The room ``name`` means (one leading ``#`` dropped, lower case), or None when it is not a room name.

    ``#Dev``, ``dev`` and ``DEV`` are one room, shown as ``dev``: IRC channel
    names are case-insensitive too, and a user typing ``#dev`` means ``dev``.
    """
    if ROOM_RE.fullmatch(name) is None:
        return None
    return name.removeprefix("#").lower()


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
    """``/me``: the nick in brackets, so no action reads as a server notice (``* server shutting down``)."""
    return encode(f"* [{nick}] {action}")


def private_line(sender: str, recipient: str, text: str) -> bytes:
    return encode(f"[{sender} -> {recipient}] {text}")


def joined_line(nick: str, room: str) -> bytes:
    return encode(f"* {nick} joined {room}")


def left_line(nick: str, room: str) -> bytes:
    return encode(f"* {nick} left {room}")


def renamed_line(old: str, new: str) -> bytes:
    return encode(f"* {old} is now known as {new}")


def welcome_line(nick: str, room: str) -> bytes:
    """Fits 80 columns with any IPv4 ``ip:port`` nick in ``lobby``."""
    return encode(f"* welcome to chat-svc, you are {nick} in {room}; type /help")


def notices_summary_line(room: str, joined: int, left: int, renamed: int) -> bytes:
    """Join/leave/rename notices a busy room did not show one by one (see ``NoticeLimiter``)."""
    counts = ((joined, "joined"), (left, "left"), (renamed, "renamed"))
    parts = [f"{count} more {verb}" for count, verb in counts if count]
    return encode(f"* {room}: {', '.join(parts)}")


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
