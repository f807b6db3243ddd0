"""Rooms sharded over a real Redis Cluster (issue 16): delivery, a dead shard, failover.

Each test builds its own cluster from Debian's redis-server and redis-cli
(fails under CI=true when they are missing); the failure tests break theirs.
Waits are bounded polls; the 10 s of the failover test is the issue's bound.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import pytest
from _backplane import Start, joined, metrics, wait_ready
from _chat import LineClient, ServerProcess, wait_for
from _rediscluster import ClusterNode, RedisCluster
from chat_svc.backplane import keys

pytestmark = pytest.mark.redis

ID = re.compile(r"@([A-Za-z0-9]{1,16}):(\d+) (.*)")


@pytest.fixture
def three_masters() -> Iterator[RedisCluster]:
    cluster = RedisCluster(masters=3, replicas=0)
    yield cluster
    cluster.stop()


@pytest.fixture
def with_replicas() -> Iterator[RedisCluster]:
    cluster = RedisCluster(masters=3, replicas=1)
    yield cluster
    cluster.stop()


def instances(chat_server: Start, cluster: RedisCluster, count: int = 2) -> list[ServerProcess]:
    """Instances each given a different node of the cluster: any node will do."""
    urls = cluster.urls()
    servers = [
        chat_server("--redis-url", urls[i % len(urls)], "--flood-rate", "0", "--notice-threshold", "0")
        for i in range(count)
    ]
    masters = len(cluster.masters())
    for srv in servers:
        wait_ready(srv)
        wait_for(lambda srv=srv: metrics(srv).get("chat_backplane_shards_up") == masters, 15, f"shards up :{srv.port}")
        assert metrics(srv)["chat_backplane_shards"] == masters
        assert metrics(srv)["chat_backplane_up"] == 1
    return servers


def say(client: LineClient, nick: str, text: str, count: int) -> None:
    """``count`` numbered lines in one write, then an end mark."""
    client.send("".join(f"{nick} {text} {k}\n" for k in range(count)) + f"{nick} {text} end\n")


def heard(client: LineClient, nick: str, text: str) -> list[str]:
    """The lines from ``nick`` that ``client`` got up to ``nick``'s end mark (lines keep their order,
    so a line lost, doubled or reordered shows here)."""
    lines = client.read_until(f"[{nick}] {nick} {text} end", timeout=15)
    return [line for line in lines[:-1] if line.startswith(f"[{nick}] ")]


def expected(nick: str, text: str, count: int) -> list[str]:
    return [f"[{nick}] {nick} {text} {k}" for k in range(count)]


def relays(sender: LineClient, receiver: LineClient, nick: str, text: str, within: float) -> bool:
    """``sender`` says ``text`` (numbered) every 0.3 s until ``receiver`` hears one, or ``within`` s pass."""
    deadline = time.monotonic() + within
    k = 0
    while time.monotonic() < deadline:
        sender.send(f"{text} {k}")
        k += 1
        if any(line.startswith(f"[{nick}] {text} ") for line in receiver.lines_for(0.3)):
            return True
    return False


def rooms_by_master(cluster: RedisCluster, count: int) -> dict[int, list[str]]:
    """``count`` room names, with the port of the master holding each one's slot."""
    by_port: dict[int, list[str]] = {}
    for i in range(count):
        room = f"room{i}"
        by_port.setdefault(cluster.node_of(keys.room_channel(room)).port, []).append(room)
    return by_port


def test_thirty_rooms_over_three_masters_deliver_every_line_once_in_order(
    three_masters: RedisCluster, chat_server: Start
) -> None:
    """Done-when 1: 2 instances, 30 rooms with a member on each instance; channels on all 3 masters."""
    a, b = instances(chat_server, three_masters)
    rooms = [f"room{i}" for i in range(30)]
    pairs = [(joined(a, f"a{i}", room), joined(b, f"b{i}", room)) for i, room in enumerate(rooms)]
    per_sender = 20
    for i, (left, right) in enumerate(pairs):
        say(left, f"a{i}", "line", per_sender)
        say(right, f"b{i}", "line", per_sender)
    for i, (left, right) in enumerate(pairs):
        assert heard(right, f"a{i}", "line") == expected(f"a{i}", "line", per_sender)
        assert heard(left, f"b{i}", "line") == expected(f"b{i}", "line", per_sender)
    for i, (left, right) in enumerate(pairs):  # and nothing more, after the end marks
        extra_l = [line for line in left.lines_for(0.02) if line.startswith("[")]
        extra_r = [line for line in right.lines_for(0.02) if line.startswith("[")]
        assert (i, extra_l, extra_r) == (i, [], [])
    channels = {node.port: three_masters.shard_channels(node) for node in three_masters.masters()}
    room_channels = {keys.room_channel(room) for room in rooms}
    assert len(channels) == 3
    for port, names in channels.items():
        assert room_channels & set(names), f"no room channel on master :{port}"
    assert set().union(*channels.values()) >= room_channels
    for node in three_masters.masters():  # both instances subscribed each of its rooms there
        counts = three_masters.cmd(node, "PUBSUB", "SHARDNUMSUB", *(room_channels & set(channels[node.port])))
        assert set(counts.split()[1::2]) == {"2"}, counts


