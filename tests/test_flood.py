"""The flood bucket with an injected clock: no real time passes."""

from __future__ import annotations

from chat_svc.flood import TokenBucket


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_burst_passes_then_lines_are_spaced_at_the_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(burst=3, rate=2.0, clock=clock)
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take() == 0.5
    clock.now += 0.5
    assert bucket.take() == 0.5
    assert bucket.throttled_for() == 0.5


def test_tokens_refill_up_to_the_burst_only() -> None:
    clock = Clock()
    bucket = TokenBucket(burst=2, rate=1.0, clock=clock)
    bucket.take()
    bucket.take()
    clock.now += 60
    assert [bucket.take() for _ in range(2)] == [0.0, 0.0]
    assert bucket.take() == 1.0


def test_throttling_ends_when_a_line_goes_through_at_once() -> None:
    clock = Clock()
    bucket = TokenBucket(burst=1, rate=1.0, clock=clock)
    bucket.take()
    assert bucket.take() == 1.0
    clock.now += 5
    assert bucket.take() == 0.0
    assert bucket.throttled_for() == 0.0
