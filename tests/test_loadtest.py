"""The Locust swarm (loadtest/): its fan-out judge, and real locust runs on loopback.

Unit tests drive the verification modules (``_recorder``, ``_ledger``, ``_verdict``)
directly: they import neither Locust nor gevent, so they do not monkey-patch this pytest
process. The end-to-end tests run locust as a subprocess, as a user would, against the
real server (``chat_server`` fixture) and against ``tests/_faulty_server.py``, which
drops/duplicates deliveries on purpose so the checks are shown to fail. Every run is
bounded (-t, subprocess timeouts) and only targets 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _chat import ROOT, free_port
from _locust import LOCUST, headless, run_locust, start_locust
from _require import require_installed

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from loadtest._ledger import Ledger
from loadtest._recorder import Recorder, parse_probe, probe_line
from loadtest._verdict import Verdict, evaluate, to_csv

# ---------------------------------------------------------------------------
# unit tests of the judge


def _batch(rec: Recorder) -> dict[str, Any]:
    batch = rec.take_batch()
    assert batch is not None
    return batch


def _room(*nicks: str, deadline: float = 1.0, grace: float = 0.0) -> tuple[Recorder, Ledger]:
    """A recorder whose ``nicks`` all joined room "r" at t=0, and an empty ledger."""
    rec = Recorder("n1", deadline)
    for nick in nicks:
        rec.joined("r", nick, 0.0)
    return rec, Ledger(deadline, grace)


def test_probe_lines_carry_seq_and_send_time_and_other_lines_are_ignored() -> None:
    line = probe_line(7, 1234.5, 64)
    assert len(line) == 65 and line.endswith(b"\n")
    assert parse_probe(line.rstrip(b"\n")) == (7, 1234.5)
    assert parse_probe(b"hello there") is None
    assert parse_probe(b"lt seven 12") is None


def test_loss_counts_only_members_at_send_time() -> None:
    rec = Recorder("n1", deadline=1.0)
    ledger = Ledger(deadline=1.0, grace=0.0)
    rec.joined("r", "a", 10.0)
    rec.joined("r", "b", 10.0)
    rec.joined("r", "late", 11.5)  # joined after the send: not expected
    rec.sent("r", "a", 1, 11.0)
    rec.sent("r", "a", 2, 12.0)
    rec.received("b", "a", 1, 11.0, 11.01)
    rec.received("late", "a", 1, 11.0, 11.02)  # got it anyway: fine, not "extra loss"
    rec.received("late", "a", 2, 12.0, 12.01)  # b never gets seq 2
    ledger.apply(_batch(rec), 12.5)
    first = ledger.sweep(12.5)  # seq 2 still inside its deadline
    assert [(j.seq, j.missing, j.expected) for j in first] == [(1, [], 1)]
    assert first[0].complete_ms == pytest.approx(20.0)  # until its last receipt (here: "late" at 11.02)
    lost = ledger.sweep(13.5)
    assert [(j.sender, j.seq, j.missing, j.complete_ms) for j in lost] == [("a", 2, ["b"], None)]
    t = ledger.totals()
    assert (t["expected_deliveries"], t["delivered_in_time"], t["lost_deliveries"]) == (3, 2, 1)
    assert t["loss_ratio"] == pytest.approx(1 / 3)
    assert t["unexpected_deliveries"] == 1


def test_late_delivery_is_lost_and_leaving_member_is_excused() -> None:
    rec, ledger = _room("a", "b", "c")
    rec.sent("r", "a", 1, 5.0)
    kind, ms = rec.received("b", "a", 1, 5.0, 6.5)  # 1.5 s > 1 s deadline
    assert kind == "late" and ms == pytest.approx(1500)
    rec.left("c", 5.5)  # c left before the deadline: may legitimately miss it
    ledger.apply(_batch(rec), 7.0)
    lost = ledger.sweep(7.0)
    assert len(lost) == 1 and lost[0].missing == ["b"] and lost[0].late == 1
    t = ledger.totals()
    assert (t["lost_deliveries"], t["lost_late"], t["lost_never"]) == (1, 1, 0)


def test_a_line_arriving_after_its_verdict_moves_from_never_to_late() -> None:
    """A server frozen longer than deadline + grace: lines are judged before they arrive."""
    rec, ledger = _room("a", "b", "c", grace=0.5)
    rec.sent("r", "a", 1, 5.0)
    ledger.apply(_batch(rec), 5.1)
    (judged,) = ledger.sweep(7.0)  # nothing arrived yet: both missing, never so far
    assert sorted(judged.missing) == ["b", "c"] and judged.late == 0
    assert (ledger.totals()["lost_late"], ledger.totals()["lost_never"]) == (0, 2)
    rec.received("b", "a", 1, 5.0, 8.0)  # the server woke up: b gets it 3 s late
    ledger.apply(_batch(rec), 8.1)
    rec.received("b", "a", 1, 5.0, 8.0)  # a duplicate is not a second late delivery
    ledger.apply(_batch(rec), 8.2)
    ledger.sweep(20.0, final=True)
    t = ledger.totals()
    assert (t["lost_deliveries"], t["lost_late"], t["lost_never"]) == (2, 1, 1)
    assert t["duplicates"] == 1 and t["unknown_receipts"] == 0


def test_member_leaving_after_deadline_is_still_expected() -> None:
    rec, ledger = _room("a", "b")
    rec.sent("r", "a", 1, 5.0)
    rec.left("b", 6.5)
    ledger.apply(_batch(rec), 7.0)
    assert [m.missing for m in ledger.sweep(7.0)] == [["b"]]


def test_recorder_flags_duplicates_out_of_order_and_echo() -> None:
    rec = Recorder("n1", deadline=5.0)
    kinds = [rec.received("b", "a", seq, 1.0, 1.1)[0] for seq in (1, 3, 2, 3, 4, 4)]
    assert kinds == ["ok", "ok", "ooo", "dup", "ok", "dup"]
    assert rec.received("a", "a", 9, 1.0, 1.1)[0] == "echo"
    # a fresh sender stream per recipient: c seeing seq 7 first is fine
    assert rec.received("c", "a", 7, 1.0, 1.1)[0] == "ok"
    assert (rec.counters["dup"], rec.counters["ooo"], rec.counters["echo"]) == (2, 1, 1)
    assert rec.counters["deliveries"] == 5  # duplicates and echoes are not deliveries


def test_cross_node_receipts_before_send_record_and_cross_node_loss() -> None:
    """The master may get worker B's receipt before worker A's send record."""
    deadline = 1.0
    wa, wb = Recorder("A", deadline), Recorder("B", deadline)
    ledger = Ledger(deadline, grace=1.0)
    wa.joined("r", "a1", 0.0)
    wa.joined("r", "a2", 0.0)
    wb.joined("r", "b1", 0.0)
    ledger.apply(_batch(wa), 0.1)
    ledger.apply(_batch(wb), 0.1)
    wa.sent("r", "a1", 1, 1.0)
    wa.sent("r", "a1", 2, 1.2)
    wb.received("b1", "a1", 1, 1.0, 1.001)
    wa.received("a2", "a1", 1, 1.0, 1.001)
    wa.received("a2", "a1", 2, 1.2, 1.201)  # b1 never gets seq 2
    ledger.apply(_batch(wb), 1.3)  # receipt first: kept as an orphan
    ledger.apply(_batch(wa), 1.4)
    assert ledger.sweep(2.5) == []  # within deadline + grace
    judged = ledger.sweep(3.5)
    assert [(m.seq, m.missing, m.cross_node) for m in judged] == [(1, [], 0), (2, ["b1"], 1)]
    t = ledger.totals()
    assert t["cross_node_deliveries"] == 1 and t["lost_cross_node"] == 1
    assert t["nodes"] == 2 and t["unknown_receipts"] == 0


def test_final_sweep_judges_complete_messages_and_leaves_after_drain() -> None:
    rec, ledger = _room("a", "b", deadline=5.0, grace=1.0)
    rec.sent("r", "a", 1, 10.0)
    rec.sent("r", "a", 2, 10.5)
    rec.received("b", "a", 1, 10.0, 10.01)
    ledger.apply(_batch(rec), 11.0)
    ledger.frozen_at = 11.0
    rec.left("b", 11.2)  # the test stopping its users: must not excuse b
    ledger.apply(_batch(rec), 11.3)
    ledger.sweep(11.3, final=True)
    t = ledger.totals()
    assert t["messages_judged"] == 1 and t["messages_unjudged"] == 1
    assert ledger.members["b"].leave_t is None


def _lossy_totals() -> dict[str, Any]:
    """100 lines a -> b over 2 s: seq 50 never arrives, seq 99-100 take 200 ms."""
    rec, ledger = _room("a", "b")
    for seq in range(1, 101):
        t = 1.0 + seq * 0.01
        rec.sent("r", "a", seq, t)
        if seq != 50:
            rec.received("b", "a", seq, t, t + (0.2 if seq > 98 else 0.002))
    ledger.apply(_batch(rec), 3.0)
    ledger.window = (1.0, 3.0)
    ledger.sweep(5.0, final=True)
    return ledger.totals()


def test_thresholds_and_summary_name_the_violation() -> None:
    totals = _lossy_totals()
    assert totals["p50_ms"] == pytest.approx(2.0, rel=0.03)
    assert totals["p99_ms"] == pytest.approx(200.0, rel=0.03)

    ok = evaluate(totals, max_p99_ms=500, max_loss_ratio=0.05, min_deliveries_per_s=10)
    assert all(c.ok for c in ok)
    bad = evaluate(totals, max_p99_ms=50, max_loss_ratio=0.0, min_deliveries_per_s=1000)
    failed = {c.name for c in bad if not c.ok}
    assert failed == {"fan-out loss ratio (late + never)", "fan-out p99 (whole run)", "deliveries/s"}
    text = Verdict("t", totals, bad, deadline=1.0).text()
    assert (
        "RESULT: FAIL - fan-out loss ratio (late + never) 0.01 (1/100 deliveries: 0 late, 1 never; 1 lines)"
        " violates <= 0" in text
    )
    assert "lost: never arrived: 1 deliveries (counts as loss)" in text
    assert Verdict("t", totals, ok, deadline=1.0).text().endswith("RESULT: PASS")


def test_verdict_rows_csv_and_json_say_the_same_thing() -> None:
    totals = _lossy_totals()
    verdict = Verdict("t", totals, evaluate(totals, None, 0.0, None), 1.0, {"run_id": "ab12"})
    rows = verdict.rows()
    assert rows[0] == {
        "check": "RESULT",
        "threshold": "",
        "result": verdict.result_line(),
        "verdict": "FAIL",
    }
    assert {"check": "deliveries/s", "threshold": "not set", "result": "49.5", "verdict": "-"} in rows
    assert list(csv.DictReader(io.StringIO(to_csv(rows)))) == rows
    data = json.loads(json.dumps(verdict.to_json()))
    assert data["passed"] is False and data["run_id"] == "ab12" and data["totals"]["lost_never"] == 1
    assert data["result"] == rows[0]["result"]
    running = Verdict("t", totals, evaluate(totals, None, 0.05, None), 1.0, final=False)
    assert running.rows()[0]["verdict"] == "PASS so far"
    assert running.result_line() == "so far: RESULT: PASS"


def test_latency_thresholds_use_the_steady_state_after_ramp_up() -> None:
    rec, ledger = _room("a", "b", deadline=5.0)
    for seq in range(1, 11):  # ramp-up: slow
        rec.sent("r", "a", seq, float(seq))
        rec.received("b", "a", seq, float(seq), seq + 0.5)
    rec.steady_from = 20.0
    for seq in range(11, 31):  # steady state: fast
        rec.sent("r", "a", seq, float(seq + 10))
        rec.received("b", "a", seq, float(seq + 10), seq + 10.001)
    ledger.apply(_batch(rec), 41.0)
    ledger.sweep(60.0, final=True)
    t = ledger.totals()
    assert t["latency_scope"] == "after ramp-up"
    assert t["p99_ms"] == pytest.approx(1.0, rel=0.03)
    assert t["run_p99_ms"] == pytest.approx(500.0, rel=0.03)
    checks = evaluate(t, max_p99_ms=10, max_loss_ratio=0.0, min_deliveries_per_s=None)
    assert all(c.ok for c in checks)


def test_nothing_verified_fails() -> None:
    ledger = Ledger(deadline=1.0, grace=0.0)
    checks = evaluate(ledger.totals(), None, 0.0, None)
    assert [c.name for c in checks if not c.ok] == ["lines verified"]


# ---------------------------------------------------------------------------
# end-to-end helpers


def _until(what: str, probe: Callable[[], Any], timeout: float = 30.0) -> Any:
    """Poll ``probe`` until it returns something truthy; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            last = probe()
            if last:
                return last
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


