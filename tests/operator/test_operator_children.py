"""Job manifests, labels and the reading of Jobs and pods, against the runner contract."""

from __future__ import annotations

import json

from cfit_support import PLATFORM_POD_SETTINGS, ep_fit, make_fit, shard_report

from consensusfit.operator import children, labels, planner
from consensusfit.operator.config import Config, Policy
from consensusfit.operator.observe import indexes, job_view, pod_view
from consensusfit.runner.spec import parse

BUILT_IN = Config().runner_defaults  # the operator's own runner defaults, without the chart


def _manifest(step: str, defaults: dict | None = None, **spec) -> dict:
    return children.job_manifest(make_fit(**spec), step, BUILT_IN if defaults is None else defaults,
                                 "runner:default")


def _pod(step: str, defaults: dict | None = None, **spec) -> dict:
    return _manifest(step, defaults, **spec)["spec"]["template"]["spec"]


def test_the_runner_gets_the_contract_command_and_accepts_the_spec():
    container = _manifest("sample")["spec"]["template"]["spec"]["containers"][0]
    command = container["command"]
    assert command[:3] == ["consensusfit-runner", "sample", "--spec"]
    assert command[4:] == ["--out", "s3://bucket/fits/default/fvc/uid-fvc/"]
    fit = parse(json.loads(command[3]))  # the runner's own parser takes it as it is
    assert (fit.name, fit.namespace, fit.shards) == ("fvc", "default", 3)
    assert "runner" not in fit.raw and "suspend" not in fit.raw
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert container["image"] == "runner:default"
    assert container["resources"] == {"limits": {"nvidia.com/gpu": "1"}}


