"""The Redis backplane (issue 5): real chat-svc processes sharing a real redis-server.

Every test starts its own redis-server on a free loopback port (``redis_server``
fixture: fails under CI=true when redis-server is missing, skips elsewhere) and
two or three chat-svc instances pointed at it.  Waits are bounded polls, never
bare sleeps standing in for a condition.
"""

from __future__ import annotations

import re
import time
from types import SimpleNamespace
from typing import Any

import pytest
import redis as redis_client
from _backplane import Start, cluster, joined, metrics, readyz, wait_ready
from _chat import LineClient, free_port, wait_for
from _redis import RedisServer
from chat_svc.backplane import RedisBackplane, keys, publisher

pytestmark = pytest.mark.redis

# ----------------------------------------------------------------------------- helpers


def who(client: LineClient, room: str) -> list[str]:
    client.send("/who")
    line = client.expect(f"* in {room} ")
    listed = line.split(": ", 1)[1] if ": " in line else ""
    return [name for name in listed.split(", ") if name]


def rooms(client: LineClient) -> dict[str, int]:
    client.send("/rooms")
    line = client.expect("* rooms:")
    return {name: int(count) for name, count in re.findall(r"(\S+) \((\d+)\)", line)}


def claim(client: LineClient, old: str, new: str) -> bool:
    """Try ``/nick new`` as ``old``; True when it was granted."""
    client.send(f"/nick {new}")
    answer = client.expect_re(rf"^(! nick {new} is taken|\* {old} is now known as {new})$")
    return answer.startswith("*")


def chat_lines(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("[") and not line.startswith("[history]")]


# ----------------------------------------------------------------------------- fan-out


@pytest.mark.parametrize("instances", [2, 3])
def test_members_on_different_instances_chat_in_order_with_nothing_lost(
    redis_server: RedisServer, chat_server: Start, instances: int
) -> None:
    servers = cluster(chat_server, redis_server, instances)
    nicks = [f"m{i}" for i in range(instances)]
    members = [joined(srv, nick, "r") for srv, nick in zip(servers, nicks, strict=True)]
    per_sender = 150
    for nick, member in zip(nicks, members, strict=True):  # all at once: one write each
        member.send("".join(f"{nick} line {k}\n" for k in range(per_sender)))
    for nick, member in zip(nicks, members, strict=True):
        others = [n for n in nicks if n != nick]
        want = {n: [f"[{n}] {n} line {k}" for k in range(per_sender)] for n in others}
        got: dict[str, list[str]] = {n: [] for n in nicks}
        deadline = time.monotonic() + 15
        while any(len(got[n]) < per_sender for n in others) and time.monotonic() < deadline:
            for line in chat_lines(member.lines_for(0.2)):
                got[line[1:].split("]", 1)[0]].append(line)
        for line in chat_lines(member.lines_for(0.3)):  # nothing twice, nothing extra
            got[line[1:].split("]", 1)[0]].append(line)
        assert got[nick] == [], f"{nick} got its own lines back"
        for other in others:
            assert got[other] == want[other], f"{nick} from {other}: lost, reordered or doubled"
    for srv in servers:
        samples = metrics(srv)
        assert samples["chat_backplane_up"] == 1
        assert samples["chat_backplane_published_total"] >= per_sender
        assert samples["chat_backplane_received_total"] >= per_sender * (instances - 1)


def test_an_instance_subscribes_only_to_rooms_with_local_members(redis_server: RedisServer, chat_server: Start) -> None:
    a, b = cluster(chat_server, redis_server, 2)
    store = redis_client.Redis.from_url(redis_server.url)

    def subscribers(room: str) -> int:
        channel = keys.room_channel(room)
        return int(dict(store.pubsub_numsub(channel))[channel.encode()])

    alice = joined(a, "alice", "shared")
    joined(b, "bob", "shared")
    joined(a, "amy", "only-a")
    assert subscribers("shared") == 2
    assert subscribers("only-a") == 1
    wait_for(lambda: subscribers("lobby") == 0, 5, "everyone moved on from lobby")
    alice.send("/join only-a")
    alice.expect("* you joined only-a")
    wait_for(lambda: subscribers("shared") == 1, 5, "a unsubscribes when its last member leaves")
    assert subscribers("only-a") == 1


