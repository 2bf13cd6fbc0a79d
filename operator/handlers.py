"""The kopf handlers and the reconcile loop: observe, call the planner, apply. No decisions here.

- Two indexes keep a summary of every Job and pod labelled with a fit (kopf fills them from
  watches, and fully before any resource handler runs, so a restarted operator sees all children at once).
- A watch on fits keeps the latest body of every fit; kopf calls it only once the indexes are full,
  so no fit is planned from a partial view of its children. It forgets deleted fits (and their metrics).
- One loop, started with the operator, reconciles every known fit each `resync_seconds`: it reads
  the fit's children from the indexes, plans, applies the plan, writes the status and posts the events.
  With leader election (operator/leadership.py) it does so only while this replica holds the Lease;
  a follower's loop idles with its indexes and fits kept warm by the same watches.
  Not a kopf timer or daemon: those put a finalizer on every fit, and a finalizer outlives an
  uninstalled operator, blocking the deletion of fits, their namespaces and the CRD.
The operator writes only its children, the fit's status and Events; never the spec, and no finalizer
(kopf removes the one that versions with timers left on a fit).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import kopf
from kubernetes.client import ApiClient

from . import leadership, observe, planner
from .children import GROUP, VERSION
from .config import Config
from .kube import PLURAL, Kube
from .labels import FIT
from .metrics import Metrics

log = logging.getLogger(__name__)
_RECONCILER = "reconciler"  # the loop's tasks (reconcile; elect) in the operator's memo


def register(
    registry: kopf.OperatorRegistry, config: Config, api: ApiClient, metrics: Metrics,
    replica: leadership.Replica | None = None,
) -> kopf.OperatorRegistry:
    """Declare the handlers on `registry` (tests pass their own, with their own config). With a
    `replica` that has an elector, the loop reconciles only while it holds the Lease."""
    replica = replica or leadership.Replica()
    kube = Kube(api, metrics.api_request)
    metrics.resync.set(config.resync_seconds)
    ours = {FIT: kopf.PRESENT}
    fits: dict[tuple[str, str], dict] = {}  # (namespace, name) -> the fit as last seen
    seen: dict[tuple[str, str], planner.Ledger] = {}
    refused: dict[tuple[str, str], dict[str, planner.Refusal]] = {}  # the last pass's refused creates

    @kopf.index("batch", "v1", "jobs", id="fit_jobs", labels=ours, registry=registry)
    def fit_jobs(body: kopf.Body, namespace: str, labels: kopf.Labels, **_: object) -> dict:
        return {(namespace, labels[FIT]): observe.job_view(body)}

    @kopf.index("v1", "pods", id="fit_pods", labels=ours, registry=registry)
    def fit_pods(body: kopf.Body, namespace: str, labels: kopf.Labels, **_: object) -> dict:
        return {(namespace, labels[FIT]): observe.pod_view(body)}

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    def fit_seen(event: kopf.RawEvent, namespace: str, name: str, **_: object) -> None:
        key = (namespace, name)
        if event["type"] == "DELETED":
            for memory in (fits, seen, refused):
                memory.pop(key, None)
            metrics.forget(namespace, name)
        else:
            fits[key] = event["object"]

    def reconcile(fit: dict, jobs: kopf.Index, pods: kopf.Index) -> None:
        metadata = fit["metadata"]
        key = (namespace, name) = (metadata["namespace"], metadata["name"])
        own = planner.children_of(fit, list(jobs.get(key, [])), list(pods.get(key, [])))
        obstacles = planner.Obstacles(
            foreign=own.foreign,
            failed_creates=kube.failed_creates(namespace, planner.podless(own.jobs, own.pods)),
            refused=refused.get(key, {}),
        )
        result = planner.plan(fit, own.jobs, own.pods, datetime.now(UTC), config, seen.get(key, planner.Ledger()),
                              obstacles)
        refused[key] = kube.apply(namespace, name, result)
        seen[key] = result.seen
        if result.status and (stored := kube.patch_status(namespace, name, result.status)) is not None:
            # The next pass plans from the status just written, even before the watch brings it.
            if key in fits and fits[key]["metadata"].get("uid") == metadata.get("uid"):
                fits[key] = stored
        kube.post_events(fit, result.events)
        metrics.record(namespace, name, result, own.jobs, list(own.pods))
        if key not in fits:  # deleted while this pass ran: its `forget` may have come before this record
            metrics.forget(namespace, name)

    def reconcile_all(jobs: kopf.Index, pods: kopf.Index) -> None:
        known = list(fits.values())
        with metrics.full_pass(len(known)):
            for fit in known:
                try:
                    with metrics.reconcile_duration.time():
                        reconcile(fit, jobs, pods)
                except Exception:  # one fit's failure (the API refusing a patch) must not stall the others
                    metrics.reconcile_errors.inc()
                    log.exception("reconciling %s/%s", fit["metadata"]["namespace"], fit["metadata"]["name"])

    passing = threading.Lock()  # held by a pass in flight: the Lease is released only after it

    def reconcile_if_leading(jobs: kopf.Index, pods: kopf.Index) -> None:
        with passing:
            if replica.leading():
                reconcile_all(jobs, pods)
            else:  # the leader exports the fits' series; a replica that lost the Lease drops its stale ones
                for namespace, name in list(fits):
                    metrics.forget(namespace, name)

    async def reconcile_forever(jobs: kopf.Index, pods: kopf.Index) -> None:
        try:
            while True:
                # The Kubernetes client blocks: off the event loop that runs kopf's watches.
                await asyncio.to_thread(reconcile_if_leading, jobs, pods)
                replica.running.set()
                await asyncio.sleep(config.resync_seconds)
        finally:
            replica.running.clear()

    async def elect_forever(elector: leadership.Elector) -> None:
        try:
            while True:
                metrics.leader.set(await asyncio.to_thread(elector.attempt))
                await asyncio.sleep(elector.timing.retry_seconds)
        finally:
            replica.running.clear()

    def release(elector: leadership.Elector) -> None:
        with passing:
            elector.release()
        metrics.leader.set(0)

    @kopf.on.startup(registry=registry)
    async def start_reconciling(memo: kopf.Memo, fit_jobs: kopf.Index, fit_pods: kopf.Index, **_: Any) -> None:
        memo[_RECONCILER] = [asyncio.create_task(reconcile_forever(fit_jobs, fit_pods))]
        if replica.elector is None:
            metrics.leader.set(1)
        else:
            memo[_RECONCILER].append(asyncio.create_task(elect_forever(replica.elector)))

    @kopf.on.cleanup(registry=registry)
    async def stop_reconciling(memo: Mapping[str, Any], **_: Any) -> None:
        for task in memo[_RECONCILER]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if replica.elector is not None:  # a rolling update hands over now, not after a lease duration
            await asyncio.to_thread(release, replica.elector)

    return registry