def test_pods_run_restricted_with_a_writable_scratch_folder():
    pod = _manifest("combine")["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["securityContext"] == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    container = pod["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert container["volumeMounts"] == [{"name": "scratch", "mountPath": "/tmp"}]


def test_runner_settings_reach_the_pod_and_operator_defaults_fill_gaps():
    runner = {
        "image": "mine:1", "nodeSelector": {"gpu": "a100"}, "priorityClassName": "batch",
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "serviceAccountName": "runner", "envFrom": [{"secretRef": {"name": "s3"}}],
        "labels": {"kueue.x-k8s.io/queue-name": "gpus", "argocd.argoproj.io/instance": "no"},
        "resources": {"limits": {"nvidia.com/gpu": 1}},
    }
    defaults = {"env": [{"name": "AWS_ENDPOINT_URL", "value": "http://minio:9000"}],
                "resources": {"limits": {"memory": "16Gi"}}}
    manifest = _manifest("partition", defaults, runner=runner)
    pod = manifest["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"gpu": "a100"} and pod["priorityClassName"] == "batch"
    assert pod["serviceAccountName"] == "runner" and pod["tolerations"] == runner["tolerations"]
    container = pod["containers"][0]
    assert container["image"] == "mine:1"
    assert container["envFrom"] == [{"secretRef": {"name": "s3"}}]
    assert container["env"] == defaults["env"]
    assert container["resources"] == {"limits": {"memory": "16Gi", "nvidia.com/gpu": "1"}}
    job_labels = manifest["metadata"]["labels"]
    assert job_labels["kueue.x-k8s.io/queue-name"] == "gpus" and job_labels["team"] == "lungs"
    assert job_labels[labels.FIT] == "fvc" and job_labels[labels.STEP] == "partition"


def test_gitops_tracking_labels_are_never_copied():
    manifest = _manifest("sample", runner={"labels": {"kustomize.toolkit.fluxcd.io/name": "x",
                                                      "helm.toolkit.fluxcd.io/name": "y"}})
    everywhere = {**manifest["metadata"]["labels"], **manifest["spec"]["template"]["metadata"]["labels"]}
    assert not [key for key in everywhere if labels.is_tracking(key)]
    assert labels.is_tracking("app.kubernetes.io/instance") and not labels.is_tracking("app.kubernetes.io/name")


def test_partition_and_combine_jobs_fail_at_once_on_bad_input():
    for step in ("partition", "globals", "combine"):
        spec = _manifest(step, maxRetriesPerShard=5)["spec"]
        assert spec["backoffLimit"] == 5 and spec["completions"] == 1
        assert spec["podFailurePolicy"]["rules"][0]["action"] == "FailJob"
    assert children.job_name("fvc", "sample") == "fvc-shards"


def test_each_step_runs_its_runner_command():
    """docs/contract.md: `consensusfit-runner <command> --spec SPEC --out ROOT [options]`."""
    def command(step):
        return _manifest(step)["spec"]["template"]["spec"]["containers"][0]["command"]

    expected = {"partition": ["partition"], "sample": ["sample"], "globals": ["combine", "--stage", "globals"],
                "resample": ["resample"], "combine": ["combine", "--stage", "finish"]}
    for step, (subcommand, *options) in expected.items():
        line = command(step)
        assert line[:3] == ["consensusfit-runner", subcommand, "--spec"] and line[4] == "--out"
        assert line[6:] == options, step
    resample = _manifest("resample", maxRetriesPerShard=4)["spec"]
    assert resample["completionMode"] == "Indexed" and resample["completions"] == resample["parallelism"] == 3
    assert resample["backoffLimitPerIndex"] == 4 and resample["maxFailedIndexes"] == 0
    assert resample["podFailurePolicy"]["rules"][0]["action"] == "FailIndex"


def test_re_sampling_is_a_step_only_when_group_parameters_are_re_sampled():
    assert children.steps(make_fit()) == ("partition", "sample", "globals", "resample", "combine")  # consensus
    keep = make_fit(combine={"method": "swiss", "groupParameters": "keep"})
    assert children.steps(keep) == ("partition", "sample", "globals", "combine")


def test_job_names_fit_the_63_character_limit_for_the_longest_fit_name():
    longest = "f" * 53  # the CRD's limit on fit names
    assert max(len(children.job_name(longest, step)) for step in children.STEPS) == 63


def test_job_and_pod_views_read_what_kubernetes_writes():
    job = {"metadata": {"name": "fvc-shards", "labels": {labels.STEP: "sample"},
                        "creationTimestamp": "2026-01-01T00:00:00Z",
                        "annotations": {labels.SUSPENDED_BY_FIT: "true"}},
           "spec": {"suspend": True},
           "status": {"active": 2, "succeeded": 5, "completedIndexes": "0,2,5-7", "failedIndexes": "1,3-4",
                      "conditions": [{"type": "Failed", "status": "True", "reason": "FailedIndexes",
                                      "message": "indexes failed"}]}}
    view = job_view(job)
    assert (view.step, view.outcome, view.reason) == ("sample", "Failed", "FailedIndexes")
    assert view.failed_indexes == (1, 3, 4) and view.completed_indexes == (0, 2, 5, 6, 7)
    assert view.suspended and view.suspended_by_fit and (view.active, view.succeeded) == (2, 5)
    pod = {"metadata": {"name": "p", "uid": "u", "labels": {labels.STEP: "sample"},
                        "annotations": {"batch.kubernetes.io/job-completion-index": "7"},
                        "creationTimestamp": "2026-01-01T00:00:01Z"},
           "status": {"phase": "Succeeded",
                      "conditions": [{"type": "DisruptionTarget", "status": "False"}],
                      "containerStatuses": [{"name": "runner", "state": {"terminated": {
                          "exitCode": 0, "startedAt": "2026-01-01T00:00:05Z",
                          "finishedAt": "2026-01-01T00:01:05Z", "message": json.dumps(shard_report(7))}}}]}}
    view = pod_view(pod)
    assert (view.index, view.exit_code, view.disrupted, view.done) == (7, 0, False, True)
    assert view.report["shard"] == 7 and (view.finished - view.started).total_seconds() == 60
    assert indexes("") == () and len(indexes("0-9,20")) == 11


def test_shards_per_pod_packs_consecutive_shards_into_fewer_sample_pods():
    fit = make_fit(shards=10, runner={"shardsPerPod": 4})
    sample = children.job_manifest(fit, "sample", {}, "runner:1")
    assert sample["spec"]["completions"] == sample["spec"]["parallelism"] == 3  # 4 + 4 + 2 shards
    command = sample["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[command.index("--shards-per-pod") + 1] == "4"
    resample = children.job_manifest(fit, "resample", {}, "runner:1")
    assert resample["spec"]["completions"] == 10  # re-sampling stays one pod per shard
    assert "--shards-per-pod" not in resample["spec"]["template"]["spec"]["containers"][0]["command"]


def test_the_compilation_cache_volume_reaches_the_sampling_pods_only():
    cache = {"persistentVolumeClaim": {"claimName": "jax-cache"}}
    fit = make_fit(runner={"compilationCache": cache})
    for step in children.STEPS:
        pod = children.job_manifest(fit, step, {}, "runner:1")["spec"]["template"]["spec"]
        container = pod["containers"][0]
        mounted = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        env = {e["name"]: e.get("value") for e in container["env"]}
        if step in ("sample", "resample"):
            assert {"name": "compilation-cache", **cache} in pod["volumes"]
            assert env["CONSENSUSFIT_COMPILATION_CACHE"] == mounted["compilation-cache"]
        else:
            assert "compilation-cache" not in mounted and "CONSENSUSFIT_COMPILATION_CACHE" not in env


def test_a_packed_sample_pod_samples_as_many_shards_at_once_as_it_requests_cores():
    resources = {"requests": {"cpu": "1500m"}, "limits": {"memory": "4Gi"}}
    fit = make_fit(shards=10, runner={"shardsPerPod": 4, "resources": resources})
    lanes = {"name": "CONSENSUSFIT_CPU_LANES", "valueFrom": {"resourceFieldRef": {
        "containerName": "runner", "resource": "requests.cpu", "divisor": "1"}}}
    for step in children.STEPS:
        container = children.job_manifest(fit, step, {}, "runner:1")["spec"]["template"]["spec"]["containers"][0]
        assert container["name"] == "runner"
        assert (lanes in container["env"]) == (step == "sample")
    # one shard a pod, no CPU request, or the user's own setting: left alone
    for runner in ({"shardsPerPod": 1, "resources": resources}, {"shardsPerPod": 4},
                   {"shardsPerPod": 4, "resources": resources,
                    "env": [{"name": "CONSENSUSFIT_CPU_LANES", "value": "3"}]}):
        env = children.job_manifest(make_fit(shards=10, runner=runner), "sample", {}, "runner:1")[
            "spec"]["template"]["spec"]["containers"][0]["env"]
        assert lanes not in env


# --- per-step pod settings, the platform's pod fields, shard parallelism (#17 items 1-3) -------

def test_a_steps_settings_merge_general_to_specific_the_operators_before_the_fits():
    defaults = {"resources": {"requests": {"cpu": "1", "memory": "1Gi"}},
                "nodeSelector": {"pool": "any"},
                "steps": {"combine": {"resources": {"requests": {"memory": "8Gi"}}, "nodeSelector": {"pool": "cpu"}},
                          "sample": {"resources": {"limits": {"nvidia.com/gpu": 1}}}}}
    runner = {"resources": {"requests": {"cpu": "2"}},
              "steps": {"combine": {"resources": {"requests": {"memory": "32Gi"}}},
                        "sample": {"nodeSelector": {"pool": "a100"}}}}
    fit = make_fit(runner=runner)
    combine = children.runner_settings(fit, defaults, "combine")
    assert combine["resources"] == {"requests": {"cpu": "2", "memory": "32Gi"}}  # fit's step > fit > chart's step
    assert combine["nodeSelector"] == {"pool": "cpu"} and "steps" not in combine
    partition = children.runner_settings(fit, defaults, "partition")
    assert partition["resources"] == {"requests": {"cpu": "2", "memory": "1Gi"}}
    assert partition["nodeSelector"] == {"pool": "any"}
    for step in ("sample", "round-3"):  # an EP round is set as sample is
        settings = children.runner_settings(fit, defaults, step)
        assert settings["resources"]["limits"] == {"nvidia.com/gpu": 1} and settings["nodeSelector"] == {"pool": "a100"}
    assert "limits" not in children.runner_settings(fit, defaults, "update")["resources"]


def test_only_the_steps_that_sample_ask_for_a_gpu_by_default():
    sampling = {"pilot", "sample", "round", "resample"}
    for fit in (make_fit(), ep_fit(max_rounds=2)):
        for step in children.steps(fit):
            pod = children.job_manifest(fit, step, BUILT_IN, "runner:1")["spec"]["template"]["spec"]
            limits = pod["containers"][0]["resources"].get("limits", {})
            gpu = children.parse_step(step)[0] in sampling
            assert (limits.get("nvidia.com/gpu") == "1") == gpu, step
            assert ("tolerations" in pod) == gpu, step
    # a fit's own settings for a step, e.g. sampling on CPUs
    cpu = make_fit(runner={"steps": {"sample": {"resources": {"limits": {"nvidia.com/gpu": 0}}}}})
    assert _pod("sample", runner=cpu["spec"]["runner"])["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "0"}





def test_every_pod_field_a_platform_needs_lands_on_every_steps_pod():
    fit = ep_fit(max_rounds=1, runner=PLATFORM_POD_SETTINGS)
    for step in children.steps(fit):
        template = children.job_manifest(fit, step, BUILT_IN, "runner:1")["spec"]["template"]
        pod, (container,) = template["spec"], template["spec"]["containers"]
        for key in ("imagePullSecrets", "affinity", "topologySpreadConstraints", "runtimeClassName", "schedulerName"):
            assert pod[key] == PLATFORM_POD_SETTINGS[key], (step, key)
        assert template["metadata"]["labels"]["cost-center"] == "lungs"
        assert template["metadata"]["annotations"] == {"sidecar.istio.io/inject": "false"}
        assert pod["volumes"] == [{"name": "scratch", "emptyDir": {}}, *PLATFORM_POD_SETTINGS["volumes"]]
        assert container["volumeMounts"] == [{"name": "scratch", "mountPath": "/tmp"}, *PLATFORM_POD_SETTINGS["volumeMounts"]]
        assert pod["securityContext"] == {**PLATFORM_POD_SETTINGS["podSecurityContext"], "runAsNonRoot": True,
                                          "seccompProfile": {"type": "RuntimeDefault"}}
    assert "annotations" not in _manifest("partition")["spec"]["template"]["metadata"]


def test_the_operators_own_labels_and_security_context_cannot_be_overridden():
    runner = {"podLabels": {labels.FIT: "other", labels.STEP: "combine", "app.kubernetes.io/managed-by": "me",
                            "argocd.argoproj.io/instance": "app"},
              "podAnnotations": {"argocd.argoproj.io/tracking-id": "app:batch/Job:x"},
              "podSecurityContext": {"runAsNonRoot": False, "runAsUser": 0, "seccompProfile": {"type": "Unconfined"},
                                     "fsGroup": 1000}}
    template = _manifest("sample", runner=runner)["spec"]["template"]
    assert template["metadata"]["labels"] == labels.own("fvc", "sample")
    assert "annotations" not in template["metadata"]
    assert template["spec"]["securityContext"] == {"fsGroup": 1000, "runAsNonRoot": True,
                                                   "seccompProfile": {"type": "RuntimeDefault"}}


ADMIN = Config(runner_image="runner:test", policy=Policy())


def _refusal(step: str, config: Config = ADMIN, **runner):
    failure = planner.step_admission(make_fit(runner=runner), config, step)
    return failure and (failure.reason, failure.message)


def test_a_volume_named_as_the_operators_own_or_on_the_node_is_refused_for_its_step():
    reason, message = _refusal("combine", volumes=[{"name": "scratch", "emptyDir": {}}])
    assert reason == "VolumeNotAllowed"
    assert message == ("combine: spec.runner.volumes may not be named scratch: the operator's own volumes are "
                       "scratch, compilation-cache")
    host = {"steps": {"partition": {"volumes": [{"name": "node", "hostPath": {"path": "/"}}]}}}
    reason, message = _refusal("partition", **host)
    assert reason == "VolumeNotAllowed" and message.startswith("partition: spec.runner.volumes[node] may not be a hostPath volume")
    assert _refusal("combine", **host) is None  # another step's volume is that step's business
    anything = Config(runner_image="runner:test", policy=Policy(volume_types=("hostPath", "configMap")))
    assert _refusal("partition", anything, **host)[0] == "VolumeNotAllowed"  # never, whatever the policy says
    assert _refusal("sample", volumes=PLATFORM_POD_SETTINGS["volumes"]) is None
    assert "nfs volume: only" in _refusal("sample", compilationCache={"nfs": {"server": "x", "path": "/"}})[1]


def test_shard_jobs_run_at_most_parallelism_pods_and_let_kueue_admit_fewer():
    fit = make_fit(shards=10, runner={"parallelism": 4, "shardsPerPod": 2})
    for step, completions in (("sample", 5), ("resample", 10)):
        job = children.job_manifest(fit, step, BUILT_IN, "runner:1")
        assert (job["spec"]["completions"], job["spec"]["parallelism"]) == (completions, 4)
        assert job["metadata"]["annotations"] == {"kueue.x-k8s.io/job-min-parallelism": "1"}
    wide = children.job_manifest(make_fit(shards=3, runner={"parallelism": 8}), "sample", BUILT_IN, "runner:1")
    assert wide["spec"]["parallelism"] == wide["spec"]["completions"] == 3
    assert wide["metadata"]["annotations"] == {"kueue.x-k8s.io/job-min-parallelism": "1"}
    # one pod at once: nothing for Kueue to lower (it refuses a minimum that is not below parallelism)
    for job in (children.job_manifest(make_fit(shards=1), "sample", BUILT_IN, "runner:1"),
                children.job_manifest(make_fit(shards=4, runner={"parallelism": 1}), "sample", BUILT_IN, "runner:1"),
                _manifest("partition"), _manifest("combine")):
        assert job["spec"]["parallelism"] == 1 and "annotations" not in job["metadata"]
