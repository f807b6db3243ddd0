"""Slash commands: one table of name, usage, help, cost and handler; ``/help`` is built from it.

A handler answers through the hub (so its reply comes after the room lines
its member is already owed) and asks the Directory who is where.  It never
touches the session or its socket, so every command runs in a unit test
against a real Hub.  It returns the reason the session ends, or None to go on.

Listings are what a client could turn into an amplifier (5000 rooms made a
190 KB ``/rooms`` answer costing 6 ms of the one event loop).  So each answer
is bounded (``/rooms`` shows the biggest ``ROOMS_SHOWN`` rooms and a total,
``/who`` the first ``WHO_SHOWN`` names), built at most once per
``Listings.floor`` whoever asks, and every command spends its ``cost`` in
tokens from the sender's flood bucket.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import structlog

from . import protocol
from .bans import BanList
from .directory import Directory
from .flood import TokenBucket
from .hub import Hub, Member
from .identity import NICK_TAKEN, WRONG_SUB, Authenticator, ExpiryWatch
from .jwtauth import AuthFailed, looks_like_jwt

log = structlog.get_logger("chat_svc.commands")

# /who lists at most this many nicks, then says how many more there are.
WHO_SHOWN = 200
# /rooms lists at most this many rooms, the biggest first, then the totals.
ROOMS_SHOWN = 50
NICK_RULE = "use 1-32 letters, digits, _ - ."
ROOM_RULE = NICK_RULE + " (optional leading #)"


class Listings:
    """The ``/rooms`` and ``/who`` answers, shared by everyone who asks within a moment.

    An answer is reused for up to ``ttl`` seconds while this instance's
    membership is unchanged (``generation``), so a quiet server answers from
    memory, exactly.  With a backplane, other instances' changes do not move
    this instance's generation: the service then passes ``ttl=0``.
    A big listing (``big`` rooms or members walked, about 0.2 ms of work) is
    moreover rebuilt at most every ``floor`` seconds, changes or not, so a
    crowd asking during churn costs one build per ``floor`` (20 builds a second
    of a 5000-room listing are about 2 % of the loop); a small one is cheap
    enough to build for every asker, and so is never stale.
    """

    def __init__(
        self,
        floor: float = 0.05,
        ttl: float = 1.0,
        big: int = 1000,
        size: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.floor = floor
        self.ttl = ttl
        self.big = big
        self.size = size
        self._clock = clock
        self._answers: dict[str, tuple[float, int, bytes]] = {}

    def get(self, key: str, generation: int, walked: int, build: Callable[[], bytes]) -> bytes:
        """The answer for ``key``; ``walked``: how many rooms or members a build walks."""
        now = self._clock()
        cached = self._answers.get(key)
        if cached is not None:
            built, seen, answer = cached
            age = now - built
            if (seen == generation and age < self.ttl) or (age < self.floor and walked >= self.big):
                return answer
        answer = build()
        if len(self._answers) >= self.size:
            self._answers = {k: v for k, v in self._answers.items() if now - v[0] < self.ttl}
            if len(self._answers) >= self.size:
                self._answers.clear()
        self._answers[key] = (now, generation, answer)
        return answer


class Context(Protocol):
    """What handlers may use besides the member who sent the command."""

    @property
    def hub(self) -> Hub: ...

    @property
    def directory(self) -> Directory: ...

    @property
    def listings(self) -> Listings: ...

    @property
    def auth(self) -> Authenticator: ...

    @property
    def expiry(self) -> ExpiryWatch: ...

    @property
    def bans(self) -> BanList: ...

    @property
    def new_rooms(self) -> tuple[int, float]:
        """Rooms a member may bring into being at once, and per second after that (0: no limit)."""
        ...


Handler = Callable[[Context, Member, str], str | None]


def _reply(ctx: Context, member: Member, data: bytes) -> None:
    ctx.hub.send_to(member, data)


def nick(ctx: Context, member: Member, arg: str) -> str | None:
    if not arg:
        _usage(ctx, member, "nick")
        return None
    if not protocol.valid_nick(arg):
        _reply(ctx, member, protocol.error_line(f"invalid nick: {NICK_RULE}"))
        return None
    if protocol.reserved_nick(arg):
        _reply(ctx, member, protocol.error_line(f"nick {arg} is reserved"))
        return None
    identity = member.identity
    if identity is not None and not identity.nick_change and protocol.nick_key(arg) != protocol.nick_key(identity.sub):
        _reply(ctx, member, protocol.error_line(f"nick change not allowed: you are {identity.sub}"))
        return None
    ban = ctx.bans.for_nick(arg) if arg != member.nick else None
    if ban is not None:
        _reply(ctx, member, protocol.error_line(f"banned: {ban.reason}"))
        return None
    old = member.nick
    error = ctx.directory.claim_nick(member, arg)
    if error:
        _reply(ctx, member, protocol.error_line(error))
    elif old != arg:
        log.info("nick_changed", old=old, nick=arg)
    return None


def _may_bring_into_being(ctx: Context, member: Member, room: str) -> bool:
    """Whether ``member`` may enter ``room``: a room this process holds nothing of costs a token.

    Every room brought into being costs memory here and keys in Redis until
    it expires; one client must not mint them without bound.
    """
    burst, rate = ctx.new_rooms
    if rate <= 0 or ctx.hub.knows_room(room):
        return True
    bucket = member.new_rooms
    if not isinstance(bucket, TokenBucket):
        bucket = member.new_rooms = TokenBucket(burst, rate)
    if bucket.try_take():
        return True
    ctx.hub.counters.rooms_refused += 1
    _reply(ctx, member, protocol.error_line(f"too many new rooms: try again in {max(1, round(bucket.wait()))} s"))
    log.info("room_creation_refused", nick=member.nick, room=room)
    return False


def _may_enter(ctx: Context, member: Member, arg: str) -> str | None:
    """/join and /resume: the room ``arg`` names, if it is valid, allowed by the member's JWT and
    not one new room too many; else None, and the member is told why."""
    name = protocol.room_name(arg)
    if name is None:
        _reply(ctx, member, protocol.error_line(f"invalid room name: {ROOM_RULE}"))
        return None
    if member.identity is not None and not member.identity.allows(name):
        _reply(ctx, member, protocol.error_line(f"not allowed in {name}"))
        return None
    return name if _may_bring_into_being(ctx, member, name) else None


def join(ctx: Context, member: Member, arg: str) -> str | None:
    assert member.room is not None
    if not arg:
        _usage(ctx, member, "join")
        return None
    name = _may_enter(ctx, member, arg)
    if name is None:
        return None
    if member.room.name == name:
        _reply(ctx, member, protocol.info_line(f"you are already in {name}"))
        return None
    _move(ctx, member, name)
    return None


def _move(ctx: Context, member: Member, room: str) -> None:
    _reply(ctx, member, protocol.info_line(f"you joined {room}"))
    ctx.hub.move(member, room)
    log.info("room_joined", nick=member.nick, room=room)


def rooms(ctx: Context, member: Member, _: str) -> str | None:
    hub = ctx.hub
    answer = ctx.listings.get("/rooms", hub.generation, len(hub.rooms), lambda: _rooms_answer(ctx.directory))
    _reply(ctx, member, answer)
    return None


def _rooms_answer(directory: Directory) -> bytes:
    counts = directory.room_counts()
    shown = heapq.nsmallest(ROOMS_SHOWN, counts, key=lambda room: (-room[1], room[0]))
    listing = ", ".join(f"{name} ({count})" for name, count in shown)
    more = len(counts) - len(shown)
    if more > 0:
        members = sum(count for _, count in counts)
        listing += f" and {more} more ({members} members in {len(counts)} rooms)"
    return protocol.info_line(f"rooms: {listing}")


def who(ctx: Context, member: Member, _: str) -> str | None:
    assert member.room is not None
    room, walked = member.room.name, len(member.room.members)
    answer = ctx.listings.get(f"/who {room}", ctx.hub.generation, walked, lambda: _who_answer(ctx.directory, room))
    _reply(ctx, member, answer)
    return None


def _who_answer(directory: Directory, room: str) -> bytes:
    names = directory.who(room)
    more = len(names) - WHO_SHOWN
    shown = ", ".join(names[:WHO_SHOWN]) + (f" and {more} more" if more > 0 else "")
    return protocol.info_line(f"in {room} ({len(names)}): {shown}")


def me(ctx: Context, member: Member, arg: str) -> str | None:
    if not arg:
        _usage(ctx, member, "me")
        return None
    ctx.hub.say(member, protocol.action_line(member.nick, arg), time.perf_counter())
    return None


def msg(ctx: Context, member: Member, arg: str) -> str | None:
    target, _, text = arg.partition(" ")
    text = text.strip()
    if not target or not text:
        _usage(ctx, member, "msg")
    elif not ctx.directory.whisper(member, target, text):
        _reply(ctx, member, protocol.error_line(f"no such nick: {target}"))
    return None


def _usage(ctx: Context, member: Member, name: str) -> None:
    _reply(ctx, member, protocol.error_line(f"usage: {BY_NAME[name].usage}"))


def ids(ctx: Context, member: Member, _: str) -> str | None:
    ctx.hub.enable_ids(member)
    _reply(ctx, member, protocol.IDS_ON)
    return None


def resume(ctx: Context, member: Member, arg: str) -> str | None:
    parsed = protocol.parse_resume(arg)
    if parsed is None:
        _usage(ctx, member, "resume")
        return None
    arg_room, epoch, offset = parsed
    room = _may_enter(ctx, member, arg_room)
    if room is None:
        return None
    complete, _ = ctx.hub.resume(member, room, epoch, offset)
    if not complete:
        log.info("resume_incomplete", nick=member.nick, room=room, since=f"{epoch.decode()}:{offset}")
    return None


def help_(ctx: Context, member: Member, _: str) -> str | None:
    _reply(ctx, member, HELP)
    return None


def quit_(ctx: Context, member: Member, _: str) -> str | None:
    _reply(ctx, member, protocol.info_line("bye"))
    return "quit"


def auth(ctx: Context, member: Member, arg: str) -> str | None:
    """/auth after the first line: a JWT identifies a guest, or refreshes the member's own identity.

    The shared token was checked (or not needed) on the first line already.
    """
    if not (ctx.auth.accepts_jwt and looks_like_jwt(arg)):
        refusal = "already authenticated" if ctx.auth.required else "no token is required"
        _reply(ctx, member, protocol.error_line(refusal))
        return None
    try:
        identity = ctx.auth.check(arg)
        if identity is None:  # a shared token shaped like a JWT
            _reply(ctx, member, protocol.error_line("already authenticated"))
            return None
        current = member.identity
        if current is not None and current.sub != identity.sub:
            ctx.auth.count(WRONG_SUB)
            raise AuthFailed(WRONG_SUB)
    except AuthFailed as failed:
        log.info("auth_failed", reason=failed.reason)
        _reply(ctx, member, protocol.error_line("authentication failed"))
        return None
    if current is None:
        ban = ctx.bans.for_nick(identity.sub)
        if ban is not None:
            _reply(ctx, member, protocol.error_line(f"banned: {ban.reason}"))
            return "banned"
        error = ctx.directory.claim_nick(member, identity.sub)
        if error:
            ctx.auth.count(NICK_TAKEN)
            log.info("auth_failed", reason=NICK_TAKEN)
            _reply(ctx, member, protocol.error_line(error))
            return None
    member.identity = identity
    ctx.expiry.watch(member)
    log.info("authenticated", nick=member.nick, refresh=current is not None)
    _reply(ctx, member, protocol.info_line(f"authenticated as {identity.sub}"))
    if member.room is not None and not identity.allows(member.room.name):
        _move(ctx, member, identity.start_room(member.room.name))
    return None


@dataclass(frozen=True, slots=True)
class Command:
    """One slash command: how it is called, what it does in a line, its handler and its cost.

    ``cost`` is in flood-bucket tokens (a chat line costs 1): roughly what the
    command costs the server next to a chat line, so no mix of commands buys a
    client more than its rate's worth of the event loop.
    """

    name: str
    usage: str
    help: str
    run: Handler
    cost: int = 1
    listed: bool = True


TABLE: tuple[Command, ...] = (
    # Renames tell the room and, with Redis, claim the nick there.
    Command("nick", "/nick NAME", "take the nick NAME", nick, cost=2),
    # Two notices, a history block, and with Redis a subscription and a history read.
    Command("join", "/join ROOM", "leave your room for ROOM (#ROOM too)", join, cost=3),
    # Listings walk every room or member (cached, but a miss costs a walk).
    Command("rooms", "/rooms", "list the biggest rooms and how many are in each", rooms, cost=5),
    Command("who", "/who", "list who is in your room", who, cost=3),
    Command("me", "/me ACTION", "tell your room what you are doing", me),
    Command("msg", "/msg NICK TEXT", "send TEXT to NICK alone", msg),
    Command("ids", "/ids", "prefix every line of a room's log with its id @EPOCH:OFFSET", ids),
    # As /join, with a replay of up to --resume-lines lines instead of the history block.
    Command("resume", "/resume ROOM EPOCH:OFFSET", "enter ROOM and get every line after that id", resume, cost=3),
    Command("help", "/help", "show the commands", help_),
    Command("quit", "/quit", "say goodbye and disconnect", quit_),
    # The first line when the server requires it; later only to present or refresh a JWT.
    Command("auth", "/auth TOKEN", "present the access token or your JWT", auth, listed=False),
)

BY_NAME = {command.name: command for command in TABLE}

HELP = b"".join(
    [
        protocol.info_line("commands:"),
        *(protocol.info_line(f"{command.usage}  {command.help}") for command in TABLE if command.listed),
        protocol.info_line("//text  send /text as a chat line"),
    ]
)


def cost(parsed: protocol.Command | str | None) -> int:
    """Flood-bucket tokens a parsed line spends: its command's cost; 1 for chat, blank lines and unknown commands."""
    if not isinstance(parsed, protocol.Command):
        return 1
    command = BY_NAME.get(parsed.name)
    return command.cost if command is not None else 1


def dispatch(ctx: Context, member: Member, parsed: protocol.Command) -> str | None:
    """Run the command ``parsed`` for ``member``; the reason the session ends, or None."""
    command = BY_NAME.get(parsed.name)
    if command is None:
        _reply(ctx, member, protocol.error_line(f"unknown command /{parsed.name} (try /help)"))
        return None
    return command.run(ctx, member, parsed.arg)
