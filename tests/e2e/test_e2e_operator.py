"""The operator end to end on a real control plane (etcd, kube-apiserver, controller-manager,
scheduler, kwok GPU nodes), installed with its Helm chart and running as the chart's ServiceAccount.

Shard pods are created by the real Job controller, scheduled by the real scheduler onto fake GPU
nodes, and run by the test's executor as local runner processes against S3 on loopback: draws flow
through partition, sampling, combining the globals, re-sampling every shard's groups and finishing
into the fit's status.
"""

from __future__ import annotations

import json

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from e2e_support import (
    FIT_LABEL,
    GROUP,
    INDEX_ANNOTATION,
    NAMESPACE,
    PLURAL,
    STEP_LABEL,
    VERSION,
    render_fit,
    wait_for,
)

pytestmark = pytest.mark.timeout(900)


class Api:
    """The test's reads, as the cluster admin."""

    def __init__(self, cluster):
        from kubernetes import client, config

        api = config.new_client_from_config(config_file=str(cluster.kubeconfig))
        self.core, self.batch, self.custom = client.CoreV1Api(api), client.BatchV1Api(api), client.CustomObjectsApi(api)

    def fit(self, name: str) -> dict:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, name)

    def phase(self, name: str) -> str:
        return (self.fit(name).get("status") or {}).get("phase", "")

    def jobs(self, name: str) -> list:
        return self.batch.list_namespaced_job(NAMESPACE, label_selector=f"{FIT_LABEL}={name}").items

    def pods(self, name: str, step: str | None = None) -> list:
        selector = f"{FIT_LABEL}={name}" + (f",{STEP_LABEL}={step}" if step else "")
        return self.core.list_namespaced_pod(NAMESPACE, label_selector=selector).items


def wait_phase(api: Api, name: str, phases: tuple[str, ...], timeout: float, operator=None) -> dict:
    def reached():
        fit = api.fit(name)
        if operator is not None and not operator.alive():
            raise AssertionError(f"the operator exited:\n{operator.log_tail()}")
        return fit if (fit.get("status") or {}).get("phase") in phases else None

    try:
        return wait_for(reached, timeout, f"fit {name} to reach {phases}")
    except TimeoutError as error:
        status = json.dumps(api.fit(name).get("status"), indent=1)[:3000]
        raise AssertionError(f"{error}\nstatus: {status}\noperator log:\n"
                             f"{operator.log_tail() if operator else ''}") from None


def apply(cluster, manifest: str, check: bool = True):
    return cluster.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=manifest, check=check)


def s3_keys(uri: str) -> list[str]:
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def restart(operator) -> None:
    """SIGKILL the operator (no chance to clean up) and start a fresh one."""
    operator.kill()
    operator.start()


def wait_succeeded(api: Api, name: str, timeout: float, operator) -> dict:
    fit = wait_phase(api, name, ("Succeeded", "Failed"), timeout, operator)
    assert fit["status"]["phase"] == "Succeeded", json.dumps(fit["status"], indent=1)
    return fit


def operator_requests(cluster, user: str, verb: str, resource: str) -> list[dict]:
    return [e for e in cluster.audit_events()
            if e["user"]["username"] == user and e["verb"] == verb
            and (e.get("objectRef") or {}).get("resource") == resource]