def test_a_dead_master_costs_only_its_rooms_and_resumes_there_say_incomplete(
    three_masters: RedisCluster, chat_server: Start
) -> None:
    """Done-when 2 (no replicas): SIGKILL one master; the other shards' rooms lose nothing across
    instances, the dead shard's rooms keep local delivery, and a resume there answers incomplete."""
    a, b = instances(chat_server, three_masters)
    by_port = rooms_by_master(three_masters, 12)
    assert len(by_port) == 3
    victim_port = next(iter(by_port))
    victim = next(node for node in three_masters.nodes if node.port == victim_port)
    lost_room = by_port[victim_port][0]
    alive_rooms = [room for port, rooms in by_port.items() if port != victim_port for room in rooms]
    left = {room: joined(a, f"a{i}", room) for i, room in enumerate(alive_rooms)}
    right = {room: joined(b, f"b{i}", room) for i, room in enumerate(alive_rooms)}
    speaker, local_ear, far_ear = joined(a, "sp", lost_room), joined(a, "near", lost_room), joined(b, "far", lost_room)
    local_ear.send("/ids")
    local_ear.expect("* ids on")
    speaker.send("before")
    epoch, offset, _ = ID.fullmatch(local_ear.expect_re(r"^@\S+ \[sp\] before$")).groups()  # type: ignore[union-attr]
    far_ear.expect("[sp] before")
    local_ear.close()

    victim.kill()
    for srv in (a, b):
        wait_for(lambda srv=srv: metrics(srv)["chat_backplane_shards_up"] == 2, 15, f"a shard down on :{srv.port}")
        assert metrics(srv)["chat_backplane_up"] == 1
        assert readyz_ok(srv)

    per_sender = 15
    for i, room in enumerate(alive_rooms):
        say(left[room], f"a{i}", "after", per_sender)
    for i, room in enumerate(alive_rooms):
        assert heard(right[room], f"a{i}", "after") == expected(f"a{i}", "after", per_sender)

    near2 = joined(a, "near2", lost_room)
    speaker.send("during")
    near2.expect("[sp] during")  # local delivery goes on
    assert not any("during" in line for line in far_ear.lines_for(1.0))  # nothing crosses a dead shard
    resumer = a.member("near3")
    resumer.send(f"/resume {lost_room} {epoch}:{offset}")
    resumer.expect(f"! resume incomplete {lost_room}: ")
    a.expect_log("backplane_shard_down", "backplane_shard_unreachable")
    b.expect_log("backplane_shard_down", "backplane_shard_unreachable")


def readyz_ok(srv: ServerProcess) -> bool:
    """Ready: a dead shard does not take instances out of the balancer (docs/scaling.md says why)."""
    status, _, _ = srv.get("/readyz")
    return status == 200


def test_a_promoted_replica_takes_over_without_restarting_chat_svc(
    with_replicas: RedisCluster, chat_server: Start
) -> None:
    """Done-when 2 (3 masters + 3 replicas): after a manual failover and after a master is SIGKILLed,
    cross-instance delivery in the moved room resumes within 10 s, unattended."""
    a, b = instances(chat_server, with_replicas)
    room = "failover"
    sender, receiver = joined(a, "s", room), joined(b, "r", room)
    assert relays(sender, receiver, "s", "warm", 5)
    master = with_replicas.node_of(keys.room_channel(room))
    replica = next(node for node in with_replicas.nodes if replicates(with_replicas, node, master))
    assert with_replicas.cmd(replica, "CLUSTER", "FAILOVER").strip() == "OK"
    wait_for(lambda: with_replicas.holder(keys.room_channel(room)) is replica, 10, "replica promoted")
    started = time.monotonic()
    assert relays(sender, receiver, "s", "after failover", 10), "no delivery 10 s after CLUSTER FAILOVER"
    manual = time.monotonic() - started

    with_replicas.wait_ok()
    replica.kill()  # the master now: its replica (the old master) takes over
    killed = time.monotonic()
    assert relays(sender, receiver, "s", "after kill", 10), "no delivery 10 s after the master was SIGKILLed"
    print(f"delivery resumed {manual:.1f} s after CLUSTER FAILOVER, {time.monotonic() - killed:.1f} s after SIGKILL")
    for srv in (a, b):
        wait_for(lambda srv=srv: metrics(srv)["chat_backplane_shards_up"] == 3, 15, f"3 shards up on :{srv.port}")
        srv.expect_log("backplane_shard_down", "backplane_shard_unreachable", "backplane_rooms_moved")


def replicates(cluster: RedisCluster, node: ClusterNode, master: ClusterNode) -> bool:
    return re.search(rf"^master_port:{master.port}\s*$", cluster.cmd(node, "INFO", "replication"), re.M) is not None
