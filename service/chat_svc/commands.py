"""Slash commands: one table of name, usage, help and handler; ``/help`` is built from it.

A handler answers through the hub (so its reply comes after the room lines
its member is already owed) and asks the Directory who is where.  It never
touches the session or its socket, so every command runs in a unit test
against a real Hub.  It returns the reason the session ends, or None to go on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import structlog

from . import protocol
from .bans import BanList
from .directory import Directory
from .hub import Hub, Member
from .identity import NICK_TAKEN, WRONG_SUB, Authenticator, ExpiryWatch
from .jwtauth import AuthFailed, looks_like_jwt

log = structlog.get_logger("chat_svc.commands")

# /who lists at most this many nicks, then says how many more there are.
WHO_SHOWN = 200
NICK_RULE = "use 1-32 letters, digits, _ - ."
ROOM_RULE = NICK_RULE + " (optional leading #)"


class Context(Protocol):
    """What handlers may use besides the member who sent the command."""

    @property
    def hub(self) -> Hub: ...

    @property
    def directory(self) -> Directory: ...

    @property
    def auth(self) -> Authenticator: ...

    @property
    def expiry(self) -> ExpiryWatch: ...

    @property
    def bans(self) -> BanList: ...


Handler = Callable[[Context, Member, str], str | None]


def _reply(ctx: Context, member: Member, data: bytes) -> None:
    ctx.hub.send_to(member, data)


def nick(ctx: Context, member: Member, arg: str) -> str | None:
    if not protocol.valid_nick(arg):
        _reply(ctx, member, protocol.error_line(f"invalid nick: {NICK_RULE}"))
        return None
    identity = member.identity
    if identity is not None and not identity.nick_change and arg != identity.sub:
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


def join(ctx: Context, member: Member, arg: str) -> str | None:
    assert member.room is not None
    if not protocol.valid_room(arg):
        _reply(ctx, member, protocol.error_line(f"invalid room name: {ROOM_RULE}"))
        return None
    if member.identity is not None and not member.identity.allows(arg):
        _reply(ctx, member, protocol.error_line(f"not allowed in {arg}"))
        return None
    if member.room.name == arg:
        _reply(ctx, member, protocol.info_line(f"you are already in {arg}"))
        return None
    _move(ctx, member, arg)
    return None


def _move(ctx: Context, member: Member, room: str) -> None:
    _reply(ctx, member, protocol.info_line(f"you joined {room}"))
    ctx.hub.move(member, room)
    log.info("room_joined", nick=member.nick, room=room)


def rooms(ctx: Context, member: Member, _: str) -> str | None:
    listing = ", ".join(f"{name} ({count})" for name, count in ctx.directory.room_counts())
    _reply(ctx, member, protocol.info_line(f"rooms: {listing}"))
    return None


def who(ctx: Context, member: Member, _: str) -> str | None:
    assert member.room is not None
    names = ctx.directory.who(member.room.name)
    more = len(names) - WHO_SHOWN
    shown = ", ".join(names[:WHO_SHOWN]) + (f" and {more} more" if more > 0 else "")
    _reply(ctx, member, protocol.info_line(f"in {member.room.name} ({len(names)}): {shown}"))
    return None


def me(ctx: Context, member: Member, arg: str) -> str | None:
    if not arg:
        _reply(ctx, member, protocol.error_line("usage: /me ACTION"))
        return None
    ctx.hub.say(member, protocol.action_line(member.nick, arg), time.perf_counter())
    return None


def msg(ctx: Context, member: Member, arg: str) -> str | None:
    target, _, text = arg.partition(" ")
    text = text.strip()
    if not target or not text:
        _reply(ctx, member, protocol.error_line("usage: /msg NICK TEXT"))
    elif not ctx.directory.whisper(member, target, text):
        _reply(ctx, member, protocol.error_line(f"no such nick: {target}"))
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
    """One slash command: how it is called, what it does in a line, and its handler."""

    name: str
    usage: str
    help: str
    run: Handler
    listed: bool = True


TABLE: tuple[Command, ...] = (
    Command("nick", "/nick NAME", "take the nick NAME", nick),
    Command("join", "/join ROOM", "leave your room for ROOM, created on demand", join),
    Command("rooms", "/rooms", "list the rooms and how many are in each", rooms),
    Command("who", "/who", "list who is in your room", who),
    Command("me", "/me ACTION", "tell your room what you are doing", me),
    Command("msg", "/msg NICK TEXT", "send TEXT to NICK alone", msg),
    Command("help", "/help", "show the commands", help_),
    Command("quit", "/quit", "say goodbye and disconnect", quit_),
    # The first line when the server requires it; later only to present or refresh a JWT.
    Command("auth", "/auth TOKEN", "present the access token or your JWT", auth, listed=False),
)

BY_NAME = {command.name: command for command in TABLE}

HELP = protocol.info_line(
    "commands: "
    + " | ".join(command.usage for command in TABLE if command.listed)
    + "  (start a line with // to send a literal /)"
)


def dispatch(ctx: Context, member: Member, parsed: protocol.Command) -> str | None:
    """Run the command ``parsed`` for ``member``; the reason the session ends, or None."""
    command = BY_NAME.get(parsed.name)
    if command is None:
        _reply(ctx, member, protocol.error_line(f"unknown command /{parsed.name} (try /help)"))
        return None
    return command.run(ctx, member, parsed.arg)
