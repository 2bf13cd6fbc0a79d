"""Runner pods on a real control plane (#17 items 1-3): the API server takes the CRD's per-step
settings and the Jobs built with every pod field a platform needs; the real scheduler puts a
partition pod without a GPU on a CPU-only node and the shard pods on GPU nodes, as the chart's
per-step defaults ask.

The Jobs here are built by the operator's own builder with the installed chart's environment and
created directly, in namespaces of their own, so that neither the operator nor the executor acts
on them.
"""

from __future__ import annotations

import json
import sys

import pytest
from e2e_support import GROUP, NAMESPACE, ROOT, VERSION, clusterlib, wait_for

sys.path.insert(0, str(ROOT / "tests" / "operator"))
from cfit_support import PLATFORM_POD_SETTINGS  # noqa: E402

from consensusfit.operator import children, labels
from consensusfit.operator.config import Config

pytestmark = pytest.mark.timeout(600)

SPEC = {"data": {"uri": "s3://bucket/x/", "groupColumn": "g"}, "shards": 4,
        "model": {"formula": "y ~ 1 + (1 | g)"}, "output": {"uri": "s3://bucket/fits/"}}
# Every pod field a platform needs, at spec.runner and for one step.
PLATFORM = {
    **PLATFORM_POD_SETTINGS,
    "runtimeClassName": "e2e-runtime",  # ones this control plane has
    "schedulerName": "default-scheduler",
    "parallelism": 2,
    "steps": {"combine": {"resources": {"requests": {"memory": "1Gi"}}, "nodeSelector": {"pool": "cpu"}}},
}


def _dry_run(cluster, manifest: dict, namespace: str = NAMESPACE, check: bool = True):
    result = cluster.kubectl("create", "--dry-run=server", "-n", namespace, "-o", "json", "-f", "-",
                             input=json.dumps(manifest), check=check)
    return json.loads(result.stdout) if result.returncode == 0 else result


def _fit(name: str, runner: dict) -> dict:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ConsensusFit", "metadata": {"name": name},
            "spec": {**SPEC, "runner": runner}}


def _stored(fit: dict) -> dict:
    """A dry-run fit as the API server would store it, given the uid a dry run does not assign."""
    fit["metadata"]["uid"] = "00000000-0000-0000-0000-000000000017"
    return fit


def test_the_crd_takes_per_step_settings_and_rejects_an_unknown_step(cluster, installation):
    fit = _dry_run(cluster, _fit("steps", PLATFORM))
    assert fit["spec"]["runner"] == {**PLATFORM, "shardsPerPod": 1}  # nothing pruned
    unknown = _dry_run(cluster, _fit("steps", {"steps": {"training": {"nodeSelector": {"pool": "gpu"}}}}), check=False)
    assert unknown.returncode != 0 and 'unknown field "spec.runner.steps.training"' in unknown.stderr, unknown.stderr
    for runner, message in (({"parallelism": 0}, "spec.runner.parallelism: Invalid value: 0"),
                            ({"steps": {"sample": {"resources": "lots"}}}, "spec.runner.steps.sample.resources")):
        refused = _dry_run(cluster, _fit("steps", runner), check=False)
        assert refused.returncode != 0 and message in refused.stderr, refused.stderr


def test_the_api_server_accepts_every_steps_job_and_pod_with_every_pod_field(cluster, installation):
    """Server-side dry runs of each kind of step's Job, and of its pod in the namespace that enforces
    the restricted Pod Security Standard (fsGroup, supplementalGroups and a configMap volume pass)."""
    config = Config.from_env(installation.env)
    cluster.kubectl("apply", "-f", "-", input=json.dumps({
        "apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass", "metadata": {"name": "e2e-runtime"},
        "handler": "e2e"}))
    fit = _stored(_dry_run(cluster, _fit("platform", PLATFORM)))
    for step in ("partition", "pilot", "round-1", "update-1", "globals", "resample", "combine"):
        job = children.job_manifest(fit, step, config.runner_defaults, config.runner_image)
        job["metadata"].pop("ownerReferences")  # the fit was not created: only the Job is checked
        created = _dry_run(cluster, job)
        template = created["spec"]["template"]
        for key in ("imagePullSecrets", "affinity", "topologySpreadConstraints", "runtimeClassName", "schedulerName"):
            assert template["spec"][key] == PLATFORM[key], (step, key)
        assert template["spec"]["securityContext"]["fsGroup"] == 1000
        assert template["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"
        if children.is_per_shard(step):
            assert created["spec"]["parallelism"] == 2 and created["spec"]["completions"] == 4
            assert created["metadata"]["annotations"] == {children.KUEUE_MIN_PARALLELISM: "1"}
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"platform-{step}", **template["metadata"]},
               "spec": template["spec"]}
        admitted = _dry_run(cluster, pod, check=False)
        assert isinstance(admitted, dict), f"{step}: {admitted.stderr}"
    combine = children.job_manifest(fit, "combine", config.runner_defaults, config.runner_image)
    assert combine["spec"]["template"]["spec"]["nodeSelector"] == {"pool": "cpu"}


POOL = "consensusfit.dev/e2e-pool"
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}


def test_the_scheduler_puts_partition_on_a_cpu_node_and_the_shards_on_gpu_nodes(cluster, installation):
    """With the chart's per-step defaults, on a CPU-only node and a GPU node with the usual GPU taint
    (both in a pool of their own, which the fit selects): the partition pod asks for no GPU and does
    not tolerate the taint, so it can only land on the CPU node; the shard pods ask for a GPU."""
    namespace = "e2e-scheduling"
    cluster.kubectl("create", "namespace", namespace)
    cluster.add_nodes([
        clusterlib.kwok_node("cpu-only-0", cpu=64, memory_gi=256, pods=32, labels={POOL: "scheduling"}),
        clusterlib.kwok_node("gpu-tainted-0", cpu=64, memory_gi=256, pods=32, gpus=8, labels={POOL: "scheduling"},
                             taints=(GPU_TAINT,)),
    ])
    try:
        config = Config.from_env(installation.env)
        # The namespace's own ServiceAccount: the chart's runner ServiceAccount is in the watched namespace only.
        fit = _fit("placed", {"nodeSelector": {POOL: "scheduling"}, "serviceAccountName": "default"})
        fit["metadata"]["namespace"] = namespace
        fit = _stored(_dry_run(cluster, fit, namespace))
        for step in ("partition", "sample"):
            job = children.job_manifest(fit, step, config.runner_defaults, config.runner_image)
            job["metadata"].pop("ownerReferences")
            cluster.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(job))

        def placed() -> dict[str, set[str]] | None:
            pods = json.loads(cluster.kubectl("get", "pods", "-n", namespace, "-o", "json").stdout)["items"]
            nodes: dict[str, set[str]] = {}
            for pod in pods:
                nodes.setdefault(pod["metadata"]["labels"][labels.STEP], set()).add(pod["spec"].get("nodeName"))
            done = len(pods) == 1 + SPEC["shards"] and all(pod["spec"].get("nodeName") for pod in pods)
            return nodes if done else None

        nodes = wait_for(placed, 120, "the partition and shard pods scheduled")
        assert nodes == {"partition": {"cpu-only-0"}, "sample": {"gpu-tainted-0"}}
    finally:
        cluster.kubectl("delete", "namespace", namespace, "--wait=false")
        cluster.kubectl("delete", "node", "cpu-only-0", "gpu-tainted-0", "--wait=false", check=False)
