"""Each slash command as a unit: its handler against a real Hub, members on recording sinks.

The end-to-end tests (test_chat.py) send the same commands over real sockets.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from _hub_fakes import RecordingSink, make_member, settle
from chat_svc import commands, protocol
from chat_svc.bans import BanList
from chat_svc.directory import Directory
from chat_svc.hub import Hub, Member
from chat_svc.identity import Authenticator, ExpiryWatch
from chat_svc.metrics import Counters


@dataclass(frozen=True)
class Context:
    hub: Hub
    directory: Directory
    auth: Authenticator
    expiry: ExpiryWatch
    bans: BanList = field(default_factory=BanList)


class Room:
    """A hub with members on recording sinks, and a way to run a command line."""

    def __init__(self, *nicks: str, history: int = 20, token_required: bool = False) -> None:
        self.hub = Hub(Counters(), history=history)
        auth = Authenticator("secret" if token_required else None, None)
        self.ctx = Context(self.hub, self.hub, auth, ExpiryWatch(lambda member: None))
        self.sinks: dict[str, RecordingSink] = {}
        self.members: dict[str, Member] = {}
        for nick in nicks:
            self.add(nick)
        self.heard()

    def add(self, nick: str, room: str = "lobby") -> Member:
        self.sinks[nick] = RecordingSink()
        self.members[nick] = make_member(self.hub, nick, self.sinks[nick], room=room)
        return self.members[nick]

    def run(self, nick: str, line: str) -> str | None:
        parsed = protocol.parse(line)
        assert isinstance(parsed, protocol.Command)
        return commands.dispatch(self.ctx, self.members[nick], parsed)

    def heard(self) -> dict[str, list[str]]:
        """What each member was written since the last look."""
        settle()
        return {nick: sink.take_text() for nick, sink in self.sinks.items()}


def test_help_lists_every_listed_command_in_one_line() -> None:
    room = Room("alice")
    assert room.run("alice", "/help") is None
    assert room.heard()["alice"] == [
        "* commands: /nick NAME | /join ROOM | /rooms | /who | /me ACTION | /msg NICK TEXT | /help | /quit"
        "  (start a line with // to send a literal /)"
    ]
    assert [c.name for c in commands.TABLE if not c.listed] == ["auth"]


def test_nick_renames_and_tells_the_room() -> None:
    room = Room("alice", "bob")
    room.run("alice", "/nick alicia")
    heard = room.heard()
    assert heard["alice"] == ["* alice is now known as alicia"]
    assert heard["bob"] == ["* alice is now known as alicia"]
    assert room.hub.members.keys() == {"alicia", "bob"}


def test_nick_refuses_invalid_and_taken_names_and_ignores_the_same_name() -> None:
    room = Room("alice", "bob")
    room.run("alice", "/nick no spaces")
    room.run("alice", "/nick bob")
    room.run("alice", "/nick alice")
    heard = room.heard()
    assert heard["alice"] == ["! invalid nick: use 1-32 letters, digits, _ - .", "! nick bob is taken"]
    assert heard["bob"] == []


def test_join_moves_the_member_with_notices_and_history() -> None:
    room = Room("alice", "bob")
    room.add("carol", room="dev")
    room.hub.say(room.members["carol"], protocol.chat_line("carol", "earlier"), 0.0)
    room.heard()
    room.run("alice", "/join dev")
    heard = room.heard()
    assert heard["alice"] == ["* you joined dev", "[history] [carol] earlier"]
    assert heard["bob"] == ["* alice left lobby"]
    assert heard["carol"] == ["* alice joined dev"]
    assert room.members["alice"].room is room.hub.rooms["dev"]


def test_join_refuses_bad_names_and_the_current_room() -> None:
    room = Room("alice")
    room.run("alice", "/join bad/room")
    room.run("alice", "/join lobby")
    assert room.heard()["alice"] == [
        "! invalid room name: use 1-32 letters, digits, _ - . (optional leading #)",
        "* you are already in lobby",
    ]


def test_rooms_lists_each_room_with_its_count() -> None:
    room = Room("alice", "bob")
    room.add("carol", room="dev")
    room.heard()
    room.run("alice", "/rooms")
    assert room.heard()["alice"] == ["* rooms: dev (1), lobby (2)"]


def test_who_lists_the_room_sorted_and_caps_long_lists() -> None:
    room = Room("bob", "alice")
    room.run("bob", "/who")
    assert room.heard()["bob"] == ["* in lobby (2): alice, bob"]
    for n in range(commands.WHO_SHOWN + 5):
        room.add(f"m{n:03d}")
    room.heard()
    room.run("bob", "/who")
    line = room.heard()["bob"][0]
    assert line.startswith(f"* in lobby ({commands.WHO_SHOWN + 7}): alice, bob, m000, ")
    assert line.endswith(" and 7 more")


def test_me_acts_to_the_others_and_needs_an_action() -> None:
    room = Room("alice", "bob")
    room.run("alice", "/me waves")
    room.run("alice", "/me")
    heard = room.heard()
    assert heard["bob"] == ["* alice waves"]
    assert heard["alice"] == ["! usage: /me ACTION"]


def test_msg_reaches_only_its_recipient_and_echoes_to_the_sender() -> None:
    room = Room("alice", "bob", "carol")
    before = room.hub.counters.deliveries
    room.run("alice", "/msg bob  psst ")
    heard = room.heard()
    assert heard["bob"] == ["[alice -> bob] psst"]
    assert heard["alice"] == ["[alice -> bob] psst"]
    assert heard["carol"] == []
    assert room.hub.counters.deliveries == before + 1  # the echo is not a delivery


def test_msg_to_yourself_arrives_once() -> None:
    room = Room("alice")
    room.run("alice", "/msg alice note to self")
    assert room.heard()["alice"] == ["[alice -> alice] note to self"]


def test_msg_needs_a_known_nick_and_text() -> None:
    room = Room("alice")
    room.run("alice", "/msg nobody hello?")
    room.run("alice", "/msg bob")
    room.run("alice", "/msg")
    assert room.heard()["alice"] == ["! no such nick: nobody", "! usage: /msg NICK TEXT", "! usage: /msg NICK TEXT"]


def test_quit_says_bye_and_ends_the_session() -> None:
    room = Room("alice")
    assert room.run("alice", "/quit") == "quit"
    assert room.heard()["alice"] == ["* bye"]


@pytest.mark.parametrize(
    ("token_required", "answer"), [(True, "! already authenticated"), (False, "! no token is required")]
)
def test_auth_after_the_first_line_says_why_it_is_not_needed(token_required: bool, answer: str) -> None:
    room = Room("alice", token_required=token_required)
    assert room.run("alice", "/auth secret") is None
    assert room.heard()["alice"] == [answer]


def test_unknown_command_points_at_help() -> None:
    room = Room("alice")
    assert room.run("alice", "/DANCE now") is None
    assert room.heard()["alice"] == ["! unknown command /dance (try /help)"]


def test_replies_come_after_the_room_lines_the_member_is_owed() -> None:
    room = Room("alice", "bob")
    room.hub.say(room.members["bob"], protocol.chat_line("bob", "first"), 0.0)
    room.run("alice", "/who")  # before the sweeper has run
    assert room.heard()["alice"] == ["[bob] first", "* in lobby (2): alice, bob"]
