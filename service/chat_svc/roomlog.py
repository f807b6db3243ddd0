"""Room logs: the lines a room retains with their ids, for ``/resume`` and the ``[history]`` block.

Every line of a room's log (chat, ``/me``, join/leave/rename notices) has an
id ``<epoch>:<offset>``: offsets grow by exactly one per line, and the epoch
names one generation of the log, so a client holding an id can ask for what
came after it and be told, never silently, when that is no longer known.

A log outlives its room: when the last member leaves, the log stays
*dormant* for a while so a member that reconnects can still resume, and is
dropped after that.  Memory stays bounded however many rooms exist: each log
keeps at most ``max_lines`` lines and ``max_bytes`` bytes, and all logs
together at most ``budget`` bytes; past the budget dormant logs go first,
oldest first, then the largest logs are trimmed.  Bytes are counted with
what an entry costs beyond its text, so the budget is close to real memory.

With Redis the log is a *mirror*: ids come from Redis (``add``) and the
mirror may have gaps or change epoch underneath; ``since`` only answers from
the newest contiguous segment.  Pure: no sockets, no gevent, an injected clock.
"""

from __future__ import annotations

import secrets
import string
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

# What a retained line costs beyond its text: the entry tuple (72), the offset int (28),
# the bytes object's header (33) and a list slot (8).
ENTRY_OVERHEAD = 140
# What an empty log costs (the object, its list, its dict slot).
LOG_OVERHEAD = 400
# Past the budget, logs are trimmed until this fraction of it is used, so
# the search for the largest log happens once per budget/16 bytes, not per line.
BUDGET_REFILL = 15 / 16

_EPOCH_ALPHABET = string.ascii_letters + string.digits

# (epoch, offset, line, is_chat): one retained line.  The epoch travels with
# the entry because a mirror may hold lines of an older epoch (for history).
Entry = tuple[bytes, int, bytes, bool]
# What a dropped line's slot holds until the list is compacted.
_GONE: Entry = (b"", 0, b"", False)


def new_epoch() -> bytes:
    """A fresh epoch: 10 random characters of [A-Za-z0-9] (59 bits)."""
    return "".join(secrets.choice(_EPOCH_ALPHABET) for _ in range(10)).encode()


def valid_epoch(text: str) -> bool:
    return 1 <= len(text) <= 16 and all(ch in _EPOCH_ALPHABET for ch in text)


def line_id(entry: Entry) -> bytes:
    """``@<epoch>:<offset> ``: the prefix a line carries for members with ids on."""
    return b"@%b:%d " % (entry[0], entry[1])


@dataclass(frozen=True, slots=True)
class Gap:
    """Why a resume cannot be complete; ``reason`` is said to the client."""

    reason: str


