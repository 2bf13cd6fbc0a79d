"""Shared helpers of the operator tests: the CRD, API-server-like defaulting, fits, Jobs and pods."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

from consensusfit.operator.children import job_name
from consensusfit.operator.observe import JobView, PodView

CRD_PATH = Path(__file__).resolve().parents[2] / "manifests" / "crd.yaml"
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def crd() -> dict:
    return yaml.safe_load(CRD_PATH.read_text())


def spec_schema() -> dict:
    return crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]


def apply_defaults(value: Any, schema: dict) -> Any:
    """What the API server does with a structural schema's defaults (also inside defaults)."""
    if not isinstance(value, dict) or "properties" not in schema:
        return value
    result = dict(value)
    for key, sub in schema["properties"].items():
        if key not in result and "default" in sub:
            result[key] = copy.deepcopy(sub["default"])
        if key in result:
            result[key] = apply_defaults(result[key], sub)
    return result


def make_fit(name: str = "fvc", namespace: str = "default", status: dict | None = None, **spec: Any) -> dict:
    """A ConsensusFit as the API server would return it: defaulted, with uid and generation.

    One-shot (`combine.method: consensus`) unless `combine` is given: most tests are about the
    steps every fit has; those about EP rounds ask for them (`ep_fit`).
    """
    given = {
        "data": {"uri": "s3://bucket/osic/", "groupColumn": "Patient"},
        "shards": 3,
        "model": {"formula": "FVC ~ 1 + Weeks + (1 + Weeks || Patient)"},
        "combine": {"method": "consensus"},
        "output": {"uri": "s3://bucket/fits/"},
        **spec,
    }
    fit = {
        "apiVersion": "consensusfit.dev/v1alpha1",
        "kind": "ConsensusFit",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": f"uid-{name}",
            "generation": 1,
            "creationTimestamp": T0.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "labels": {"team": "lungs", "app.kubernetes.io/instance": "argo-app",
                       "argocd.argoproj.io/instance": "x"},
        },
        "spec": apply_defaults(given, spec_schema()),
    }
    if status is not None:
        fit["status"] = status
    return fit


def ep_fit(status: dict | None = None, max_rounds: int = 8, **spec: Any) -> dict:
    """An EP fit (the CRD's default method) with `max_rounds` rounds at most."""
    return make_fit(status=status, combine={"method": "ep", "maxRounds": max_rounds}, **spec)


def job(step: str, outcome: str | None = None, *, active: int = 0, succeeded: int = 0,
        failed_indexes: int = 0, suspended: bool = False, by_fit: bool = False,
        reason: str = "", fit: str = "fvc", owner: str | None = "uid-fvc", failed: int = 0,
        queue: str | None = None) -> JobView:
    return JobView(
        name=job_name(fit, step), step=step, uid=job_uid(step, fit), owner=owner, created=T0 + timedelta(seconds=1), suspended=suspended,
        suspended_by_fit=by_fit, outcome=outcome, reason=reason, message="", active=active,
        succeeded=succeeded, completed_indexes=tuple(range(succeeded)),
        failed_indexes=tuple(range(succeeded, succeeded + failed_indexes)), failed=failed, queue=queue,
    )


def job_uid(step: str, fit: str = "fvc") -> str:
    return f"uid-{job_name(fit, step)}"


def pod(step: str, index: int | None = None, phase: str = "Succeeded", *, report: dict | None = None,
        exit_code: int | None = None, attempt: int = 0, disrupted: bool = False,
        seconds: float = 10.0, waiting: tuple[str, str] | None = None, unschedulable: str | None = None) -> PodView:
    done = phase in ("Succeeded", "Failed")
    started = T0 + timedelta(seconds=5 + 100 * attempt)
    return PodView(
        uid=f"{step}-{index}-{attempt}", name=f"fvc-{step}-{index}-{attempt}", step=step, owner=job_uid(step),
        index=index,
        phase=phase, created=T0 + timedelta(seconds=2 + 100 * attempt), started=started if phase != "Pending" else None,
        finished=started + timedelta(seconds=seconds) if done else None,
        exit_code=exit_code if exit_code is not None else (0 if phase == "Succeeded" else 1 if done else None),
        disrupted=disrupted, report=report, waiting=waiting, unschedulable=unschedulable,
    )


def shard_report(shard: int, rhat: float = 1.001, ess: float = 900.0, divergences: int = 0,
                 seconds: float = 30.0) -> dict:
    return {"ok": True, "shard": shard, "rhatMax": rhat, "essBulkMin": ess,
            "divergences": divergences, "seconds": seconds}


def resample_report(shard: int, seconds: float = 12.0, accept: float = 0.9) -> dict:
    return {"ok": True, "shard": shard, "seconds": seconds, "acceptProb": accept}


GLOBALS_REPORT = {"ok": True, "stage": "globals", "uri": "s3://bucket/fits/default/fvc/uid-fvc/combined/draws.parquet",
                  "draws": 4000, "warnings": 1}
COMBINE_REPORT = {"ok": True, "uri": "s3://bucket/fits/default/fvc/uid-fvc/combined/",
                  "parameters": {"Intercept": {"mean": 2775.0, "sd": 10.0, "q05": 2758.0,
                                               "q50": 2775.0, "q95": 2791.0}}}


def message(report: dict) -> str:
    return json.dumps(report)


# EP rounds (docs/contract.md, "EP rounds"): the pilot's, a round shard's and an update's messages.
PILOT_REPORT = {"ok": True, "round": 0, "shards": [0], "rhatMax": 1.003, "essBulkMin": 300.0,
                "divergences": 0, "seconds": 20.0}


def round_report(r: int, shard: int, **diagnostics: Any) -> dict:
    return {**shard_report(shard, **diagnostics), "round": r}


def update_report(r: int, final: bool, converged: bool | None = None, mean: float = 0.3, sd: float = 0.1) -> dict:
    return {"ok": True, "round": r, "converged": final if converged is None else converged, "final": final,
            "meanChange": mean, "sdChange": sd, "damping": 0.5}


# Every pod field a platform needs (#17 item 2), as spec.runner or chart values set them.
PLATFORM_POD_SETTINGS = {
    "imagePullSecrets": [{"name": "registry"}],
    "affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 1, "preference": {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["batch"]}]}}]}},
    "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                                   "whenUnsatisfiable": "ScheduleAnyway",
                                   "labelSelector": {"matchLabels": {"consensusfit.dev/fit": "fvc"}}}],
    "podLabels": {"cost-center": "lungs"},
    "podAnnotations": {"sidecar.istio.io/inject": "false"},
    "runtimeClassName": "nvidia",
    "schedulerName": "volcano",
    "volumes": [{"name": "s3-ca", "configMap": {"name": "s3-ca-bundle"}}],
    "volumeMounts": [{"name": "s3-ca", "mountPath": "/etc/ssl/s3", "readOnly": True}],
    "podSecurityContext": {"fsGroup": 1000, "fsGroupChangePolicy": "OnRootMismatch", "supplementalGroups": [2000]},
}
