"""The chart's runner values per step (#17 items 1-2): what each step's pods get from the values and
a fit, rendered with the real helm and built by the operator's own Job builder."""

from __future__ import annotations

import json
import sys

import yaml
from platform_support import CHART, ROOT, container_env, helm, render

sys.path.insert(0, str(ROOT / "tests" / "operator"))
from cfit_support import PLATFORM_POD_SETTINGS  # noqa: E402

from consensusfit.operator import children
from consensusfit.operator.config import Config


def _fit(runner: dict | None = None) -> dict:
    spec = {"data": {"uri": "s3://b/d/"}, "shards": 2, "model": {"formula": "y ~ 1"},
            "combine": {"method": "ep", "maxRounds": 2}, "output": {"uri": "s3://b/f/"},
            "maxRetriesPerShard": 3, "runner": runner or {}}
    return {"metadata": {"name": "fit", "namespace": "team-a", "uid": "u"}, "spec": spec}


def _pods(config: Config, fit: dict) -> dict[str, dict]:
    """The pod spec of each step of the fit, as the operator with this configuration builds it."""
    return {step: children.job_manifest(fit, step, config.runner_defaults, config.runner_image)["spec"]["template"]
            for step in children.steps(fit)}


def test_only_the_steps_that_sample_get_a_gpu_and_partition_and_combine_more_memory():
    pods = _pods(Config.from_env(container_env(render())), _fit())
    for step, template in pods.items():
        pod = template["spec"]
        (container,) = pod["containers"]
        kind = children.parse_step(step)[0]
        gpu = kind in ("pilot", "round", "resample")
        assert ("nvidia.com/gpu" in container["resources"]["limits"]) == gpu, step
        assert ("tolerations" in pod) == gpu, step
        memory = container["resources"]["limits"]["memory"]
        assert memory == ("4Gi" if kind in ("update", "globals") else "16Gi"), step
    assert pods["round-1"]["spec"]["containers"][0]["resources"] == {
        "requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"memory": "16Gi", "nvidia.com/gpu": "1"}}


def test_a_steps_values_and_the_fits_settings_merge_in_order():
    config = Config.from_env(container_env(render(
        "runner.nodeSelector.pool=any", "runner.steps.combine.nodeSelector.pool=cpu",
        "runner.steps.combine.resources.limits.memory=64Gi", "runner.steps.sample.resources.limits.nvidia\\.com/gpu=2")))
    fit = _fit({"resources": {"requests": {"cpu": "3"}}, "steps": {"combine": {"resources": {"requests": {"memory": "32Gi"}}}}})
    pods = _pods(config, fit)
    combine = pods["combine"]["spec"]
    assert combine["nodeSelector"] == {"pool": "cpu"}
    assert combine["containers"][0]["resources"] == {"requests": {"cpu": "3", "memory": "32Gi"}, "limits": {"memory": "64Gi"}}
    assert pods["partition"]["spec"]["nodeSelector"] == {"pool": "any"}
    assert pods["round-2"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"





def test_the_platforms_pod_values_reach_every_steps_pods_and_a_fit_replaces_its_lists():
    args = ["template", "x", str(CHART)]
    for key, value in PLATFORM_POD_SETTINGS.items():
        args += ["--set-json", f"runner.{key}={json.dumps(value)}"]
    config = Config.from_env(container_env([doc for doc in yaml.safe_load_all(helm(*args).stdout) if doc]))
    for step, template in _pods(config, _fit()).items():
        pod = template["spec"]
        for key in ("imagePullSecrets", "affinity", "topologySpreadConstraints", "runtimeClassName", "schedulerName"):
            assert pod[key] == PLATFORM_POD_SETTINGS[key], (step, key)
        assert template["metadata"]["labels"]["cost-center"] == "lungs"
        assert template["metadata"]["annotations"] == PLATFORM_POD_SETTINGS["podAnnotations"]
        assert PLATFORM_POD_SETTINGS["volumes"][0] in pod["volumes"]
        assert PLATFORM_POD_SETTINGS["volumeMounts"][0] in pod["containers"][0]["volumeMounts"]
        assert pod["securityContext"]["fsGroup"] == 1000 and pod["securityContext"]["runAsNonRoot"] is True
    own = _fit({"imagePullSecrets": [{"name": "team-a-registry"}]})
    assert _pods(config, own)["partition"]["spec"]["imagePullSecrets"] == [{"name": "team-a-registry"}]
