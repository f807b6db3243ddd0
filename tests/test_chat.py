"""The chat contract over real sockets against a real server process."""

from __future__ import annotations


def test_line_reaches_every_other_member_and_is_not_echoed(chat_server):
    srv = chat_server()
    alice, bob, carol = (srv.member(n) for n in ("alice", "bob", "carol"))
    alice.send("hello room")
    assert bob.expect("[alice]") == "[alice] hello room"
    assert carol.expect("[alice]") == "[alice] hello room"
    assert not [line for line in alice.lines_for(0.5) if line.startswith("[alice]")]


def test_join_and_leave_notices_name_the_member(chat_server):
    srv = chat_server()
    alice = srv.member("alice")
    bob = srv.connect()
    welcome = bob.expect("* welcome")
    nick = welcome.split("you are ")[1].split(" ")[0]
    host, port = nick.rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) == bob.sock.getsockname()[1]
    assert welcome == f"* welcome to chat-svc, you are {nick} in lobby; type /help"
    assert len(welcome) <= 80
    alice.expect(f"* {nick} joined lobby")
    bob.close()
    alice.expect(f"* {nick} left lobby")


def test_blank_lines_are_ignored_and_crlf_is_accepted(chat_server):
    srv = chat_server()
    alice, bob = srv.member("alice"), srv.member("bob")
    alice.send(b"\r\n   \n\nfirst\r\nsecond\n")
    assert bob.recv_line() == "[alice] first"
    assert bob.recv_line() == "[alice] second"


def test_nick_rules(chat_server):
    srv = chat_server()
    alice, bob = srv.member("alice"), srv.member("bob")
    alice.send("/nick bob")
    assert alice.expect("!") == "! nick bob is taken"
    for bad in ("a" * 33, "has space", "bad:colon", "émile", "\u0430lice"):
        alice.send(f"/nick {bad}")
        assert alice.expect("!").startswith("! invalid nick")
    # Invisible characters are stripped before the line is read: they never reach a nick.
    alice.send("/nick a\u202eli\u200bc\u2066e2")
    assert bob.expect("*") == "* alice is now known as alice2"
    alice.send("/nick alice")
    assert bob.expect("*") == "* alice2 is now known as alice"
    alice.send("/nick")
    assert alice.expect("!") == "! usage: /nick NAME"
    alice.send("/nick BOB")
    assert alice.expect("!") == "! nick BOB is taken"
    alice.send("/nick al.ice-2_X")
    assert bob.expect("*") == "* alice is now known as al.ice-2_X"
    alice.send("hi")
    assert bob.expect("[") == "[al.ice-2_X] hi"
    bob.send("/msg AL.ICE-2_x case does not matter")
    assert alice.expect("[bob") == "[bob -> AL.ICE-2_x] case does not matter"


def test_join_moves_between_rooms_created_on_demand(chat_server):
    srv = chat_server()
    alice, bob, carol = srv.member("alice"), srv.member("bob"), srv.member("carol")
    bob.send("/join dev")
    bob.expect("* you joined dev")
    alice.expect("* bob left lobby")
    carol.send("/join #Dev")
    carol.expect("* you joined dev")
    bob.expect("* carol joined dev")
    carol.send("/join DEV")
    assert carol.expect("*") == "* you are already in dev"
    carol.send("in dev")
    assert bob.expect("[carol]") == "[carol] in dev"
    assert not [line for line in alice.lines_for(0.4) if "in dev" in line]
    bob.send("/join dev")
    assert bob.expect("*") == "* you are already in dev"
    bob.send("/join bad/room")
    assert bob.expect("!").startswith("! invalid room name")
    bob.send("/rooms")
    assert bob.expect("* rooms") == "* rooms: dev (2), lobby (1)"


def test_rooms_and_who_list_members(chat_server):
    srv = chat_server()
    alice, bob = srv.member("alice"), srv.member("bob")
    srv.member("carol", room="dev")
    alice.send("/rooms")
    assert alice.expect("* rooms") == "* rooms: lobby (2), dev (1)"
    bob.send("/who")
    assert bob.expect("* in ") == "* in lobby (2): alice, bob"