def test_fit_runs_end_to_end_through_a_retry_and_an_operator_restart(cluster, operator, executor, bucket):
    """kubectl apply of the example fit -> Job controller pods on GPU nodes -> real runner -> result,
    through the five Jobs: partition, shards, globals, resample (Indexed, a pod per shard), combine.

    Shard 1's first pod cannot reach the object store (the runner exits 1): the Job controller
    retries it and the fit still succeeds. The operator is SIGKILLed while the shards sample and a
    fresh one finishes the fit without creating any Job twice. Deleting the fit removes its Jobs
    and pods (garbage collector) and keeps its results.
    """
    api, name = Api(cluster), "tiny"
    failed_once: list[str] = []

    def fail_shard_1_once(pod: dict) -> dict | None:
        annotations = pod["metadata"].get("annotations") or {}
        if annotations.get(INDEX_ANNOTATION) == "1" and not failed_once:
            failed_once.append(pod["metadata"]["name"])
            # Nothing listens on port 9: the runner's storage gives up and exits 1 (transient).
            return {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "CONSENSUSFIT_S3_MAX_ATTEMPTS": "1"}
        return None

    executor.hooks[name] = fail_shard_1_once
    executor.fits.add(name)
    apply(cluster, render_fit(name, bucket, cleanupPolicy={"onSuccess": "Keep"}))  # its pods are looked at

    wait_phase(api, name, ("Sampling",), 300, operator)
    before = {job.metadata.name: job.metadata.uid for job in api.jobs(name)}
    assert f"{name}-shards" in before
    restart(operator)

    fit = wait_succeeded(api, name, 600, operator)
    status = fit["status"]
    assert set(status["result"]["parameters"]) >= {"mu", "tau", "sigma"}
    assert 0.5 < status["result"]["parameters"]["mu"]["mean"] < 2.5
    assert status["shards"]["total"] == 2 and status["shards"]["succeeded"] == 2
    assert status["resample"] == {"total": 2, "active": 0, "succeeded": 2, "failed": 0}
    assert {c["type"] for c in status["conditions"] if c["status"] == "True"} >= {
        "Partitioned", "Sampled", "GlobalsCombined", "GroupsResampled", "Succeeded"}
    assert status["diagnostics"]["rhatMax"] > 0

    # Pods came from the Job controller and were scheduled onto the kwok nodes; only the steps that
    # sample hold a GPU each (the chart's runner.steps), the others none.
    pods = api.pods(name)
    assert pods and all(p.spec.node_name.startswith("gpu-node-") for p in pods)
    gpus = {p.metadata.labels[STEP_LABEL]: (p.spec.containers[0].resources.limits or {}).get("nvidia.com/gpu")
            for p in pods}
    assert gpus == {"partition": None, "sample": "1", "globals": None, "resample": "1", "combine": None}, gpus
    # Admitted under the restricted Pod Security Standard (the namespace enforces it), without an API token.
    assert api.core.read_namespace(NAMESPACE).metadata.labels["pod-security.kubernetes.io/enforce"] == "restricted"
    assert all(p.spec.automount_service_account_token is False for p in pods)
    assert not any(v.projected for p in pods for v in p.spec.volumes or [])
    assert all(p.metadata.owner_references[0].kind == "Job" for p in pods)
    shard_runs = sorted((r["index"], r["exit"]) for r in executor.runs if r["fit"] == name and r["step"] == "sample")
    assert shard_runs == [("0", 0), ("1", 0), ("1", 1)], executor.runs
    assert len(api.pods(name, "sample")) == 3  # the retry is a new pod
    # Re-sampling ran as its own Indexed Job, one pod per shard, after the globals and before combine.
    resample = next(job for job in api.jobs(name) if job.metadata.name == f"{name}-resample")
    assert resample.spec.completion_mode == "Indexed" and resample.spec.completions == 2
    assert resample.status.succeeded == 2
    runs = [r for r in executor.runs if r["fit"] == name]
    assert sorted((r["index"], r["exit"]) for r in runs if r["step"] == "resample") == [("0", 0), ("1", 0)]
    order = [r["step"] for r in runs if r["step"] in ("globals", "resample", "combine")]
    assert order == ["globals", "resample", "resample", "combine"], order

    # No duplicate Jobs across the restart: the same five Jobs, each created once.
    jobs = {job.metadata.name: job.metadata.uid for job in api.jobs(name)}
    assert sorted(jobs) == sorted(f"{name}-{s}" for s in ("partition", "shards", "globals", "resample", "combine"))
    assert all(jobs[job] == uid for job, uid in before.items())
    # The audit log: the operator's successful Job creates for this fit (a repeated create after
    # the restart would be a harmless 409, never a second 201).
    creates = [e for e in operator_requests(cluster, operator.user, "create", "jobs")
               if e["objectRef"].get("name", "").startswith(f"{name}-")]
    succeeded_creates = [e for e in creates if e["responseStatus"]["code"] == 201]
    assert len(succeeded_creates) == 5, [(e["objectRef"], e["responseStatus"]) for e in creates]

    # The results are in the object store, under <output>/<namespace>/<name>/<uid>/.
    root = f"{bucket}/fits/{NAMESPACE}/{name}/{fit['metadata']['uid']}/"
    keys = s3_keys(root)
    assert any(k.endswith("combined/summary.json") for k in keys), keys
    assert all(any(k.endswith(f"combined/groups/{s}/_SUCCESS.json") for k in keys) for s in (0, 1)), keys

    # Deleting the fit: the garbage collector removes its Jobs and pods; the results stay.
    cluster.kubectl("delete", "consensusfit", name, "-n", NAMESPACE, "--wait=true", "--timeout=120s")
    wait_for(lambda: not api.jobs(name) and not api.pods(name), 120, "the fit's Jobs and pods to go")
    assert s3_keys(root) == keys
    executor.fits.discard(name)


