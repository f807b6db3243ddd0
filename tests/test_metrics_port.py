"""Issue 18 point 7: --metrics-port takes the operators' endpoints off the chat port; scrapes are shared.

With --metrics-port the chat port answers /metrics, /healthz, /readyz and the API's
paths with 404, and the metrics port serves them.  Without it, thirty scrapers
hammering /metrics on the chat port of a server with a thousand members share one
rendering per 100 ms, and a member and the probes notice nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request

from _attack import Crowd, hammer
from _chat import free_port, get, scrape
from _probe import Bystander


def test_metrics_port_takes_metrics_probes_and_api_off_the_chat_port(chat_server):
    port = free_port()
    srv = chat_server("--metrics-port", str(port), "--metrics-host", "127.0.0.1")
    alice, bob = srv.member("alice"), srv.member("bob")
    for path in ("/metrics", "/healthz", "/readyz", "/api/v1/rooms"):
        assert get(srv.port, path)[0] == 404, path
    assert get(srv.port, "/metrics", method="HEAD")[0] == 404
    assert scrape(port)["chat_members"] == 2
    assert get(port, "/healthz")[:2] == (200, "ok\n")
    assert get(port, "/readyz")[:2] == (200, "ready\n")
    assert get(port, "/api/v1/rooms")[0] == 404  # no API yet; when there is one, it lives here
    alice.send("chat still works")
    assert bob.expect("[alice]") == "[alice] chat still works"
    # the image's HEALTHCHECK follows CHAT_METRICS_PORT
    env = {**os.environ, "CHAT_PORT": str(srv.port), "CHAT_METRICS_PORT": str(port)}
    probe = [sys.executable, "-m", "chat_svc", "healthcheck"]
    assert subprocess.run(probe, env=env, capture_output=True, timeout=10).returncode == 0
    del env["CHAT_METRICS_PORT"]
    assert subprocess.run(probe, env=env, capture_output=True, timeout=10).returncode == 1


def test_thirty_scrapers_on_the_chat_port_share_renderings_and_cost_members_nothing(chat_server):
    srv = chat_server("--flood-rate", "0")
    members = Crowd(srv.host, srv.port, 1000, first=b"/nick\n")
    bodies: list[bytes] = []

    def scrape_once() -> None:
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/metrics", timeout=5) as response:
            bodies.append(response.read())

    with Bystander(srv.host, srv.port, source="127.0.0.2") as bystander:
        started = time.monotonic()
        hammer(scrape_once, 5, threads=30)
        elapsed = time.monotonic() - started
    measured = bystander.stop()
    members.close()
    renderings = len(set(bodies))
    print(f"{len(bodies)} scrapes, {renderings} renderings in {elapsed:.1f} s; {measured.summary()}")
    assert len(bodies) >= 100
    assert renderings <= elapsed / 0.1 + 2
    assert measured.lost == 0 and not measured.health_failures
    assert measured.p99() < 0.25 and measured.slowest_health() < 1.0, measured.summary()
