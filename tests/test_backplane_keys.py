"""The backplane's shared names and envelopes as pure units, and its import boundary."""

from __future__ import annotations

import subprocess
import sys

import pytest
from _chat import ROOT
from chat_svc.backplane import keys


def test_every_key_and_channel_is_under_the_service_prefix() -> None:
    names = [
        keys.room_channel("r"),
        keys.meta("r"),
        keys.log("r"),
        keys.who("r"),
        keys.inbox("i-1"),
        keys.nick("alice"),
        keys.room_counts("i-1"),
        keys.INSTANCES,
    ]
    assert names == [
        "chat:{r}:ch",
        "chat:{r}:meta",
        "chat:{r}:log",
        "chat:{r}:who",
        "chat:inst:i-1",
        "chat:nick:alice",
        "chat:rooms:i-1",
        "chat:instances",
    ]
    assert keys.nick_of(keys.nick("alice")) == "alice"


def test_every_key_of_a_room_hashes_to_the_rooms_slot() -> None:
    """Redis Cluster hashes only what is between the first { and the next }: the room name."""
    for room in ("r", "#dev", "a.b-c_d"):
        tags = {name[name.index("{") + 1 : name.index("}")] for name in (keys.room_channel(room), keys.meta(room),
                                                                           keys.log(room), keys.who(room))}
        assert tags == {room}


def test_room_of_reads_room_channels_only() -> None:
    assert keys.room_of(keys.room_channel("#dev").encode()) == "#dev"
    assert keys.room_of(b"chat:{bad\xff}:ch") == "bad\ufffd"
    assert keys.room_of(b"chat:inst:i-1") is None
    assert keys.room_of(keys.meta("r").encode()) is None


def test_room_lines_carry_tag_and_id() -> None:
    assert keys.open_line(b"17 Ab3:1042 [alice] hi there\n") == (17, b"Ab3", 1042, b"[alice] hi there\n")
    assert keys.open_line(b"garbage") is None
    assert keys.open_line(b"x Ab3:1 line") is None


def test_a_nick_is_held_until_its_expiry() -> None:
    assert keys.nick_owner(b"2000 inst a", 1999) == "inst a"
    assert keys.nick_owner(b"2000 inst a", 2001) is None
    assert keys.nick_owner(None, 0) is None
    assert keys.nick_owner(b"inst-from-an-older-version", 0) is None


def test_envelopes_carry_origin_kind_and_payload_unchanged() -> None:
    line = b"[alice] hello \x00 with a NUL\n"
    message = keys.envelope_prefix("inst-a", keys.LINE) + line
    assert keys.open_envelope(message) == (b"inst-a", keys.LINE, line)
    notice = keys.envelope_prefix("inst-a", keys.NOTICE) + b"* bob joined r\n"
    assert keys.open_envelope(notice) == (b"inst-a", keys.NOTICE, b"* bob joined r\n")


def test_private_payload_names_its_target() -> None:
    line = b"[alice -> bob] psst\n"
    message = keys.envelope_prefix("inst-a", keys.PRIVATE) + keys.private_payload("bob", line)
    opened = keys.open_envelope(message)
    assert opened is not None and opened[1] == keys.PRIVATE
    assert keys.open_private(opened[2]) == ("bob", line)


@pytest.mark.parametrize("message", [b"", b"no separator", b"origin\x00"])
def test_foreign_messages_are_not_envelopes(message: bytes) -> None:
    assert keys.open_envelope(message) is None


def test_who_entries_split_at_the_first_space() -> None:
    entry = keys.who_entry("alice", "host 7-abc")
    assert keys.open_who_entry(entry.encode()) == ("alice", "host 7-abc")


@pytest.mark.parametrize("instance_id", ["", "   ", "a\x00b"])
def test_unusable_instance_ids_are_refused(instance_id: str) -> None:
    with pytest.raises(ValueError, match="unusable instance id"):
        keys.check_instance_id(instance_id)


def test_a_single_instance_never_imports_redis() -> None:
    code = (
        "import sys, chat_svc.app, chat_svc.__main__; "
        "loaded = sorted(m for m in sys.modules if m == 'redis' or m.startswith(('redis.', 'chat_svc.backplane'))); "
        "print(loaded); sys.exit(1 if loaded else 0)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
