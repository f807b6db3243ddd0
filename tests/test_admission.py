"""Admission as a unit: the caps behind --max-clients and --max-per-ip."""

from __future__ import annotations

from chat_svc.admission import FULL, FULL_FOR_ADDRESS, Admission


def test_total_cap_refuses_until_a_place_is_given_back() -> None:
    gate = Admission(limit=2)
    assert gate.acquire("10.0.0.1") is None
    assert gate.acquire("10.0.0.2") is None
    assert gate.acquire("10.0.0.3") == FULL
    gate.release("10.0.0.1")
    assert gate.acquire("10.0.0.3") is None
    assert gate.count == 2


def test_per_address_cap_counts_each_address_apart() -> None:
    gate = Admission(limit=0, per_ip_limit=1)
    assert gate.acquire("10.0.0.1") is None
    assert gate.acquire("10.0.0.1") == FULL_FOR_ADDRESS
    assert gate.acquire("10.0.0.2") is None
    gate.release("10.0.0.1")
    assert gate.acquire("10.0.0.1") is None
    assert gate.count == 2


def test_refused_acquires_hold_nothing() -> None:
    gate = Admission(limit=1, per_ip_limit=1)
    assert gate.acquire("a") is None
    assert gate.acquire("a") == FULL
    gate.release("a")
    assert gate.count == 0
    assert gate.acquire("a") is None  # the refusal left no per-address count behind


def test_no_caps_only_counts() -> None:
    gate = Admission()
    for _ in range(1000):
        assert gate.acquire("10.0.0.1") is None
    assert gate.count == 1000


def test_closing_refuses_everyone_with_the_reason_and_keeps_places_held() -> None:
    gate = Admission(limit=5)
    assert gate.acquire("a") is None
    gate.close("server shutting down")
    assert gate.acquire("b") == "server shutting down"
    assert gate.count == 1
    gate.release("a")
    assert gate.count == 0