def test_an_ep_fit_runs_three_rounds_end_to_end_through_an_operator_restart(cluster, operator, executor, bucket):
    """An EP fit (the default method) on the real control plane: the pilot, then three rounds, each
    an Indexed Job of real runner pods and an update, then combining. The tolerance is too tight to
    converge before maxRounds (3), so all three rounds run. The operator is SIGKILLed while round 2
    samples; the new one neither repeats nor skips a round."""
    api, name = Api(cluster), "ep-rounds"
    executor.fits.add(name)
    # 0.0001, not smaller: JSON writes 1e-05 for smaller numbers, which the runner's YAML parser of
    # --spec reads as a string (YAML 1.1 wants a dot in a float).
    combine = {"method": "ep", "maxRounds": 3, "tolerance": {"mean": 0.0001, "sd": 0.0001}, "groupParameters": "keep"}
    # Enough draws that Monte Carlo noise cannot pass for convergence in round 1 (whose SDs shrink
    # from the pilot's half of the data).
    apply(cluster, render_fit(name, bucket, combine=combine, sampler={"warmup": 100, "samples": 300,
                                                                      "chains": 1, "seed": 1}))

    def in_round_2():
        fit = api.fit(name)
        if not operator.alive():
            raise AssertionError(f"the operator exited:\n{operator.log_tail()}")
        status = fit.get("status") or {}
        if status.get("phase") in ("Succeeded", "Failed"):
            raise AssertionError(f"the fit ended before round 2 was seen: {json.dumps(status)[:2000]}")
        return (status.get("rounds") or {}).get("current") == 2

    wait_for(in_round_2, 600, "round 2 to start")
    before = {job.metadata.name: job.metadata.uid for job in api.jobs(name)}
    assert {f"{name}-pilot", f"{name}-round-1", f"{name}-update-1", f"{name}-round-2"} <= set(before), before
    restart(operator)

    fit = wait_succeeded(api, name, 900, operator)
    status = fit["status"]
    rounds = status["rounds"]
    assert (rounds["current"], rounds["completed"], rounds["max"]) == (3, 3, 3), rounds
    converged = next(c for c in status["conditions"] if c["type"] == "Converged")
    if rounds["converged"]:
        assert (converged["status"], converged["reason"]) == ("True", "Converged"), converged
    else:
        assert (converged["status"], converged["reason"]) == ("False", "MaxRoundsReached"), converged
        assert "maxRounds (3) without converging" in converged["message"]
    assert {c["type"] for c in status["conditions"] if c["status"] == "True"} >= {
        "Partitioned", "Piloted", "Sampled", "Updated", "GlobalsCombined", "Succeeded"}
    assert set(status["result"]["parameters"]) >= {"mu", "tau", "sigma"}
    assert 0.5 < status["result"]["parameters"]["mu"]["mean"] < 2.5

    # Every round ran each shard once, as real runner pods of that round's Indexed Job.
    runs = [r for r in executor.runs if r["fit"] == name]
    for r in (1, 2, 3):
        assert sorted((run["index"], run["exit"]) for run in runs if run["step"] == f"round-{r}") == [
            ("0", 0), ("1", 0)], runs
        assert [run["exit"] for run in runs if run["step"] == f"update-{r}"] == [0]
    steps = [run["step"] for run in runs if run["index"] is None]
    assert steps == ["partition", "pilot", "update-1", "update-2", "update-3", "globals", "combine"], steps

    # No Job twice across the restart, none recreated, no fourth round.
    expected = ["partition", "pilot", "round-1", "update-1", "round-2", "update-2", "round-3", "update-3",
                "globals", "combine"]
    jobs = {job.metadata.name: job.metadata.uid for job in api.jobs(name)}
    assert sorted(jobs) == sorted(f"{name}-{s}" for s in expected)
    assert all(jobs[job] == uid for job, uid in before.items())
    creates = [e for e in operator_requests(cluster, operator.user, "create", "jobs")
               if e["objectRef"].get("name", "").startswith(f"{name}-") and e["responseStatus"]["code"] == 201]
    assert len(creates) == len(expected), [e["objectRef"]["name"] for e in creates]

    root = f"{bucket}/fits/{NAMESPACE}/{name}/{fit['metadata']['uid']}/"
    keys = s3_keys(root)
    assert all(any(k.endswith(f"rounds/{r}/state.json") for k in keys) for r in (0, 1, 2, 3)), keys
    assert not any("rounds/4/" in k for k in keys)
    cluster.kubectl("delete", "consensusfit", name, "-n", NAMESPACE, "--wait=true", "--timeout=120s")
    executor.fits.discard(name)


