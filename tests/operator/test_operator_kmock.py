"""The kopf handlers against kmock (a Kubernetes API mock server) through a whole fit.

kmock stores objects and streams watch events but runs no controllers, so the test plays the Job
controller: it creates the pods a Job would run, with the termination messages the runner writes
(docs/contract.md), and marks the Jobs complete. One shard's first pod crashes and is retried; the
operator is stopped mid-fit and a fresh one runs the three Jobs of Combining (globals, the Indexed
re-sampling Job, combine) to the end; finally the fit is deleted. An EP fit runs its pilot and
three rounds, the operator restarted in the middle of one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

import aiohttp
import kmock as kmocklib
import kopf
import pytest
from cfit_support import (
    COMBINE_REPORT,
    GLOBALS_REPORT,
    PILOT_REPORT,
    ep_fit,
    make_fit,
    resample_report,
    round_report,
    shard_report,
    update_report,
)
from kubernetes.client import ApiClient, Configuration
from prometheus_client import generate_latest

from consensusfit.operator.config import Config
from consensusfit.operator.handlers import register
from consensusfit.operator.metrics import Metrics

NS = "default"
FITS = f"/apis/consensusfit.dev/v1alpha1/namespaces/{NS}/consensusfits"
JOBS = f"/apis/batch/v1/namespaces/{NS}/jobs"
PODS = f"/api/v1/namespaces/{NS}/pods"
VERBS = {"list", "watch", "get", "create", "patch", "update", "delete"}


def declare_resources(server: kmocklib.KubernetesEmulator) -> None:
    info = kmocklib.ResourceInfo
    server.resources["consensusfit.dev/v1alpha1/consensusfits"] = info(
        kind="ConsensusFit", namespaced=True, verbs=VERBS, subresources={"status"})
    server.resources["batch/v1/jobs"] = info(kind="Job", namespaced=True, verbs=VERBS)
    server.resources["v1/pods"] = info(kind="Pod", namespaced=True, verbs=VERBS)
    server.resources["v1/events"] = info(kind="Event", namespaced=True, verbs=VERBS)
    # kopf waits to discover these two before it starts (it does not watch them: scanning is off).
    server.resources["v1/namespaces"] = info(kind="Namespace", namespaced=False, verbs=VERBS)
    server.resources["apiextensions.k8s.io/v1/customresourcedefinitions"] = info(
        kind="CustomResourceDefinition", namespaced=False, verbs=VERBS)


def posted_events(server: kmocklib.KubernetesEmulator) -> list[dict]:
    """Events as the operator posted them (kmock stores only one: it ignores generateName)."""
    return [r.data for r in server[kmocklib.resource("v1/events")] if r.method == kmocklib.method.POST]


@contextlib.asynccontextmanager
async def operator(url: str, metrics: Metrics):
    """One operator process: the real handlers, logged in to the mock server, run in this loop."""
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def login(**_: object) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=url, default_namespace=NS)

    register(registry, Config(resync_seconds=0.2, runner_image="runner:test"),
             ApiClient(Configuration(host=url)), metrics)
    settings = kopf.OperatorSettings()
    settings.scanning.disabled = True  # no CRD or namespace watching in the mock
    settings.watching.server_timeout = 10
    stop = asyncio.Event()
    task = asyncio.create_task(kopf.operator(
        registry=registry, settings=settings, clusterwide=True, standalone=True, stop_flag=stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=10)


class Cluster:
    """The test's side of the API: reads, and the Job controller's writes."""

    def __init__(self, http: aiohttp.ClientSession):
        self.http = http

    async def get(self, path: str) -> dict | None:
        async with self.http.get(path) as response:
            return await response.json() if response.status == 200 else None

    async def wait(self, check, timeout: float = 15.0):
        """Poll until `check()` returns something truthy (the operator reconciles every 0.2 s)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            if value := await check():
                return value
            await asyncio.sleep(0.05)
        raise AssertionError(f"timed out waiting for {check.__name__}")

    async def job(self, name: str) -> dict:
        async def created():
            return await self.get(f"{JOBS}/{name}")
        created.__name__ = f"Job {name}"
        return await self.wait(created)

    async def phase(self, wanted: str) -> dict:
        async def reached():
            fit = await self.get(f"{FITS}/fvc")
            return fit if fit and fit.get("status", {}).get("phase") == wanted else None
        reached.__name__ = f"phase {wanted}"
        return await self.wait(reached)

    async def run_pod(self, job: dict, *, index: int | None = None, attempt: int = 0,
                      exit_code: int = 0, report: dict) -> None:
        """A pod of `job` that ran to the end, as the kubelet would report it."""
        name = f"{job['metadata']['name']}-{index if index is not None else 0}-{attempt}"
        annotations = {} if index is None else {"batch.kubernetes.io/job-completion-index": str(index)}
        pod = {
            "metadata": {"name": name, "namespace": NS, "uid": name, "annotations": annotations,
                         "creationTimestamp": "2026-01-01T00:00:01Z",
                         "labels": {**job["spec"]["template"]["metadata"]["labels"],
                                    "batch.kubernetes.io/job-name": job["metadata"]["name"]}},
            "spec": job["spec"]["template"]["spec"],
            "status": {"phase": "Succeeded" if exit_code == 0 else "Failed",
                       "containerStatuses": [{"name": "runner", "state": {"terminated": {
                           "exitCode": exit_code, "startedAt": "2026-01-01T00:00:03Z",
                           "finishedAt": "2026-01-01T00:00:13Z", "message": json.dumps(report)}}}]},
        }
        async with self.http.post(PODS, json=pod) as response:
            assert response.status < 300, await response.text()

    async def finish_job(self, job: dict, **status: object) -> None:
        status["conditions"] = [{"type": "Complete", "status": "True"}]
        if job["spec"].get("completionMode") == "Indexed":  # as the Job controller writes it
            status["completedIndexes"] = f"0-{job['spec']['completions'] - 1}"
        async with self.http.patch(f"{JOBS}/{job['metadata']['name']}", json={"status": status}) as response:
            assert response.status < 300, await response.text()

    async def combine(self, shards: int = 3) -> None:
        """The three Jobs of Combining, each run to success: globals, resample (Indexed), combine."""
        globals_job = await self.job("fvc-globals")
        await self.phase("Combining")
        await self.run_pod(globals_job, report=GLOBALS_REPORT)
        await self.finish_job(globals_job, succeeded=1)
        resample = await self.job("fvc-resample")
        assert resample["spec"]["completionMode"] == "Indexed" and resample["spec"]["completions"] == shards
        for k in range(shards):
            await self.run_pod(resample, index=k, report=resample_report(k))
        await self.finish_job(resample, succeeded=shards)
        combine = await self.job("fvc-combine")
        await self.run_pod(combine, report=COMBINE_REPORT)
        await self.finish_job(combine, succeeded=1)


