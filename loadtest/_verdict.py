"""The swarm's verdict: thresholds against the ledger's totals, in every form it is read.

One ``Verdict`` feeds the console summary, the web UI's verdict tab, the JSON and CSV
downloads and the exit code, so they cannot disagree.
"""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass, field
from typing import Any

COLUMNS = ("check", "threshold", "result", "verdict")


@dataclass
class Check:
    """One row of the verdict: a threshold (or an always-on rule) and what the run did."""

    name: str
    threshold: str
    result: str
    ok: bool
    checked: bool = True

    @property
    def verdict(self) -> str:
        return ("ok" if self.ok else "FAIL") if self.checked else "-"


def _fmt_ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f} ms"


def evaluate(
    totals: dict[str, Any],
    max_p99_ms: float | None,
    max_loss_ratio: float | None,
    min_deliveries_per_s: float | None,
    user_exceptions: int = 0,
    max_incomplete_resumes: float | None = 0,
) -> list[Check]:
    """Compare the run's totals with the thresholds; unset thresholds are shown, not checked.

    In resume mode a server that closes a connection is not a failure (the user resumes);
    an incomplete resume is, beyond ``max_incomplete_resumes``, and so is a line that two
    members saw under different ids.
    """
    t = totals
    resume = bool(t.get("resume_mode"))
    checks = [
        Check(
            "fan-out loss ratio (late + never)",
            "not set" if max_loss_ratio is None else f"<= {max_loss_ratio:g}",
            f"{t['loss_ratio']:.4g} ({t['lost_deliveries']}/{t['expected_deliveries']} deliveries:"
            f" {t['lost_late']} late, {t['lost_never']} never; {t['messages_lost']} lines)",
            max_loss_ratio is None or t["loss_ratio"] <= max_loss_ratio,
            max_loss_ratio is not None,
        ),
        Check(
            f"fan-out p99 ({t.get('latency_scope', 'whole run')})",
            "not set" if max_p99_ms is None else f"<= {max_p99_ms:g} ms",
            _fmt_ms(t["p99_ms"]),
            max_p99_ms is None or (t["p99_ms"] is not None and t["p99_ms"] <= max_p99_ms),
            max_p99_ms is not None,
        ),
        Check(
            "deliveries/s",
            "not set" if min_deliveries_per_s is None else f">= {min_deliveries_per_s:g}",
            f"{t['deliveries_per_s']:.1f}",
            min_deliveries_per_s is None or t["deliveries_per_s"] >= min_deliveries_per_s,
            min_deliveries_per_s is not None,
        ),
        Check(
            "lines verified",
            "> 0",
            f"{t['messages_judged']} ({t['expected_deliveries']} deliveries expected)",
            t["expected_deliveries"] > 0,
        ),
    ]
    always = [
        ("duplicates" + (" (after dedup by id)" if resume else ""), "duplicates"),
        ("out-of-order", "out_of_order"),
        ("echoed to sender", "echoes"),
        ("server error lines (!)", "server_errors"),
        ("server disconnects" + (" (not resumed)" if resume else ""), "disconnects"),
        ("connect failures", "connect_failures"),
        ("join failures", "join_failures"),
    ]
    if resume:
        incomplete = t["resumes_incomplete"]
        checks.append(
            Check(
                "resumes incomplete",
                "not set" if max_incomplete_resumes is None else f"<= {max_incomplete_resumes:g}",
                f"{incomplete} (of {incomplete + t['resumes_complete']} resumes)",
                max_incomplete_resumes is None or incomplete <= max_incomplete_resumes,
                max_incomplete_resumes is not None,
            )
        )
        always.append(("line ids differing between members", "id_mismatches"))
    for name, key in always:
        checks.append(Check(name, "= 0", str(t[key]), t[key] == 0))
    checks.append(Check("user exceptions", "= 0", str(user_exceptions), user_exceptions == 0))
    return checks