def test_bad_input_fails_the_shard_at_once_with_the_reason(cluster, operator, executor, bucket, s3_endpoint):
    """Shard 0's data gets a NaN after partitioning: its runner exits 3, the index fails without a
    retry (podFailurePolicy FailIndex), and the fit fails with the runner's reason in its status."""
    api, name = Api(cluster), "bad-input"

    def corrupt_shard_0(pod: dict) -> None:
        annotations = pod["metadata"].get("annotations") or {}
        command = pod["spec"]["containers"][0]["command"]
        if annotations.get(INDEX_ANNOTATION) != "0":
            return None
        root = command[command.index("--out") + 1]
        s3 = boto3.client("s3")
        for key in s3_keys(f"{root}partition/shard=0/"):
            bucket_name = root.removeprefix("s3://").split("/")[0]
            table = pq.read_table(pa.BufferReader(s3.get_object(Bucket=bucket_name, Key=key)["Body"].read()))
            y = table.column("y").to_numpy().copy()
            y[0] = float("nan")
            table = table.set_column(table.schema.get_field_index("y"), "y", pa.array(y))
            sink = pa.BufferOutputStream()
            pq.write_table(table, sink)
            s3.put_object(Bucket=bucket_name, Key=key, Body=sink.getvalue().to_pybytes())
        return None

    executor.hooks[name] = corrupt_shard_0
    executor.fits.add(name)
    apply(cluster, render_fit(name, bucket))
    fit = wait_phase(api, name, ("Succeeded", "Failed"), 600, operator)
    status = fit["status"]
    assert status["phase"] == "Failed", json.dumps(status, indent=1)
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert "shard 0" in failed["message"] and "BadInput" in failed["message"], failed
    assert "NaN" in failed["message"] or "nan" in failed["message"].lower(), failed
    runs = [r for r in executor.runs if r["fit"] == name and r["step"] == "sample" and r["index"] == "0"]
    assert [r["exit"] for r in runs] == [3], runs
    shard_0_pods = [p for p in api.pods(name, "sample")
                    if p.metadata.annotations.get(INDEX_ANNOTATION) == "0"]
    assert len(shard_0_pods) == 1  # maxRetriesPerShard is 2, yet no retry: bad input is final
    cluster.kubectl("delete", "consensusfit", name, "-n", NAMESPACE, "--wait=true", "--timeout=120s")
    executor.fits.discard(name)


STUCK_MODEL = b'''
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist


def model(g, y=None):
    """A finite log density whose gradient is NaN everywhere: no NUTS transition can move."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    numpyro.factor("stuck", jnp.sqrt(mu - mu))
    with numpyro.plate("rows", len(g)):
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)
'''


