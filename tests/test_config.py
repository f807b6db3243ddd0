"""One declaration per setting (a Config field) feeds --help, the CHAT_* variables and docs/configuration.md."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from _chat import ROOT
from chat_svc.config import SETTINGS, Config, load, markdown_table

CONFIGURATION = (ROOT / "docs" / "configuration.md").read_text()
OPERATIONS = (ROOT / "docs" / "operations.md").read_text()


def test_flags_beat_environment_which_beats_defaults() -> None:
    env = {"CHAT_PORT": "7000", "CHAT_HOST": "127.0.0.2", "CHAT_FLOOD_RATE": "0", "CHAT_LOG_MESSAGES": "true"}
    config = load(["--port", "7100"], env)
    assert (config.port, config.host, config.flood_rate, config.log_messages) == (7100, "127.0.0.2", 0.0, True)
    assert load([], {}) == Config()


def test_every_boolean_option_takes_the_same_forms() -> None:
    booleans = [setting for setting in SETTINGS if setting.is_bool]
    assert {setting.name for setting in booleans} == {"ready_requires_backplane", "log_messages", "require_auth"}
    base = {"CHAT_TOKEN": "t"}  # --require-auth needs something to require
    for setting in booleans:
        assert getattr(load([setting.option], base), setting.name) is True
        assert getattr(load([setting.option, "true"], base), setting.name) is True
        assert getattr(load([f"{setting.option}=false"], base), setting.name) is False
        assert getattr(load([setting.option, "false"], {**base, setting.env: "true"}), setting.name) is False
        assert getattr(load([], {**base, setting.env: "false"}), setting.name) is False
        assert getattr(load([], {**base, setting.env: "1"}), setting.name) is True


def test_bad_values_are_refused_with_the_variable_named(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        load([], {"CHAT_PORT": "http"})
    assert "CHAT_PORT" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        load(["--tls-cert", "x.pem"], {})
    with pytest.raises(SystemExit):
        load(["--require-auth"], {})


def test_help_documents_every_option_with_its_default() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "chat_svc", "--help"], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    flat = " ".join(out.split())
    for setting in SETTINGS:
        assert setting.option in out
        assert f"[env {setting.env}; default {setting.shown_default()}]" in flat, setting.name


def test_configuration_table_matches_the_settings() -> None:
    assert markdown_table() in CONFIGURATION


def test_secrets_never_appear_in_the_public_config() -> None:
    shown = Config(token="hunter2", redis_url="redis://:pw@host/0").public()
    assert shown["token"] == "<set>" and shown["redis_url"] == "<set>" and shown["token_file"] is None


def test_operations_guide_documents_every_metric_and_log_event() -> None:
    source = "".join(path.read_text() for path in (ROOT / "service" / "chat_svc").rglob("*.py"))
    metrics = set(re.findall(r'"(chat_[a-z_]+)"', source)) - {"chat_svc"}
    events = set(re.findall(r'log\w*\.(?:info|warning|error|exception|debug)\(\s*"([a-z_]+)"', source))
    events |= set(re.findall(r'Coalesced\(\s*[\w.]+,\s*"([a-z_]+)"', source))  # logged once per interval
    assert {"client_refused", "auth_failed", "accept_paused"} <= events
    assert metrics and events
    missing = sorted(name for name in metrics | events if f"`{name}" not in OPERATIONS)
    assert not missing
