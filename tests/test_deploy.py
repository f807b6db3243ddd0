"""deploy/: Kubernetes manifests, Prometheus config and rules, Grafana dashboard, compose file.

Static checks (schemas, promtool, PromQL syntax) plus live ones: the Debian `prometheus`
binary scrapes a real chat-svc process, and every metric the rules and the dashboard use must
be exported by a running server.  Needs promtool/prometheus (Debian package `prometheus`),
redis-server and docker-compose: fails under CI=true when one is missing, skips elsewhere.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from _chat import ROOT, free_port, get, metric_samples, prometheus_api, scrape
from _redis import RedisServer
from _require import require_binary, require_module

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
PROM = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "chat-svc.json"
K8S_VERSIONS = ("1.27", "1.30")
CRD_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}
PROMQL_BUILTINS = {"up"}
# 0/1 series: a panel showing one (not a sum or count of them) must map 0 to red.
BOOLEAN_METRICS = {"chat_ready", "chat_backplane_up", "up"}
# Panels that draw an alert's threshold as a line: alert -> panel title.
ALERT_PANELS = {
    "ChatSvcFanoutLatencyHigh": "Fan-out latency per instance",
    "ChatSvcEventLoopStalled": "Event-loop lag per instance",
    "ChatSvcCpuSaturated": "CPU per instance",
    "ChatSvcFdsNearMax": "Open fds / max per instance",
    "ChatSvcConnectionsNearMax": "Connections / max per instance",
}


# ----------------------------------------------------------------------------- helpers


def load_all(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def k8s_docs() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs: list[dict[str, Any]] = []
    for name in kustomization["resources"]:
        docs.extend(load_all(K8S / name))
    return docs


def find(kind: str, name: str | None = None) -> dict[str, Any]:
    hits = [
        d
        for d in k8s_docs()
        if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, found {len(hits)}"
    return hits[0]


def alert_rules() -> list[dict[str, Any]]:
    return [
        r for g in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"] for r in g["rules"]
    ]


def dashboard_panels() -> list[dict[str, Any]]:
    """Every panel but the row headers, which hold no query."""
    return [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] != "row"]


def panel(title: str) -> dict[str, Any]:
    (hit,) = [p for p in dashboard_panels() if p["title"] == title]
    return hit


def panel_exprs(p: dict[str, Any]) -> list[str]:
    return [t["expr"] for t in p["targets"]]


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [e for p in dashboard_panels() for e in panel_exprs(p)]
    for var in dash.get("templating", {}).get("list", []):
        q = var.get("query")
        exprs.append(q["query"] if isinstance(q, dict) else q)
    return exprs


def concrete(expr: str) -> str:
    """A dashboard expression with Grafana's variables replaced, so promtool can parse it."""
    expr = expr.replace("$__rate_interval", "1m").replace("$__interval", "1m")
    expr = re.sub(r"\$\{?instance\}?", ".*", expr)
    m = re.fullmatch(r"label_values\((.*),\s*\w+\)", expr.strip())
    return m.group(1) if m else expr


def metric_names(expr: str) -> set[str]:
    no_strings = re.sub(r'"[^"]*"', '""', expr)
    names = set(re.findall(r"\b((?:chat|process)_[a-z0-9_]+)\b", no_strings))
    names |= {n for n in PROMQL_BUILTINS if re.search(rf"\b{n}\b(?=\s*[{{\[)])", no_strings)}
    return names


def used_metric_names() -> dict[str, set[str]]:
    used: dict[str, set[str]] = {}
    for rule in alert_rules():
        for n in metric_names(rule["expr"]):
            used.setdefault(n, set()).add(f"rule {rule['alert']}")
    for expr in dashboard_exprs():
        for n in metric_names(expr):
            used.setdefault(n, set()).add("dashboard")
    return used


def used_label_values() -> set[tuple[str, str, str]]:
    """(metric, label, value) for every equality matcher on a chat_ metric."""
    out = set()
    for expr in [r["expr"] for r in alert_rules()] + dashboard_exprs():
        for metric, matchers in re.findall(r"\b((?:chat|process)_[a-z0-9_]+)\{([^}]*)\}", expr):
            for label, value in re.findall(r'(\w+)\s*=\s*"([^"$]*)"', matchers):
                if label not in ("instance", "job"):
                    out.add((metric, label, value))
    return out