def test_a_shard_whose_chains_never_move_fails_the_fit_naming_shard_and_site(cluster, operator, executor, bucket):
    """Every transition divergent, every draw the same: the shard's runner exits 3 (a retry would
    draw the same), its strict-JSON reason reaches the status through the real API server, and no
    combination is attempted."""
    api, name = Api(cluster), "stuck-chains"
    bucket_name = bucket.removeprefix("s3://").split("/")[0]
    boto3.client("s3").put_object(Bucket=bucket_name, Key="models/stuck_model.py", Body=STUCK_MODEL)
    executor.fits.add(name)
    apply(cluster, render_fit(name, bucket, model={"python": {"uri": f"{bucket}/models/stuck_model.py",
                                                                "function": "model"}}))
    fit = wait_phase(api, name, ("Succeeded", "Failed"), 600, operator)
    status = fit["status"]
    assert status["phase"] == "Failed", json.dumps(status, indent=1)
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert "BadInput" in failed["message"] and "NUTS never moved any of the 1 chain(s) in site mu" in failed["message"]
    runs = [r for r in executor.runs if r["fit"] == name and r["step"] == "sample"]
    assert runs and all(r["exit"] == 3 for r in runs), runs
    assert not [r for r in executor.runs if r["fit"] == name and r["step"] in ("globals", "combine")]
    cluster.kubectl("delete", "consensusfit", name, "-n", NAMESPACE, "--wait=true", "--timeout=120s")
    executor.fits.discard(name)


