"""The server fixture's own check: it must be able to fail, or it proves nothing."""

from __future__ import annotations

from pathlib import Path

from _chat import ServerProcess


def test_logged_bugs_are_reported_unless_the_test_declares_them(tmp_path: Path) -> None:
    srv = ServerProcess((), log_dir=tmp_path)
    srv.member("alice")
    assert srv.stop() == 0
    assert srv.problems() == []
    with srv.log_path.open("a") as log:  # as the server writes them (JSON), and as gevent prints one
        log.write('{"event": "fanout_failed", "room": "lobby", "level": "error", "exception": []}\n')
        log.write('{"event": "backplane_publisher_failed", "level": "error", "exception": []}\n')
        log.write("Traceback (most recent call last):\n")
        log.write('{"event": "message", "text": "a Traceback in a chat line is not a bug", "level": "debug"}\n')
    [report] = srv.problems()
    assert "'fanout_failed'" in report and "'backplane_publisher_failed'" in report and "'Traceback'" in report
    assert "chat line" not in report.split("--- last")[0]
    assert "--- last 40 log lines ---" in report
    srv.expect_log("fanout_failed", "backplane_publisher_failed", "Traceback")
    assert srv.problems() == []


def test_an_unexpected_exit_status_is_reported_unless_declared_or_killed_by_the_test(tmp_path: Path) -> None:
    crashed = ServerProcess((), log_dir=tmp_path)
    crashed.proc.kill()  # as if it died on its own
    crashed.stop()
    [report] = crashed.problems()
    assert "exit status -9, expected 0" in report
    crashed.expect_exit(-9)
    assert crashed.problems() == []
    killed = ServerProcess((), log_dir=tmp_path)
    killed.kill()
    killed.stop()
    assert killed.problems() == []
