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

from consensusfit.operator.children import job_manifest
from consensusfit.operator.config import Config
from consensusfit.operator.handlers import register
from consensusfit.operator.leadership import Replica, Timing
from consensusfit.operator.metrics import Metrics

NS = "default"
FITS = f"/apis/consensusfit.dev/v1alpha1/namespaces/{NS}/consensusfits"
JOBS = f"/apis/batch/v1/namespaces/{NS}/jobs"
PODS = f"/api/v1/namespaces/{NS}/pods"
VERBS = {"list", "watch", "get", "create", "patch", "update", "delete"}
# Waits for the operator, scaled for a loaded 2-core machine (CI runs the suite beside other work):
# a wait ends as soon as its condition holds, so only a failing test waits this long.
WAIT = 90.0
KOPF_FINALIZER = "kopf.zalando.org/KopfFinalizerMarker"  # what timers of earlier versions put on fits


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
async def operator(url: str, metrics: Metrics, replica: Replica | None = None, **config: object):
    """One operator process: the real handlers, logged in to the mock server, run in this loop."""
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def login(**_: object) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=url, default_namespace=NS)

    register(registry, Config(resync_seconds=0.2, runner_image="runner:test", **config),
             ApiClient(Configuration(host=url)), metrics, replica)
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
        await asyncio.wait_for(task, timeout=WAIT)


class Cluster:
    """The test's side of the API: reads, and the Job controller's writes."""

    def __init__(self, http: aiohttp.ClientSession):
        self.http = http

    async def get(self, path: str) -> dict | None:
        async with self.http.get(path) as response:
            return await response.json() if response.status == 200 else None

    async def wait(self, check, timeout: float = WAIT):
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
        job = await self.wait(created)
        if "uid" not in job["metadata"]:  # the API server assigns one; kmock does not
            job["metadata"]["uid"] = f"uid-{name}"
            async with self.http.patch(f"{JOBS}/{name}", json={"metadata": {"uid": job["metadata"]["uid"]}}) as response:
                assert response.status < 300, await response.text()
        return job

    async def phase(self, wanted: str) -> dict:
        async def reached():
            fit = await self.get(f"{FITS}/fvc")
            return fit if fit and fit.get("status", {}).get("phase") == wanted else None
        reached.__name__ = f"phase {wanted}"
        return await self.wait(reached)

    async def condition(self, kind: str, status: str = "True") -> dict:
        async def holds():
            fit = await self.get(f"{FITS}/fvc")
            found = [c for c in (fit or {}).get("status", {}).get("conditions", []) if c["type"] == kind]
            return found[0] if found and found[0]["status"] == status else None
        holds.__name__ = f"condition {kind}={status}"
        return await self.wait(holds)

    async def run_pod(self, job: dict, *, index: int | None = None, attempt: int = 0,
                      exit_code: int = 0, report: dict) -> None:
        """A pod of `job` that ran to the end, as the kubelet would report it."""
        await self.post_pod(job, index=index, attempt=attempt, status={
            "phase": "Succeeded" if exit_code == 0 else "Failed",
            "containerStatuses": [{"name": "runner", "state": {"terminated": {
                "exitCode": exit_code, "startedAt": "2026-01-01T00:00:03Z",
                "finishedAt": "2026-01-01T00:00:13Z", "message": json.dumps(report)}}}]})

    async def post_pod(self, job: dict, *, status: dict, index: int | None = None, attempt: int = 0) -> None:
        """A pod of `job` (owned by it, as the Job controller makes them) in this state."""
        name = f"{job['metadata']['name']}-{index if index is not None else 0}-{attempt}"
        annotations = {} if index is None else {"batch.kubernetes.io/job-completion-index": str(index)}
        pod = {
            "metadata": {"name": name, "namespace": NS, "uid": name, "annotations": annotations,
                         "creationTimestamp": "2026-01-01T00:00:01Z",
                         "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "controller": True,
                                              "name": job["metadata"]["name"], "uid": job["metadata"]["uid"]}],
                         "labels": {**job["spec"]["template"]["metadata"]["labels"],
                                    "batch.kubernetes.io/job-name": job["metadata"]["name"]}},
            "spec": job["spec"]["template"]["spec"],
            "status": status,
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
@pytest.mark.timeout(600)
async def test_a_whole_fit_with_a_retried_shard_and_an_operator_restart(kmock):
    metrics = Metrics()
    fit = make_fit()
    fit["metadata"]["finalizers"] = [KOPF_FINALIZER]  # left by an earlier version's timer
    async with fit_posted(kmock, fit) as (url, cluster):
        http = cluster.http
        async with operator(url, metrics):
            partition = await cluster.job("fvc-partition")
            await cluster.phase("Partitioning")
            assert partition["metadata"]["ownerReferences"][0]["uid"] == "uid-fvc"
            assert "app.kubernetes.io/instance" not in partition["metadata"]["labels"]
            assert partition["spec"]["template"]["spec"]["automountServiceAccountToken"] is False

            async def no_finalizer():  # kopf removes the old one, and nothing adds one
                return not (await cluster.get(f"{FITS}/fvc"))["metadata"].get("finalizers")
            await cluster.wait(no_finalizer)
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
                                             "slowestShardSeconds": 50, "step": "sample", "indexes": "0-2"}
            assert status["retries"] == {"total": 1, "steps": {"sample": 1}}
            kinds = {c["type"]: c["status"] for c in status["conditions"]}
            assert kinds == {"Partitioned": "True", "Sampled": "True", "GlobalsCombined": "True",
                             "GroupsResampled": "True", "Succeeded": "True"}
            assert done["spec"] == fit["spec"]  # never written
            assert not done["metadata"].get("finalizers")  # nothing to block a delete once we are gone
            # spec.cleanupPolicy's default: the next pass deletes the Jobs, their pods going with them
            # (background propagation: the API server's garbage collector); the status stays.
            async def jobs_deleted():
                return not (await cluster.get(JOBS))["items"]
            await cluster.wait(jobs_deleted)
            deletes = [r for r in kmock[kmocklib.resource("batch/v1/jobs")] if r.method == kmocklib.method.DELETE]
            assert {r.url.name for r in deletes} == {"fvc-combine", "fvc-globals", "fvc-partition", "fvc-resample",
                                                     "fvc-shards"}
            assert {r.params.get("propagationPolicy") for r in deletes} == {"Background"}
            await asyncio.sleep(1.0)  # passes without the Jobs (every 0.2 s)
            assert (await cluster.get(f"{FITS}/fvc"))["status"] == status
            reasons = {e["reason"] for e in posted_events(kmock)}
            assert {"Partitioning", "Sampling", "Combining", "Succeeded", "PodFailed"} <= reasons

            exported = generate_latest(metrics.registry).decode()
            assert 'consensusfit_fits{namespace="default",phase="Succeeded"} 1.0' in exported
            assert 'consensusfit_shard_retries_total{fit="fvc",namespace="default"} 1.0' in exported
            assert 'consensusfit_fit_rhat_max{fit="fvc",namespace="default"} 1.011' in exported
            assert 'consensusfit_shard_duration_seconds_count{fit="fvc",namespace="default"}' in exported

            # Deleting the fit: no finalizer holds it, and its series go away. (The Jobs go through
            # their owner references: the API server's garbage collector, not ours.)
            async with http.delete(f"{FITS}/fvc") as response:
                assert response.status < 300

            async def gone():
                return await cluster.get(f"{FITS}/fvc") is None
            await cluster.wait(gone)

            async def forgotten():
                return 'fit="fvc"' not in generate_latest(metrics.registry).decode()
            await cluster.wait(forgotten)