def alert_lhs(expr: str) -> str:
    """The measured side of an alert expression: `a / b > 0.9` -> `a / b`."""
    m = re.fullmatch(r"(.*?)\s*(?:>|<|==)\s*[0-9.]+\s*", expr, re.S)
    assert m, expr
    return m.group(1)


def grafana_color(p: dict[str, Any], value: float) -> str:
    """The colour Grafana gives `value`: a matching value mapping first, else the thresholds."""
    defaults = p["fieldConfig"]["defaults"]
    for mapping in defaults.get("mappings", []):
        hit = mapping["options"].get(f"{value:g}", {}) if mapping["type"] == "value" else {}
        if "color" in hit:
            return str(hit["color"])
    color = ""
    for step in defaults["thresholds"]["steps"]:
        if step["value"] is None or value >= step["value"]:
            color = step["color"]
    return color


def promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    exe = require_binary("promtool")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def exported(text: str) -> tuple[set[str], set[tuple[str, str, str]]]:
    """The sample names of an exposition, and its (name, label, value) triples."""
    samples = metric_samples(text)
    labels = {(s.name, label, value) for s in samples for label, value in s.labels.items()}
    return {s.name for s in samples}, labels


# ----------------------------------------------------------------------------- Kubernetes


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present, f"not listed: {present - listed}; missing files: {listed - present}"
    assert {i["name"] for i in kustomization.get("images", [])} == {"chat-svc"}


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_manifests_validate_against_schemas(version: str) -> None:
    kv = require_module("kubernetes_validate")
    checked = 0
    for doc in k8s_docs():
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            continue  # no schema shipped for CRDs: checked structurally below
        kv.validate(doc, version, strict=True)
        checked += 1
    assert checked >= 7


def test_k8s_validation_rejects_a_broken_manifest() -> None:
    """The validator really checks: a typo in a Deployment field is an error."""
    kv = require_module("kubernetes_validate")
    broken = find("Deployment", "chat-svc")
    broken = json.loads(json.dumps(broken))
    broken["spec"]["replicas"] = "three"
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, K8S_VERSIONS[-1], strict=True)