def test_private_message_reaches_a_member_on_another_instance(redis_server: RedisServer, chat_server: Start) -> None:
    a, b = cluster(chat_server, redis_server, 2)
    alice = joined(a, "alice", "ra")
    bob = joined(b, "bob", "rb")
    alice.send("/msg bob psst, over here")
    assert bob.expect("[alice ->") == "[alice -> bob] psst, over here"
    assert alice.expect("[alice ->") == "[alice -> bob] psst, over here"
    bob.send("/msg alice got it")
    assert alice.expect("[bob ->") == "[bob -> alice] got it"
    alice.send("/msg nobody hello?")
    assert alice.expect("!") == "! no such nick: nobody"


def test_nick_clash_across_instances_is_refused_and_freed_on_leave(
    redis_server: RedisServer, chat_server: Start
) -> None:
    a, b = cluster(chat_server, redis_server, 2)
    alice = a.member("alice")
    other = b.member("other")
    other.send("/nick alice")
    assert other.expect("!") == "! nick alice is taken"
    alice.send("/nick alice2")  # a rename frees the old nick cluster-wide
    alice.expect("* alice is now known as alice2")
    wait_for(lambda: claim(other, "other", "alice"), 5, "alice free after the rename")
    alice.send("/nick alice")
    assert alice.expect("!") == "! nick alice is taken"
    alice.send("/quit")  # leaving frees the nick too
    alice.expect("* bye")
    newcomer = b.member("newcomer")
    wait_for(lambda: claim(newcomer, "newcomer", "alice2"), 5, "alice2 free after /quit")


def test_nicks_are_one_across_instances_whatever_their_case(redis_server: RedisServer, chat_server: Start) -> None:
    """The nick key is lower case; the nick shown keeps the case its owner chose."""
    a, b = cluster(chat_server, redis_server, 2)
    alice = joined(a, "Alice", "r")
    other = joined(b, "other", "r")
    other.send("/nick aLICE")
    assert other.expect("!") == "! nick aLICE is taken"
    other.send("/msg ALICE hello")
    assert alice.expect("[other ->") == "[other -> ALICE] hello"
    assert wait_for(lambda: who(other, "r") == ["Alice", "other"], 5, "who shows the case chosen") < 5
    store = redis_client.Redis.from_url(redis_server.url)
    assert store.get("chat:nick:alice") is not None and store.get("chat:nick:Alice") is None
    alice.send("/nick ALICE")  # a change of case only keeps the nick
    assert other.expect("* Alice") == "* Alice is now known as ALICE"
    assert store.get("chat:nick:alice") is not None


def test_who_and_rooms_cover_every_instance(redis_server: RedisServer, chat_server: Start) -> None:
    a, b, c = cluster(chat_server, redis_server, 3)
    alice = joined(a, "alice", "r")
    bob = joined(b, "bob", "r")
    joined(c, "carol", "other")
    wait_for(lambda: who(bob, "r") == ["alice", "bob"], 5, "/who on b lists alice from a")
    assert who(alice, "r") == ["alice", "bob"]
    wait_for(lambda: {"r": 2, "other": 1}.items() <= rooms(bob).items(), 5, "/rooms sums instances")
    bob.send("/join elsewhere")
    bob.expect("* you joined elsewhere")
    wait_for(lambda: who(alice, "r") == ["alice"], 5, "bob gone from r on a")
    want = {"r": 1, "other": 1, "elsewhere": 1}
    wait_for(lambda: rooms(alice) == want, 5, "/rooms follows the move")


def test_history_is_shared_and_survives_instance_restarts(redis_server: RedisServer, chat_server: Start) -> None:
    a, b, c = cluster(chat_server, redis_server, 3, "--history", "3")
    alice = joined(a, "alice", "h")
    watcher = joined(b, "watcher", "h")
    for text in ("zero", "one", "two", "three"):
        alice.send(text)
    watcher.expect("[alice] three")  # published, so already in the Redis list
    expected = ["[history] [alice] one", "[history] [alice] two", "[history] [alice] three"]
    # c has no member in h: its in-memory history is empty, the lines come from Redis
    newcomer = c.member("newcomer")
    newcomer.send("/join h")
    newcomer.expect("* you joined h")
    assert [newcomer.recv_line() for _ in expected] == expected
    for srv in (a, b, c):
        assert srv.stop() == 0
    fresh = cluster(chat_server, redis_server, 1, "--history", "3")[0]
    later = fresh.member("later")
    later.send("/join h")
    later.expect("* you joined h")
    assert [later.recv_line() for _ in expected] == expected


