"""Shared helpers of the platform tests: the repository's paths, the external tools, helm rendering.

Tools come from scripts/tools.sh (which `make test` runs first); a test that needs one that is not
installed skips and says how to install it.
"""

from __future__ import annotations

import json
import re
import subprocess
from functools import cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "consensusfit"
ALERTS = CHART / "files" / "alerts.yaml"
DASHBOARD = CHART / "files" / "dashboard.json"
TOOLS = ROOT / "scripts" / "tools.sh"


@cache
def _tool_path(name: str) -> str | None:
    found = subprocess.run([str(TOOLS), "path", name], capture_output=True, text=True)
    path = found.stdout.strip()
    return path if found.returncode == 0 and path else None


def tool(name: str) -> str:
    """The path of an external tool, or skip the test, saying how to get it."""
    path = _tool_path(name)
    if path is None:
        pytest.skip(f"{name} is not installed: `scripts/tools.sh install {name}` installs it "
                    "(`make test` runs it; it needs Go for helm, apt-get as root for the others)")
    return path


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([tool("helm"), *args], capture_output=True, text=True, check=check, timeout=120)


def render(*values: str, namespace: str = "consensusfit-system", release: str = "consensusfit") -> list[dict]:
    """`helm template` of the chart with `--set` values; the objects it renders (CRDs excluded)."""
    args = ["template", release, str(CHART), "--namespace", namespace]
    for value in values:
        args += ["--set", value]
    out = helm(*args)
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def find(objects: list[dict], kind: str, name: str | None = None, namespace: str | None = None) -> list[dict]:
    return [o for o in objects if o["kind"] == kind
            and (name is None or o["metadata"]["name"] == name)
            and (namespace is None or o["metadata"].get("namespace") == namespace)]


def container_env(objects: list[dict]) -> dict[str, str]:
    (deployment,) = find(objects, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e["value"] for e in container["env"]}


# --- metric names in PromQL -----------------------------------------------------------------------

def exported_metric_names() -> set[str]:
    """Every series name the operator's registry can export (histograms: _bucket, _count, _sum)."""
    from consensusfit.operator.metrics import Metrics

    names = set()
    for family in Metrics().registry.collect():
        if family.type == "histogram":
            names |= {f"{family.name}_bucket", f"{family.name}_count", f"{family.name}_sum"}
        elif family.type == "counter":
            names.add(f"{family.name}_total")
        else:
            names.add(family.name)
    return names


_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
             "bool", "offset", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (a small scanner, enough for our rules and panels)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)  # strings
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range and subquery durations
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w:$.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", text):
        word, call = match.group(1), match.group(2)
        if not call and word.lower() not in _KEYWORDS:
            names.add(word)
    return names


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_queries(board: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every panel target, rows' nested panels included."""
    queries = []
    def walk(panels):
        for panel in panels:
            walk(panel.get("panels", []))
            for target in panel.get("targets", []):
                queries.append((panel["title"], target["expr"]))
    walk(board["panels"])
    return queries


# --- scraping the way Prometheus Operator does ----------------------------------------------------

def _label_suffix(key: str) -> str:
    """A Kubernetes label key as Kubernetes discovery spells it in a label name (app.kubernetes.io/name ->
    app_kubernetes_io_name)."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", key)


def _snake(key: str) -> str:
    """A ServiceMonitor relabeling field as Prometheus spells it (sourceLabels -> source_labels)."""
    return re.sub(r"(?<!^)([A-Z])", r"_\1", key).lower()


def endpoint_target(service: dict, deployment: dict, address: str, pod: str) -> dict:
    """A file_sd entry for one address of the Service's Endpoints, labelled as Kubernetes discovery
    (role endpoints) labels it: the Service's namespace, name and labels, the port's name, the pod
    behind the address and its container. The Service must select the Deployment's pods (else its
    Endpoints would have no address)."""
    template = deployment["spec"]["template"]
    assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items()
    (port,) = service["spec"]["ports"]
    (container,) = template["spec"]["containers"]
    labels = {
        "__meta_kubernetes_namespace": service["metadata"]["namespace"],
        "__meta_kubernetes_service_name": service["metadata"]["name"],
        "__meta_kubernetes_endpoint_port_name": port["name"],
        "__meta_kubernetes_endpoint_address_target_kind": "Pod",
        "__meta_kubernetes_endpoint_address_target_name": pod,
        "__meta_kubernetes_pod_name": pod,
        "__meta_kubernetes_pod_container_name": container["name"],
        "__meta_kubernetes_pod_phase": "Running",
    }
    for key, value in service["metadata"]["labels"].items():
        labels[f"__meta_kubernetes_service_label_{_label_suffix(key)}"] = value
        labels[f"__meta_kubernetes_service_labelpresent_{_label_suffix(key)}"] = "true"
    return {"targets": [address], "labels": labels}


def service_monitor_scrape_config(monitor: dict, targets: Path, index: int = 0) -> dict:
    """The scrape config Prometheus Operator generates for endpoint `index` of a ServiceMonitor
    (its promcfg.go, role endpoints): the endpoint's honorLabels, interval, timeout and path; its
    relabelling that keeps the selected Service's port and sets the namespace, service, pod,
    container, job and endpoint target labels; then the endpoint's own relabelings. Discovery reads
    `targets` (file_sd, written with endpoint_target) instead of the Kubernetes API."""
    endpoint = monitor["spec"]["endpoints"][index]
    target_of = ["__meta_kubernetes_endpoint_address_target_kind", "__meta_kubernetes_endpoint_address_target_name"]
    selected = [
        {"action": "keep", "regex": f"({value});true",
         "source_labels": [f"__meta_kubernetes_service_label_{_label_suffix(key)}",
                           f"__meta_kubernetes_service_labelpresent_{_label_suffix(key)}"]}
        for key, value in monitor["spec"]["selector"]["matchLabels"].items()]
    relabel = [
        {"source_labels": ["job"], "target_label": "__tmp_prometheus_job_name"},
        # namespaceSelector: a namespaces filter of kubernetes_sd_configs, a keep rule here.
        {"action": "keep", "source_labels": ["__meta_kubernetes_namespace"],
         "regex": "|".join(monitor["spec"]["namespaceSelector"]["matchNames"])},
        *selected,
        {"action": "keep", "source_labels": ["__meta_kubernetes_endpoint_port_name"], "regex": endpoint["port"]},
        {"source_labels": target_of, "separator": ";", "regex": "Node;(.*)", "replacement": "${1}", "target_label": "node"},
        {"source_labels": target_of, "separator": ";", "regex": "Pod;(.*)", "replacement": "${1}", "target_label": "pod"},
        {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
        {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "service"},
        {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
        {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
        {"action": "drop", "source_labels": ["__meta_kubernetes_pod_phase"], "regex": "(Failed|Succeeded)"},
        {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "job", "replacement": "${1}"},
        {"target_label": "endpoint", "replacement": endpoint["port"]},
        *({_snake(key): value for key, value in rule.items()} for rule in endpoint.get("relabelings", [])),
    ]
    meta = monitor["metadata"]
    return {
        "job_name": f"serviceMonitor/{meta['namespace']}/{meta['name']}/{index}",
        "honor_labels": endpoint.get("honorLabels", False),
        "scrape_interval": endpoint["interval"],
        "scrape_timeout": endpoint["scrapeTimeout"],
        "metrics_path": endpoint.get("path", "/metrics"),
        "file_sd_configs": [{"files": [str(targets)]}],
        "relabel_configs": relabel,
    }