def test_deployment_contract() -> None:
    dep = find("Deployment", "chat-svc")
    cm = find("ConfigMap", "chat-svc-config")
    spec = dep["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert spec["replicas"] == 3
    ports = {p["name"]: p for p in container["ports"]}
    assert ports["chat"]["containerPort"] == 9009 and ports["chat"]["protocol"] == "TCP"

    def probe_port(p: dict[str, Any]) -> int:
        port = p["httpGet"]["port"]
        return ports[port]["containerPort"] if isinstance(port, str) else port

    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # the probes go where the server serves them: with CHAT_METRICS_PORT, the chat port answers 404
    metrics_port = int(cm["data"]["CHAT_METRICS_PORT"])
    assert ports["metrics"]["containerPort"] == metrics_port
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert probe_port(container[probe]) == metrics_port, probe
    annotations = spec["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(metrics_port)
    res = container["resources"]
    assert {"cpu", "memory"} <= set(res["requests"]) and {"cpu", "memory"} <= set(res["limits"])
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    # grace period > preStop sleep + the whole drain (delay + spread + flush)
    drain = sum(float(cm["data"][key]) for key in ("CHAT_DRAIN_DELAY", "CHAT_DRAIN_SPREAD", "CHAT_SHUTDOWN_TIMEOUT"))
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    pre_stop_s = float(pre_stop[1]) if pre_stop[:1] == ["sleep"] else 0.0
    assert pod["terminationGracePeriodSeconds"] > drain + pre_stop_s
    assert container["envFrom"][0]["configMapRef"]["name"] == cm["metadata"]["name"]
    # every CHAT_* key is a real flag of the server
    help_text = subprocess.run(
        [sys.executable, "-m", "chat_svc", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    for key in cm["data"]:
        flag = "--" + key.removeprefix("CHAT_").lower().replace("_", "-")
        assert flag in help_text, f"ConfigMap key {key}: chat-svc has no {flag}"


def test_deployment_user_matches_image() -> None:
    user = re.findall(r"^USER\s+(\S+)", (ROOT / "Dockerfile").read_text(), re.M)[-1]
    uid, _, gid = user.partition(":")
    pod = find("Deployment", "chat-svc")["spec"]["template"]["spec"]
    assert str(pod["securityContext"]["runAsUser"]) == uid
    assert str(pod["securityContext"]["runAsGroup"]) == (gid or uid)


def test_service_pdb_hpa_monitor_wiring() -> None:
    dep = find("Deployment", "chat-svc")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]

    def selects(selector: dict[str, str]) -> bool:
        return all(pod_labels.get(k) == v for k, v in selector.items())

    svc = find("Service", "chat-svc")
    assert selects(svc["spec"]["selector"])
    (port,) = svc["spec"]["ports"]
    assert port["port"] == 9009 and port["protocol"] == "TCP"
    metrics_svc = find("Service", "chat-svc-metrics")
    assert selects(metrics_svc["spec"]["selector"])
    (metrics_port,) = metrics_svc["spec"]["ports"]
    assert metrics_port["targetPort"] == "metrics"
    pdb = find("PodDisruptionBudget")
    assert selects(pdb["spec"]["selector"]["matchLabels"])
    hpa = find("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "chat-svc"
    assert hpa["spec"]["minReplicas"] >= dep["spec"]["replicas"] - 0
    sm = find("ServiceMonitor")

    def monitored(service: dict[str, Any]) -> bool:
        labels = service["metadata"]["labels"]
        return all(labels.get(k) == v for k, v in sm["spec"]["selector"]["matchLabels"].items())

    assert monitored(metrics_svc) and not monitored(svc)
    assert [e["port"] for e in sm["spec"]["endpoints"]] == [metrics_port["name"]]
    assert sm["spec"]["endpoints"][0]["path"] == "/metrics"
    redis = find("StatefulSet", "chat-redis")
    redis_svc = find("Service", "chat-redis")
    url = find("ConfigMap")["data"]["CHAT_REDIS_URL"]
    assert urllib.parse.urlparse(url).hostname == redis_svc["metadata"]["name"]
    assert redis["spec"]["serviceName"] == redis_svc["metadata"]["name"]


def test_prometheusrule_matches_rule_file() -> None:
    rule = find("PrometheusRule")
    assert rule["spec"] == yaml.safe_load((PROM / "alerts.yml").read_text())


def test_prometheusrule_groups_pass_promtool(tmp_path: Path) -> None:
    path = tmp_path / "operator-rules.yml"
    path.write_text(yaml.safe_dump(find("PrometheusRule")["spec"]))
    r = promtool("check", "rules", str(path))
    assert r.returncode == 0, r.stdout + r.stderr


# ----------------------------------------------------------------------------- Prometheus


def test_promtool_check_rules() -> None:
    r = promtool("check", "rules", "deploy/prometheus/alerts.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    required = {
        "InstanceDown",
        "SlowConsumerDisconnects",
        "FanoutLatencyHigh",
        "ConnectionsNearMax",
        "BackplaneDown",
    }
    names = {r["alert"].removeprefix("ChatSvc") for r in alert_rules()}
    assert required <= names
    near_max = next(r for r in alert_rules() if r["alert"].endswith("ConnectionsNearMax"))
    assert "chat_connections" in near_max["expr"] and "chat_max_clients" in near_max["expr"]


def test_promtool_unit_tests_for_alerts() -> None:
    r = promtool("test", "rules", "alerts_test.yml", cwd=PROM)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout
    tested = set(re.findall(r"alertname:\s*(\w+)", (PROM / "alerts_test.yml").read_text()))
    assert tested == {r["alert"] for r in alert_rules()}, "every alert has a unit test"


def test_promtool_check_config() -> None:
    r = promtool("check", "config", "deploy/prometheus/prometheus.yml")
    assert r.returncode == 0, r.stdout + r.stderr


# ----------------------------------------------------------------------------- Grafana


def test_dashboard_is_provisioned_and_wellformed() -> None:
    dash = json.loads(DASHBOARD.read_text())
    ds = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yaml").read_text())[
        "datasources"
    ]
    uids = {d["uid"] for d in ds if d["type"] == "prometheus"}
    provider = yaml.safe_load((GRAFANA / "provisioning/dashboards/chat-svc.yaml").read_text())[
        "providers"
    ][0]
    assert provider["type"] == "file"
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in mounts
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dashboard_panels():
        assert p["datasource"]["uid"] in uids, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] in uids
    # the panels the dashboard must have
    exprs = "\n".join(dashboard_exprs())
    for needle in (
        "chat_connections",
        "chat_messages_received_total",
        "chat_deliveries_total",
        "histogram_quantile(0.5, sum by (instance, le) (rate(chat_fanout_latency_seconds_bucket",
        "histogram_quantile(0.99, sum by (instance, le) (rate(chat_fanout_latency_seconds_bucket",
        "chat_event_loop_tick_lag_seconds_bucket",
        "chat_event_loop_lag_seconds",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "sum by (reason) (rate(chat_disconnects_total",
        "chat_sendq_bytes",
        "chat_backplane_up",
        "chat_backplane_queue",
        "sum by (reason) (rate(chat_backplane_publish_errors_total",
    ):
        assert needle in exprs, needle
    # process_* series also come from Prometheus itself (job prometheus): select chat-svc's
    for expr in dashboard_exprs():
        for m in re.finditer(r"\bprocess_[a-z_]+(\{[^}]*\})?", expr):
            assert 'job="chat-svc"' in (m.group(1) or ""), expr


def test_every_panel_has_a_unit() -> None:
    for p in dashboard_panels():
        assert p["fieldConfig"]["defaults"].get("unit"), f"panel {p['title']!r} has no unit"


def test_boolean_panels_map_zero_to_red() -> None:
    """With Grafana's defaults `Ready = 0` rendered green: every 0/1 panel needs mappings."""
    boolean = []
    for p in dashboard_panels():
        for expr in panel_exprs(p):
            aggregated = re.match(r"\s*(sum|count)\b", expr)
            if metric_names(expr) & BOOLEAN_METRICS and not aggregated:
                boolean.append(p["title"])
                texts = {
                    k: v.get("text")
                    for m in p["fieldConfig"]["defaults"]["mappings"]
                    if m["type"] == "value"
                    for k, v in m["options"].items()
                }
                assert texts.get("0") and texts.get("1"), f"{p['title']!r}: no 0/1 value mappings"
                assert grafana_color(p, 0) == "red", p["title"]
                assert grafana_color(p, 1) == "green", p["title"]
    assert {"Ready", "Backplane up", "Backplane state"} <= set(boolean), boolean
    # a count of healthy instances is not boolean, but none up is red too
    assert grafana_color(panel("Instances up"), 0) == "red"


def test_alert_thresholds_are_drawn_on_their_panels() -> None:
    """Each alert's threshold is a red line on a panel that shows what the alert measures,
    per instance as the alert is."""
    rules = {r["alert"]: r for r in alert_rules()}
    for alert, title in ALERT_PANELS.items():
        expr = rules[alert]["expr"]
        le = re.search(r'le="([0-9.]+)"', expr)
        threshold = float(le.group(1) if le else re.findall(r"[0-9.]+", expr)[-1])
        p = panel(title)
        defaults = p["fieldConfig"]["defaults"]
        assert defaults["custom"]["thresholdsStyle"]["mode"] in ("line", "line+area"), title
        assert {"color": "red", "value": threshold} in defaults["thresholds"]["steps"], title
        exprs = panel_exprs(p)
        assert metric_names(alert_lhs(expr)) & set().union(*map(metric_names, exprs)), title
        for e in exprs:
            for by in re.findall(r"\b(?:sum|min|max|avg|count)\s*(?:by\s*\(([^)]*)\))?\s*\(", e):
                assert "instance" in by, f"{title}: {e} drops the instance label"


def test_no_panel_mixes_rate_and_increase() -> None:
    for p in dashboard_panels():
        used = {f for e in panel_exprs(p) for f in ("rate", "increase") if f"{f}(" in e}
        assert len(used) <= 1, f"{p['title']!r} puts rate() and increase() on one axis"


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    rules = [
        {"record": f"dashboard:q{i}", "expr": concrete(e)} for i, e in enumerate(dashboard_exprs())
    ]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = promtool("check", "rules", str(path))
    assert r.returncode == 0, r.stdout + r.stderr


# ----------------------------------------------------------------------------- compose (static)


def test_compose_file_is_valid() -> None:
    exe = require_binary("docker-compose")
    env = {k: v for k, v in os.environ.items() if not k.endswith(("_PORT", "_IMAGE", "_BIND_ADDR", "_NET_PREFIX"))}
    r = subprocess.run(
        [exe, "-f", str(DEPLOY / "compose.yaml"), "config"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    services = yaml.safe_load(r.stdout)["services"]
    raw = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    assert raw["grafana"]["profiles"] == ["grafana"]
    for name, port in (("chat-a", 9010), ("chat-b", 9011)):
        assert services[name]["ports"] == [f"127.0.0.1:{port}:9009/tcp"], services[name]["ports"]
        assert services[name]["environment"]["CHAT_REDIS_URL"].startswith("redis://redis:")
        # PROXY headers from HAProxy's fixed address only, not from docker's gateway (.1)
        assert services[name]["environment"]["CHAT_PROXY_PROTOCOL_FROM"] == "10.209.9.9/32"
    balancer = services["haproxy"]
    assert balancer["ports"] == ["127.0.0.1:9009:9009/tcp", "127.0.0.1:8404:8404/tcp"], balancer["ports"]
    assert balancer["networks"]["default"]["ipv4_address"] == "10.209.9.9"
    assert balancer["volumes"][0].endswith("/deploy/haproxy:/usr/local/etc/haproxy:ro"), balancer["volumes"]
    (ipam,) = yaml.safe_load(r.stdout)["networks"]["default"]["ipam"]["config"]
    assert ipam == {"subnet": "10.209.9.0/24", "ip_range": "10.209.9.128/25", "gateway": "10.209.9.1"}
    for name, var in (
        ("chat-a", "CHAT_IMAGE"),
        ("redis", "REDIS_IMAGE"),
        ("prometheus", "PROMETHEUS_IMAGE"),
        ("haproxy", "HAPROXY_IMAGE"),
    ):
        assert raw[name]["image"].startswith("${" + var), name
    scrape = yaml.safe_load((PROM / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j["static_configs"][0]["targets"] for j in scrape["scrape_configs"]}
    assert jobs["chat-svc"] == ["chat-a:9009", "chat-b:9009"]
    assert jobs["haproxy"] == ["haproxy:8404"]


def test_haproxy_config_is_valid() -> None:
    """Debian's haproxy (the offline image's) accepts deploy/haproxy/haproxy.cfg; the instances'
    names resolve only inside compose, which the config allows for (init-addr none)."""
    exe = require_binary("haproxy")
    r = subprocess.run([exe, "-c", "-f", str(DEPLOY / "haproxy" / "haproxy.cfg")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Configuration file is valid" in r.stdout + r.stderr


# ----------------------------------------------------------------------------- live


def test_probe_paths_of_the_manifests_answer(chat_server) -> None:
    """The ConfigMap's metrics port setting, as the pod runs it: probes and scrapes there, 404 on chat."""
    metrics_port = free_port()
    srv = chat_server("--metrics-port", str(metrics_port), "--metrics-host", "127.0.0.1")
    container = find("Deployment", "chat-svc")["spec"]["template"]["spec"]["containers"][0]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        path = container[probe]["httpGet"]["path"]
        assert get(metrics_port, path)[0] == 200, (probe, path)
        assert srv.get(path)[0] == 404, (probe, path)
    path = find("ServiceMonitor")["spec"]["endpoints"][0]["path"]
    assert "chat_connections{transport=tcp}" in scrape(metrics_port) and path == "/metrics"


def test_every_metric_in_rules_and_dashboard_is_exported(chat_server, redis_server: RedisServer) -> None:
    """Names (and label values such as reason="slow_consumer") must exist on a running server.

    The server runs with --redis-url against a real redis-server, since the chat_backplane_*
    series exist only with the backplane on.
    """
    srv = chat_server("--redis-url", redis_server.url)
    alice = srv.member("alice")
    bob = srv.member("bob")
    alice.send("hello")
    bob.expect("[alice]")
    names, labels = exported(srv.get("/metrics")[1])
    used = used_metric_names()
    missing = {n: sorted(w) for n, w in used.items() if n not in names and n not in PROMQL_BUILTINS}
    missing_labels = {x for x in used_label_values() if x not in labels}
    assert not missing, f"used but not exported: {missing}"
    assert not missing_labels, f"label values used but not exported: {sorted(missing_labels)}"


def test_a_stall_shorter_than_a_scrape_is_counted(chat_server) -> None:
    """ChatSvcEventLoopStalled counts ticks later than 1 s from the tick-lag histogram: a
    2.2 s freeze (SIGSTOP) between two scrapes must land there, and an idle server has none."""
    srv = chat_server()

    def late_ticks() -> float:
        metrics = srv.scrape()
        within = metrics["chat_event_loop_tick_lag_seconds_bucket{le=1.0}"]
        return metrics["chat_event_loop_tick_lag_seconds_count"] - within

    assert late_ticks() == 0
    srv.signal(signal.SIGSTOP)
    time.sleep(2.2)
    srv.signal(signal.SIGCONT)
    deadline = time.monotonic() + 5
    while late_ticks() < 1:
        assert time.monotonic() < deadline, "the 2.2 s stall was not counted"
        time.sleep(0.1)
    assert late_ticks() == 1


def test_prometheus_scrapes_a_running_server(chat_server, redis_server: RedisServer, tmp_path: Path) -> None:
    """The Debian prometheus binary scrapes chat-svc's chat port and loads the alert rules;
    every dashboard query and every alert's measured side returns data from it."""
    exe = require_binary("prometheus")
    srv = chat_server("--redis-url", redis_server.url)
    member = srv.member("alice")
    listener = srv.member("bob")
    member.send("/rooms")
    web = free_port()
    (tmp_path / "alerts.yml").write_text((PROM / "alerts.yml").read_text())
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    config["global"]["evaluation_interval"] = "1s"
    config["scrape_configs"] = [
        {
            "job_name": "chat-svc",
            "metrics_path": "/metrics",
            "static_configs": [{"targets": [f"127.0.0.1:{srv.port}"]}],
        }
    ]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            exe,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{web}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )

    def query(q: str) -> list[dict[str, Any]]:
        return prometheus_api(web, "query", query=q)["result"]

    try:
        deadline = time.monotonic() + 45
        up: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-3000:]
            try:
                up = query('up{job="chat-svc"}')
                if up and up[0]["value"][1] == "1":
                    break
            except OSError:
                pass
            time.sleep(0.5)
        assert up and up[0]["value"][1] == "1", (
            f"up: {up}\n{(tmp_path / 'prometheus.log').read_text()[-3000:]}"
        )
        assert up[0]["metric"]["instance"] == f"127.0.0.1:{srv.port}"
        connections = query('chat_connections{job="chat-svc"}')
        assert connections and float(connections[0]["value"][1]) >= 1, connections
        build = query("chat_build_info")
        assert build and build[0]["metric"]["version"], build
        groups = prometheus_api(web, "rules")["groups"]
        loaded = {r["name"]: r for g in groups for r in g["rules"]}
        assert set(loaded) == {r["alert"] for r in alert_rules()}
        assert all(r["health"] in ("ok", "unknown") for r in loaded.values()), loaded
        # Every panel and alert has data once a few scrapes are in and lines flow (the
        # histogram quantiles need observations inside the rate window).
        queries = [concrete(e) for e in dashboard_exprs()] + [
            alert_lhs(r["expr"]) for r in alert_rules()
        ]
        empty: list[str] = queries
        deadline = time.monotonic() + 30
        while empty and time.monotonic() < deadline:
            member.send("keep the histograms moving")
            listener.expect("[alice] keep the histograms moving")
            empty = [q for q in queries if not query(q)]
            time.sleep(0.5)
        assert not empty, f"no data from Prometheus for: {empty}"
        for rule in alert_rules():
            query(rule["expr"])  # the full expression evaluates (firing or not)
        p99 = query(concrete(panel("Fan-out latency per instance")["targets"][0]["expr"]))
        assert p99 and all(math.isfinite(float(r["value"][1])) for r in p99), p99  # not NaN: observed
        cpu = query(concrete(panel("CPU per instance")["targets"][0]["expr"]))
        assert [r["metric"]["instance"] for r in cpu] == [f"127.0.0.1:{srv.port}"], cpu
    finally:
        member.close()
        listener.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