# ----------------------------------------------------------------------------- outages


def test_redis_outage_keeps_local_rooms_working_and_fanout_resumes(
    redis_server: RedisServer, chat_server: Start
) -> None:
    a = cluster(chat_server, redis_server, 1, "--ready-requires-backplane", "true")[0]
    b = cluster(chat_server, redis_server, 1)[0]  # the default: ready, degraded
    alice, amy = joined(a, "alice", "r"), joined(a, "amy", "r")
    bob = joined(b, "bob", "r")
    alice.send("before")
    assert bob.expect("[alice]") == "[alice] before"
    amy.expect("[alice] before")

    redis_server.kill()
    wait_for(lambda: readyz(a) == (503, "backplane down\n"), 5, "a not ready")
    assert readyz(b) == (200, "ready (degraded: backplane down)\n")
    assert metrics(a)["chat_backplane_up"] == 0
    assert metrics(b)["chat_backplane_up"] == 0
    alice.send("during")  # delivered inside a, never relayed (at-most-once)
    assert amy.expect("[alice]") == "[alice] during"
    assert who(bob, "r") == ["bob"]  # local view, answered at once
    # a joiner on b gets b's mirror of the history, remote lines included
    late = b.member("late")
    late.send("/join r")
    late.expect("* you joined r")
    assert late.expect("[history]") == "[history] [alice] before"

    redis_server.start()  # same port, empty: nothing to replay
    wait_ready(a, timeout=15)
    wait_for(lambda: metrics(b)["chat_backplane_up"] == 1, 15, "b reconnected")
    alice.send("after")
    assert bob.expect("[alice]") == "[alice] after"  # "during" never arrives
    bob.send("back")
    assert alice.expect("[bob]") == "[bob] back"
    for srv in (a, b):
        assert srv.proc.poll() is None
        samples = metrics(srv)
        assert samples["chat_backplane_reconnects_total"] >= 1
    assert metrics(a)["chat_backplane_publish_errors_total{reason=down}"] >= 1
    wait_for(lambda: who(bob, "r") == ["alice", "amy", "bob", "late"], 5, "presence rewritten")


def test_nick_taken_on_two_instances_during_an_outage_is_logged_as_a_conflict(
    redis_server: RedisServer, chat_server: Start
) -> None:
    a, b = cluster(chat_server, redis_server, 2)
    on_a, on_b = joined(a, "x", "r"), joined(b, "y", "r")
    redis_server.kill()
    for srv in (a, b):
        wait_for(lambda srv=srv: metrics(srv)["chat_backplane_up"] == 0, 5, f"backplane down on :{srv.port}")
    assert claim(on_a, "x", "twin") and claim(on_b, "y", "twin")  # nobody to ask: granted locally
    redis_server.start()
    for srv in (a, b):
        wait_for(lambda srv=srv: metrics(srv)["chat_backplane_up"] == 1, 15, f"backplane back on :{srv.port}")
    # Both rewrite their claims; the second finds the nick held by the first and says so.
    wait_for(lambda: any(e["event"] == "nick_conflict" for srv in (a, b) for e in srv.log_events()), 10,
             "a nick_conflict warning")
    conflicts = [e for srv in (a, b) for e in srv.log_events() if e["event"] == "nick_conflict"]
    assert [e["nicks"] for e in conflicts] == [["twin"]]


def test_instance_starts_degraded_without_redis_and_connects_later(chat_server: Start) -> None:
    port = free_port()
    srv = chat_server(
        "--redis-url", f"redis://127.0.0.1:{port}/0", "--flood-rate", "0", "--ready-requires-backplane", "true"
    )
    wait_for(lambda: readyz(srv) == (503, "backplane down\n"), 5, "not ready without Redis")
    alice, bob = srv.member("alice"), srv.member("bob")
    alice.send("local still works")
    assert bob.expect("[alice]") == "[alice] local still works"
    redis = RedisServer(port)
    try:
        wait_ready(srv, timeout=15)
        assert metrics(srv)["chat_backplane_up"] == 1
        assert metrics(srv)["chat_backplane_reconnects_total"] == 0  # first connection
        store = redis_client.Redis.from_url(redis.url)
        wait_for(lambda: store.zcard(keys.who("lobby")) == 2, 5, "presence written to Redis")
    finally:
        redis.stop()