@pytest.mark.asyncio
@pytest.mark.timeout(600)
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


@pytest.mark.asyncio
@pytest.mark.timeout(600)
async def test_jobs_of_an_old_fit_of_the_same_name_are_never_adopted(kmock):
    """An old fit `fvc` was deleted with --cascade=orphan after it succeeded: its five Jobs, complete,
    and their pods' reports are still there. A new fit `fvc` (another uid) must not go Succeeded
    with the old result: it ignores them, says so, is Blocked on the name its partition Job needs,
    and fails with that reason after the grace period."""
    old = {"partition": {"ok": True, "rows": 1549, "groups": 176}, "sample": shard_report(0),
           "globals": GLOBALS_REPORT, "resample": resample_report(0), "combine": COMBINE_REPORT}
    async with fit_posted(kmock, make_fit()) as (url, cluster):
        for step, report in old.items():
            manifest = job_manifest(make_fit(), step, {}, "runner:old")
            manifest["metadata"].pop("ownerReferences")  # orphaned: the garbage collector dropped them
            manifest["metadata"]["uid"] = f"old-{step}"
            async with cluster.http.post(JOBS, json=manifest) as response:
                assert response.status < 300
            await cluster.run_pod(manifest, report=report)
            await cluster.finish_job(manifest, succeeded=1)
        async with operator(url, Metrics(), blocked_grace_seconds=2):
            failed = await cluster.phase("Failed")
        status = failed["status"]
        kinds = {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}
        assert kinds == {"Blocked": ("True", "JobNameTaken"), "Failed": ("True", "JobNameTaken")}, kinds
        blocked = next(c for c in status["conditions"] if c["type"] == "Blocked")
        assert "Job fvc-partition is owned by no one (orphaned)" in blocked["message"]
        assert "result" not in status and status["shards"]["succeeded"] == 0 and "diagnostics" not in status
        foreign = [e["message"] for e in posted_events(kmock) if e.get("reason") == "ForeignJob"]
        assert len(foreign) == 5 and all("ignored" in m for m in foreign)
        names = {j["metadata"]["name"]: j["metadata"]["uid"] for j in (await cluster.get(JOBS))["items"]}
        assert sorted(names.values()) == sorted(f"old-{step}" for step in old)  # none created, none touched


