"""The Locust swarm (loadtest/): its fan-out judge, and real locust runs on loopback.

Unit tests drive ``loadtest._ledger`` directly (it imports neither Locust nor gevent, so
it does not monkey-patch this pytest process). The end-to-end tests run locust as a
subprocess, as a user would, against the real server (``chat_server`` fixture) and
against ``tests/_faulty_server.py``, which drops/duplicates deliveries on purpose so the
checks are shown to fail. Every run is bounded (-t, subprocess timeouts) and only
targets 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from _require import missing  # noqa: E402

from loadtest._ledger import Ledger, Recorder, evaluate, format_summary  # noqa: E402

LOCUST = [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest")]


# ---------------------------------------------------------------------------
# unit tests of the judge


def _batch(rec: Recorder) -> dict[str, Any]:
    batch = rec.take_batch()
    assert batch is not None
    return batch


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
    assert ledger.sweep(12.5) == []  # seq 2 still inside its deadline
    lost = ledger.sweep(13.5)
    assert [(m.sender, m.seq, m.missing) for m in lost] == [("a", 2, ["b"])]
    t = ledger.totals()
    assert (t["expected_deliveries"], t["delivered_in_time"], t["lost_deliveries"]) == (3, 2, 1)
    assert t["loss_ratio"] == pytest.approx(1 / 3)
    assert t["unexpected_deliveries"] == 1


def test_late_delivery_is_lost_and_leaving_member_is_excused() -> None:
    rec = Recorder("n1", deadline=1.0)
    ledger = Ledger(deadline=1.0, grace=0.0)
    for nick in ("a", "b", "c"):
        rec.joined("r", nick, 0.0)
    rec.sent("r", "a", 1, 5.0)
    kind, ms = rec.received("b", "a", 1, 5.0, 6.5)  # 1.5 s > 1 s deadline
    assert kind == "late" and ms == pytest.approx(1500)
    rec.left("c", 5.5)  # c left before the deadline: may legitimately miss it
    ledger.apply(_batch(rec), 7.0)
    lost = ledger.sweep(7.0)
    assert len(lost) == 1 and lost[0].missing == ["b"] and lost[0].late == 1
    t = ledger.totals()
    assert (t["lost_deliveries"], t["lost_late"], t["lost_never"]) == (1, 1, 0)


def test_member_leaving_after_deadline_is_still_expected() -> None:
    rec = Recorder("n1", deadline=1.0)
    ledger = Ledger(deadline=1.0, grace=0.0)
    rec.joined("r", "a", 0.0)
    rec.joined("r", "b", 0.0)
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
    lost = ledger.sweep(3.5)
    assert [(m.seq, m.missing, m.cross_node) for m in lost] == [(2, ["b1"], 1)]
    t = ledger.totals()
    assert t["cross_node_deliveries"] == 1 and t["lost_cross_node"] == 1
    assert t["nodes"] == 2 and t["unknown_receipts"] == 0


def test_final_sweep_judges_complete_messages_and_leaves_after_drain() -> None:
    rec = Recorder("n", deadline=5.0)
    ledger = Ledger(deadline=5.0, grace=1.0)
    rec.joined("r", "a", 0.0)
    rec.joined("r", "b", 0.0)
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


def test_thresholds_and_summary_name_the_violation() -> None:
    rec = Recorder("n", deadline=1.0)
    ledger = Ledger(deadline=1.0, grace=0.0)
    rec.joined("r", "a", 0.0)
    rec.joined("r", "b", 0.0)
    for seq in range(1, 101):
        t = 1.0 + seq * 0.01
        rec.sent("r", "a", seq, t)
        if seq != 50:
            rec.received("b", "a", seq, t, t + (0.2 if seq > 98 else 0.002))
    ledger.apply(_batch(rec), 3.0)
    ledger.window = (1.0, 3.0)
    ledger.sweep(5.0, final=True)
    totals = ledger.totals()
    assert totals["p50_ms"] == pytest.approx(2.0, rel=0.03)
    assert totals["p99_ms"] == pytest.approx(200.0, rel=0.03)

    ok = evaluate(totals, max_p99_ms=500, max_loss_ratio=0.05, min_deliveries_per_s=10)
    assert all(c.ok for c in ok)
    bad = evaluate(totals, max_p99_ms=50, max_loss_ratio=0.0, min_deliveries_per_s=1000)
    failed = {c.name for c in bad if not c.ok}
    assert failed == {"fan-out loss ratio", "fan-out p99 (whole run)", "deliveries/s"}
    text = format_summary(totals, bad, "t")
    assert "RESULT: FAIL - fan-out loss ratio 0.01 (1/100 deliveries, 1 msgs)" in text
    assert "RESULT: PASS" in format_summary(totals, ok, "t")


def test_latency_thresholds_use_the_steady_state_after_ramp_up() -> None:
    rec = Recorder("n", deadline=5.0)
    ledger = Ledger(deadline=5.0, grace=0.0)
    rec.joined("r", "a", 0.0)
    rec.joined("r", "b", 0.0)
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
    assert [c.name for c in checks if not c.ok] == ["messages verified"]


# ---------------------------------------------------------------------------
# end-to-end helpers


def _need(*modules: str) -> None:
    """Locust runs as a subprocess: check it is installed without importing it here
    (importing locust would gevent-monkey-patch the whole pytest process)."""
    for name in modules:
        if importlib.util.find_spec(name) is None:
            missing(f"Python module {name} is not installed; pip install -e '.[loadtest]'")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class FaultyServer:
    """tests/_faulty_server.py as a subprocess; ``stats()`` stops it and returns its counters."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "_faulty_server.py"), "--port", "0", *args],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("LISTENING"), line
        self.port = int(line.split()[1])

    def stats(self) -> dict[str, int]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=10)
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
            srv.proc.kill()
            srv.proc.wait()


