"""The swarm's options, declared once: each field below is a command-line flag, a web UI
form field (unless marked otherwise) and a typed attribute of ``SwarmOptions``.

Locust only shows arguments in its web form when they carry ``include_in_web_ui``, which
``LocustArgumentParser.add_argument`` sets and ``add_argument_group(...).add_argument``
does not; the group keeps ``--help`` readable, so the flag is set on each action here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from locust import events
from locust.env import Environment


def _opt(default: Any, help: str, kind: type = float, ui: bool = True) -> Any:
    return field(default=default, metadata={"help": help, "kind": kind, "ui": ui})


@dataclass(frozen=True)
class SwarmOptions:
    """One run's settings, read from ``parsed_options`` when the run starts."""

    msg_rate: float = _opt(
        1.0,
        "Chat lines per second per user (0 = listen only). The server's flood control allows "
        "10/s; start it with --flood-rate 0 for more.",
    )
    room_size: int = _opt(20, "Users per swarm room; the web form's default user count fills one room.", int)
    deadline: float = _opt(5.0, "Seconds a line may take to reach every member; a delivery after it is lost (late).")
    msg_bytes: int = _opt(64, "Size of each chat line (padded).", int)
    max_loss_ratio: float | None = _opt(
        0.0, "Fail if lost deliveries (late + never) / expected deliveries exceeds this (1: accept any loss)."
    )
    max_p99_ms: float | None = _opt(
        None, "Fail if the p99 fan-out latency (every delivery after ramp-up) exceeds this."
    )
    min_deliveries_per_s: float | None = _opt(None, "Fail if deliveries/s after ramp-up stays below this.")
    fanout_sample_every: int = _opt(
        10, "Fire a Locust 'fanout' request for 1 of N deliveries (the verdict counts every one).", int
    )
    transport: str = _opt(
        "", "tcp or ws (WebSocket, GET /ws on the same port) for every user; default: the --host scheme.", str
    )
    ws_share: float | None = _opt(
        None, "Share of users on WebSocket, 0 to 1, spread evenly over the rooms; the rest use TCP."
    )
    resume: str = _opt(
        "auto",
        "Resume mode: on, off, or auto (on when --host lists several hosts). A server closing a"
        " connection is then no failure: the user reconnects to the next host and /resumes by message id."
        " Use on for a load balancer's address.",
        str,
    )
    max_incomplete_resumes: int | None = _opt(
        0, "Resume mode: fail if more resumes than this were incomplete (the server said lines may be missing).", int
    )
    join_timeout: float = _opt(10.0, "Seconds to wait for the welcome line and the /join round trip.")
    room_prefix: str = _opt("swarm", "Prefix of the swarm's room names.", str)
    summary_json: str = _opt("", "Also write the verdict as JSON to this file.", str, ui=False)

    @classmethod
    def read(cls, env: Environment | None) -> SwarmOptions:
        """The options as given on the command line, in the web form or by the master.

        Web form values arrive as strings when the default is None (Locust converts the
        others to the default's type); an empty field means "not set".
        """
        opts = env.parsed_options if env is not None else None
        values: dict[str, Any] = {}
        for f in fields(cls):
            value = getattr(opts, f.name, f.default) if opts is not None else f.default
            if isinstance(value, str) and f.metadata["kind"] is not str:
                value = f.metadata["kind"](value) if value.strip() else None
            values[f.name] = value
        values["room_size"] = max(1, values["room_size"] or 1)
        values["fanout_sample_every"] = max(1, values["fanout_sample_every"] or 1)
        return cls(**values)

    def thresholds(self) -> dict[str, float | None]:
        return {
            "max_p99_ms": self.max_p99_ms,
            "max_loss_ratio": self.max_loss_ratio,
            "min_deliveries_per_s": self.min_deliveries_per_s,
            "max_incomplete_resumes": self.max_incomplete_resumes,
        }

    def resume_on(self, host: str | None) -> bool:
        """Whether users resume: ``--resume on``, or ``auto`` with several hosts in ``host``."""
        mode = (self.resume or "auto").strip().lower()
        if mode not in ("auto", "on", "off"):
            raise ValueError(f"--resume must be auto, on or off, not {self.resume!r}")
        return mode == "on" or (mode == "auto" and "," in (host or "").strip(", "))


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any, **_kw: Any) -> None:
    group = parser.add_argument_group("chat-svc swarm")
    for f in fields(SwarmOptions):
        kind = f.metadata["kind"]
        action = group.add_argument(
            "--" + f.name.replace("_", "-"),
            type=kind,
            default=f.default,
            help=f.metadata["help"],
        )
        action.include_in_web_ui = f.metadata["ui"]
