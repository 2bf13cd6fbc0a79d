"""The kopf handlers: observe, call the planner, apply. No decisions here.

- Two indexes keep a summary of every Job and pod labelled with a fit (kopf fills them from
  watches, and fully before any handler runs, so a restarted operator sees all children at once).
- A timer reconciles each fit every `resync_seconds`: it reads the fit's children from the
  indexes, plans, applies the plan, and lets kopf write the status patch.
- A watch on fits forgets the metrics of deleted fits.
The operator writes only its children, the fit's status, Events, and (through kopf's timer) a
finalizer; never the spec.
"""

from __future__ import annotations

from datetime import UTC, datetime

import kopf
from kubernetes.client import ApiClient

from . import observe, planner
from .children import GROUP, VERSION
from .config import Config
from .kube import PLURAL, Kube
from .labels import FIT
from .metrics import Metrics


def register(
    registry: kopf.OperatorRegistry, config: Config, api: ApiClient, metrics: Metrics
) -> kopf.OperatorRegistry:
    """Declare the handlers on `registry` (tests pass their own, with their own config)."""
    kube = Kube(api)
    ours = {FIT: kopf.PRESENT}

    @kopf.index("batch", "v1", "jobs", id="fit_jobs", labels=ours, registry=registry)
    def fit_jobs(body: kopf.Body, namespace: str, labels: kopf.Labels, **_: object) -> dict:
        return {(namespace, labels[FIT]): observe.job_view(body)}

    @kopf.index("v1", "pods", id="fit_pods", labels=ours, registry=registry)
    def fit_pods(body: kopf.Body, namespace: str, labels: kopf.Labels, **_: object) -> dict:
        return {(namespace, labels[FIT]): observe.pod_view(body)}

    @kopf.timer(GROUP, VERSION, PLURAL, interval=config.resync_seconds, registry=registry)
    def reconcile(
        body: kopf.Body, namespace: str, name: str, patch: kopf.Patch, memo: kopf.Memo,
        fit_jobs: kopf.Index, fit_pods: kopf.Index, **_: object,
    ) -> None:
        key = (namespace, name)
        jobs = {job.step: job for job in fit_jobs.get(key, [])}
        pods = list(fit_pods.get(key, []))
        result = planner.plan(body, jobs, pods, datetime.now(UTC), config, memo.get("seen", planner.Ledger()))
        kube.apply(namespace, name, result)
        memo["seen"] = result.seen
        if result.status:
            patch["status"] = result.status
        for event in result.events:
            kopf.event(body, type=event.type, reason=event.reason, message=event.message)
        metrics.record(namespace, name, result, jobs, pods)

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    def forget_deleted(event: kopf.RawEvent, namespace: str, name: str, **_: object) -> None:
        if event["type"] == "DELETED":
            metrics.forget(namespace, name)

    return registry
