"""Every setting of the server, declared once.

The table below feeds the argument parser (and so ``chat-svc --help``), the
``CHAT_*`` environment variables and the README's configuration table, so the
three cannot drift apart; ``tests/test_config.py`` fails when the README does.
Precedence: command-line flag, then environment variable, then default.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any


def _flag(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(f"must be >= 0: {value}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"must be >= 1: {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise ValueError(f"must be >= 0: {value}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError(f"not a TCP port: {value}")
    return value


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        lowered = text.strip().lower()
        if lowered not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}: {text!r}")
        return lowered

    return parse


@dataclass(frozen=True)
class Setting:
    """One option: its name, parser, default and the sentence that documents it."""

    name: str
    parse: Callable[[str], Any]
    default: Any
    help: str
    secret: bool = False
    is_flag: bool = False

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "CHAT_" + self.name.upper()

    def shown_default(self) -> str:
        if self.default is None:
            return "off"
        if self.is_flag:
            return "false"
        return str(self.default)


SETTINGS: tuple[Setting, ...] = (
    Setting("host", str, "0.0.0.0", "Address the chat port binds to."),
    Setting("port", _port, 9009, "Chat TCP port; it also answers HTTP /metrics, /healthz, /readyz."),
    Setting("metrics_host", str, "0.0.0.0", "Address of the separate metrics listener."),
    Setting(
        "metrics_port",
        _port,
        None,
        "Extra HTTP listener for /metrics, /healthz, /readyz (bind it to an internal "
        "interface with --metrics-host to keep metrics off the chat port).",
    ),
    Setting("history", _non_negative_int, 20, "Recent room lines replayed to a joiner."),
    Setting(
        "max_line_bytes",
        _positive_int,
        8192,
        "Longest accepted input line; a longer one gets '! line too long' and is disconnected.",
    ),
    Setting(
        "sendq_bytes",
        _positive_int,
        1048576,
        "Outbound queue limit per member; past it the member is dropped as a slow consumer.",
    ),
    Setting(
        "sndbuf_bytes",
        _non_negative_int,
        262144,
        "Kernel send buffer per client socket (SO_SNDBUF); bounds what the kernel holds for a "
        "slow reader beyond --sendq-bytes. 0 = kernel autotuning (up to tcp_wmem max).",
    ),
    Setting("flood_burst", _positive_int, 20, "Lines a client may send at once before fakelag."),
    Setting(
        "flood_rate",
        _non_negative_float,
        10.0,
        "Sustained lines per second per client; 0 turns flood control off.",
    ),
    Setting(
        "flood_max_input_bytes",
        _positive_int,
        65536,
        "Unread input (ours plus the kernel's) a throttled client may pile up before it "
        "is disconnected for flood.",
    ),
    Setting(
        "flood_kick_after",
        _non_negative_float,
        60.0,
        "Seconds a client may stay continuously throttled before it is disconnected for "
        "flood; 0 = never.",
    ),
    Setting("max_clients", _positive_int, 20000, "Most chat members at once; past it '! server full'."),
    Setting("max_per_ip", _non_negative_int, 0, "Most chat members per client IP; 0 = no cap."),
    Setting("idle_timeout", _non_negative_float, 0.0, "Seconds without input before a member is dropped; 0 = off."),
    Setting("shutdown_timeout", _non_negative_float, 5.0, "Seconds to flush queues on SIGTERM/SIGINT before closing."),
    Setting(
        "notice_threshold",
        _non_negative_int,
        200,
        "Rooms with more members than this get no join/leave notices (keeps big rooms linear).",
    ),
    Setting(
        "http_sniff_ms",
        _non_negative_int,
        250,
        "A new connection silent for this long is taken as chat (an HTTP request line "
        "arriving first is served as HTTP).",
    ),
    Setting("http_timeout", _non_negative_float, 5.0, "Seconds an HTTP client has to send its request headers."),
    Setting(
        "auth_timeout", _non_negative_float, 5.0, "Seconds a client has to send '/auth TOKEN' when a token is set."
    ),
    Setting("tls_cert", str, None, "PEM certificate: serve chat over TLS (needs --tls-key)."),
    Setting("tls_key", str, None, "PEM private key for --tls-cert."),
    Setting("token", str, None, "Access token; clients must send '/auth TOKEN' first.", secret=True),
    Setting("token_file", str, None, "File holding the access token (first line).", secret=True),
    Setting(
        "redis_url",
        str,
        None,
        "Redis URL enabling the multi-instance backplane, e.g. redis://redis:6379/0.",
        secret=True,
    ),
    Setting(
        "ready_requires_backplane",
        _flag,
        True,
        "Whether /readyz answers 503 while the Redis backplane is down.",
    ),
    Setting("presence_ttl", _positive_int, 15, "Seconds a member's cluster presence lives without refresh."),
    Setting("instance_id", str, None, "Name of this instance on the backplane (default: host name and pid)."),
    Setting("log_format", _choice("auto", "json", "console"), "auto", "auto = JSON unless stdout is a terminal."),
    Setting("log_level", _choice("debug", "info", "warning", "error"), "info", "Lowest level logged."),
    Setting("log_messages", _flag, False, "Log message bodies (debug level); off by default.", is_flag=True),
)


@dataclass(frozen=True)
class Config:
    """The typed configuration every module receives; built by ``load``."""

    host: str = "0.0.0.0"
    port: int = 9009
    metrics_host: str = "0.0.0.0"
    metrics_port: int | None = None
    history: int = 20
    max_line_bytes: int = 8192
    sendq_bytes: int = 1048576
    sndbuf_bytes: int = 262144
    flood_burst: int = 20
    flood_rate: float = 10.0
    flood_max_input_bytes: int = 65536
    flood_kick_after: float = 60.0
    max_clients: int = 20000
    max_per_ip: int = 0
    idle_timeout: float = 0.0
    shutdown_timeout: float = 5.0
    notice_threshold: int = 200
    http_sniff_ms: int = 250
    http_timeout: float = 5.0
    auth_timeout: float = 5.0
    tls_cert: str | None = None
    tls_key: str | None = None
    token: str | None = None
    token_file: str | None = None
    redis_url: str | None = None
    ready_requires_backplane: bool = True
    presence_ttl: int = 15
    instance_id: str | None = None
    log_format: str = "auto"
    log_level: str = "info"
    log_messages: bool = False

    def access_token(self) -> str | None:
        """The token to demand, read from --token or the first line of --token-file."""
        if self.token:
            return self.token
        if self.token_file:
            with open(self.token_file, encoding="utf-8") as handle:
                return handle.readline().strip() or None
        return None

    def public(self) -> dict[str, Any]:
        """The settings safe to log: secrets show only whether they are set."""
        shown: dict[str, Any] = {}
        for setting in SETTINGS:
            value = getattr(self, setting.name)
            shown[setting.name] = ("<set>" if value else None) if setting.secret else value
        return shown


def _check_table() -> None:
    declared = {s.name: s.default for s in SETTINGS}
    typed = {f.name: f.default for f in fields(Config)}
    if declared != typed:
        raise RuntimeError(f"settings table and Config disagree: {declared.items() ^ typed.items()}")


_check_table()


def build_parser(prog: str = "chat-svc") -> argparse.ArgumentParser:
    """The argument parser; every option shows its environment variable and default."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="chat-svc: a TCP line chat server with Prometheus metrics on the same port. "
        "Every option can also be set through its CHAT_* environment variable; flags win.",
        epilog="Subcommand: 'chat-svc healthcheck [--host H] [--port P]' probes /healthz "
        "and exits 0 when healthy.",
    )
    for setting in SETTINGS:
        text = f"{setting.help} [env {setting.env}; default {setting.shown_default()}]"
        if setting.is_flag:
            parser.add_argument(setting.option, dest=setting.name, action="store_true", default=None, help=text)
        else:
            parser.add_argument(
                setting.option,
                dest=setting.name,
                type=setting.parse,
                default=None,
                metavar=setting.name.upper(),
                help=text,
            )
    return parser


def load(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Build the Config from flags, then CHAT_* variables, then defaults."""
    environ = os.environ if environ is None else environ
    parser = build_parser()
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        flagged = getattr(args, setting.name)
        if flagged is not None:
            values[setting.name] = flagged
        elif environ.get(setting.env, "") != "":
            try:
                values[setting.name] = setting.parse(environ[setting.env])
            except ValueError as exc:
                parser.error(f"{setting.env}: {exc}")
        else:
            values[setting.name] = setting.default
    config = Config(**values)
    if bool(config.tls_cert) != bool(config.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    return config


def markdown_table() -> str:
    """The README's configuration table, generated from SETTINGS."""
    rows = ["| flag | environment | default | meaning |", "|---|---|---|---|"]
    for setting in SETTINGS:
        rows.append(f"| `{setting.option}` | `{setting.env}` | {setting.shown_default()} | {setting.help} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