def test_join_leave_and_rename_notices_stop_above_the_notice_threshold(chat_server):
    srv = chat_server("--notice-threshold", "2")
    alice = srv.member("alice")
    bob = srv.member("bob")
    assert alice.read_until("* ")[-1].endswith(" joined lobby")  # 2 members: at the threshold
    assert alice.expect("* ").endswith(" is now known as bob")
    carol, dave = srv.member("carol"), srv.member("dave")  # 3 and 4: above it
    dave.send("/quit")  # 4 -> 3 members
    dave.expect("* bye")
    carol.send("/quit")  # 3 -> 2: a room of 3 was still above the threshold
    carol.expect("* bye")
    bob.send("sync")
    assert alice.read_until("[bob] sync") == ["[bob] sync"]
    bob.send("/quit")  # 2 -> 1
    assert alice.expect("* ") == "* bob left lobby"


def test_me_action_and_usage(chat_server):
    srv = chat_server()
    alice, bob = srv.member("alice"), srv.member("bob")
    alice.send("/me waves")
    assert bob.expect("* [alice]") == "* [alice] waves"
    alice.send("/me")
    assert alice.expect("!") == "! usage: /me ACTION"


def test_private_message_goes_only_to_its_recipient(chat_server):
    srv = chat_server()
    alice, bob, carol = srv.member("alice"), srv.member("bob"), srv.member("carol")
    alice.send("/msg bob meet at noon")
    assert bob.expect("[alice ->") == "[alice -> bob] meet at noon"
    assert alice.expect("[alice ->") == "[alice -> bob] meet at noon"
    assert not [line for line in carol.lines_for(0.4) if "noon" in line]
    alice.send("/msg nobody hi")
    assert alice.expect("!") == "! no such nick: nobody"
    alice.send("/msg bob")
    assert alice.expect("!") == "! usage: /msg NICK TEXT"


def test_help_unknown_command_and_literal_slash(chat_server):
    srv = chat_server()
    alice, bob = srv.member("alice"), srv.member("bob")
    alice.send("/help")
    alice.expect("* commands:")
    assert alice.recv_line() == "* /nick NAME  take the nick NAME"
    alice.send("/dance now")
    assert alice.expect("!").startswith("! unknown command")
    alice.send("//shrug")
    assert bob.expect("[alice]") == "[alice] /shrug"


def test_quit_says_bye_closes_and_tells_the_room(chat_server):
    srv = chat_server()
    alice, bob = srv.member("alice"), srv.member("bob")
    bob.send("/quit")
    assert bob.expect("* bye") == "* bye"
    assert bob.closed()
    alice.expect("* bob left lobby")


def test_joiner_gets_recent_history_marked_as_history(chat_server):
    srv = chat_server("--history", "3")
    alice = srv.member("alice")
    for n in range(5):
        alice.send(f"line {n}")
    alice.send("/me is done")
    alice.send("/who")  # answered in order, so every line before it is in the history
    alice.expect("* in lobby")
    bob = srv.connect()
    bob.expect("* welcome")
    history = [bob.recv_line() for _ in range(3)]
    assert history == ["[history] [alice] line 3", "[history] [alice] line 4", "[history] * [alice] is done"]
    alice.send("live")
    assert bob.expect("[alice]") == "[alice] live"


def test_history_is_replayed_on_join_and_can_be_disabled(chat_server):
    srv = chat_server("--history", "2")
    alice = srv.member("alice", room="dev")
    alice.send("dev talk")
    bob = srv.member("bob")
    bob.send("/join dev")
    bob.expect("* you joined dev")
    assert bob.recv_line() == "[history] [alice] dev talk"
    quiet = chat_server("--history", "0")
    carol = quiet.member("carol")
    carol.send("nothing kept")
    dave = quiet.connect()
    dave.expect("* welcome")
    dave.send("/who")
    assert dave.recv_line().startswith("* in lobby")


def test_line_over_the_limit_is_refused_and_disconnected(chat_server):
    srv = chat_server("--max-line-bytes", "100")
    alice, bob = srv.member("alice"), srv.member("bob")
    alice.send("x" * 100)
    assert bob.expect("[alice]") == "[alice] " + "x" * 100
    alice.send("y" * 101)
    assert alice.expect("!") == "! line too long"
    assert alice.closed()
    bob.expect("* alice left lobby")


def test_invalid_utf8_and_escapes_never_reach_others(chat_server):
    srv = chat_server()
    alice, bob = srv.member("alice"), srv.member("bob")
    alice.send(b"bad \xff\xfe utf8 \x1b[2J\x1b]0;title\x07 nul\x00 tab\there \xc2\x9b\n")
    line = bob.expect("[alice]")
    assert line == "[alice] bad \ufffd\ufffd utf8 [2J]0;title nul tab\there "
    assert not any(ord(ch) < 32 and ch != "\t" for ch in line)
    alice.send("still fine")
    assert bob.expect("[alice]") == "[alice] still fine"
