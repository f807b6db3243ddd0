"""The ban list and the idempotency keys as units, on a clock the test moves.

The API tests (test_api.py, test_api_cluster.py) drive both through real
servers; these pin the rules: matching, expiry, what is announced, bounds.
"""

from __future__ import annotations

import pytest
from chat_svc.bans import Ban, BanList, normalize_ip
from chat_svc.idempotency import MAX_KEYS, PENDING, LocalIdempotency


class Clock:
    """Time the test moves by hand (``clock.now += 60``)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_bans_match_by_nick_sub_address_and_network() -> None:
    clock = Clock()
    bans = BanList(clock)
    assert bans.for_ip("10.0.0.1") is None and bans.for_nick("eve") is None
    by_nick = bans.create("eve", None, "spam", 60)
    by_ip = bans.create(None, "10.0.0.1", "flood", 60)
    by_net = bans.create(None, normalize_ip("192.168.0.0/16"), "range", 60)
    assert bans.for_nick("eve") is by_nick and bans.for_nick("bob") is None
    assert bans.for_ip("10.0.0.1") is by_ip and bans.for_ip("10.0.0.2") is None
    assert bans.for_ip("192.168.7.9") is by_net and bans.for_ip("not an address") is None
    assert by_nick.matches("eve", "1.1.1.1", None) and by_nick.matches("renamed", "1.1.1.1", "eve")
    assert not by_nick.matches("bob", "10.0.0.1", None)
    assert by_net.matches("x", "192.168.1.1", None) and not by_net.matches("x", "192.169.1.1", None)
    # Nicks are one whatever their case, so a ban on one is too.
    assert bans.for_nick("EVE") is by_nick and by_nick.matches("Eve", "1.1.1.1", None)
    assert by_nick.matches("renamed", "1.1.1.1", "eVe")


def test_bans_end_after_their_ttl_and_leave_the_list() -> None:
    clock = Clock()
    bans = BanList(clock)
    short = bans.create("eve", None, "spam", 10)
    longer = bans.create("eve", None, "again", 100)
    assert bans.for_nick("eve") is longer, "the longest-lasting ban wins"
    clock.now += 50
    assert [ban.id for ban in bans.active()] == [longer.id]
    assert not bans.delete(short.id)
    clock.now += 60
    assert bans.for_nick("eve") is None and bans.active() == [] and len(bans) == 0


def test_only_new_bans_are_announced() -> None:
    clock = Clock()
    bans = BanList(clock)
    announced: list[str] = []
    bans.on_added = lambda ban: announced.append(ban.id)
    first = bans.create("a", None, "r", 60)
    second = Ban.new("b", None, "r", 60, clock())
    bans.replace([first, second])  # a reload from Redis with one new ban
    bans.replace([first, second])
    assert announced == [first.id, second.id]


def test_stored_bans_decode_or_are_ignored() -> None:
    ban = Ban.new("eve", "::1", "spam", 60, 1000.0)
    assert Ban.decode(ban.encode()) == ban
    for junk in [
        b"",
        b"{}",
        b"[1]",
        b'{"id":1,"nick":5,"ip":null,"reason":"r","expires":1}',
        b'{"id":"x","nick":null,"ip":"nonsense","reason":"r","expires":1}',
    ]:
        assert Ban.decode(junk) is None
    assert normalize_ip(" 10.0.0.1 ") == "10.0.0.1"
    assert normalize_ip("10.0.0.1/32") == "10.0.0.1"
    assert normalize_ip("10.1.2.3/8") == "10.0.0.0/8"
    with pytest.raises(ValueError):
        normalize_ip("example.com")


def test_idempotency_keys_claim_record_replay_abandon_and_expire() -> None:
    clock = Clock()
    keys = LocalIdempotency(clock, ttl_s=300)
    assert keys.claim("k") is None
    assert keys.claim("k") == PENDING
    keys.record("k", "{}")
    assert keys.claim("k") == "{}"
    assert keys.claim("other") is None
    keys.abandon("other")
    assert keys.claim("other") is None
    clock.now += 301
    assert keys.claim("k") is None, "a key is forgotten after its TTL"


def test_idempotency_keys_are_bounded() -> None:
    keys = LocalIdempotency(Clock())
    for index in range(MAX_KEYS + 10):
        keys.claim(str(index))
    assert keys.claim("0") is None, "the oldest keys went first"
    assert keys.claim(str(MAX_KEYS + 9)) == PENDING
