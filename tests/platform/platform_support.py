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