@contextlib.asynccontextmanager
async def fit_posted(kmock: kmocklib.KubernetesEmulator, fit: dict):
    """The mock server with the fit created in it: (its URL, the test's side of the API)."""
    declare_resources(kmock)
    url = str(kmock.url).rstrip("/")
    fit["metadata"]["resourceVersion"] = "1"  # kopf's patches test it; kmock does not assign one
    async with aiohttp.ClientSession(base_url=url) as http:
        async with http.post(FITS, json=fit) as response:
            assert response.status < 300
        yield url, Cluster(http)


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_a_whole_fit_with_a_retried_shard_and_an_operator_restart(kmock):
    metrics = Metrics()
    fit = make_fit()
    async with fit_posted(kmock, fit) as (url, cluster):
        http = cluster.http
        async with operator(url, metrics):
            partition = await cluster.job("fvc-partition")
            await cluster.phase("Partitioning")
            assert partition["metadata"]["ownerReferences"][0]["uid"] == "uid-fvc"
            assert "app.kubernetes.io/instance" not in partition["metadata"]["labels"]
            await cluster.run_pod(partition, report={"ok": True, "rows": 1549, "groups": 176})
            await cluster.finish_job(partition, succeeded=1)
            shards = await cluster.job("fvc-shards")
            assert shards["spec"]["completionMode"] == "Indexed" and shards["spec"]["completions"] == 3
            await cluster.phase("Sampling")
            await cluster.run_pod(shards, index=0, report=shard_report(0, rhat=1.004, ess=700, divergences=1))
            # Shard 1 crashes once (exit 1: transient); the Job controller retries it.
            await cluster.run_pod(shards, index=1, exit_code=1,
                                  report={"ok": False, "reason": "Error", "message": "storage unreachable"})

            async def failure_reported():
                return [e for e in posted_events(kmock) if e.get("reason") == "PodFailed"]
            failure_reported.__name__ = "a PodFailed event"
            (event,) = await cluster.wait(failure_reported)
            assert "shard 1" in event["message"] and "storage unreachable" in event["message"]

        # The operator is down; shards finish meanwhile; a new operator takes over.
        await cluster.run_pod(shards, index=1, attempt=1, report=shard_report(1, rhat=1.011, ess=400, seconds=50))
        await cluster.run_pod(shards, index=2, report=shard_report(2))
        await cluster.finish_job(shards, succeeded=3)
        async with operator(url, metrics):
            await cluster.combine()
            done = await cluster.phase("Succeeded")

            status = done["status"]
            assert status["result"] == {"uri": COMBINE_REPORT["uri"], "parameters": COMBINE_REPORT["parameters"]}
            assert status["shards"] == {"total": 3, "active": 0, "succeeded": 3, "failed": 0}
            assert status["resample"] == {"total": 3, "active": 0, "succeeded": 3, "failed": 0}
            assert status["diagnostics"] == {"rhatMax": 1.011, "essBulkMin": 400, "divergences": 1,
                                             "slowestShardSeconds": 50}
            kinds = {c["type"]: c["status"] for c in status["conditions"]}
            assert kinds == {"Partitioned": "True", "Sampled": "True", "GlobalsCombined": "True",
                             "GroupsResampled": "True", "Succeeded": "True"}
            assert done["spec"] == fit["spec"]  # never written
            names = sorted(j["metadata"]["name"] for j in (await cluster.get(JOBS))["items"])
            assert names == ["fvc-combine", "fvc-globals", "fvc-partition", "fvc-resample", "fvc-shards"]
            reasons = {e["reason"] for e in posted_events(kmock)}
            assert {"Partitioning", "Sampling", "Combining", "Succeeded", "PodFailed"} <= reasons

            exported = generate_latest(metrics.registry).decode()
            assert 'consensusfit_fits{namespace="default",phase="Succeeded"} 1.0' in exported
            assert 'consensusfit_shard_retries_total{fit="fvc",namespace="default"} 1.0' in exported
            assert 'consensusfit_fit_rhat_max{fit="fvc",namespace="default"} 1.011' in exported
            assert 'consensusfit_shard_duration_seconds_count{fit="fvc",namespace="default"}' in exported

            # Deleting the fit: kopf releases its finalizer and the fit's series go away. (The Jobs
            # go through their owner references: the API server's garbage collector, not ours.)
            async with http.delete(f"{FITS}/fvc") as response:
                assert response.status < 300

            async def gone():
                return await cluster.get(f"{FITS}/fvc") is None
            await cluster.wait(gone)

            async def forgotten():
                return 'fit="fvc"' not in generate_latest(metrics.registry).decode()
            await cluster.wait(forgotten)


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_an_ep_fit_runs_pilot_and_three_rounds_across_an_operator_restart(kmock):
    metrics = Metrics()
    updates = {1: update_report(1, False, mean=0.9, sd=0.3), 2: update_report(2, False, mean=0.2, sd=0.06),
               3: update_report(3, True, mean=0.01, sd=0.005)}

    async def run_round(cluster: Cluster, r: int, shards: range = range(3)) -> dict:
        job = await cluster.job(f"fvc-round-{r}")
        assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 3
        command = job["spec"]["template"]["spec"]["containers"][0]["command"]
        assert command[1] == "sample" and command[-2:] == ["--round", str(r)]
        for k in shards:
            await cluster.run_pod(job, index=k, report=round_report(r, k, rhat=1.0 + r / 1000))
        return job

    async def update(cluster: Cluster, r: int) -> None:
        job = await cluster.job(f"fvc-update-{r}")
        await cluster.run_pod(job, report=updates[r])
        await cluster.finish_job(job, succeeded=1)

    async with fit_posted(kmock, ep_fit(max_rounds=5)) as (url, cluster):
        async with operator(url, metrics):
            partition = await cluster.job("fvc-partition")
            await cluster.run_pod(partition, report={"ok": True, "rows": 1549, "groups": 176})
            await cluster.finish_job(partition, succeeded=1)
            pilot = await cluster.job("fvc-pilot")
            await cluster.phase("Sampling")
            await cluster.run_pod(pilot, report=PILOT_REPORT)
            await cluster.finish_job(pilot, succeeded=1)
            await cluster.finish_job(await run_round(cluster, 1), succeeded=3)
            await update(cluster, 1)
            round_2 = await run_round(cluster, 2, range(2))  # shard 2 still sampling when the operator goes

        # Down mid-round: round 2 finishes and its update runs meanwhile; a new operator goes on.
        await cluster.run_pod(round_2, index=2, report=round_report(2, 2))
        await cluster.finish_job(round_2, succeeded=3)
        async with operator(url, metrics):
            await update(cluster, 2)
            await cluster.finish_job(await run_round(cluster, 3), succeeded=3)
            await update(cluster, 3)
            await cluster.combine()
            done = await cluster.phase("Succeeded")

            status = done["status"]
            assert status["rounds"] == {"current": 3, "completed": 3, "max": 5, "converged": True,
                                        "meanChange": 0.01, "sdChange": 0.005}
            kinds = {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}
            assert kinds["Converged"] == ("True", "Converged") and kinds["Sampled"] == ("True", "RoundSampled")
            names = sorted(j["metadata"]["name"] for j in (await cluster.get(JOBS))["items"])
            assert names == sorted(f"fvc-{s}" for s in (
                "partition", "pilot", "round-1", "update-1", "round-2", "update-2", "round-3", "update-3",
                "globals", "resample", "combine"))  # each once: no fourth round, none twice
            events = posted_events(kmock)
            started = [e["message"] for e in events if e.get("reason") == "RoundStarted"]
            assert {"round 1 of at most 5: Job fvc-round-1", "round 3 of at most 5: Job fvc-round-3"} <= set(started)
            assert "Converged" in {e["reason"] for e in events}
            exported = generate_latest(metrics.registry).decode()
            assert 'consensusfit_ep_rounds_completed_total{fit="fvc",namespace="default"} 3.0' in exported
            assert 'consensusfit_ep_converged{fit="fvc",namespace="default"} 1.0' in exported
