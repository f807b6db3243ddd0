"""What the instances share through Redis: key names, scripts and message envelopes.

Pure: no connection, no clock, so every rule here is unit-tested alone.
What lives where (every name starts with ``chat:``; everything of one room
carries the room as a ``{room}`` hash tag, so in a Redis Cluster it all sits
in one slot)::

    {<room>}:ch      pub/sub channel of a room.  An instance subscribes only while the
                     room has local members: subscribing every node to everything is
                     what burned 100% CPU in socket.io-redis-adapter#41.
    {<room>}:meta    hash: epoch, seq (the last offset given), bytes (of the log's lines).
    {<room>}:log     stream of the room's log: entry id <offset>-0, fields k (h chat,
                     n notice) and d (the line); capped at --resume-lines and
                     --resume-bytes.  meta and log expire --resume-keep after the last
                     line (refreshed while the room has members): the only keys with a
                     TTL, so the only ones a volatile-* eviction policy can take.
    {<room>}:who     sorted set "<nick> <instance>" scored by expiry time (Redis clock).
    inst:<id>        pub/sub inbox of one instance: /msg to its members.
    nick:<nick>      "<expiry ms> <instance>": the instance owning a nick until then; the
                     key in lower case (nicks are unique whatever their case; members and
                     {room}:who entries keep the case shown).
    rooms:<id>       hash room -> member count of one instance.
    instances        sorted set of instances scored by expiry time.
    bans             hash ban id -> ban (JSON with its expiry, Redis clock); expired ones are
                     pruned by whoever reads it.  Every instance mirrors it in memory.
    control          pub/sub channel every instance subscribes to: "the bans changed".
    idem:<sha256>    an operator API Idempotency-Key (hashed: keys are client text): ""
                     while its request runs, then the answer; expires after 5 minutes.

Global keys (bans, control, idem:*) are single keys, so on a Redis Cluster
each lives on one shard like the others; no command here spans two keys.

Presence (who, nick, rooms, instances) and bans carry no TTL: presence
expires by the scores and expiry times in it, and the survivors delete what
an instance that died left (the publisher's heartbeat), so Redis' eviction
can never take a nick from its owner.  Besides the room logs, only the API's
idem:* keys carry a TTL.

A room line's offset and its publication happen in one Lua script
(``PUBLISH``; ``SHARDED_PUBLISH`` on a Redis Cluster): every instance, the origin included, delivers the line when
it arrives on the room's channel, so each instance's order is Redis' order.
A message is ``<origin>\\0<kind><payload>``; a room line's payload is
``<tag> <epoch>:<offset> <line>``, the tag telling the origin which of its
members sent it (nobody hears their own lines).
"""

from __future__ import annotations

import hashlib

from ..protocol import nick_key

PREFIX = "chat:"
INSTANCES = PREFIX + "instances"

BANS = PREFIX + "bans"
CONTROL = PREFIX + "control"

# Kinds of message: a chat line (kept as history), a notice (join, leave,
# rename), a private line for one member of the receiving instance, a kick
# (the notice, then the member is disconnected) and "the bans changed".
LINE, NOTICE, PRIVATE, KICK, BANS_CHANGED = b"h", b"n", b"m", b"k", b"b"


def key(kind: str, name: str) -> str:
    """A Redis key or channel name of this service that is not a room's."""
    return f"{PREFIX}{kind}:{name}"


def room_key(room: str, kind: str) -> str:
    """A key or channel of one room, hash-tagged by the room (room names have no braces)."""
    return f"{PREFIX}{{{room}}}:{kind}"


def room_channel(room: str) -> str:
    return room_key(room, "ch")


def meta(room: str) -> str:
    return room_key(room, "meta")


def log(room: str) -> str:
    return room_key(room, "log")


def who(room: str) -> str:
    return room_key(room, "who")


def inbox(instance_id: str) -> str:
    return key("inst", instance_id)


def nick(name: str) -> str:
    return key("nick", nick_key(name))


def room_counts(instance_id: str) -> str:
    return key("rooms", instance_id)


def idempotency(client_key: str) -> str:
    """The Redis key of an API Idempotency-Key: hashed, so any client text makes a short, safe name."""
    return key("idem", hashlib.sha256(client_key.encode()).hexdigest())


_ROOM = (PREFIX + "{").encode()
_CHANNEL = b"}:ch"
_NICK = nick("")


def room_of(channel: bytes) -> str | None:
    """The room a pub/sub channel belongs to; None for any other channel (an inbox)."""
    if not (channel.startswith(_ROOM) and channel.endswith(_CHANNEL)):
        return None
    return channel[len(_ROOM) : -len(_CHANNEL)].decode("utf-8", "replace")


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


def open_line(payload: bytes) -> tuple[int, bytes, int, bytes] | None:
    """``(tag, epoch, offset, line)`` of a room line's payload; None when malformed."""
    try:
        tag, position, line = payload.split(b" ", 2)
        epoch, _, offset = position.partition(b":")
        return int(tag), epoch, int(offset), line
    except ValueError:
        return None


def who_entry(nick: str, instance_id: str) -> str:
    """A member of ``{room}:who``; nicks have no spaces, so the first one splits it."""
    return f"{nick} {instance_id}"


def open_who_entry(entry: bytes) -> tuple[str, str]:
    """``(nick, instance id)`` of a ``{room}:who`` member."""
    nick, _, owner = entry.decode("utf-8", "replace").partition(" ")
    return nick, owner


