"""The hub and outboxes as units: fan-out order, sharing, coalescing, slow consumers."""

from __future__ import annotations

from _hub_fakes import RecordingSink, make_member, settle
from chat_svc.hub import Hub
from chat_svc.metrics import Counters
from chat_svc.outbox import Outbox


def test_each_sender_keeps_order_and_nobody_hears_themselves() -> None:
    hub = Hub(Counters(), history=0)
    sinks = {nick: RecordingSink() for nick in "abc"}
    members = {nick: make_member(hub, nick, sink) for nick, sink in sinks.items()}
    for n in range(50):
        for nick in "abc":
            hub.say(members[nick], f"[{nick}] {n}\n".encode(), 0.0)
        if n % 7 == 0:
            settle()
    settle()
    for nick, sink in sinks.items():
        chat = [line for line in sink.text() if line.startswith("[")]
        assert not [line for line in chat if line.startswith(f"[{nick}]")]
        for other in set("abc") - {nick}:
            assert [line for line in chat if line.startswith(f"[{other}]")] == [f"[{other}] {n}" for n in range(50)]
    assert hub.counters.deliveries >= 50 * 3 * 2


def test_a_burst_goes_out_in_one_write_per_member_with_shared_bytes() -> None:
    hub = Hub(Counters(), history=0, notice_threshold=0)
    sinks = [RecordingSink() for _ in range(5)]
    members = [make_member(hub, f"m{i}", sink) for i, sink in enumerate(sinks)]
    speaker = make_member(hub, "speaker", RecordingSink())
    settle()
    for sink in sinks:
        sink.writes.clear()
    for n in range(100):
        hub.say(speaker, f"[speaker] {n}\n".encode(), 0.0)
    settle()
    assert all(len(sink.writes) == 1 for sink in sinks)
    assert all(sink.writes[0] is sinks[0].writes[0] for sink in sinks)
    assert sinks[0].text() == [f"[speaker] {n}" for n in range(100)]
    assert members[0].outbox.size == 0


def test_member_who_stops_reading_is_dropped_and_the_room_keeps_flowing() -> None:
    hub = Hub(Counters(), history=0)
    dropped: list[str] = []
    stuck = make_member(hub, "stuck", RecordingSink(capacity=0), limit=10_000, dropped=dropped)
    fine = RecordingSink()
    make_member(hub, "fine", fine)
    speaker = make_member(hub, "speaker", RecordingSink())
    for n in range(1000):
        hub.say(speaker, f"[speaker] {n:04d} {'x' * 40}\n".encode(), 0.0)
        if n % 50 == 0:
            settle()
    settle()
    assert dropped == ["stuck"]
    assert stuck.outbox.closed and stuck.outbox.size == 0
    assert [line for line in fine.text() if line.startswith("[speaker]")] == [
        f"[speaker] {n:04d} {'x' * 40}" for n in range(1000)
    ]


def test_direct_lines_stay_in_order_with_room_lines() -> None:
    hub = Hub(Counters(), history=0)
    bob_sink = RecordingSink()
    alice = make_member(hub, "alice", RecordingSink())
    bob = make_member(hub, "bob", bob_sink)
    hub.say(alice, b"[alice] first\n", 0.0)
    hub.send_to(bob, b"[alice -> bob] second\n")
    settle()
    assert bob_sink.text()[-2:] == ["[alice] first", "[alice -> bob] second"]
    assert bob.rseq == bob.room.end  # type: ignore[union-attr]


def test_partial_writes_queue_the_rest_and_ask_the_sink_to_write_it_later() -> None:
    sink = RecordingSink(capacity=4)
    outbox = Outbox(sink, 100, lambda _reason: None, lambda: None)
    outbox.push(b"0123456789")
    assert sink.writes == [b"0123"] and outbox.size == 6 and sink.kicked == 1
    outbox.push(b"abc")
    assert outbox.take() == b"456789abc" and outbox.size == 0


def test_room_log_is_trimmed_once_everyone_has_it() -> None:
    hub = Hub(Counters(), history=0)
    alice = make_member(hub, "alice", RecordingSink())
    make_member(hub, "bob", RecordingSink())
    for n in range(10):
        hub.say(alice, f"[alice] {n}\n".encode(), 0.0)
    settle()
    room = hub.rooms["lobby"]
    assert room.lines == [] and room.waiting == 0 and room.base == room.end