def details(totals: dict[str, Any], deadline: float) -> list[tuple[str, str, str]]:
    """(name, note, value) rows that explain the checks without judging anything."""
    t = totals
    pcts = " ".join(f"{q} {_fmt_ms(t[q + '_ms'])}" for q in ("p50", "p95", "p99", "max"))
    rows = [
        ("lost: arrived late", "counts as loss", f"{t['lost_late']} deliveries, after the {deadline:g}s deadline"),
        ("lost: never arrived", "counts as loss", f"{t['lost_never']} deliveries"),
    ]
    if t["nodes"] > 1:
        rows.append(
            ("lost: cross-worker", "", f"{t['lost_cross_node']} deliveries sent on one worker, lost to another")
        )
    rows += [
        (
            "lines",
            "",
            f"sent {t['messages_sent']}, judged {t['messages_judged']}, unjudged {t['messages_unjudged']},"
            f" missed by someone {t['messages_lost']}",
        ),
        (
            "deliveries",
            "",
            f"{t['deliveries']} (expected {t['expected_deliveries']}, in time {t['delivered_in_time']},"
            f" cross-worker {t['cross_node_deliveries']}, to members still joining {t['unexpected_deliveries']})",
        ),
        (f"latency ({t['latency_scope']})", "every delivery", pcts),
    ]
    if t["latency_scope"] != "whole run":
        run = " ".join(f"{q} {_fmt_ms(t['run_' + q + '_ms'])}" for q in ("p50", "p99", "max"))
        rows.append(("latency (whole run incl. ramp-up)", "every delivery", run))
    rows.append(
        (
            "swarm",
            "",
            f"{t['nodes']} node(s), {t['members']} connections, {t['rooms']} rooms, max CPU"
            f" {t['swarm_cpu_max']:.0f}% per process, event-loop lag p99 {_fmt_ms(t['swarm_lag_p99_ms'])}"
            f" max {_fmt_ms(t['swarm_lag_max_ms'])}",
        )
    )
    if t.get("resume_mode"):
        reconnect = " ".join(f"{q} {_fmt_ms(t['reconnect_' + q + '_ms'])}" for q in ("p50", "p99", "max"))
        rows += [
            (
                "resumes",
                "resume mode",
                f"{t['resumes_complete']} complete, {t['resumes_incomplete']} incomplete, after"
                f" {t['server_closes']} server-initiated disconnects; {t['reconnect_retries']} reconnect"
                f" attempts failed and were retried",
            ),
            ("reconnect time", "disconnect to resumed", reconnect),
            ("dedup by id", "", f"{t['deduped']} lines dropped as already seen (not counted as deliveries)"),
        ]
    pairs = t.get("by_transport", {})
    if len(pairs) > 1:
        each = ", ".join(f"{pair} {n['expected'] - n['lost']}/{n['expected']}" for pair, n in pairs.items())
        rows.append(("transports", "sender->member", f"{each} in time"))
    if t.get("swarm_starved"):
        rows.append(
            (
                "WARNING",
                "",
                "the swarm itself was short of CPU (busy or starved by other processes); its latencies"
                " include that delay. Use --processes or a quieter machine.",
            )
        )
    return rows


@dataclass
class Verdict:
    """A run's checks and totals; ``final`` once the run has stopped and everything is judged."""

    title: str
    totals: dict[str, Any]
    checks: list[Check]
    deadline: float
    settings: dict[str, Any] = field(default_factory=dict)
    final: bool = True

    @property
    def passed(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def result_line(self) -> str:
        """``RESULT: PASS``, or ``RESULT: FAIL - `` and every violated check."""
        if self.passed:
            line = "RESULT: PASS"
        else:
            line = "RESULT: FAIL - " + "; ".join(f"{c.name} {c.result} violates {c.threshold}" for c in self.failed)
        return line if self.final else f"so far: {line}"

    def text(self) -> str:
        """The console summary: the checks as a table, then the details, then the result."""
        w0 = max(len(c.name) for c in self.checks)
        w1 = max(len("threshold"), *(len(c.threshold) for c in self.checks))
        w2 = max(len("result"), *(len(c.result) for c in self.checks))
        lines = [self.title, f"{'check':<{w0}}  {'threshold':<{w1}}  {'result':<{w2}}  verdict"]
        lines.append("-" * len(lines[-1]))
        lines += [f"{c.name:<{w0}}  {c.threshold:<{w1}}  {c.result:<{w2}}  {c.verdict}" for c in self.checks]
        for name, note, value in details(self.totals, self.deadline):
            lines.append(f"{name}: {value}" + (f" ({note})" if note else ""))
        lines.append(self.result_line())
        return "\n".join(lines)

    def rows(self) -> list[dict[str, str]]:
        """Rows for the web UI tab and the CSV: result first, then checks, then details."""
        verdict = ("PASS" if self.passed else "FAIL") + ("" if self.final else " so far")
        rows = [("RESULT", "" if self.final else "run in progress", self.result_line(), verdict)]
        rows += [(c.name, c.threshold, c.result, c.verdict) for c in self.checks]
        rows += [(name, note, value, "") for name, note, value in details(self.totals, self.deadline)]
        return [dict(zip(COLUMNS, row, strict=True)) for row in rows]

    def to_json(self) -> dict[str, Any]:
        """Everything, for ``--summary-json`` and the JSON download (the sweep reads ``totals``)."""
        return {
            **self.settings,
            "deadline": self.deadline,
            "final": self.final,
            "passed": self.passed,
            "result": self.result_line(),
            "totals": self.totals,
            "checks": [asdict(c) | {"verdict": c.verdict} for c in self.checks],
        }


def to_csv(rows: list[dict[str, str]]) -> str:
    """Verdict rows as CSV, for the download and ``<--csv prefix>_verdict.csv``."""
    out = io.StringIO()
    writer = csv.DictWriter(out, COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()