class RoomLog:
    """One room's retained lines, newest last; ``seg`` starts the newest contiguous segment."""

    __slots__ = ("_entries", "_head", "_seg", "bytes", "dormant_since", "epoch", "local", "name", "next", "store",
                 "synced")  # fmt: skip

    def __init__(self, store: RoomLogs, name: str, epoch: bytes, *, local: bool) -> None:
        self.store = store
        self.name = name
        self.epoch = epoch
        # True when this process assigns the offsets (single instance, or the
        # fallback while Redis is away); False for a mirror of the Redis log.
        self.local = local
        # Mirror only: a contiguous copy of the Redis log's tail, kept up to
        # date by a confirmed subscription.  Only a local or synced log answers
        # a resume from memory.
        self.synced = False
        self.next = 1
        self._entries: list[Entry] = []
        self._head = 0
        self._seg = 0
        self.bytes = LOG_OVERHEAD
        self.dormant_since: float | None = None
        store.bytes += LOG_OVERHEAD

    def __len__(self) -> int:
        return len(self._entries) - self._head

    @property
    def last(self) -> int:
        """Offset of the newest line of the current epoch (``first - 1`` when none)."""
        return self.next - 1

    @property
    def first(self) -> int:
        """Offset of the oldest line of the newest contiguous segment."""
        return self.next - (len(self._entries) - self._seg)

    def entries(self) -> list[Entry]:
        return self._entries[self._head :]

    def held_through(self) -> int:
        """The end of the oldest run of its epoch's lines a mirror holds: a read of Redis starts after it.

        Past that run the mirror may have holes: the subscription starts a new segment
        for a line heard while the mirror did not follow Redis (the room had no member
        here, or a joiner's read was not sent yet), so a read from after the newest line
        would leave the hole for good and every resume from inside it would be answered
        incomplete.  Lines older than the run are older than the mirror, like trimmed
        ones; a resume that asks for them starts the read at its own id.
        """
        offset: int | None = None
        for entry in self._entries[self._head :]:
            if offset is None:
                if entry[0] == self.epoch:
                    offset = entry[1]
            elif entry[0] != self.epoch or entry[1] != offset + 1:
                break
            else:
                offset += 1
        return self.last if offset is None else offset

    # -- writing ------------------------------------------------------------

    def append(self, data: bytes, chat: bool) -> Entry:
        """A line whose id this process assigns (single instance, Redis fallback)."""
        if not self.local:
            self._restart(new_epoch(), 1)
            self.local = True
            self.synced = False
        return self._push((self.epoch, self.next, data, chat))

    def add(self, epoch: bytes, offset: int, data: bytes, chat: bool) -> Entry | None:
        """A line whose id Redis assigned; a new epoch or a skipped offset starts a new segment.

        None for a line the log holds already: a read of the Redis log (``merge``) and the
        subscription both bring the lines published while the read was on its way, and the
        one that comes second must neither start a segment (resumes from before it would
        be refused) nor reach the members again (a joiner had it in its replay).
        """
        if not self.local and epoch == self.epoch and self.first <= offset < self.next:
            return None
        if self.local or epoch != self.epoch or offset != self.next:
            self.local = False
            self._restart(epoch, offset)
        return self._push((epoch, offset, data, chat))

    def merge(
        self,
        epoch: bytes | None,
        read: list[tuple[int, bytes, bool]],
        seq: int,
        before: tuple[bytes, int],
        *,
        following: bool = False,
    ) -> None:
        """Splice a read of the Redis log with what the mirror holds; the mirror is then synced.

        ``read`` is the Redis log's tail (contiguous, oldest first) as of its
        ``seq``; ``epoch`` None means Redis has no log for the room (never
        written, expired, evicted or flushed).  ``before`` is (epoch, next) of
        the mirror when the read was sent: lines that arrived since came
        through the subscription, confirmed before the read, so they follow
        it.  Lines of other epochs stay for history, never for resumes.

        ``following``: the room has members here, and they get its lines from the
        subscription, which hands on only lines the mirror does not hold yet.  The
        read's lines past the mirror's newest are on their way through it; taken from
        the read they would reach no member here, so they are left to it.
        """
        if following and epoch is not None and epoch == self.epoch and not self.local:
            read = [entry for entry in read if entry[0] <= self.last]
            seq = min(seq, self.last)
        self.synced = True
        if epoch is None:
            if not self.local and self.epoch and (self.epoch, self.next) == before:
                self._restart(b"", self.next)  # the Redis log this mirrored is gone: resumes from it fail
            return
        # Every line of this epoch the mirror holds, in any segment (the subscription may have
        # started one past a hole this read fills), with the read laid over them.
        held = {} if self.local else {e[1]: (e[1], e[2], e[3]) for e in self.entries() if e[0] == epoch}
        held.update((entry[0], entry) for entry in read)
        kept = [e for e in self.entries() if e[0] != epoch]
        self._drop(len(self), None)
        self._entries, self._head, self._seg = [], 0, 0
        for entry in kept:
            self._push(entry)
        self.local = False
        combined = [held[offset] for offset in sorted(held)]
        self._restart(epoch, combined[0][0] if combined else seq + 1)
        for offset, data, chat in combined:
            if offset != self.next:  # a hole the subscription left: resumes only from after it
                self._restart(epoch, offset)
            self._push((epoch, offset, data, chat))

    def _restart(self, epoch: bytes, offset: int) -> None:
        """A new contiguous segment: older lines stay for history but are never resumed from."""
        self.epoch = epoch
        self.next = offset
        self._seg = len(self._entries)

    def _push(self, entry: Entry) -> Entry:
        data = entry[2]
        self.next = entry[1] + 1
        self._entries.append(entry)
        cost = len(data) + ENTRY_OVERHEAD
        self.bytes += cost
        store = self.store
        store.bytes += cost
        excess = len(self) - store.max_lines
        if excess > 0:
            self._drop(excess, "lines")
        while self.bytes - LOG_OVERHEAD > store.max_bytes and len(self) > 1:
            self._drop(1, "bytes")
        if store.bytes > store.budget:
            store.enforce_budget()
        return entry

    def _drop(self, count: int, reason: str | None) -> None:
        """Forget the ``count`` oldest lines (``reason`` None: not counted as dropped)."""
        entries, head = self._entries, self._head
        count = min(count, len(entries) - head)
        if count <= 0:
            return
        freed = ENTRY_OVERHEAD * count
        for index in range(head, head + count):
            freed += len(entries[index][2])
            entries[index] = _GONE  # the line's memory goes now, the slot at the next compaction
        head += count
        self.bytes -= freed
        self.store.bytes -= freed
        if reason is not None:
            dropped = self.store.dropped_lines
            dropped[reason] = dropped.get(reason, 0) + count
        if head > 64 and head * 2 > len(entries):
            del entries[:head]
            self._seg = max(0, self._seg - head)
            head = 0
        self._head = head
        self._seg = max(self._seg, head)

    def trim(self, keep_bytes: int, reason: str) -> None:
        """Drop oldest lines until at most ``keep_bytes`` of lines remain."""
        while len(self) and self.bytes - LOG_OVERHEAD > keep_bytes:
            self._drop(max(1, len(self) // 8), reason)

    # -- reading ------------------------------------------------------------

    def since(self, epoch: bytes, offset: int) -> list[Entry] | Gap:
        """The lines after ``epoch:offset``, oldest first, or why they cannot all be given."""
        if epoch != self.epoch:
            return Gap("epoch changed")
        if offset > self.last:
            return Gap(f"offset {offset} is ahead of the log (latest {self.last})")
        missing = self.first - offset - 1
        if missing > 0:
            return Gap(f"{missing} lines no longer retained")
        return self._entries[len(self._entries) - (self.last - offset) :]

    def history(self, count: int) -> list[Entry]:
        """The last ``count`` chat lines (notices are not history), oldest first."""
        found: list[Entry] = []
        if count <= 0:
            return found
        entries = self._entries
        for index in range(len(entries) - 1, self._head - 1, -1):
            entry = entries[index]
            if entry[3]:
                found.append(entry)
                if len(found) == count:
                    break
        found.reverse()
        return found


class RoomLogs:
    """Every room's log, active and dormant, and the global byte budget they share."""

    def __init__(
        self,
        max_lines: int = 1000,
        max_bytes: int = 262144,
        budget: int = 64 << 20,
        keep: float = 300.0,
        *,
        local: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_lines = max_lines
        self.max_bytes = max_bytes
        self.budget = budget
        self.keep = keep
        self.local = local
        self.clock = clock
        self.bytes = 0
        self.logs: dict[str, RoomLog] = {}
        # dormant logs by name, oldest first (insertion order)
        self._dormant: dict[str, RoomLog] = {}
        self.dropped_lines: dict[str, int] = {}
        self.dropped_logs: dict[str, int] = {}

    def __iter__(self) -> Iterator[RoomLog]:
        return iter(self.logs.values())

    def __len__(self) -> int:
        return len(self.logs)

    def get(self, name: str) -> RoomLog | None:
        return self.logs.get(name)

    def open(self, name: str) -> RoomLog:
        """The log of a room that (again) has members: the dormant one, or a new epoch."""
        log = self.logs.get(name)
        if log is None:
            log = self.logs[name] = RoomLog(self, name, new_epoch() if self.local else b"", local=self.local)
            if self.bytes > self.budget:
                self.enforce_budget()
        elif log.dormant_since is not None:
            log.dormant_since = None
            del self._dormant[name]
        return log

    def dormant(self, log: RoomLog) -> None:
        """The room emptied: keep its log ``keep`` seconds for resumes, then drop it."""
        if self.logs.get(log.name) is not log or log.dormant_since is not None:
            return
        log.dormant_since = self.clock()
        self._dormant[log.name] = log
        if self.keep <= 0:
            self.expire()

    @property
    def dormant_count(self) -> int:
        return len(self._dormant)

    def expire(self) -> None:
        """Drop dormant logs older than ``keep`` seconds."""
        cutoff = self.clock() - self.keep
        while self._dormant:
            log = next(iter(self._dormant.values()))
            if log.dormant_since is None or log.dormant_since > cutoff:
                break
            self._forget(log, "expired")

    def enforce_budget(self) -> None:
        """Over budget: drop dormant logs (oldest first), then trim the largest active ones."""
        target = int(self.budget * BUDGET_REFILL)
        while self.bytes > target and self._dormant:
            self._forget(next(iter(self._dormant.values())), "budget")
        while self.bytes > target:
            largest = max(self.logs.values(), key=lambda log: log.bytes, default=None)
            if largest is None or not len(largest):
                break
            # Halve the largest (at least down to what gets us under the target):
            # every log keeps a share, and the scan is paid once per halving.
            excess = self.bytes - target
            largest.trim(max(0, min(largest.bytes - LOG_OVERHEAD - excess, (largest.bytes - LOG_OVERHEAD) // 2)),
                         "budget")  # fmt: skip

    def _forget(self, log: RoomLog, reason: str) -> None:
        lines = len(log)
        log._drop(lines, None)
        if lines:
            self.dropped_lines[reason] = self.dropped_lines.get(reason, 0) + lines
        self.dropped_logs[reason] = self.dropped_logs.get(reason, 0) + 1
        self.bytes -= log.bytes
        log.bytes = 0
        del self.logs[log.name]
        self._dormant.pop(log.name, None)