def nick_owner(value: bytes | None, now_ms: int) -> str | None:
    """The instance holding a nick key's ``value`` at ``now_ms``; None when free or expired."""
    if value is None:
        return None
    expiry, _, owner = value.decode("utf-8", "replace").partition(" ")
    if not expiry.isdigit() or int(expiry) < now_ms or not owner:
        return None
    return owner


def read_reply(reply: list[object]) -> tuple[bytes | None, int, list[tuple[int, bytes, bool]]]:
    """``(epoch, seq, entries)`` of a ``READ`` reply; epoch None when Redis has no log for the room."""
    if not reply:
        return None, 0, []
    epoch, seq, raw = reply
    assert isinstance(epoch, bytes) and isinstance(raw, list)
    entries = []
    for entry_id, fields in raw:
        values = dict(zip(fields[::2], fields[1::2], strict=True))
        entries.append((int(entry_id.split(b"-", 1)[0]), values[b"d"], values[b"k"] == LINE))
    return epoch, int(seq), entries  # type: ignore[call-overload]


# KEYS: meta, log.  ARGV: 1 epoch to use if the room has none, 2 kind, 3 line,
# 4 envelope prefix, 5 tag, 6 max lines, 7 max bytes, 8 TTL (s), 9 channel.
# Gives the line the room's next offset, keeps it in the stream, trims the
# stream to its bounds, publishes it with its id and returns {epoch, offset}.
# A room without meta (new, expired, evicted, flushed) starts a new epoch and
# drops whatever log was left, so an old id can never meet a new line.
# Cheap per line: the stream is trimmed back to its bounds in batches, once it
# holds 1/16 more lines or bytes than them, and the TTLs are refreshed every
# 16th line (and by the heartbeat while the room has members).
PUBLISH = """
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'seq', 0, 'bytes', 0)
end
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
redis.call('XADD', KEYS[2], seq .. '-0', 'k', ARGV[2], 'd', ARGV[3])
local len = redis.call('XLEN', KEYS[2])
local bytes
if len == 1 then
  bytes = #ARGV[3]
  redis.call('HSET', KEYS[1], 'bytes', bytes)
else
  bytes = redis.call('HINCRBY', KEYS[1], 'bytes', #ARGV[3])
end
local maxlen, maxbytes = tonumber(ARGV[6]), tonumber(ARGV[7])
local slack = math.max(1, math.floor(maxlen / 16))
local trim = len > maxlen + slack or bytes > maxbytes + maxbytes / 16
while trim and len > 1 and (len > maxlen or bytes > maxbytes) do
  local oldest = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', math.max(len - maxlen, 0) + slack)
  local dropped, freed, last = 0, 0, nil
  for _, entry in ipairs(oldest) do
    if len - dropped <= 1 or (len - dropped <= maxlen and bytes - freed <= maxbytes) then
      break
    end
    dropped = dropped + 1
    freed = freed + #entry[2][4]
    last = entry[1]
  end
  if dropped == 0 then
    break
  end
  redis.call('XTRIM', KEYS[2], 'MINID', (tonumber(string.match(last, '^(%d+)')) + 1) .. '-0')
  bytes = redis.call('HINCRBY', KEYS[1], 'bytes', -freed)
  len = len - dropped
end
if seq % 16 == 1 then
  redis.call('EXPIRE', KEYS[1], ARGV[8])
  redis.call('EXPIRE', KEYS[2], ARGV[8])
end
redis.call('PUBLISH', ARGV[9], ARGV[4] .. ARGV[5] .. ' ' .. epoch .. ':' .. seq .. ' ' .. ARGV[3])
return {epoch, seq}
"""

# The same on a Redis Cluster: SPUBLISH, to the shard of the room's slot only (the
# channel carries the room's hash tag, so a script may publish to it).
SHARDED_PUBLISH = PUBLISH.replace("redis.call('PUBLISH',", "redis.call('SPUBLISH',")
assert SHARDED_PUBLISH != PUBLISH

# KEYS: meta, log.  ARGV: 1 an epoch the caller holds lines of, 2 its last offset.
# Returns {} when the room has no log, else {epoch, seq, entries}: the entries
# after ARGV[2] when the epoch is the caller's, else the whole stream.
READ = """
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  return {}
end
local seq = redis.call('HGET', KEYS[1], 'seq')
local from = '-'
if epoch == ARGV[1] then
  from = (tonumber(ARGV[2]) + 1) .. '-0'
end
return {epoch, seq, redis.call('XRANGE', KEYS[2], from, '+')}
"""

# KEYS: nick keys; ARGV: instance id, now (ms, Redis clock), ttl (ms).  Takes
# free and expired nicks, refreshes our own, returns the keys another live
# instance holds.
CLAIM = """
local now = tonumber(ARGV[2])
local value = (now + tonumber(ARGV[3])) .. ' ' .. ARGV[1]
local taken = {}
for _, key in ipairs(KEYS) do
  local held = redis.call('GET', key)
  local free = not held
  if held then
    local space = string.find(held, ' ', 1, true)
    local expiry = space and tonumber(string.sub(held, 1, space - 1))
    free = not expiry or expiry < now or string.sub(held, space + 1) == ARGV[1]
  end
  if free then
    redis.call('SET', key, value)
  else
    taken[#taken + 1] = key
  end
end
return taken
"""

# KEYS: nick keys; ARGV: instance id.  Deletes only the keys that instance holds.
RELEASE = """
local n = 0
for _, key in ipairs(KEYS) do
  local held = redis.call('GET', key)
  if held then
    local space = string.find(held, ' ', 1, true)
    if space and string.sub(held, space + 1) == ARGV[1] then
      redis.call('DEL', key)
      n = n + 1
    end
  end
end
return n
"""
