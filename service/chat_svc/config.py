"""Every setting of the server, declared once: a field of ``Config`` with its parser and its sentence.

The argument parser (and so ``chat-svc --help``), the ``CHAT_*`` environment
variables and the README's configuration table are all derived from those
fields, so the three cannot drift apart; ``tests/test_config.py`` fails when
the README does.  Precedence: command-line flag, then environment variable,
then default.  Every boolean takes the same form: ``--x`` or ``--x true``
turns it on, ``--x false`` off (``CHAT_X=true|false`` likewise).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

_SETTING = "chat_svc.setting"


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def parse_non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(f"must be >= 0: {value}")
    return value


def parse_positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"must be >= 1: {value}")
    return value


def parse_non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise ValueError(f"must be >= 0: {value}")
    return value


def parse_port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError(f"not a TCP port: {value}")
    return value


def parse_networks(text: str) -> tuple[str, ...]:
    """A list of networks, comma- or space-separated (``10.0.0.0/8, 192.168.1.7``), normalized."""
    return tuple(str(ipaddress.ip_network(part, strict=False)) for part in text.replace(",", " ").split())


def parse_choice(*allowed: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        lowered = text.strip().lower()
        if lowered not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}: {text!r}")
        return lowered

    return parse


def parse_origins(text: str) -> str:
    """``same-host``, ``*`` or a comma-separated list of origins (``scheme://host[:port]``), normalized."""
    items = [item.strip().lower().rstrip("/") for item in text.split(",") if item.strip()]
    if not items:
        raise ValueError("give same-host, * or a list of origins")
    for item in items:
        if item not in ("same-host", "*") and not re.fullmatch(r"[a-z][a-z0-9+.-]*://[^/\s]+", item):
            raise ValueError(f"not an origin (scheme://host[:port]): {item!r}")
    return ",".join(items)


def setting(default: Any, parse: Callable[[str], Any], help: str, *, secret: bool = False) -> Any:
    """A ``Config`` field that is also an option: its default, parser and documentation."""
    return field(default=default, metadata={_SETTING: (parse, help, secret)})


@dataclass(frozen=True)
class Config:
    """The typed configuration every module receives; built by ``load``."""

    host: str = setting("0.0.0.0", str, "Address the chat port binds to.")
    port: int = setting(
        9009,
        parse_port,
        "Chat TCP port; it also serves the chat page (/), WebSocket chat (/ws) and, without "
        "--metrics-port, HTTP /metrics, /healthz, /readyz and the API (/api/).",
    )
    metrics_host: str = setting("0.0.0.0", str, "Address of the separate metrics listener.")
    metrics_port: int | None = setting(
        None,
        parse_port,
        "HTTP listener for /metrics, /healthz, /readyz, the chat page and the API; once set, the chat "
        "port answers /metrics, /healthz, /readyz and /api/ with 404 (bind it to an internal interface "
        "with --metrics-host).",
    )
    history: int = setting(
        20, parse_non_negative_int, "Recent chat lines replayed to a joiner (from the room's retained log)."
    )
    resume_lines: int = setting(
        1000, parse_positive_int, "Lines each room retains for /resume (and history), in memory and in Redis."
    )
    resume_bytes: int = setting(
        262144,
        parse_positive_int,
        "Bytes of lines each room retains (each line counted with its overhead); the oldest go first.",
    )
    resume_keep: float = setting(
        300.0,
        parse_non_negative_float,
        "Seconds the log of a room whose last member left is kept for resumes (in Redis: the TTL "
        "of a quiet room's keys).",
    )
    history_budget_bytes: int = setting(
        67108864,
        parse_positive_int,
        "Bytes all room logs of this process may retain together; past it, emptied rooms' logs go "
        "first (oldest first), then the largest logs are trimmed.",
    )
    room_create_burst: int = setting(
        20, parse_positive_int, "Rooms a member may bring into being at once (rooms this instance holds nothing of)."
    )
    room_create_rate: float = setting(
        0.2,
        parse_non_negative_float,
        "Rooms per second a member may bring into being after the burst; 0 = no limit.",
    )
    max_line_bytes: int = setting(
        8192,
        parse_positive_int,
        "Longest accepted input line; a longer one gets '! line too long' and is disconnected.",
    )
    sendq_bytes: int = setting(
        1048576,
        parse_positive_int,
        "Outbound queue limit per member; past it the member is dropped as a slow consumer.",
    )
    sndbuf_bytes: int = setting(
        262144,
        parse_non_negative_int,
        "Kernel send buffer per client socket (SO_SNDBUF); bounds what the kernel holds for a "
        "slow reader beyond --sendq-bytes. 0 = kernel autotuning (up to tcp_wmem max).",
    )
    outbound_budget_bytes: int = setting(
        134217728,
        parse_positive_int,
        "Outbound bytes all members together may hold (queues, each shared buffer once, plus the full kernel "
        "send buffer of every member with a queue); past it the largest queues are dropped first.",
    )
    flood_burst: int = setting(
        20, parse_positive_int, "Tokens a client may spend at once before fakelag (a line costs 1, /nick 2, "
        "/join and /who 3, /rooms 5)."
    )
    flood_rate: float = setting(
        10.0,
        parse_non_negative_float,
        "Sustained tokens (lines) per second per client; 0 turns flood control off.",
    )
    flood_max_input_bytes: int = setting(
        65536,
        parse_positive_int,
        "Unread input (ours plus the kernel's) a throttled client may pile up before it "
        "is disconnected for flood.",
    )
    flood_kick_after: float = setting(
        60.0,
        parse_non_negative_float,
        "Seconds a client may stay continuously throttled before it is disconnected for "
        "flood; 0 = never.",
    )
    max_clients: int = setting(
        20000,
        parse_positive_int,
        "Most chat members at once; past it '! server full'. Lowered at start to what the open-files "
        "limit leaves after its reserve (docs/operations.md).",
    )
    max_per_ip: int = setting(
        0,
        parse_non_negative_int,
        "Most open connections per client IP, counted from accept (members, HTTP, not yet admitted); 0 = no cap.",
    )
    max_pending: int = setting(
        1024,
        parse_positive_int,
        "Most connections not yet admitted (TLS handshake, sniffing, HTTP, /auth) at once; past it the "
        "oldest one of the address holding the most is dropped.",
    )
    admission_timeout: float = setting(
        10.0,
        parse_non_negative_float,
        "Seconds from accept until a connection must be a member or have had its HTTP answer, whatever "
        "it sends; 0 = no limit.",
    )
    connect_burst: int = setting(
        20000, parse_positive_int, "Connections one client IP may open at once before --connect-rate applies."
    )
    connect_rate: float = setting(
        50.0,
        parse_non_negative_float,
        "Sustained new connections per second per client IP; past it a connection is refused at once; 0 = no limit.",
    )
    auth_failure_burst: int = setting(
        10,
        parse_positive_int,
        "Failed /auth attempts one client IP may make at once before --auth-failure-rate applies.",
    )
    auth_failure_rate: float = setting(
        0.5,
        parse_non_negative_float,
        "Failed /auth attempts per second one client IP earns back; while it has none left, /auth is "
        "refused unchecked; 0 = no limit.",
    )
    throttle_exempt: tuple[str, ...] | None = setting(
        None,
        parse_networks,
        "Client networks (CIDR, comma-separated) exempt from --connect-rate and --auth-failure-rate.",
    )
    proxy_protocol_from: tuple[str, ...] | None = setting(
        None,
        parse_networks,
        "Balancers (CIDR, comma-separated) whose connections must start with a PROXY protocol v1/v2 "
        "header naming the real client; a PROXY header from anywhere else is refused.",
    )
    idle_timeout: float = setting(
        0.0, parse_non_negative_float, "Seconds without input before a member is dropped; 0 = off."
    )
    drain_delay: float = setting(
        2.0,
        parse_non_negative_float,
        "On SIGTERM/SIGINT /readyz turns 503 at once, and the server keeps serving this many "
        "seconds so load balancers stop sending new connections.",
    )
    drain_spread: float = setting(
        3.0,
        parse_non_negative_float,
        "Then each member is told '* server restarting, reconnect' and closed, spread evenly over "
        "this many seconds, so other instances take the reconnects gradually.",
    )
    shutdown_timeout: float = setting(
        2.0,
        parse_non_negative_float,
        "After the last member is told, seconds left for queued lines to flush before the rest "
        "are closed; the process exits within drain-delay + drain-spread + this.",
    )
    notice_threshold: int = setting(
        200,
        parse_non_negative_int,
        "Rooms with more members than this get no join/leave notices (keeps big rooms linear).",
    )
    notice_rate: int = setting(
        10,
        parse_non_negative_int,
        "Join/leave/rename notices a room shows per second; the rest are summed up in one line a second. "
        "0 = no limit.",
    )
    http_sniff_ms: int = setting(
        250,
        parse_non_negative_int,
        "A new connection silent for this long is taken as chat (an HTTP request line "
        "arriving first is served as HTTP; one arriving later is refused, never relayed).",
    )
    http_timeout: float = setting(
        5.0,
        parse_non_negative_float,
        "Seconds an HTTP client has to send its request headers (within --admission-timeout).",
    )
    ws_origins: str = setting(
        "same-host",
        parse_origins,
        "Origins whose pages may open a WebSocket on /ws: same-host (the page's host is the "
        "one it connects to, any port), * (any), or a comma-separated list such as "
        "https://chat.example.com,same-host. A request without an Origin header (not a "
        "browser) is always accepted.",
    )
    ws_ping_interval: float = setting(
        30.0,
        parse_non_negative_float,
        "Seconds a WebSocket client may be silent before it is pinged; one that answers "
        "nothing for another interval is dropped (ping_timeout). 0 = no pings.",
    )
    auth_timeout: float = setting(
        5.0,
        parse_non_negative_float,
        "Seconds a client has to send '/auth TOKEN' when a token is set (within --admission-timeout).",
    )
    tls_cert: str | None = setting(None, str, "PEM certificate: serve chat over TLS (needs --tls-key).")
    tls_key: str | None = setting(None, str, "PEM private key for --tls-cert.")
    token: str | None = setting(None, str, "Access token; clients must send '/auth TOKEN' first.", secret=True)
    token_file: str | None = setting(None, str, "File holding the access token (first line).", secret=True)
    jwt_key_file: str | None = setting(
        None,
        str,
        "Accept '/auth <JWT>': an HS256 secret (32+ bytes), or an RS256/ES256 public key in PEM; "
        "re-read on SIGHUP. The token's sub becomes the member's nick.",
    )
    jwt_audience: str | None = setting(None, str, "With --jwt-key-file: the aud a token must carry.")
    jwt_issuer: str | None = setting(None, str, "With --jwt-key-file: the iss a token must carry.")
    require_auth: bool = setting(
        False,
        parse_bool,
        "Make '/auth' (a JWT or the shared token) the mandatory first line; --token alone already does.",
    )
    api_keys_file: str | None = setting(
        None,
        str,
        "Turn on the operator HTTP API under /api/: Bearer keys, one per line ('#' comments); "
        "re-read on SIGHUP. Off: every /api/ path answers 404.",
    )
    redis_url: str | None = setting(
        None,
        str,
        "Redis URL enabling the multi-instance backplane, e.g. redis://redis:6379/0.",
        secret=True,
    )
    ready_requires_backplane: bool = setting(
        False,
        parse_bool,
        "Whether /readyz answers 503 while the Redis backplane is down (all instances share it, so "
        "true makes them all unready at once; docs/scaling.md).",
    )
    presence_ttl: int = setting(
        15, parse_positive_int, "Seconds a member's cluster presence lives without refresh."
    )
    instance_id: str | None = setting(
        None, str, "Name of this instance on the backplane (default: host name and pid)."
    )
    log_format: str = setting(
        "auto", parse_choice("auto", "json", "console"), "auto = JSON unless stdout is a terminal."
    )
    log_level: str = setting("info", parse_choice("debug", "info", "warning", "error"), "Lowest level logged.")
    log_messages: bool = setting(False, parse_bool, "Log message bodies (debug level); off by default.")

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
        for option in SETTINGS:
            value = getattr(self, option.name)
            shown[option.name] = ("<set>" if value else None) if option.secret else value
        return shown


@dataclass(frozen=True)
class Setting:
    """One option as the parser, the environment and the docs see it; derived from a Config field."""

    name: str
    parse: Callable[[str], Any]
    default: Any
    help: str
    secret: bool

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "CHAT_" + self.name.upper()

    @property
    def is_bool(self) -> bool:
        return self.parse is parse_bool

    def shown_default(self) -> str:
        if self.default is None:
            return "off"
        if self.is_bool:
            return "true" if self.default else "false"
        return str(self.default)


SETTINGS: tuple[Setting, ...] = tuple(
    Setting(f.name, f.metadata[_SETTING][0], f.default, f.metadata[_SETTING][1], f.metadata[_SETTING][2])
    for f in fields(Config)
)


def build_parser(prog: str = "chat-svc") -> argparse.ArgumentParser:
    """The argument parser; every option shows its environment variable and default."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="chat-svc: a TCP line chat server with Prometheus metrics on the same port. "
        "Every option can also be set through its CHAT_* environment variable; flags win.",
        epilog="Subcommand: 'chat-svc healthcheck [--host H] [--port P]' probes /healthz "
        "and exits 0 when healthy.",
    )
    for option in SETTINGS:
        text = f"{option.help} [env {option.env}; default {option.shown_default()}]"
        if option.is_bool:
            parser.add_argument(
                option.option,
                dest=option.name,
                type=parse_bool,
                nargs="?",
                const=True,
                default=None,
                metavar="true|false",
                help=text,
            )
        else:
            parser.add_argument(
                option.option,
                dest=option.name,
                type=option.parse,
                default=None,
                metavar=option.name.upper(),
                help=text,
            )
    return parser


def load(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Build the Config from flags, then CHAT_* variables, then defaults."""
    environ = os.environ if environ is None else environ
    parser = build_parser()
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    for option in SETTINGS:
        flagged = getattr(args, option.name)
        if flagged is not None:
            values[option.name] = flagged
        elif environ.get(option.env, "") != "":
            try:
                values[option.name] = option.parse(environ[option.env])
            except ValueError as exc:
                parser.error(f"{option.env}: {exc}")
        else:
            values[option.name] = option.default
    config = Config(**values)
    if bool(config.tls_cert) != bool(config.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    if config.require_auth and not (config.token or config.token_file or config.jwt_key_file):
        parser.error("--require-auth needs --token, --token-file or --jwt-key-file")
    return config


def markdown_table() -> str:
    """The README's configuration table, generated from the Config fields."""
    rows = ["| flag | environment | default | meaning |", "|---|---|---|---|"]
    for option in SETTINGS:
        rows.append(f"| `{option.option}` | `{option.env}` | {option.shown_default()} | {option.help} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
