"""Admission as a unit: the caps behind --max-clients and --max-per-ip, and whom the waiting room drops."""

from __future__ import annotations

import socket
import time

from chat_svc.admission import FULL, FULL_FOR_ADDRESS, STUCK_AFTER, Admission, Arrival, WaitingRoom


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


def test_only_a_connection_the_server_got_to_can_be_stuck() -> None:
    """In a burst faster than the server, the oldest waiting were queued behind the server's own work:
    dropping them for it refused 5,800 of 19,000 WebSocket members from one address (the idle benchmark)."""
    room = WaitingRoom(2, lambda: 100)
    slots = Admission()
    sock = socket.socket()
    try:
        first, second = (Arrival(("10.0.0.1", port), sock, room, slots, 10.0) for port in (1, 2))
        for arrival in (first, second):
            assert room.enter(arrival) is None
            arrival.since -= 2 * STUCK_AFTER  # accepted long ago, their greenlets not started yet
        assert room.full()  # nobody stuck: the listener leaves newcomers in the backlog
        newcomer = Arrival(("10.0.0.2", 3), sock, room, slots, 10.0)
        assert room.enter(newcomer) is None
        room.leave(newcomer)
        first.serve()
        assert room.full()  # just got to it: not stuck, however long it was queued
        first.served -= 2 * STUCK_AFTER  # served long ago and still waiting: for its client
        assert not room.full()
        assert room.enter(newcomer) is first
        assert time.monotonic() - second.since > STUCK_AFTER
    finally:
        sock.close()