@pytest.mark.asyncio
@pytest.mark.timeout(600)
async def test_pods_that_cannot_start_are_reported_and_fail_the_fit_after_the_grace_period(kmock):
    """The partition Job cannot create its pod at first (the Job controller's FailedCreate event: no
    such ServiceAccount): Blocked, with the controller's message. Its pod then waits on a Secret
    that does not exist (CreateContainerConfigError): Blocked with the kubelet's reason, a Warning
    event, and after the grace period the fit fails with that reason."""
    async with fit_posted(kmock, make_fit()) as (url, cluster):
        async with operator(url, Metrics(), blocked_grace_seconds=3):
            partition = await cluster.job("fvc-partition")
            message = 'Error creating: pods "fvc-partition-x" is forbidden: error looking up service account default/nope'
            event = {"metadata": {"name": "fvc-partition.1", "namespace": NS}, "reason": "FailedCreate",
                     "type": "Warning", "message": message,
                     "involvedObject": {"kind": "Job", "name": "fvc-partition", "uid": partition["metadata"]["uid"]}}
            async with cluster.http.post(f"/api/v1/namespaces/{NS}/events", json=event) as response:
                assert response.status < 300
            blocked = await cluster.condition("Blocked")
            assert blocked["reason"] == "FailedCreate" and message in blocked["message"], blocked

            await cluster.post_pod(partition, status={"phase": "Pending", "containerStatuses": [{"name": "runner", "state": {
                "waiting": {"reason": "CreateContainerConfigError", "message": 'secret "s3-credentials" not found'}}}]})
            failed = await cluster.phase("Failed")
        conditions = {c["type"]: c for c in failed["status"]["conditions"]}
        assert conditions["Failed"]["reason"] == "CreateContainerConfigError"
        assert 'pod fvc-partition-0-0: secret "s3-credentials" not found' in conditions["Failed"]["message"]
        assert conditions["Blocked"]["reason"] == "CreateContainerConfigError"
        warnings = {e["reason"] for e in posted_events(kmock) if e.get("type") == "Warning"}
        assert {"FailedCreate", "CreateContainerConfigError"} <= warnings
        job = await cluster.get(f"{JOBS}/fvc-partition")
        assert job["spec"]["suspend"] is True  # a failed fit stops its Jobs


@pytest.mark.asyncio
@pytest.mark.timeout(600)
async def test_a_fit_outside_the_admins_policy_is_refused_before_any_job(kmock):
    fit = make_fit(runner={"compilationCache": {"hostPath": {"path": "/"}}})
    async with fit_posted(kmock, fit) as (url, cluster):
        async with operator(url, Metrics()):
            failed = await cluster.phase("Failed")
        reason = next(c["reason"] for c in failed["status"]["conditions"] if c["type"] == "Failed")
        assert reason == "VolumeNotAllowed"
        assert (await cluster.get(JOBS))["items"] == []


class SwitchedElector:
    """An elector whose leadership the test decides (the Lease itself is tested against the real
    API server in tests/e2e/test_e2e_leadership.py)."""

    timing = Timing(lease_seconds=3.0, renew_deadline_seconds=2.0, retry_seconds=0.1)

    def __init__(self) -> None:
        self.holds = True

    def leading(self) -> bool:
        return self.holds

    def attempt(self) -> bool:
        return self.holds

    def release(self) -> None:
        self.holds = False


@pytest.mark.asyncio
@pytest.mark.timeout(600)
async def test_a_replica_that_loses_the_lease_stops_writing_and_drops_its_fits_series(kmock):
    """Only the leader exports a fit's series: a replica that lost the Lease would otherwise go on
    serving stale ones beside the new leader's, and every `sum by (namespace)` would count the fit twice."""
    elector, metrics = SwitchedElector(), Metrics()

    def exported() -> str:
        return generate_latest(metrics.registry).decode()

    async with fit_posted(kmock, make_fit()) as (url, cluster):
        async with operator(url, metrics, Replica(elector)):
            await cluster.phase("Partitioning")

            async def recorded():  # the pass records its metrics after it writes the status
                return 'consensusfit_fits{namespace="default",phase="Partitioning"} 1.0' in exported()
            await cluster.wait(recorded)
            assert "consensusfit_operator_leader 1.0" in exported()
            elector.holds = False

            async def dropped():
                return 'fit="fvc"' not in exported() and "consensusfit_operator_leader 0.0" in exported()
            await cluster.wait(dropped)
            seen = len(list(kmock))  # requests so far: after `dropped`, no pass of this replica leads
            await cluster.run_pod(await cluster.job("fvc-partition"), report={"ok": True, "rows": 1549, "groups": 176})
            await cluster.finish_job(await cluster.job("fvc-partition"), succeeded=1)
            await asyncio.sleep(1.0)  # five resyncs of a replica that does not lead
            fit = await cluster.get(f"{FITS}/fvc")
            assert fit["status"]["phase"] == "Partitioning"  # nobody planned the next step
            assert await cluster.get(f"{JOBS}/fvc-shards") is None
            writes = [r for r in list(kmock)[seen:] if r.method != kmocklib.method.GET
                      and ("consensusfits" in r.url.path or "/events" in r.url.path)]  # the test writes only pods and Jobs
            assert not writes, writes
