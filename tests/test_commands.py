"""Each slash command as a unit: its handler against a real Hub, members on recording sinks.

The end-to-end tests (test_chat.py) send the same commands over real sockets.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pytest
from _hub_fakes import RecordingSink, make_member, settle
from chat_svc import commands, protocol
from chat_svc.bans import BanList
from chat_svc.directory import Directory
from chat_svc.hub import Hub, Member
from chat_svc.identity import Authenticator, ExpiryWatch
from chat_svc.metrics import Counters
from chat_svc.roomlog import RoomLogs


@dataclass(frozen=True)
class Context:
    hub: Hub
    directory: Directory
    auth: Authenticator
    expiry: ExpiryWatch
    bans: BanList = field(default_factory=BanList)
    listings: commands.Listings = field(default_factory=commands.Listings)
    new_rooms: tuple[int, float] = (20, 0.0)


class Room:
    """A hub with members on recording sinks, and a way to run a command line."""

    def __init__(
        self,
        *nicks: str,
        history: int = 20,
        token_required: bool = False,
        new_rooms: tuple[int, float] = (20, 0.0),
        resume_lines: int = 1000,
    ) -> None:
        self.hub = Hub(Counters(), history=history, logs=RoomLogs(max_lines=resume_lines))
        auth = Authenticator("secret" if token_required else None, None)
        self.ctx = Context(self.hub, self.hub, auth, ExpiryWatch(lambda member: None), new_rooms=new_rooms)
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


def test_help_lists_every_listed_command_one_per_line() -> None:
    room = Room("alice")
    assert room.run("alice", "/help") is None
    assert room.heard()["alice"] == [
        "* commands:",
        "* /nick NAME  take the nick NAME",
        "* /join ROOM  leave your room for ROOM (#ROOM too)",
        "* /rooms  list the biggest rooms and how many are in each",
        "* /who  list who is in your room",
        "* /me ACTION  tell your room what you are doing",
        "* /msg NICK TEXT  send TEXT to NICK alone",
        "* /ids  prefix every line of a room's log with its id @EPOCH:OFFSET",
        "* /resume ROOM EPOCH:OFFSET  enter ROOM and get every line after that id",
        "* /help  show the commands",
        "* /quit  say goodbye and disconnect",
        "* //text  send /text as a chat line",
    ]
    assert [c.name for c in commands.TABLE if not c.listed] == ["auth"]
    assert all(len(line) <= 80 for line in commands.HELP.decode().splitlines())


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


def test_nick_without_a_name_shows_usage() -> None:
    room = Room("alice")
    room.run("alice", "/nick")
    room.run("alice", "/join")
    assert room.heard()["alice"] == ["! usage: /nick NAME", "! usage: /join ROOM"]


def test_nicks_are_unique_whatever_their_case_and_keep_the_case_shown() -> None:
    room = Room("alice", "bob")
    room.run("bob", "/nick ALICE")
    room.run("alice", "/nick Alice")
    heard = room.heard()
    assert heard["bob"] == ["! nick ALICE is taken", "* alice is now known as Alice"]
    assert room.hub.member("aLiCe") is room.members["alice"] and room.members["alice"].nick == "Alice"
    room.run("bob", "/msg ALICE hi")
    assert room.heard()["alice"] == ["[bob -> ALICE] hi"]


@pytest.mark.parametrize("reserved", ["history", "server", "You", "WELCOME", "bye", "ids", "resumed", "in"])
def test_nicks_that_would_read_as_server_lines_are_reserved(reserved: str) -> None:
    room = Room("alice")
    room.run("alice", f"/nick {reserved}")
    assert room.heard()["alice"] == [f"! nick {reserved} is reserved"]


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
    room.run("alice", "/join ##lobby")
    room.run("alice", "/join lobby")
    room.run("alice", "/join #LOBBY")
    assert room.heard()["alice"] == [
        "! invalid room name: use 1-32 letters, digits, _ - . (optional leading #)",
        "! invalid room name: use 1-32 letters, digits, _ - . (optional leading #)",
        "* you are already in lobby",
        "* you are already in lobby",
    ]


def test_room_names_drop_one_leading_hash_and_ignore_case() -> None:
    room = Room("alice", "bob")
    room.run("alice", "/join #Dev")
    room.run("bob", "/join DEV")
    heard = room.heard()
    assert heard["alice"] == ["* you joined dev", "* bob joined dev"]
    assert heard["bob"] == ["* alice left lobby", "* you joined dev"]
    assert list(room.hub.rooms) == ["dev"]


def test_rooms_lists_each_room_with_its_count_biggest_first() -> None:
    room = Room("alice", "bob")
    room.add("carol", room="dev")
    room.heard()
    room.run("alice", "/rooms")
    assert room.heard()["alice"] == ["* rooms: lobby (2), dev (1)"]


def test_rooms_shows_the_biggest_rooms_and_totals_the_rest() -> None:
    room = Room("alice", "bob")
    for n in range(commands.ROOMS_SHOWN + 10):
        room.add(f"m{n}", room=f"r{n:03d}")
    room.heard()
    room.run("alice", "/rooms")
    line = room.heard()["alice"][0]
    assert line.startswith("* rooms: lobby (2), r000 (1), r001 (1), ")
    assert line.endswith(f", r048 (1) and 11 more (62 members in {commands.ROOMS_SHOWN + 11} rooms)")
    assert len(line) < 1000


def test_listings_are_reused_until_membership_changes_and_big_ones_rebuilt_at_most_every_floor() -> None:
    now = [100.0]
    builds: list[int] = []
    listings = commands.Listings(floor=0.1, ttl=1.0, big=1000, clock=lambda: now[0])

    def ask(generation: int, step: float, walked: int) -> None:
        now[0] += step
        assert listings.get("/rooms", generation, walked, lambda: builds.append(1) or b"answer") == b"answer"

    ask(1, 0.0, 5)  # built
    ask(1, 0.5, 5)  # unchanged: reused
    ask(2, 0.01, 5)  # changed, small: built again at once
    ask(2, 1.2, 5)  # unchanged but older than the ttl: built
    assert len(builds) == 3
    ask(3, 0.0, 5000)  # changed, big, built 0 s ago: reused
    ask(4, 0.05, 5000)  # changed, big, built 0.05 s ago: reused
    ask(5, 0.06, 5000)  # changed, big, built 0.11 s ago (past the floor): built
    assert len(builds) == 4


def test_commands_cost_flood_tokens_by_what_they_cost_the_server() -> None:
    assert commands.cost("plain chat") == commands.cost(None) == 1
    assert commands.cost(protocol.Command("rooms", "")) == 5
    assert commands.cost(protocol.Command("who", "")) == commands.cost(protocol.Command("join", "x")) == 3
    assert commands.cost(protocol.Command("dance", "")) == 1


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
    assert heard["bob"] == ["* [alice] waves"]
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


# ----------------------------------------------------------------------------- ids and resume


def _id(line: str) -> tuple[str, int]:
    """(epoch, offset) of an id-prefixed line."""
    match = re.match(r"@([A-Za-z0-9]{1,16}):(\d+) ", line)
    assert match, line
    return match[1], int(match[2])


def test_ids_prefix_every_line_of_the_room_log_and_nothing_else() -> None:
    room = Room("alice", "bob", "carol")
    assert room.run("alice", "/ids") is None
    assert room.heard()["alice"] == ["* ids on"]
    room.hub.say(room.members["bob"], protocol.chat_line("bob", "hi"), 0.0)
    room.run("bob", "/me waves")
    room.run("carol", "/nick caroline")
    room.run("bob", "/msg alice psst")
    room.run("alice", "/who")
    room.run("alice", "/join nowhere!")
    heard = room.heard()
    ids = [_id(line) for line in heard["alice"][:3]]
    assert [line.split(" ", 1)[1] for line in heard["alice"][:3]] == [
        "[bob] hi", "* [bob] waves", "* carol is now known as caroline"
    ]  # fmt: skip
    assert heard["alice"][3:] == [
        "[bob -> alice] psst",
        "* in lobby (3): alice, bob, caroline",
        "! invalid room name: use 1-32 letters, digits, _ - . (optional leading #)",
    ]
    assert len({epoch for epoch, _ in ids}) == 1
    assert [offset for _, offset in ids] == [ids[0][1], ids[0][1] + 1, ids[0][1] + 2]
    assert heard["bob"] == ["* carol is now known as caroline", "[bob -> alice] psst"]
    assert heard["carol"] == ["[bob] hi", "* [bob] waves", "* carol is now known as caroline"]


def test_history_carries_each_lines_own_id() -> None:
    room = Room("alice", "bob")
    room.run("alice", "/ids")
    room.hub.say(room.members["bob"], protocol.chat_line("bob", "one"), 0.0)
    room.hub.say(room.members["bob"], protocol.chat_line("bob", "two"), 0.0)
    live = room.heard()["alice"][1:]
    room.run("alice", "/join dev")
    room.run("alice", "/join lobby")
    heard = room.heard()["alice"]
    assert heard[-2:] == [line.replace(" [bob]", " [history] [bob]") for line in live]


def test_resume_replays_exactly_what_came_after_the_id_then_says_how_many() -> None:
    room = Room("alice", "bob")
    room.run("alice", "/ids")
    room.hub.say(room.members["bob"], protocol.chat_line("bob", "seen"), 0.0)
    epoch, offset = _id(room.heard()["alice"][1])
    for n in range(5):
        room.hub.say(room.members["bob"], protocol.chat_line("bob", f"missed {n}"), 0.0)
    room.heard()
    newcomer = room.add("alice2")
    room.heard()
    assert room.run("alice2", f"/resume lobby {epoch}:{offset}") is None
    room.hub.say(room.members["bob"], protocol.chat_line("bob", "live"), 0.0)
    heard = room.heard()["alice2"]
    # every line after the id, its own arrival in lobby included
    assert [_id(line) for line in heard[:6]] == [(epoch, offset + 1 + n) for n in range(6)]
    assert [line.split(" ", 1)[1] for line in heard[:6]] == [
        *(f"[bob] missed {n}" for n in range(5)), "* alice2 joined lobby"
    ]
    assert heard[6] == "* resumed lobby: 6 lines"
    assert heard[7].endswith(" [bob] live") and _id(heard[7]) == (epoch, offset + 7)
    assert len(heard) == 8 and newcomer.ids
    assert (room.hub.counters.resumes_complete, room.hub.counters.resume_lines) == (1, 6)


def test_resume_into_another_room_moves_with_notices_and_no_history() -> None:
    room = Room("alice", "bob")
    room.add("carol", room="dev")
    room.run("carol", "/ids")
    room.run("bob", "/join dev")
    room.hub.say(room.members["bob"], protocol.chat_line("bob", "in dev"), 0.0)
    epoch, offset = _id(room.heard()["carol"][-1])
    room.run("alice", f"/resume #Dev {epoch}:{offset}")  # the room as /join names it: dev
    heard = room.heard()
    assert heard["alice"] == ["* resumed dev: 0 lines"]
    assert heard["bob"] == ["* alice joined dev"]
    assert heard["carol"] == [f"@{epoch}:{offset + 1} * alice joined dev"]
    assert room.members["alice"].room is room.hub.rooms["dev"]


@pytest.mark.parametrize(
    ("since", "reason"),
    [
        ("Zz9:1", "epoch changed"),
        ("{epoch}:1", "2 lines no longer retained"),
        ("{epoch}:99", "offset 99 is ahead of the log (latest {last})"),
    ],
)
def test_resume_says_why_it_is_incomplete_then_sends_the_history(since: str, reason: str) -> None:
    room = Room("alice", "bob", "alice2", resume_lines=3)
    room.run("alice", "/ids")
    for n in range(3):
        room.hub.say(room.members["bob"], protocol.chat_line("bob", f"line {n}"), 0.0)
    lines = room.heard()["alice"][1:]
    epoch, last = _id(lines[-1])  # the log holds offsets 4..6; 1..3 (three join notices) are gone
    assert last == 6
    room.run("alice2", "/resume lobby " + since.format(epoch=epoch))
    heard = room.heard()["alice2"]
    assert heard[0] == "! resume incomplete lobby: " + reason.format(last=last)
    assert heard[1:] == [line.replace(" [bob]", " [history] [bob]") for line in lines]
    assert room.hub.counters.resumes_incomplete == 1


def test_resume_in_the_same_room_replays_without_repeating_what_is_pending() -> None:
    room = Room("alice", "bob")
    room.run("alice", "/ids")
    room.hub.say(room.members["bob"], protocol.chat_line("bob", "zero"), 0.0)
    epoch, offset = _id(room.heard()["alice"][1])
    room.hub.say(room.members["bob"], protocol.chat_line("bob", "one"), 0.0)
    room.run("alice", f"/resume lobby {epoch}:{offset}")  # "one" is still waiting for the sweeper
    assert [line.split(" ", 1)[1] for line in room.heard()["alice"]] == ["[bob] one", "resumed lobby: 1 lines"]


@pytest.mark.parametrize("arg", ["", "lobby", "lobby abc", "lobby abc:-1", "lobby a_b:1", "lobby x:1 extra"])
def test_resume_needs_a_room_and_an_id(arg: str) -> None:
    room = Room("alice")
    room.run("alice", f"/resume {arg}")
    assert room.heard()["alice"] == ["! usage: /resume ROOM EPOCH:OFFSET"]


def test_a_member_may_bring_only_so_many_rooms_into_being() -> None:
    room = Room("alice", "bob", new_rooms=(2, 0.001))
    for name in ("r1", "r2", "r3", "lobby"):
        room.run("alice", f"/join {name}")
    room.run("alice", "/resume r4 abc:1")
    room.add("carol", room="r9")
    room.run("alice", "/join r9")  # a room with members is not brought into being
    heard = room.heard()["alice"]
    assert heard[:2] == ["* you joined r1", "* you joined r2"]
    assert re.fullmatch(r"! too many new rooms: try again in \d+ s", heard[2])
    assert heard[3:] == ["* you joined lobby", heard[2], "* you joined r9"]
    assert room.hub.counters.rooms_refused == 2
