"""The outbound budget as a unit: shared buffers counted once, kernel buffers charged, largest queues shed."""

from __future__ import annotations

from _hub_fakes import RecordingSink, make_member, settle
from chat_svc.budget import OutboundBudget
from chat_svc.hub import Hub
from chat_svc.metrics import Counters
from chat_svc.outbox import Outbox


class StuckSink(RecordingSink):
    """A socket whose kernel buffer is full: takes nothing, and says how big that buffer is."""

    def __init__(self, kernel_buffer: int = 0) -> None:
        super().__init__(capacity=0)
        self.kernel_buffer = kernel_buffer


def outbox(budget: OutboundBudget, dropped: list[str], name: str, kernel_buffer: int = 0) -> Outbox:
    return Outbox(StuckSink(kernel_buffer), 1 << 20, lambda reason: dropped.append(f"{name}:{reason}"),
                  lambda: None, budget)


def test_a_buffer_shared_by_many_queues_is_counted_once() -> None:
    budget = OutboundBudget(1 << 30)
    dropped: list[str] = []
    shared = b"x" * 1000
    boxes = [outbox(budget, dropped, str(n)) for n in range(100)]
    for box in boxes:
        box.push(shared)
    assert budget.held == 1000 and sum(box.size for box in boxes) == 100_000
    boxes[0].push(b"own line\n")
    assert budget.held == 1009
    for box in boxes[:99]:
        box.take()
    assert budget.held == 1000
    boxes[99].close()
    assert budget.held == 0 and budget.used == 0 and not dropped


def test_a_backlogged_member_is_charged_its_full_kernel_buffer_until_it_catches_up() -> None:
    budget = OutboundBudget(1 << 30)
    box = outbox(budget, [], "a", kernel_buffer=500_000)
    box.push(b"y" * 100)
    box.push(b"z" * 100)
    assert (budget.held, budget.kernel, budget.used) == (200, 500_000, 500_200)
    box.unsend(box.take()[50:], torn=True)
    assert (budget.held, budget.kernel) == (150, 500_000)
    box.take()
    box.all_sent()
    assert budget.used == 0


def test_past_the_budget_the_largest_queues_are_dropped_first_with_their_own_reason() -> None:
    budget = OutboundBudget(100_000)
    dropped: list[str] = []
    small = outbox(budget, dropped, "small", kernel_buffer=10_000)
    medium = outbox(budget, dropped, "medium", kernel_buffer=10_000)
    large = outbox(budget, dropped, "large", kernel_buffer=10_000)
    small.push(b"s" * 5_000)
    medium.push(b"m" * 30_000)
    large.push(b"l" * 40_000)  # 75,000 held + 30,000 kernel: over by 5,000
    assert budget.used == 105_000
    settle()
    assert dropped == ["large:outbound_budget"]
    assert large.closed and not medium.closed and not small.closed
    assert budget.used == 5_000 + 30_000 + 20_000


def test_the_hub_shares_one_joined_buffer_between_members_at_the_same_position() -> None:
    """Fan-out to 50 members that do not read: the budget holds the burst once, not 50 times."""
    budget = OutboundBudget(1 << 30)
    hub = Hub(Counters(), history=0, notice_threshold=0)
    members = [make_member(hub, f"m{n}", RecordingSink()) for n in range(50)]
    for member in members:
        member.outbox._sink = StuckSink()  # type: ignore[attr-defined]
        member.outbox._budget = budget  # type: ignore[attr-defined]
    speaker = make_member(hub, "speaker", RecordingSink())
    for n in range(100):
        hub.say(speaker, f"[speaker] {n:03d}\n".encode(), 0.0)
    settle()
    per_member = members[0].outbox.size
    assert per_member == 100 * len(b"[speaker] 000\n")
    assert all(member.outbox.size == per_member for member in members)
    assert budget.held == per_member
