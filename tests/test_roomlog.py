"""Room logs as units: ids, resume answers, bounds, dormant expiry, the global budget, the Redis mirror."""

from __future__ import annotations

import pytest
from chat_svc.roomlog import ENTRY_OVERHEAD, LOG_OVERHEAD, Gap, RoomLogs, line_id, new_epoch, valid_epoch


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def lines(n: int, size: int = 10, start: int = 0) -> list[bytes]:
    return [f"[a] {k:0{size - 5}d}\n".encode() for k in range(start, start + n)]


def test_epochs_are_random_and_valid() -> None:
    epochs = {new_epoch() for _ in range(100)}
    assert len(epochs) == 100
    assert all(valid_epoch(epoch.decode()) for epoch in epochs)
    assert not valid_epoch("") and not valid_epoch("a" * 17) and not valid_epoch("a-b")


def test_offsets_grow_by_one_per_line_and_ids_prefix_lines() -> None:
    log = RoomLogs().open("r")
    entries = [log.append(line, True) for line in lines(3)]
    assert [entry[1] for entry in entries] == [1, 2, 3]
    assert {entry[0] for entry in entries} == {log.epoch}
    assert line_id(entries[2]) == b"@" + log.epoch + b":3 "
    assert (log.first, log.last, len(log)) == (1, 3, 3)


def test_since_answers_the_lines_after_an_id_or_why_not() -> None:
    store = RoomLogs(max_lines=5)
    log = store.open("r")
    for line in lines(8):
        log.append(line, True)
    assert [entry[1] for entry in log.since(log.epoch, 5)] == [6, 7, 8]  # type: ignore[union-attr]
    assert [entry[1] for entry in log.since(log.epoch, 3)] == [4, 5, 6, 7, 8]  # type: ignore[union-attr]
    assert log.since(log.epoch, 8) == []
    assert log.since(log.epoch, 2) == Gap("1 lines no longer retained")
    assert log.since(log.epoch, 0) == Gap("3 lines no longer retained")
    assert log.since(log.epoch, 9) == Gap("offset 9 is ahead of the log (latest 8)")
    assert log.since(b"other", 5) == Gap("epoch changed")


def test_a_new_log_answers_from_zero_and_a_dropped_one_has_a_new_epoch() -> None:
    clock = Clock()
    store = RoomLogs(keep=10, clock=clock)
    log = store.open("r")
    assert log.since(log.epoch, 0) == []
    log.append(b"x\n", True)
    old = log.epoch
    store.dormant(log)
    clock.now += 11
    store.expire()
    assert store.get("r") is None
    assert store.open("r").since(old, 1) == Gap("epoch changed")


def test_history_is_the_last_chat_lines_not_notices() -> None:
    log = RoomLogs().open("r")
    for k in range(6):
        log.append(f"[a] {k}\n".encode(), True)
        log.append(f"* b joined {k}\n".encode(), False)
    assert [entry[2] for entry in log.history(3)] == [b"[a] 3\n", b"[a] 4\n", b"[a] 5\n"]
    assert log.history(0) == []


def test_each_log_is_bounded_in_lines_and_bytes_and_says_why_it_dropped() -> None:
    store = RoomLogs(max_lines=100, max_bytes=10 * (50 + ENTRY_OVERHEAD))
    log = store.open("r")
    for line in lines(20, size=50):
        log.append(line, True)
    assert len(log) == 10 and log.bytes == LOG_OVERHEAD + 10 * (50 + ENTRY_OVERHEAD)
    assert store.dropped_lines == {"bytes": 10}
    store.max_bytes = 1 << 30
    store.max_lines = 4
    log.append(b"more\n", True)
    assert len(log) == 4 and store.dropped_lines == {"bytes": 10, "lines": 7}
    assert store.bytes == log.bytes


def test_a_line_bigger_than_the_byte_bound_is_still_kept_alone() -> None:
    store = RoomLogs(max_bytes=100)
    log = store.open("r")
    log.append(b"x" * 500, True)
    assert len(log) == 1


def test_dormant_logs_are_kept_for_a_while_then_dropped() -> None:
    clock = Clock()
    store = RoomLogs(keep=60, clock=clock)
    first, second = store.open("a"), store.open("b")
    first.append(b"1\n", True)
    second.append(b"2\n", True)
    store.dormant(first)
    clock.now += 30
    store.dormant(second)
    assert store.dormant_count == 2
    clock.now += 31
    store.expire()
    assert store.get("a") is None and store.get("b") is second
    assert store.open("b") is second and store.dormant_count == 0  # back in use: not dormant
    clock.now += 1000
    store.expire()
    assert store.get("b") is second
    assert store.dropped_logs == {"expired": 1} and store.dropped_lines == {"expired": 1}
    assert store.bytes == second.bytes


