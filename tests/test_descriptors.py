"""Issue 18 point 1: the open-files limit never silences the probes or the refusal.

The server runs under ``prlimit --nofile=700`` and 800 connections arrive from one
address: the member cap it derives from the limit (700 - 100 reserved - 150 kept
for connections not yet admitted = 450) fills, everyone past it is told
``! server full``, accept() never fails, and a member on another address and the
health probe notice nothing.  When descriptors do run out (the limit lowered
under a running server), it pauses accepting, logs one JSON event per interval,
does not spin, and resumes.
"""

from __future__ import annotations

import subprocess
import time

from _attack import Crowd, connect, cpu_seconds, hammer, log_events
from _chat import scrape
from _probe import Bystander
from _require import require_binary


def test_800_connections_under_a_700_descriptor_limit_are_refused_in_words_and_probes_stay_up(chat_server):
    prlimit = require_binary("prlimit")
    srv = chat_server("--flood-rate", "0", prefix=(prlimit, "--nofile=700:700"))

    def one_more() -> None:  # knocking on a full server, for the bystander to measure through
        with connect(srv.host, srv.port) as sock:
            sock.sendall(b"/nick\n")
            sock.recv(100)

    with Bystander(srv.host, srv.port, source="127.0.0.2") as bystander:
        crowd = Crowd(srv.host, srv.port, 800, first=b"/nick\n")
        outcomes = crowd.outcomes(8)
        refused = hammer(one_more, 4, per_second=500)
        samples = scrape(srv.port)
    measured = bystander.stop()
    crowd.close()
    print(outcomes, f"then {refused} more refused;", measured.summary())
    budget = next(e for e in log_events(srv.log_path) if e["event"] == "fd_budget")
    assert (budget["fd_limit"], budget["max_clients"], budget["chat_sockets"]) == (700, 450, 600)
    assert crowd.failed == 0
    # Every connection was told something: welcome, or a refusal ("! server full" past the
    # member cap, "! server busy" when a burst overfills the places for the not yet admitted).
    assert set(outcomes) <= {"* welcome to chat-svc", "! server full +closed", "! server busy +closed"}, outcomes
    assert outcomes["* welcome to chat-svc"] == 449  # and the bystander
    assert outcomes["! server full +closed"] >= 100
    assert samples["chat_members"] == 450 and samples["chat_max_clients"] == 450
    assert samples.get("chat_accept_paused_total{error=EMFILE}", 0) == 0
    assert measured.lost == 0 and not measured.health_failures
    assert measured.p99() < 0.25 and measured.slowest_health() < 1.0, measured.summary()
    assert not any(e["event"] == "accept_paused" for e in log_events(srv.log_path))


def test_out_of_descriptors_pauses_accepting_quietly_and_resumes(chat_server):
    prlimit = require_binary("prlimit")
    srv = chat_server()
    alice = srv.member("alice")
    subprocess.run([prlimit, f"--pid={srv.pid}", "--nofile=150:20000"], check=True)
    socks = []
    for _ in range(200):  # accepted until the descriptors run out, then queued in the backlog
        socks.append(connect(srv.host, srv.port))
    time.sleep(1.0)
    cpu_before = cpu_seconds(srv.pid)
    time.sleep(3.0)
    spent = cpu_seconds(srv.pid) - cpu_before
    alice.send("/who")
    assert alice.expect("* in lobby").startswith("* in lobby")
    for sock in socks:
        sock.close()
    time.sleep(0.5)
    subprocess.run([prlimit, f"--pid={srv.pid}", "--nofile=20000:20000"], check=True)
    late = srv.member("late")  # accepting again
    late.send("/who")
    late.expect("* in lobby")
    events = log_events(srv.log_path)  # every line JSON: no traceback
    paused = [e for e in events if e["event"] == "accept_paused"]
    print(f"cpu {spent:.2f} s over 3 s while out of descriptors; {paused}")
    assert spent < 0.3, "spinning on EMFILE"
    assert 1 <= len(paused) <= 2
    assert paused[0]["error"] == "EMFILE" and paused[0]["level"] == "info"
    assert scrape(srv.port)["chat_accept_paused_total{error=EMFILE}"] >= 3