INVALID = {
    "both model kinds": ({"model": {"formula": "y ~ 1", "python": {"uri": "s3://b/m.py", "function": "model"}}},
                         "spec.model needs exactly one of formula or python"),
    "zero shards": ({"shards": 0}, "should be greater than or equal to 1"),
    "neither model kind": ({"model": {"family": "gaussian"}}, "spec.model needs exactly one of formula or python"),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_resources_are_rejected_by_the_api_server(cluster, installation, bucket, case):
    spec, message = INVALID[case]
    result = apply(cluster, render_fit("invalid", bucket, **spec), check=False)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
    assert "is invalid" in result.stderr  # kubectl's readable form: The ConsensusFit "invalid" is invalid: ...


def test_a_changed_immutable_field_is_rejected(cluster, installation, bucket):
    api, name = Api(cluster), "immutable"
    apply(cluster, render_fit(name, bucket, suspend=True))
    for change, message in (({"shards": 3}, "spec.shards is immutable"),
                            ({"sampler": {"warmup": 61, "samples": 60, "chains": 1, "seed": 1}},
                             "spec.sampler is immutable"),
                            ({"data": {"uri": f"{bucket}/other/", "groupColumn": "g"}}, "spec.data is immutable"),
                            ({"output": {"uri": f"{bucket}/elsewhere/"}}, "spec.output is immutable")):
        result = apply(cluster, render_fit(name, bucket, suspend=True, **change), check=False)
        assert result.returncode != 0 and message in result.stderr, result.stderr
    # Changing a mutable field is fine.
    apply(cluster, render_fit(name, bucket, suspend=True, maxRetriesPerShard=1))
    assert api.fit(name)["spec"]["maxRetriesPerShard"] == 1
    cluster.kubectl("delete", "consensusfit", name, "-n", NAMESPACE, "--wait=true", "--timeout=120s")


def test_the_chart_lets_the_operator_own_its_jobs(installation):
    """The operator's Jobs carry an owner reference to the fit with blockOwnerDeletion (so that
    foreground deletion of a fit waits for them). Where the OwnerReferencesPermissionEnforcement
    admission plugin is on (OpenShift; this cluster), setting it needs `update` on the fit's
    `finalizers` subresource: without that rule every Job create is refused (403) and fits never
    start."""
    assert installation.can_update_finalizers, (
        "the chart's RBAC must grant `update` on consensusfits/finalizers: the API server refuses "
        "the operator's Jobs otherwise (cannot set blockOwnerDeletion if an ownerReference refers "
        "to a resource you can't set finalizers on)")


def test_users_with_the_built_in_edit_and_view_roles_can_use_fits(cluster, installation):
    """The chart's ClusterRoles aggregate into edit and view (the controller manager's
    clusterrole-aggregation controller fills them in): a user bound to edit may create and delete
    fits, one bound to view may only read them, and neither may write a fit's status."""
    resource = f"{PLURAL}.{GROUP}"
    bindings = {"alice": "edit", "bob": "view"}
    for user, role in bindings.items():
        cluster.kubectl("create", "rolebinding", f"{user}-{role}", f"--clusterrole={role}", f"--user={user}",
                        "-n", NAMESPACE)

    def can(user: str, verb: str, subresource: str = "") -> bool:
        args = ["auth", "can-i", verb, resource, "-n", NAMESPACE, f"--as={user}"]
        if subresource:
            args.append(f"--subresource={subresource}")
        return cluster.kubectl(*args, check=False).stdout.strip() == "yes"

    try:
        wait_for(lambda: can("alice", "create") and can("bob", "list"), 120,
                 "the built-in edit and view roles to aggregate the chart's")
        assert can("alice", "delete") and can("alice", "get", "status")
        assert not can("alice", "patch", "status")
        assert can("bob", "get") and not can("bob", "create") and not can("bob", "delete")
    finally:
        for user, role in bindings.items():
            cluster.kubectl("delete", "rolebinding", f"{user}-{role}", "-n", NAMESPACE, check=False)


def test_the_api_server_accepts_a_packed_sample_job_with_its_lanes_from_the_cpu_request(cluster, installation):
    """The Downward API field that tells a pod of several shards how many to sample at once
    (its CPU request, in whole cores) is one the API server accepts: server-side dry runs of a
    fit (for its defaults) and of its sample Job."""
    from consensusfit.operator import children

    def dry_run(manifest: dict) -> dict:
        created = cluster.kubectl("create", "--dry-run=server", "-n", NAMESPACE, "-o", "json", "-f", "-",
                                  input=json.dumps(manifest))
        return json.loads(created.stdout)

    fit = dry_run({
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "ConsensusFit", "metadata": {"name": "lanes"},
        "spec": {"data": {"uri": "s3://bucket/x/", "groupColumn": "g"}, "shards": 8,
                 "model": {"formula": "y ~ 1 + (1 | g)"}, "output": {"uri": "s3://bucket/fits/"},
                 "runner": {"shardsPerPod": 4, "resources": {"requests": {"cpu": "2", "memory": "1Gi"}}}},
    })
    fit["metadata"]["uid"] = "00000000-0000-0000-0000-000000000001"  # a dry run assigns none
    job = children.job_manifest(fit, "sample", {}, "runner:1")
    job["metadata"].pop("ownerReferences")  # the fit was not created: only the Job is checked
    env = dry_run(job)["spec"]["template"]["spec"]["containers"][0]["env"]
    lanes = next(e for e in env if e["name"] == "CONSENSUSFIT_CPU_LANES")
    assert lanes["valueFrom"]["resourceFieldRef"]["resource"] == "requests.cpu"


BLOCKED = {
    # The Priority admission plugin refuses the pod: the Job controller's FailedCreate event says why.
    "missing PriorityClass": ({"priorityClassName": "no-such-class"}, "FailedCreate",
                              "no PriorityClass with name no-such-class was found"),
    # The real scheduler finds no node: PodScheduled=False, reason Unschedulable.
    "no node fits": ({"nodeSelector": {"consensusfit.dev/no-such-node": "x"}}, "Unschedulable",
                     "didn't match Pod's node affinity/selector"),
}


@pytest.mark.parametrize("case", sorted(BLOCKED))
def test_a_fit_whose_pods_cannot_start_is_blocked_then_fails_with_the_reason(cluster, operator, bucket, case):
    """Nothing starts, yet the fit says why (the Blocked condition, a Warning event) and fails with
    that reason after the operator's grace period, instead of hanging in Partitioning."""
    runner, reason, message = BLOCKED[case]
    api, name = Api(cluster), "blocked-" + case.replace(" ", "-").lower()
    apply(cluster, render_fit(name, bucket, runner=runner))
    fit = wait_phase(api, name, ("Failed", "Succeeded"), 300, operator)
    conditions = {c["type"]: c for c in fit["status"]["conditions"]}
    assert conditions["Failed"]["reason"] == reason and message in conditions["Failed"]["message"], conditions
    assert conditions["Blocked"]["status"] == "True" and conditions["Blocked"]["reason"] == reason
    events = api.core.list_namespaced_event(NAMESPACE, field_selector=f"involvedObject.name={name}").items
    assert any(e.type == "Warning" and e.reason == reason and message in e.message for e in events), events
    cluster.kubectl("delete", "consensusfit", name, "-n", NAMESPACE, "--wait=true", "--timeout=120s")


def test_a_job_the_api_server_refuses_fails_the_fit_with_the_servers_message(cluster, operator, bucket):
    api, name = Api(cluster), "refused"
    apply(cluster, render_fit(name, bucket, runner={"labels": {"team": "not a label value!"}}))
    fit = wait_phase(api, name, ("Failed", "Succeeded"), 300, operator)
    failed = next(c for c in fit["status"]["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "JobRejected", failed
    assert f'Job.batch "{name}-partition" is invalid' in failed["message"], failed
    assert "metadata.labels: Invalid value" in failed["message"], failed
    assert not api.jobs(name)
    cluster.kubectl("delete", "consensusfit", name, "-n", NAMESPACE, "--wait=true", "--timeout=120s")


def test_a_fit_applied_again_after_an_orphaning_delete_does_not_adopt_the_old_jobs(cluster, operator, bucket):
    """`kubectl delete --cascade=orphan` of a Succeeded fit leaves its Jobs (the garbage collector
    removes their owner references). The same manifest applied again is a new fit (another uid): it
    must not report the old result, but say that the old Jobs are in its way, and not touch them."""
    from e2e_support import REBORN_FIT, scale_manifest

    api, name = Api(cluster), REBORN_FIT
    manifest = scale_manifest(name, 2, bucket)  # kwok completes its pods as the runner would
    manifest["spec"]["cleanupPolicy"] = {"onSuccess": "Keep"}  # the Jobs stay for the next fit to find
    manifest = json.dumps(manifest)
    apply(cluster, manifest)
    first = wait_succeeded(api, name, 300, operator)
    old_jobs = {job.metadata.name: job.metadata.uid for job in api.jobs(name)}
    cluster.kubectl("delete", "consensusfit", name, "-n", NAMESPACE, "--cascade=orphan", "--wait=true", "--timeout=120s")
    wait_for(lambda: all(not job.metadata.owner_references for job in api.jobs(name)), 120,
             "the garbage collector to orphan the old Jobs")

    apply(cluster, manifest)
    second = api.fit(name)
    assert second["metadata"]["uid"] != first["metadata"]["uid"]

    def blocked():
        fit = api.fit(name)
        assert (fit.get("status") or {}).get("phase") != "Succeeded", json.dumps(fit["status"])
        found = [c for c in (fit.get("status") or {}).get("conditions", []) if c["type"] == "Blocked"]
        return found[0] if found and found[0]["reason"] == "JobNameTaken" else None

    condition = wait_for(blocked, 120, "the new fit to be Blocked by the old Jobs")
    assert f"Job {name}-partition is owned by no one (orphaned)" in condition["message"]
    fit = api.fit(name)
    assert "result" not in fit["status"] and fit["status"]["phase"] != "Succeeded"
    events = api.core.list_namespaced_event(NAMESPACE, field_selector=f"involvedObject.uid={fit['metadata']['uid']}").items
    assert any(e.reason == "ForeignJob" for e in events), [(e.reason, e.message) for e in events]
    assert {job.metadata.name: job.metadata.uid for job in api.jobs(name)} == old_jobs
    cluster.kubectl("delete", "consensusfit", name, "-n", NAMESPACE, "--wait=true", "--timeout=120s")
    cluster.kubectl("delete", "jobs", "-n", NAMESPACE, "-l", f"{FIT_LABEL}={name}", "--wait=true", "--timeout=120s")


def condition_of(api: Api, name: str, kind: str) -> dict | None:
    return next((c for c in (api.fit(name).get("status") or {}).get("conditions", []) if c["type"] == kind), None)


def test_a_fit_whose_job_a_queue_holds_is_queued_then_admitted_and_succeeds(cluster, operator, executor, bucket):
    """The test plays Kueue: it suspends the partition Job of a fit whose Jobs name a LocalQueue (as
    Kueue's webhook does at creation, or Kueue when it takes an admission back), then releases it.
    Meanwhile the fit says Queued (not Blocked) and the operator leaves the Job suspended; once
    released it says Admitted and the fit succeeds."""
    api, name = Api(cluster), "queued"
    partition = f"{name}-partition"
    apply(cluster, render_fit(name, bucket, runner={"labels": {"kueue.x-k8s.io/queue-name": "gpus"}}))
    wait_for(lambda: any(job.metadata.name == partition for job in api.jobs(name)), 120, "the partition Job")
    api.batch.patch_namespaced_job(partition, NAMESPACE, {"spec": {"suspend": True}})

    def queued():
        found = condition_of(api, name, "Queued")
        return found if found and found["status"] == "True" else None

    held = wait_for(queued, 120, "the fit to say Queued")
    assert held["reason"] == "QueuedByKueue" and "LocalQueue gpus" in held["message"], held
    assert api.batch.read_namespaced_job(partition, NAMESPACE).spec.suspend is True  # not released behind the queue
    blocked = condition_of(api, name, "Blocked")
    assert blocked is None or blocked["status"] != "True", blocked

    api.batch.patch_namespaced_job(partition, NAMESPACE, {"spec": {"suspend": False}})
    admitted = wait_for(lambda: (c := condition_of(api, name, "Queued")) and c["status"] == "False" and c, 120,
                        "the fit to say Admitted")
    assert admitted["reason"] == "Admitted", admitted
    executor.fits.add(name)
    fit = wait_succeeded(api, name, 600, operator)
    assert fit["status"]["result"]["uri"] and condition_of(api, name, "Queued")["reason"] == "Admitted"
    events = api.core.list_namespaced_event(NAMESPACE, field_selector=f"involvedObject.name={name}").items
    assert {"QueuedByKueue", "Admitted"} <= {e.reason for e in events}
    cluster.kubectl("delete", "consensusfit", name, "-n", NAMESPACE, "--wait=true", "--timeout=120s")


def test_a_succeeded_fits_jobs_and_pods_are_deleted_and_its_status_keeps_the_result(cluster, operator, executor,
                                                                                     bucket):
    """spec.cleanupPolicy.onSuccess Delete (the default): once the fit succeeded the operator deletes
    its Jobs, and the controller manager's garbage collector their pods; the fit stays, its status
    (result, diagnostics, shard counts) as it was, and its results in the object store."""
    api, name = Api(cluster), "cleaned"
    executor.fits.add(name)
    apply(cluster, render_fit(name, bucket, cleanupPolicy={"onSuccess": "Delete"}))
    done = wait_succeeded(api, name, 600, operator)["status"]
    wait_for(lambda: not api.jobs(name) and not api.pods(name), 180, "the Jobs and their pods to be deleted")
    status = api.fit(name)["status"]
    assert status == done
    assert status["diagnostics"]["rhatMax"] > 0 and status["diagnostics"]["indexes"] == "0-1"
    assert status["shards"]["succeeded"] == 2 and set(status["result"]["parameters"]) >= {"mu", "tau", "sigma"}
    assert any(key.endswith("combined/summary.json") for key in s3_keys(status["result"]["uri"]))
    events = api.core.list_namespaced_event(NAMESPACE, field_selector=f"involvedObject.name={name}").items
    assert any(e.reason == "JobsDeleted" for e in events)
    cluster.kubectl("delete", "consensusfit", name, "-n", NAMESPACE, "--wait=true", "--timeout=120s")
