"""The Argo CD health check (manifests/argocd/health.lua) run by a real Lua interpreter on sample
ConsensusFits, as Argo CD runs it: `obj` is the object, the chunk returns {status, message}."""

from __future__ import annotations

import json
import math
import subprocess

import pytest
import yaml
from platform_support import ROOT, tool

HEALTH = ROOT / "manifests" / "argocd" / "health.lua"


def lua_literal(value) -> str:
    """A JSON-like value as a Lua table constructor (what Argo CD hands the script)."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        assert math.isfinite(value)
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid Lua escapes for these samples
    if isinstance(value, list):
        return "{" + ", ".join(lua_literal(v) for v in value) + "}"
    return "{" + ", ".join(f"[{json.dumps(k)}] = {lua_literal(v)}" for k, v in value.items()) + "}"


def health(obj: dict) -> tuple[str, str]:
    script = (f"obj = {lua_literal(obj)}\n"
              f"local hs = dofile({json.dumps(str(HEALTH))})\n"
              "io.write(hs.status, '\\n', hs.message, '\\n')\n")
    out = subprocess.run([tool("lua"), "-"], input=script, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    status, message = out.stdout.rstrip("\n").split("\n", 1)
    return status, message


def fit(generation: int = 1, suspend: bool | None = None, status: dict | None = None) -> dict:
    obj = {"apiVersion": "consensusfit.dev/v1alpha1", "kind": "ConsensusFit",
           "metadata": {"name": "fvc", "namespace": "ml", "generation": generation},
           "spec": {"shards": 5, "data": {"uri": "s3://b/d/"}, "output": {"uri": "s3://b/f/"}}}
    if suspend is not None:
        obj["spec"]["suspend"] = suspend
    if status is not None:
        obj["status"] = status
    return obj


def running(phase: str, succeeded: int = 2, generation: int = 1) -> dict:
    return {"observedGeneration": generation, "phase": phase,
            "shards": {"total": 5, "active": 3, "succeeded": succeeded, "failed": 0}}


SUCCEEDED = {"observedGeneration": 1, "phase": "Succeeded",
             "shards": {"total": 5, "active": 0, "succeeded": 5, "failed": 0},
             "diagnostics": {"rhatMax": 1.004, "essBulkMin": 800.0, "divergences": 0},
             "result": {"uri": "s3://b/f/ml/fvc/u/combined/", "parameters": {"Intercept": {"mean": 2775.0}}},
             "conditions": [{"type": "Succeeded", "status": "True", "reason": "Combined", "message": "done"}]}
FAILED = {"observedGeneration": 1, "phase": "Failed",
          "conditions": [{"type": "Partitioned", "status": "True", "reason": "Partitioned", "message": "ok"},
                         {"type": "Failed", "status": "True", "reason": "BadInput",
                          "message": "shard 3: column 'FVC' has 2 NaN values"}]}


@pytest.mark.parametrize("obj, expected", [
    (fit(), ("Progressing", "Waiting for the operator")),
    (fit(status={"phase": "Pending"}), ("Progressing", "Waiting for the operator to observe generation 1")),
    (fit(status=running("Pending")), ("Progressing", "Pending: 2/5 shards done")),
    (fit(status={"observedGeneration": 1, "phase": "Partitioning"}), ("Progressing", "Partitioning")),
    (fit(status=running("Sampling", 3)), ("Progressing", "Sampling: 3/5 shards done")),
    (fit(status=running("Combining", 5)), ("Progressing", "Combining: 5/5 shards done")),
    (fit(status={**running("Sampling", 1), "rounds": {"current": 2, "completed": 1, "max": 8}}),
     ("Progressing", "Sampling: 1/5 shards done in round 2 of at most 8")),
    (fit(status={**SUCCEEDED, "conditions": [*SUCCEEDED["conditions"], {
        "type": "Converged", "status": "False", "reason": "MaxRoundsReached",
        "message": "EP stopped at maxRounds (8) without converging"}]}),
     ("Healthy", "Succeeded: s3://b/f/ml/fvc/u/combined/ (warning: EP stopped at maxRounds (8) without converging)")),
    (fit(status=SUCCEEDED), ("Healthy", "Succeeded: s3://b/f/ml/fvc/u/combined/")),
    (fit(status={**running("Sampling", 0), "conditions": [{
        "type": "Blocked", "status": "True", "reason": "ImagePullBackOff", "message": "shard 0: no such image"}]}),
     ("Progressing", "Sampling: 0/5 shards done (blocked: ImagePullBackOff: shard 0: no such image)")),
    (fit(status={**running("Sampling", 1), "conditions": [{"type": "Blocked", "status": "False", "reason": "Started"}]}),
     ("Progressing", "Sampling: 1/5 shards done")),
    (fit(status={**SUCCEEDED, "diagnostics": {"rhatMax": 1.034}}),
     ("Healthy", "Succeeded: s3://b/f/ml/fvc/u/combined/ (warning: R-hat max 1.034 above 1.01)")),
    (fit(status=FAILED), ("Degraded", "BadInput: shard 3: column 'FVC' has 2 NaN values")),
    (fit(status={"observedGeneration": 1, "phase": "Failed"}), ("Degraded", "Failed")),
    (fit(suspend=True, status=running("Sampling")), ("Suspended", "Suspended in Sampling: 2/5 shards done")),
    (fit(suspend=True, status={"observedGeneration": 1, "phase": "Pending"}), ("Suspended", "Suspended in Pending")),
    (fit(suspend=False, status=running("Sampling")), ("Progressing", "Sampling: 2/5 shards done")),
    # A new spec the operator has not seen yet: Progressing, whatever the old status says.
    (fit(generation=2, status=SUCCEEDED), ("Progressing", "Waiting for the operator to observe generation 2")),
    (fit(generation=2, status=FAILED), ("Progressing", "Waiting for the operator to observe generation 2")),
    (fit(generation=2, suspend=True, status=running("Sampling")),
     ("Progressing", "Waiting for the operator to observe generation 2")),
    (fit(generation=2, suspend=True, status=running("Sampling", generation=2)),
     ("Suspended", "Suspended in Sampling: 2/5 shards done")),
    # Finished fits stay finished when suspended afterwards.
    (fit(generation=2, suspend=True, status={**SUCCEEDED, "observedGeneration": 2}),
     ("Healthy", "Succeeded: s3://b/f/ml/fvc/u/combined/")),
], ids=lambda v: v[0] if isinstance(v, tuple) else None)
def test_health(obj, expected):
    assert health(obj) == expected


def test_health_of_the_example_fit_as_applied():
    example = yaml.safe_load((ROOT / "manifests" / "examples" / "fvc-decline.yaml").read_text())
    assert health(example) == ("Progressing", "Waiting for the operator")


def test_the_script_sticks_to_lua_5_1():
    # Argo CD runs gopher-lua (Lua 5.1): no goto, integer division, bitwise operators or utf8 library.
    source = HEALTH.read_text()
    for construct in ("goto ", "//", " & ", " | ", "~ ", "<<", ">>", "utf8.", "math.type", "table.move"):
        assert construct not in source.replace("~=", ""), construct


def test_argocd_cm_carries_the_script():
    cm = yaml.safe_load((ROOT / "manifests" / "argocd" / "argocd-cm.yaml").read_text())
    assert cm["metadata"] == {"name": "argocd-cm", "namespace": "argocd"}
    assert cm["data"]["resource.customizations.health.consensusfit.dev_ConsensusFit"] == HEALTH.read_text()