def _run_locust(tmp_path: Path, port: int, *args: str, timeout: float = 90) -> tuple[int, str, dict]:
    summary = tmp_path / "summary.json"
    cmd = [
        *LOCUST,
        "--headless",
        "--host",
        f"tcp://127.0.0.1:{port}",
        "--summary-json",
        str(summary),
        "--only-summary",
        *args,
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert summary.exists(), out[-3000:]
    return proc.returncode, out, json.loads(summary.read_text())


def _run_distributed(tmp_path: Path, port: int, *args: str) -> tuple[int, str, dict]:
    """1 master + 2 worker processes talking over Locust's loopback messaging."""
    mport = _free_port()
    summary = tmp_path / "summary.json"
    common = ["-f", str(ROOT / "loadtest")]
    master = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "locust",
            *common,
            "--master",
            "--master-bind-host",
            "127.0.0.1",
            "--master-bind-port",
            str(mport),
            "--expect-workers",
            "2",
            "--headless",
            "--host",
            f"tcp://127.0.0.1:{port}",
            "--summary-json",
            str(summary),
            "--only-summary",
            *args,
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "locust",
                *common,
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
    _need("locust")
    srv = chat_server("--flood-rate", "0")
    rc, out, s = _run_locust(tmp_path, srv.port, "-u", "50", "-r", "25", "-t", "15s")
    t = s["totals"]
    assert rc == 0, out[-3000:]
    assert "RESULT: PASS" in out
    assert t["lost_deliveries"] == 0 and t["loss_ratio"] == 0
    assert t["members"] == 50 and t["messages_unjudged"] == 0
    assert t["expected_deliveries"] > 5000  # ~650 lines x 19 members: fan-out really checked
    assert t["delivered_in_time"] == t["expected_deliveries"]
    assert t["duplicates"] == t["out_of_order"] == t["disconnects"] == 0


@pytest.mark.slow
def test_faulty_server_fails_the_run_and_names_the_loss(faulty_server: Any, tmp_path: Path) -> None:
    _need("locust")
    srv = faulty_server("--drop-every", "40", "--dup-every", "97")
    rc, out, s = _run_locust(tmp_path, srv.port, "-u", "20", "-r", "20", "-t", "6s", "--deadline", "2")
    fault = srv.stats()
    t = s["totals"]
    assert rc != 0, out[-3000:]
    result = next(line for line in out.splitlines() if line.startswith("RESULT:"))
    assert result.startswith("RESULT: FAIL") and "fan-out loss ratio" in result
    assert "duplicates" in result
    assert fault["dropped"] > 0 and fault["duplicated"] > 0
    # every reported loss is a real drop (a drop to a member still joining is not expected)
    assert 0 < t["lost_deliveries"] <= fault["dropped"]
    assert t["lost_deliveries"] >= 0.8 * fault["dropped"]
    assert t["lost_late"] == 0
    assert 0 < t["duplicates"] <= fault["duplicated"]
    assert "LostMessageError" in out  # also in Locust's own error report


@pytest.mark.slow
def test_server_disconnects_fail_the_run_and_users_reconnect(chat_server: Any, tmp_path: Path) -> None:
    """Listen-only users idle past the server's --idle-timeout get dropped by the server."""
    _need("locust")
    srv = chat_server("--idle-timeout", "1")
    rc, out, s = _run_locust(tmp_path, srv.port, "-u", "4", "-r", "4", "-t", "4s", "--msg-rate", "0", "--deadline", "1")
    t = s["totals"]
    assert rc != 0, out[-3000:]
    result = next(line for line in out.splitlines() if line.startswith("RESULT:"))
    assert "server disconnects" in result
    assert t["disconnects"] >= 4
    assert t["members"] > 4  # dropped users reconnected under a new nick
    assert "ServerDisconnectError" in out


@pytest.mark.slow
def test_distributed_two_workers_clean(chat_server: Any, tmp_path: Path) -> None:
    _need("locust")
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
    _need("locust")
    srv = faulty_server("--drop-every", "40")
    rc, out, s = _run_distributed(tmp_path, srv.port, "-u", "20", "-r", "20", "-t", "6s", "--deadline", "2")
    fault = srv.stats()
    t = s["totals"]
    assert rc != 0, out[-3000:]
    assert "RESULT: FAIL - fan-out loss ratio" in out
    assert t["nodes"] == 2
    assert 0 < t["lost_deliveries"] <= fault["dropped"]
    assert t["lost_cross_node"] > 0  # sent on one worker, missing on the other


@pytest.mark.slow
def test_web_ui_runs_the_swarm(chat_server: Any, tmp_path: Path) -> None:
    """``locust -f loadtest`` with the web UI: start from the form, Ctrl-C prints the summary."""
    _need("locust")
    srv = chat_server("--flood-rate", "0")
    web = _free_port()
    proc = subprocess.Popen(
        [*LOCUST, "--web-host", "127.0.0.1", "--web-port", str(web), "--deadline", "2"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        base = f"http://127.0.0.1:{web}"
        for _ in range(100):
            with contextlib.suppress(OSError), urllib.request.urlopen(base + "/", timeout=1) as r:
                assert r.status == 200
                break
            time.sleep(0.1)
        form = f"user_count=6&spawn_rate=6&host=tcp://127.0.0.1:{srv.port}&room_size=3&msg_rate=2"
        with urllib.request.urlopen(base + "/swarm", data=form.encode(), timeout=5) as r:
            assert json.load(r)["success"]
        time.sleep(4)
        with urllib.request.urlopen(base + "/stats/requests", timeout=5) as r:
            stats = {e["name"]: e for e in json.load(r)["stats"]}
        assert stats["join"]["num_requests"] == 6 and stats["join"]["num_failures"] == 0
        assert stats["send"]["num_requests"] > 0
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out[-3000:]
    assert "RESULT: PASS" in out and "rooms of 3" in out