def test_the_budget_drops_dormant_logs_oldest_first_then_trims_the_largest() -> None:
    line_cost = 100 + ENTRY_OVERHEAD
    store = RoomLogs(budget=4 * LOG_OVERHEAD + 40 * line_cost)
    big, small, old, young = (store.open(name) for name in ("big", "small", "old", "young"))
    for log, count in ((big, 20), (small, 4), (old, 6), (young, 6)):
        for line in lines(count, size=100):
            log.append(line, True)
    store.dormant(old)
    store.dormant(young)
    for line in lines(8, size=100):  # 44 lines: over the budget
        small.append(line, True)
    assert store.get("old") is None and store.get("young") is young
    assert store.dropped_logs == {"budget": 1}
    assert store.bytes <= store.budget
    for line in lines(20, size=100):
        big.append(line, True)
    assert store.get("young") is None  # dormant logs go before any active log is trimmed
    assert len(big) < 40 and len(small) == 12  # then the largest is trimmed, not every log
    assert store.dropped_lines["budget"] == 12 + 40 - len(big)
    assert store.bytes <= store.budget
    assert store.bytes == sum(log.bytes for log in store)


# ----------------------------------------------------------------------------- the Redis mirror


def mirror(**kwargs: int) -> tuple[RoomLogs, object]:
    store = RoomLogs(local=False, **kwargs)
    return store, store.open("r")


def test_a_mirror_follows_redis_ids_and_restarts_on_a_gap_or_a_new_epoch() -> None:
    store = RoomLogs(local=False)
    log = store.open("r")
    assert not log.local and not log.synced
    for offset in (7, 8, 9):
        log.add(b"E1", offset, f"[a] {offset}\n".encode(), True)
    assert (log.first, log.last) == (7, 9)
    assert [entry[1] for entry in log.since(b"E1", 7)] == [8, 9]  # type: ignore[union-attr]
    log.add(b"E1", 12, b"[a] 12\n", True)  # 10 and 11 never arrived
    assert log.since(b"E1", 9) == Gap("2 lines no longer retained")
    assert log.since(b"E1", 11) == [(b"E1", 12, b"[a] 12\n", True)]
    log.add(b"E2", 1, b"[a] new\n", True)
    assert log.since(b"E1", 12) == Gap("epoch changed")
    assert [entry[2] for entry in log.history(10)] == [b"[a] 7\n", b"[a] 8\n", b"[a] 9\n", b"[a] 12\n", b"[a] new\n"]


def test_a_mirror_falls_back_to_its_own_epoch_while_redis_is_away() -> None:
    store = RoomLogs(local=False)
    log = store.open("r")
    log.add(b"E1", 5, b"[a] 5\n", True)
    entry = log.append(b"[a] local\n", True)
    assert log.local and entry[0] != b"E1" and entry[1] == 1
    assert log.since(b"E1", 5) == Gap("epoch changed")
    log.add(b"E1", 6, b"[a] 6\n", True)  # Redis is back: its ids again
    assert not log.local and log.since(entry[0], 1) == Gap("epoch changed")


def test_merge_splices_a_redis_read_with_lines_that_arrived_meanwhile() -> None:
    store = RoomLogs(local=False)
    log = store.open("r")
    log.add(b"E", 3, b"[a] 3\n", True)
    before = (log.epoch, log.next)
    log.add(b"E", 9, b"[a] 9\n", True)  # arrived live while the read was in flight (a gap for now)
    log.add(b"E", 10, b"[a] 10\n", True)
    read = [(k, f"[a] {k}\n".encode(), True) for k in range(2, 9)]
    log.merge(b"E", read, 8, before)
    assert log.synced and not log.local
    assert [entry[1] for entry in log.since(b"E", 1)] == list(range(2, 11))  # type: ignore[union-attr]
    assert store.bytes == log.bytes


def test_a_line_the_subscription_brings_after_a_read_had_it_is_not_added_twice() -> None:
    """The drain/resume seam (found by the rolling restart): a joiner's read of the Redis log
    and the subscription both carry the lines published while the read was on its way; the
    second copy must not start a segment (later resumes from before it were refused as
    "no longer retained") nor reach the members again (the joiner had it in its replay)."""
    log = RoomLogs(local=False).open("r")
    log.merge(b"E", [(k, f"[a] {k}\n".encode(), True) for k in range(1, 11)], 10, (log.epoch, log.next))
    assert log.add(b"E", 9, b"[a] 9\n", True) is None
    assert log.add(b"E", 10, b"[a] 10\n", True) is None
    assert log.add(b"E", 11, b"[a] 11\n", True) == (b"E", 11, b"[a] 11\n", True)
    assert (log.first, log.last) == (1, 11)
    assert [entry[1] for entry in log.since(b"E", 2)] == list(range(3, 12))  # type: ignore[union-attr]


