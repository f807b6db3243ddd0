"""The swarm in Locust's web UI: a verdict tab, its downloads, and charts per request type.

Built on Locust's documented extension points (``examples/extend_web_ui.py``): template
args ``extended_tabs``/``extended_tables``/``extended_csv_files`` and an
``extended_stats`` entry added to every ``/stats/requests`` poll. The tab shows the same
``Verdict`` rows as the console and the exit code, provisional while a run goes on and
final before Locust reports the run stopped (the verdict is given in ``test_stopping``).

Locust's own charts plot totals only, so sends, connects and fan-outs would share one
line. ``/swarm/charts`` plots each request type on its own line, from the same stats.
"""

from __future__ import annotations

import json
import time
from collections import deque
from pathlib import Path
from typing import Any, Protocol

import gevent
from flask import Blueprint, Response, request
from locust.runners import STATE_RUNNING, STATE_SPAWNING
from locust.web import WebUI

from loadtest._verdict import COLUMNS, Verdict, to_csv

TAB = "swarm-verdict"
CHARTS_PAGE = Path(__file__).with_name("_charts.html")


class VerdictSource(Protocol):
    runs: int
    failed_runs: int

    def current_verdict(self) -> Verdict | None: ...


def verdict_rows(source: VerdictSource) -> list[dict[str, str]]:
    """The tab's rows: the verdict, then what the process will exit with."""
    verdict = source.current_verdict()
    if verdict is None:
        return [{"check": "RESULT", "threshold": "", "result": "no run yet: start one from the form", "verdict": ""}]
    if verdict.final:
        code = 1 if source.failed_runs else 0
        exit_text = f"{code} ({source.failed_runs} of {source.runs} runs in this session failed)"
    else:
        code = 1 if source.failed_runs or not verdict.passed else 0
        exit_text = f"{code} if the run stopped now ({source.failed_runs} of {source.runs - 1} earlier runs failed)"
    exit_row = {"check": "exit code on quit", "threshold": "", "result": exit_text, "verdict": ""}
    return [*verdict.rows(), exit_row]


class Series:
    """Requests/s and latency percentiles (Locust's 10 s window) of every request type,
    sampled every 2 s while a run is on and kept, so the charts survive a page reload."""

    INTERVAL = 2.0

    def __init__(self, web_ui: WebUI) -> None:
        self.web_ui = web_ui
        self.points: deque[dict[str, Any]] = deque(maxlen=1800)  # an hour

    def sample(self) -> None:
        runner = self.web_ui.environment.runner
        if runner is None or runner.state not in (STATE_SPAWNING, STATE_RUNNING):
            return
        rows = [
            {
                "type": entry.method,
                "name": entry.name,
                "rps": round(entry.current_rps, 2),
                "p50": entry.get_current_response_time_percentile(0.5),
                "p95": entry.get_current_response_time_percentile(0.95),
            }
            for entry in runner.stats.entries.values()
        ]
        self.points.append({"t": round(time.time(), 1), "rows": rows})

    def run(self) -> None:
        while True:
            gevent.sleep(self.INTERVAL)
            self.sample()


def _download(body: str, mimetype: str, filename: str) -> Response:
    response = Response(body, mimetype=mimetype)
    response.headers["Content-Disposition"] = f"attachment; filename={filename}"
    return response


def install(web_ui: WebUI, source: VerdictSource) -> None:
    """Add the verdict tab, its downloads and the charts page to Locust's web UI."""
    app = web_ui.app
    assert app is not None, "Locust creates the Flask app with the WebUI"
    base = getattr(web_ui.environment.parsed_options, "web_base_path", "") or ""
    web_ui.template_args["extended_tabs"] = [{"title": "Swarm verdict", "key": TAB}]
    web_ui.template_args["extended_tables"] = [
        {"key": TAB, "structure": [{"key": k, "title": k.capitalize()} for k in COLUMNS]}
    ]
    web_ui.template_args["extended_csv_files"] = [
        {"href": f"{base}/swarm/verdict.csv", "title": "Download swarm verdict CSV"},
        {"href": f"{base}/swarm/verdict.json", "title": "Download swarm verdict JSON"},
        {"href": f"{base}/swarm/charts", "title": "Swarm charts by request type (page)"},
    ]
    blueprint = Blueprint("chat_swarm", __name__, url_prefix=f"{base}/swarm")
    series = Series(web_ui)
    web_ui.environment.events.test_start.add_listener(lambda **_kw: series.points.clear())
    gevent.spawn(series.run)

    @blueprint.route("/verdict.json")
    @web_ui.auth_required_if_enabled
    def verdict_json() -> Response:
        verdict = source.current_verdict()
        body = {"rows": verdict_rows(source)} | (verdict.to_json() if verdict is not None else {})
        return _download(json.dumps(body, indent=2), "application/json", "swarm_verdict.json")

    @blueprint.route("/verdict.csv")
    @web_ui.auth_required_if_enabled
    def verdict_csv() -> Response:
        return _download(to_csv(verdict_rows(source)), "text/csv", "swarm_verdict.csv")

    @blueprint.route("/series.json")
    @web_ui.auth_required_if_enabled
    def series_json() -> Response:
        runner = web_ui.environment.runner
        body = {
            "state": runner.state if runner is not None else "missing",
            "result": verdict_rows(source)[0]["result"],
            "points": list(series.points),
        }
        return Response(json.dumps(body), mimetype="application/json")

    @blueprint.route("/charts")
    @web_ui.auth_required_if_enabled
    def charts() -> Response:
        return Response(CHARTS_PAGE.read_text(encoding="utf-8"), mimetype="text/html")

    @app.after_request
    def add_verdict(response: Response) -> Response:
        if request.path != f"{base}/stats/requests" or response.json is None:
            return response
        stats = {**response.json, "extended_stats": [{"key": TAB, "data": verdict_rows(source)}]}
        response.set_data(json.dumps(stats))
        return response

    app.register_blueprint(blueprint)