def _get(url: str, data: bytes | None = None) -> bytes:
    with urllib.request.urlopen(url, data=data, timeout=10) as r:
        assert r.status == 200, url
        return bytes(r.read())


class FaultyServer:
    """tests/_faulty_server.py as a subprocess; ``stats()`` stops it and returns its counters."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "_faulty_server.py"), "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("LISTENING"), line
        self.port = int(line.split()[1])

    def stats(self) -> dict[str, int]:
        """Stop it (SIGTERM) and return its counters; it must exit 0 without a traceback."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=10)
        assert self.proc.returncode == 0 and "Traceback" not in err, err[-3000:]
        m = re.search(r"STATS (.*)", out)
        assert m, out
        return {k: int(v) for k, v in (kv.split("=") for kv in m.group(1).split())}


@pytest.fixture
def faulty_server() -> Iterator[type[FaultyServer]]:
    started: list[FaultyServer] = []

    class Tracked(FaultyServer):
        def __init__(self, *args: str) -> None:
            super().__init__(*args)
            started.append(self)

    yield Tracked
    for srv in started:
        if srv.proc.poll() is None:
            srv.stats()


def _result_line(out: str) -> str:
    return next(line for line in out.splitlines() if line.startswith("RESULT:"))


def _run_distributed(tmp_path: Path, port: int, *args: str) -> tuple[int, str, dict]:
    """1 master + 2 worker processes talking over Locust's loopback messaging."""
    mport = free_port()
    summary = tmp_path / "summary.json"
    master = start_locust(
        tmp_path,
        "--master",
        "--master-bind-host",
        "127.0.0.1",
        "--master-bind-port",
        str(mport),
        "--expect-workers",
        "2",
        *headless(tmp_path, port),
        *args,
    )
    workers = [
        subprocess.Popen(
            [
                *LOCUST,
                "--worker",
                "--master-host",
                "127.0.0.1",
                "--master-port",
                str(mport),
            ],
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(2)
    ]
    try:
        out, _ = master.communicate(timeout=90)
        for w in workers:
            w.wait(timeout=20)
    finally:
        for p in (master, *workers):
            if p.poll() is None:
                p.kill()
                p.wait()
    assert summary.exists(), out[-3000:]
    return master.returncode, out, json.loads(summary.read_text())


# ---------------------------------------------------------------------------
# end-to-end: real locust processes


@pytest.mark.slow
def test_smoke_against_real_server(chat_server: Any, tmp_path: Path) -> None:
    """CI smoke: ~50 users for ~15 s, exit 0, every expected delivery arrived."""
    require_installed("locust")
    srv = chat_server("--flood-rate", "0")
    rc, out, s = run_locust(tmp_path, srv.port, "-u", "50", "-r", "25", "-t", "15s", "--csv", "run")
    t = s["totals"]
    assert rc == 0, out[-3000:]
    assert "RESULT: PASS" in out and s["passed"] is True and s["result"] == "RESULT: PASS"
    assert t["lost_deliveries"] == 0 and t["loss_ratio"] == 0
    assert t["members"] == 50 and t["messages_unjudged"] == 0
    assert t["expected_deliveries"] > 5000  # ~650 lines x 19 members: fan-out really checked
    assert t["delivered_in_time"] == t["expected_deliveries"]
    assert t["duplicates"] == t["out_of_order"] == t["disconnects"] == 0
    # the verdict lands beside Locust's own --csv files, and each request type has its row
    assert json.loads((tmp_path / "run_verdict.json").read_text())["totals"] == t
    rows = list(csv.DictReader(io.StringIO((tmp_path / "run_verdict.csv").read_text())))
    assert rows[0] == {"check": "RESULT", "threshold": "", "result": "RESULT: PASS", "verdict": "PASS"}
    stats = {(r["Type"], r["Name"]): r for r in csv.DictReader(io.StringIO((tmp_path / "run_stats.csv").read_text()))}
    assert {("connect", "tcp"), ("join", "tcp"), ("send", "tcp"), ("fanout", "tcp"), ("verify", "line")} <= set(stats)
    # one verify per judged line that had someone to reach (not a first member's, alone in its room)
    assert 0.5 * t["messages_judged"] < int(stats[("verify", "line")]["Request Count"]) <= t["messages_judged"]
    assert stats[("verify", "line")]["Failure Count"] == "0"
    assert int(stats[("join", "tcp")]["Request Count"]) == 50


@pytest.mark.slow
def test_faulty_server_fails_the_run_and_names_the_loss(faulty_server: Any, tmp_path: Path) -> None:
    require_installed("locust")
    srv = faulty_server("--drop-every", "40", "--dup-every", "97")
    rc, out, s = run_locust(tmp_path, srv.port, "-u", "20", "-r", "20", "-t", "6s", "--deadline", "2")
    fault = srv.stats()
    t = s["totals"]
    assert rc != 0, out[-3000:]
    result = _result_line(out)
    assert result.startswith("RESULT: FAIL") and "fan-out loss ratio" in result
    assert "duplicates" in result
    assert fault["dropped"] > 0 and fault["duplicated"] > 0
    # every reported loss is a real drop (a drop to a member still joining is not expected)
    assert 0 < t["lost_deliveries"] <= fault["dropped"]
    assert t["lost_deliveries"] >= 0.8 * fault["dropped"]
    assert t["lost_late"] == 0 and t["lost_never"] == t["lost_deliveries"]
    assert 0 < t["duplicates"] <= fault["duplicated"]
    assert "LostMessageError" in out  # also in Locust's own error report


@pytest.mark.slow
def test_thresholds_decide_the_exit_code_end_to_end(faulty_server: Any, tmp_path: Path) -> None:
    """A loss within --max-loss-ratio passes; an unreachable --min-deliveries-per-s fails, by name."""
    require_installed("locust")
    srv = faulty_server("--drop-every", "40")
    quick = ["-u", "10", "-r", "10", "-t", "4s", "--deadline", "1", "--max-loss-ratio", "0.1"]
    rc, out, s = run_locust(tmp_path, srv.port, *quick)
    assert rc == 0, out[-3000:]
    assert s["totals"]["lost_deliveries"] > 0 and s["totals"]["loss_ratio"] <= 0.1
    assert _result_line(out) == "RESULT: PASS" and s["passed"] is True

    rc, out, s = run_locust(tmp_path, srv.port, *quick, "--min-deliveries-per-s", "1e9")
    assert rc == 1, out[-3000:]
    assert _result_line(out).startswith("RESULT: FAIL - deliveries/s ") and "violates >= 1e+09" in out
    assert [c["name"] for c in s["checks"] if not c["ok"]] == ["deliveries/s"]
    assert srv.stats()["dropped"] > 0


@pytest.mark.slow
def test_server_freeze_counts_late_deliveries_apart_from_lost_ones(chat_server: Any, tmp_path: Path) -> None:
    """SIGSTOP the server past the deadline: every line still arrives, late, and the run fails on it."""
    require_installed("locust")
    srv = chat_server("--flood-rate", "0")
    users = 6
    run = ["-u", str(users), "-r", str(users), "-t", "10s", "--deadline", "1"]
    proc = start_locust(tmp_path, *headless(tmp_path, srv.port), *run)
    try:
        metrics = f"http://127.0.0.1:{srv.port}/metrics"
        _until(f"{users} members", lambda: f"chat_members {users}.0" in _get(metrics).decode(), timeout=20)
        srv.signal(signal.SIGSTOP)
        time.sleep(2.5)  # the freeze itself: longer than deadline + grace (1 + 0.7 s)
        srv.signal(signal.SIGCONT)
        out, _ = proc.communicate(timeout=60)
    finally:
        srv.signal(signal.SIGCONT)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    t = json.loads((tmp_path / "summary.json").read_text())["totals"]
    assert proc.returncode == 1, out[-3000:]
    assert t["lost_late"] > 0 and t["lost_never"] == 0, t
    assert "lost: arrived late: " in out and "(counts as loss)" in out
    assert _result_line(out).startswith("RESULT: FAIL - fan-out loss ratio (late + never)")


@pytest.mark.slow
def test_server_disconnects_fail_the_run_and_users_reconnect(chat_server: Any, tmp_path: Path) -> None:
    """Listen-only users idle past the server's --idle-timeout get dropped by the server."""
    require_installed("locust")
    srv = chat_server("--idle-timeout", "1")
    rc, out, s = run_locust(tmp_path, srv.port, "-u", "4", "-r", "4", "-t", "4s", "--msg-rate", "0", "--deadline", "1")
    t = s["totals"]
    assert rc != 0, out[-3000:]
    assert "server disconnects" in _result_line(out)
    assert t["disconnects"] >= 4
    assert t["members"] > 4  # dropped users reconnected under a new nick
    assert "ServerDisconnectError" in out


@pytest.mark.slow
def test_distributed_two_workers_clean(chat_server: Any, tmp_path: Path) -> None:
    require_installed("locust")
    srv = chat_server("--flood-rate", "0")
    rc, out, s = _run_distributed(tmp_path, srv.port, "-u", "30", "-r", "30", "-t", "8s")
    t = s["totals"]
    assert rc == 0, out[-3000:]
    assert t["nodes"] == 2 and t["members"] == 30
    assert t["lost_deliveries"] == 0 and t["expected_deliveries"] > 1000
    # rooms mix both workers, so the master really judged cross-worker fan-out
    assert t["cross_node_deliveries"] > 0.3 * t["expected_deliveries"]


@pytest.mark.slow
def test_distributed_two_workers_detect_cross_worker_loss(faulty_server: Any, tmp_path: Path) -> None:
    require_installed("locust")
    srv = faulty_server("--drop-every", "40")
    rc, out, s = _run_distributed(tmp_path, srv.port, "-u", "20", "-r", "20", "-t", "6s", "--deadline", "2")
    fault = srv.stats()
    t = s["totals"]
    assert rc != 0, out[-3000:]
    assert "RESULT: FAIL - fan-out loss ratio" in out
    assert t["nodes"] == 2
    assert 0 < t["lost_deliveries"] <= fault["dropped"]
    assert t["lost_cross_node"] > 0  # sent on one worker, missing on the other


def _verdict_rows(base: str) -> list[dict[str, str]]:
    stats = json.loads(_get(base + "/stats/requests"))
    (tab,) = [e for e in stats["extended_stats"] if e["key"] == "swarm-verdict"]
    return list(tab["data"])


@pytest.mark.slow
def test_web_ui_form_runs_the_swarm_and_shows_the_verdict(chat_server: Any, tmp_path: Path) -> None:
    """``locust -f loadtest`` with the web UI: swarm options in the form, a run started from it,
    the verdict tab provisional then final (before Locust says stopped), downloads, Ctrl-C."""
    require_installed("locust")
    srv = chat_server("--flood-rate", "0")
    web = free_port()
    proc = start_locust(
        tmp_path, "--web-host", "127.0.0.1", "--web-port", str(web), "--deadline", "2", "--room-size", "3"
    )
    try:
        base = f"http://127.0.0.1:{web}"
        page = _until("the web UI", lambda: _get(base + "/").decode())
        args = json.loads(re.search(r"window\.templateArgs = (\{.*\})", page).group(1))  # type: ignore[union-attr]
        form = args["extra_options"]
        for name in ("msg_rate", "room_size", "deadline", "max_loss_ratio", "max_p99_ms", "min_deliveries_per_s"):
            assert name in form, sorted(form)
        assert "summary_json" not in form  # a file path on the server is no form field
        assert form["room_size"]["default_value"] == 3 and form["deadline"]["default_value"] == 2.0
        assert args["num_users"] == 3  # the default user count fills one room
        assert _verdict_rows(base)[0]["result"].startswith("no run yet")

        body = f"user_count=6&spawn_rate=6&host=tcp://127.0.0.1:{srv.port}&room_size=3&msg_rate=2&max_p99_ms="
        assert json.loads(_get(base + "/swarm", body.encode()))["success"]

        def joined() -> dict[str, Any] | None:
            stats = {(e["method"], e["name"]): e for e in json.loads(_get(base + "/stats/requests"))["stats"]}
            done = stats.get(("join", "tcp"), {}).get("num_requests") == 6 and ("verify", "line") in stats
            return stats if done else None

        stats = _until("6 joins and a verified line", joined)
        assert stats[("join", "tcp")]["num_failures"] == 0 and stats[("send", "tcp")]["num_requests"] > 0
        rows = _verdict_rows(base)
        assert rows[0]["verdict"] == "PASS so far" and rows[0]["threshold"] == "run in progress"
        _until("a chart point with verified lines", lambda: "verify" in _get(base + "/swarm/series.json").decode())

        assert json.loads(_get(base + "/stop", b""))["success"]  # returns once the verdict is given
        final = json.loads(_get(base + "/stats/requests"))
        rows = next(e["data"] for e in final["extended_stats"] if e["key"] == "swarm-verdict")
        assert rows[0] == {"check": "RESULT", "threshold": "", "result": "RESULT: PASS", "verdict": "PASS"}
        assert rows[-1]["check"] == "exit code on quit"
        assert rows[-1]["result"] == "0 (0 of 1 runs in this session failed)"
        downloaded = json.loads(_get(base + "/swarm/verdict.json"))
        assert downloaded["passed"] is True and downloaded["rows"] == rows
        assert downloaded["room_size"] == 3 and downloaded["msg_rate"] == 2.0
        assert list(csv.DictReader(io.StringIO(_get(base + "/swarm/verdict.csv").decode()))) == rows
        # the charts page: each request type sampled on its own, kept after the run
        points = json.loads(_get(base + "/swarm/series.json"))["points"]
        assert {"join", "send", "verify"} <= {r["type"] for p in points for r in p["rows"]}, points
        assert b'fetch("./series.json"' in _get(base + "/swarm/charts")
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out[-3000:]
    assert "RESULT: PASS" in out and "rooms of 3" in out