def test_merge_joins_an_older_segment_to_one_the_subscription_started_past_a_hole() -> None:
    """A dormant mirror (room emptied here) holds 1..5; a joiner reads from 6 while the new
    subscription already brought 9 (a new segment): the read fills 6..8 and 1..9 resume again."""
    log = RoomLogs(local=False).open("r")
    for k in range(1, 6):
        log.add(b"E", k, f"[a] {k}\n".encode(), True)
    before = (log.epoch, log.next)
    log.add(b"E", 9, b"[a] 9\n", True)
    assert log.since(b"E", 3) == Gap("5 lines no longer retained")
    log.merge(b"E", [(k, f"[a] {k}\n".encode(), True) for k in range(6, 9)], 8, before)
    assert [entry[1] for entry in log.since(b"E", 1)] == list(range(2, 10))  # type: ignore[union-attr]


def test_merge_with_no_redis_log_forgets_the_epoch_it_mirrored() -> None:
    store = RoomLogs(local=False)
    log = store.open("r")
    log.add(b"E", 3, b"[a] 3\n", True)
    log.merge(None, [], 0, (log.epoch, log.next))
    assert log.synced and log.since(b"E", 2) == Gap("epoch changed")
    assert [entry[2] for entry in log.history(5)] == [b"[a] 3\n"]


@pytest.mark.parametrize("local", [True, False])
def test_merge_of_a_new_epoch_keeps_older_lines_as_history_only(local: bool) -> None:
    store = RoomLogs(local=False)
    log = store.open("r")
    if local:
        log.append(b"[a] during outage\n", True)
    else:
        log.add(b"OLD", 4, b"[a] during outage\n", True)
    log.merge(b"NEW", [(1, b"[b] one\n", True)], 1, (log.epoch, log.next))
    assert [entry[2] for entry in log.history(5)] == [b"[a] during outage\n", b"[b] one\n"]
    assert log.since(b"NEW", 0) == [(b"NEW", 1, b"[b] one\n", True)]
    assert not log.local


def test_a_dropped_line_is_let_go_at_once_not_at_the_next_compaction() -> None:
    """The budget counts what is retained: a dropped line must not stay referenced behind the log's head."""
    import sys

    store = RoomLogs(max_lines=3)
    log = store.open("r")
    line = b"[a] the one to watch " + bytes(1000)
    log.append(line, True)
    held = sys.getrefcount(line)
    for other in lines(3):
        log.append(other, True)
    assert len(log) == 3 and line not in [entry[2] for entry in log.entries()]
    assert sys.getrefcount(line) == held - 1  # the log's reference is gone


def test_a_read_of_redis_starts_after_the_oldest_run_a_mirror_holds_not_after_its_newest_line() -> None:
    """The rolling restart's last hole: a line the subscription brought before a joiner's read
    was sent (a fresh instance, or a room that had emptied here) started a segment, and a read
    from after that line left the lines between for good."""
    log = RoomLogs(local=False).open("r")
    assert log.held_through() == 0  # nothing yet: the read takes all Redis holds (no epoch)
    for k in range(1, 6):
        log.add(b"E", k, f"[a] {k}\n".encode(), True)
    assert log.held_through() == 5
    log.add(b"E", 9, b"[a] 9\n", True)  # heard while the room had no member here
    log.add(b"E", 10, b"[a] 10\n", True)
    assert (log.held_through(), log.last) == (5, 10)
    log.add(b"F", 3, b"[a] new epoch\n", True)
    assert log.held_through() == 3  # lines of an older epoch are history only


def test_held_through_skips_older_epochs_and_trimmed_lines() -> None:
    log = RoomLogs(local=False, max_lines=4).open("r")
    log.add(b"E", 1, b"[a] old\n", True)
    for k in (7, 8, 9, 11):
        log.add(b"F", k, f"[a] {k}\n".encode(), True)
    assert log.held_through() == 9  # E:1 went with the line bound; F's first run is 7..9
    log.add(b"F", 12, b"[a] 12\n", True)  # 7 goes
    assert log.held_through() == 9


def test_a_mirror_members_follow_takes_from_a_read_only_what_it_lacks_below_its_newest_line() -> None:
    """The rolling restart's one lost delivery: a resume from before what a followed mirror holds
    reads Redis, and the read also carries lines still on their way through the subscription.
    Taken from the read, the subscription's copy was dropped as held, so the members already
    in the room never got them."""
    log = RoomLogs(local=False).open("r")
    log.merge(b"E", [(k, f"[a] {k}\n".encode(), True) for k in range(5, 9)], 8, (log.epoch, log.next))
    read = [(k, f"[a] {k}\n".encode(), True) for k in range(2, 11)]  # 9 and 10 are in flight to us
    log.merge(b"E", read, 10, (log.epoch, log.next), following=True)
    assert (log.first, log.last) == (2, 8)
    assert log.add(b"E", 9, b"[a] 9\n", True) == (b"E", 9, b"[a] 9\n", True)  # reaches the members
    assert [entry[1] for entry in log.since(b"E", 1)] == list(range(2, 10))  # type: ignore[union-attr]
