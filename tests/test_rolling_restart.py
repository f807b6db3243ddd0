"""Issue 12, Done-when 3, the headline: a rolling restart under load loses no line.

Three chat-svc instances on a real redis-server behind a real HAProxy (Debian's, TCP mode,
health-checking /readyz). A real ``locust`` process runs the swarm in resume mode through
HAProxy's port: 300 users in 10 rooms, sending continuously (at least 200 lines/s in all).
While it runs, each instance in turn gets SIGTERM (the lame-duck drain: /readyz 503,
``* server restarting, reconnect``, closes spread out) and is started again on the same
port. Every user the drain sends away reconnects through HAProxy to another instance and
resumes its room from the last message id it saw. The swarm's own verdict is the check:
0 lost deliveries, 0 duplicates after dedup by id, every resume complete, exit 0.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from _locust import run_locust
from _redis import RedisServer
from _require import require_installed
from _rolling import Balancer, Fleet

USERS, ROOMS, RATE = 300, 10, 0.8  # 240 lines/s in all
RUN_S = 45
FIRST_RESTART_S = 8  # after the ramp-up (300 users at 100/s)
# Two swarm processes (Locust's --processes: a master judging, two workers running the users):
# on a shared 2-core machine one process alone is starved by the servers and by other work,
# its receipts are read late and counted as loss. The deadline is long enough for a line said
# during a drain to reach a member after its reconnect and resume on a busy machine; a line
# that never arrives is still lost, and a passing run waits for no deadline at its end.
SWARM = ("--processes", "2", "--deadline", "15")


@pytest.mark.slow
def test_a_rolling_restart_under_load_loses_no_line(
    chat_server: Any, redis_server: RedisServer, tmp_path: Path, record_property: Any
) -> None:
    require_installed("locust")
    fleet = Fleet(chat_server, redis_server, 3, "--drain-delay", "1", "--drain-spread", "2")
    balancer = Balancer(fleet.ports, tmp_path)
    drains: list[float] = []
    errors: list[BaseException] = []

    def roll() -> None:
        try:
            time.sleep(FIRST_RESTART_S)
            for index in range(len(fleet.servers)):
                drains.append(fleet.restart(index))
                time.sleep(2.0)  # HAProxy sees it ready again within one check interval
        except BaseException as exc:  # reported by the test below
            errors.append(exc)

    roller = threading.Thread(target=roll, daemon=True)
    try:
        roller.start()
        rc, out, summary = run_locust(
            tmp_path,
            f"tcp://127.0.0.1:{balancer.port}",
            "-u", str(USERS), "-r", "100", "-t", f"{RUN_S}s",
            "--room-size", str(USERS // ROOMS), "--msg-rate", str(RATE),
            "--resume", "on", *SWARM,
            timeout=RUN_S + 60,
        )  # fmt: skip
        roller.join(30)
    finally:
        balancer.stop()
    assert not errors, errors
    assert len(drains) == 3, "every instance was restarted while the swarm ran"
    t = summary["totals"]
    rate = t["messages_sent"] / RUN_S
    figures = (
        f"lines checked {t['messages_judged']} ({t['expected_deliveries']} deliveries), lost {t['lost_deliveries']},"
        f" duplicates after dedup {t['duplicates']} (dropped by id {t['deduped']}), resumes"
        f" {t['resumes_complete']} complete / {t['resumes_incomplete']} incomplete after {t['server_closes']}"
        f" server closes, reconnect p50 {t['reconnect_p50_ms'] or 0:.0f} ms p99 {t['reconnect_p99_ms'] or 0:.0f} ms,"
        f" {rate:.0f} lines/s sent, drains {', '.join(f'{d:.1f}' for d in drains)} s; swarm CPU max"
        f" {t['swarm_cpu_max']:.0f}% per process, event-loop lag p99 {t['swarm_lag_p99_ms'] or 0:.0f} ms"
    )
    (tmp_path / "locust.out").write_text(out)
    print(f"\nROLLING RESTART: {figures}")
    record_property("rolling_restart", figures)
    assert rc == 0, (out[-4000:], t["lost_late"], t["lost_sample"])
    assert summary["passed"], summary["result"]
    assert rate >= 200, figures
    assert t["lost_deliveries"] == 0 and t["messages_unjudged"] == 0, (figures, t["lost_late"], t["lost_sample"])
    assert t["duplicates"] == 0 and t["out_of_order"] == 0 and t["id_mismatches"] == 0, figures
    assert t["resumes_incomplete"] == 0, figures
    # every user on a drained instance came back: at least the users of one instance each time
    assert t["resumes_complete"] >= USERS, figures
    assert t["resumes_complete"] == t["server_closes"], figures