def test_sigkilled_instance_vanishes_from_who_within_the_ttl(redis_server: RedisServer, chat_server: Start) -> None:
    ttl = 2
    a, b, c = cluster(chat_server, redis_server, 3, "--presence-ttl", str(ttl))
    joined(a, "alice", "r")
    bob = joined(b, "bob", "r")
    joined(c, "carol", "r")
    wait_for(lambda: who(bob, "r") == ["alice", "bob", "carol"], 5, "carol listed")
    c.kill()
    # Bounded, not timed: how soon after the TTL is the benchmark's business, that it happens is ours.
    wait_for(lambda: who(bob, "r") == ["alice", "bob"], ttl + 8, "carol expired")
    assert rooms(bob)["r"] == 2
    wait_for(lambda: claim(bob, "bob", "carol"), 2, "the dead instance's nick expired with it")


def test_without_redis_url_there_is_no_backplane(chat_server: Start) -> None:
    srv = chat_server()
    assert readyz(srv) == (200, "ready\n")
    assert not [name for name in metrics(srv) if name.startswith("chat_backplane")]


# ----------------------------------------------------------------------------- in-process


class _Room:
    def __init__(self, name: str) -> None:
        self.name = name
        self.waiting = 0


def _offline_backplane(**rooms: Any) -> RedisBackplane:
    """A backplane on an unused port over a stand-in hub: no Redis call is made."""
    hub = SimpleNamespace(rooms=rooms, members={}, history=20, delivered=[], logs=[])
    hub.deliver_local = lambda room, data, sender, t_read, chat, on_id: hub.delivered.append((room.name, data, "local"))
    hub.deliver_remote = lambda room, epoch, offset, data, chat, sender, t_read: hub.delivered.append(
        (room.name, data, (epoch, offset, chat, sender))
    )
    return RedisBackplane(f"redis://127.0.0.1:{free_port()}/0", hub, instance_id="me")


def test_publish_queue_is_bounded_and_says_so_and_lines_in_flight_stay_here_when_redis_goes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(publisher, "QUEUE_MAX_ITEMS", 50)
    plane = _offline_backplane(r=_Room("r"))
    plane.subscriber.up = True
    taken = [plane.publish("r", f"[x] {k}\n".encode(), True, None, 0.0, None) for k in range(60)]
    assert taken == [True] * 50 + [False] * 10  # the hub delivers those locally
    assert plane.congested and plane.publisher.queued == 50 and plane.publisher.errors["queue_full"] == 10
    assert plane.publisher.broken == {"r"}  # its Redis log is missing lines: a new epoch once Redis answers
    plane.subscriber.lost("test", RuntimeError("gone"))  # the 50 queued are delivered here, in order
    assert [data for _, data, _ in plane.hub.delivered] == [f"[x] {k}\n".encode() for k in range(50)]
    assert plane.publisher.queued == 0 and plane.publisher._queued_bytes == 0 and not plane.congested
    assert not plane.publish("r", b"[x] late\n", True, None, 0.0, None)
    assert plane.publisher.errors["down"] == 51


def test_received_lines_carry_their_id_and_our_own_come_back_to_their_sender() -> None:
    plane = _offline_backplane(r=_Room("r"))
    plane.subscriber.up = True
    sender = object()
    plane.publish("r", b"[a] mine\n", True, sender, 1.5, None)  # type: ignore[arg-type]
    plane.publisher._pending[1] = plane.publisher._queue.popleft()  # as _send_batch does
    channel = keys.room_channel("r").encode()
    plane.subscriber.receive(channel, b"other\0h7 E1:41 [b] theirs\n")
    plane.subscriber.receive(channel, b"me\0h1 E1:42 [a] mine\n")  # our own, back from Redis
    plane.subscriber.receive(channel, b"other\0n8 E1:43 * c joined r\n")
    plane.subscriber.receive(keys.room_channel("elsewhere").encode(), b"other\0h9 E1:1 [b] no room here\n")
    plane.subscriber.receive(channel, b"other\0hbroken")
    assert plane.hub.delivered == [
        ("r", b"[b] theirs\n", (b"E1", 41, True, None)),
        ("r", b"[a] mine\n", (b"E1", 42, True, sender)),
        ("r", b"* c joined r\n", (b"E1", 43, False, None)),
    ]
    assert plane.subscriber.received == 2 and plane.publisher._pending == {}
