"""What the instances share through Redis: key names, scripts and message envelopes.

Pure: no connection, no clock, so every rule here is unit-tested alone.
What lives where (every name starts with ``chat:``)::

    room:<room>      pub/sub channel of a room.  An instance subscribes only while the
                     room has local members: subscribing every node to everything is
                     what burned 100% CPU in socket.io-redis-adapter#41.
    inst:<id>        pub/sub inbox of one instance: /msg to its members.
    history:<room>   list capped at --history lines (RPUSH + LTRIM); read by every joiner,
                     so it outlives the instances.  The hub's deque is only a local mirror.
    nick:<nick>      the instance owning a nick, in lower case (nicks are unique whatever
                     their case; members and who: entries keep the case shown); claimed
                     atomically, TTL refreshed.
    who:<room>       sorted set "<nick> <instance>" scored by expiry time (Redis clock).
    rooms:<id>       hash room -> member count of one instance; expires with it.
    instances        sorted set of live instances scored by expiry time.
    bans             hash ban id -> ban (JSON with its expiry, Redis clock); expired ones are
                     pruned by whoever reads it.  Every instance mirrors it in memory.
    control          pub/sub channel every instance subscribes to: "the bans changed".
    idem:<sha256>    an operator API Idempotency-Key (hashed: keys are client text): ""
                     while its request runs, then the answer; expires after 5 minutes.

Global keys (bans, control, idem:*) are single keys, so on a Redis Cluster
each lives on one shard like the others; no command here spans two keys.

A message is ``<origin instance id>\\0<kind><payload>``.  The origin has
already delivered it locally, so every instance skips its own messages on
receipt and nobody gets a line twice.
"""

from __future__ import annotations

import hashlib

from ..protocol import nick_key

PREFIX = "chat:"
INSTANCES = PREFIX + "instances"
# A room nobody speaks in for a week loses its history.
HISTORY_TTL = 7 * 24 * 3600

BANS = PREFIX + "bans"
CONTROL = PREFIX + "control"

# Kinds of message: a chat line (kept in the room's history), a notice (live
# only), a private line for one member of the receiving instance, a kick
# (the notice, then the member is disconnected) and "the bans changed".
LINE, NOTICE, PRIVATE, KICK, BANS_CHANGED = b"h", b"n", b"m", b"k", b"b"


def key(kind: str, name: str) -> str:
    """A Redis key or channel name of this service."""
    return f"{PREFIX}{kind}:{name}"


def room_channel(room: str) -> str:
    return key("room", room)


def inbox(instance_id: str) -> str:
    return key("inst", instance_id)


def history(room: str) -> str:
    return key("history", room)


def nick(name: str) -> str:
    return key("nick", nick_key(name))


def who(room: str) -> str:
    return key("who", room)


def room_counts(instance_id: str) -> str:
    return key("rooms", instance_id)


def idempotency(client_key: str) -> str:
    """The Redis key of an API Idempotency-Key: hashed, so any client text makes a short, safe name."""
    return key("idem", hashlib.sha256(client_key.encode()).hexdigest())


_ROOM_CHANNEL = room_channel("").encode()
_NICK = nick("")


def room_of(channel: bytes) -> str | None:
    """The room a pub/sub channel belongs to; None for any other channel (an inbox)."""
    if not channel.startswith(_ROOM_CHANNEL):
        return None
    return channel[len(_ROOM_CHANNEL) :].decode("utf-8", "replace")


def nick_of(nick_key: str) -> str:
    return nick_key.removeprefix(_NICK)


def check_instance_id(instance_id: str) -> None:
    """Refuse an id that cannot be told apart in an envelope (NUL) or is blank."""
    if "\0" in instance_id or not instance_id.strip():
        raise ValueError(f"unusable instance id {instance_id!r}")


def envelope_prefix(origin: str, kind: bytes) -> bytes:
    """The bytes every message of ``kind`` from ``origin`` starts with; the payload follows."""
    return origin.encode() + b"\0" + kind


def private_payload(target: str, line: bytes) -> bytes:
    return target.encode() + b"\0" + line


def open_envelope(message: bytes) -> tuple[bytes, bytes, bytes] | None:
    """``(origin, kind, payload)`` of a message; None when it is not one of ours."""
    origin, sep, body = message.partition(b"\0")
    if not sep or not body:
        return None
    return origin, body[:1], body[1:]


def open_private(payload: bytes) -> tuple[str, bytes]:
    """``(target nick, line)`` of a private message's payload."""
    target, _, line = payload.partition(b"\0")
    return target.decode("utf-8", "replace"), line


def who_entry(nick: str, instance_id: str) -> str:
    """A member of ``who:<room>``; nicks have no spaces, so the first one splits it."""
    return f"{nick} {instance_id}"


def open_who_entry(entry: bytes) -> tuple[str, str]:
    """``(nick, instance id)`` of a ``who:<room>`` member."""
    nick, _, owner = entry.decode("utf-8", "replace").partition(" ")
    return nick, owner


# KEYS: nick keys; ARGV: instance id, ttl.  Takes free nicks, refreshes our own,
# and returns the keys another instance holds.
CLAIM = """
local taken = {}
for _, key in ipairs(KEYS) do
  local owner = redis.call('GET', key)
  if not owner then
    redis.call('SET', key, ARGV[1], 'EX', ARGV[2])
  elseif owner == ARGV[1] then
    redis.call('EXPIRE', key, ARGV[2])
  else
    taken[#taken + 1] = key
  end
end
return taken
"""

# KEYS: nick keys; ARGV: instance id.  Deletes only the keys we own.
RELEASE = """
local n = 0
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    redis.call('DEL', key)
    n = n + 1
  end
end
return n
"""
