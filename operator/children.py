"""The Jobs of a fit: names, commands and pod templates, built from the fit alone (pure).

Steps, in order, each one Job: partition, sample (Indexed, one pod per shard), globals (`combine
--stage globals`), resample (Indexed, one pod per shard; only with `groupParameters: resample`)
and combine (`combine --stage finish`). Re-sampling is a Job of its own so that its per-shard NUTS
runs in parallel, like sampling, rather than in the one combine pod.

An EP fit (`spec.combine.method: ep` with more than one shard) samples in rounds instead of once:
pilot, then for r = 1, 2, ... `round-<r>` (Indexed, shaped as sample: `sample --round r`) and
`update-<r>` (`update --round r`), up to spec.combine.maxRounds; the planner stops after the update
that says `final`. A round's step is its Job's suffix and label (`round-3`, `update-3`).

Pod settings are per step (`runner_settings`): the operator's defaults, then their `steps.<step>`,
then the fit's spec.runner, then its `spec.runner.steps.<step>`, so that only the steps that sample
ask for a GPU and partition or combine may ask for more memory on a CPU node. The per-shard Jobs run
at most spec.runner.parallelism pods at once and let Kueue admit fewer than that (partial admission).

Names are deterministic (`<fit>-partition`, `<fit>-shards`, `<fit>-pilot`, `<fit>-round-<r>`,
`<fit>-update-<r>`, `<fit>-globals`, `<fit>-resample`, `<fit>-combine`) so that creating a Job
twice, after a restart or from a stale view, is a harmless conflict and never a duplicate. No
suffix is longer than `-partition` (`-update-99`: the CRD caps maxRounds at 99), which the CRD's
53-character limit on fit names allows for.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from consensusfit.runner import contract
from consensusfit.runner.contract import (
    COMPILATION_CACHE,
    COMPILATION_CACHE_MOUNT,
    CPU_LANES,
    NO_RETRY_EXIT_CODES,
    RUNNER_CONTAINER,
    TERMINATION_LOG,
    deep_merge,
)

from . import labels
from .observe import DISRUPTION_TARGET

GROUP, VERSION, KIND = "consensusfit.dev", "v1alpha1", "ConsensusFit"
# The steps in order: the value of the label `consensusfit.dev/step` on their Jobs and pods.
PARTITION, SAMPLE, GLOBALS, RESAMPLE, COMBINE = "partition", "sample", "globals", "resample", "combine"
STEPS = (PARTITION, SAMPLE, GLOBALS, RESAMPLE, COMBINE)
# EP: the pilot, and the two kinds of step every round has (`round-<r>`, `update-<r>`).
PILOT, ROUND, UPDATE = "pilot", "round", "update"
_SUFFIX = {PARTITION: "partition", SAMPLE: "shards", GLOBALS: "globals", RESAMPLE: "resample", COMBINE: "combine"}
# The runner command of each kind of step (docs/contract.md), before `--spec` and `--out`, and after them.
_COMMAND = {
    PARTITION: (contract.PARTITION, ()),
    SAMPLE: (contract.SAMPLE, ()),
    PILOT: (contract.PILOT, ()),
    ROUND: (contract.SAMPLE, ()),  # + --round r
    UPDATE: (contract.UPDATE, ()),  # + --round r
    GLOBALS: (contract.COMBINE, ("--stage", contract.GLOBALS_STAGE)),
    RESAMPLE: (contract.RESAMPLE, ()),
    COMBINE: (contract.COMBINE, ("--stage", contract.FINISH_STAGE)),
}
# Kinds of step with one pod per shard (Indexed Jobs; the runner takes the shard from the completion
# index), and those that sample shards (they pack spec.runner.shardsPerPod shards into a pod).
_PER_SHARD = tuple(kind for kind, (command, _) in _COMMAND.items() if command in contract.PER_SHARD_COMMANDS)
_SAMPLING = (SAMPLE, ROUND)
# The keys of spec.runner.steps (and of the operator's runner defaults' `steps`): every kind of step,
# an EP round's sampling under `sample`, which it is shaped as.
SETTINGS_STEPS = (PARTITION, PILOT, SAMPLE, UPDATE, GLOBALS, RESAMPLE, COMBINE)
# The steps whose pods sample with NUTS: the ones that ask for a GPU by default.
GPU_STEPS = (PILOT, SAMPLE, RESAMPLE)
# The parts of the spec the runner reads; pod settings and suspension are not its business.
_RUNNER_SPEC_FIELDS = ("data", "shards", "model", "sampler", "combine", "output")
# The one writable folder of a runner pod (an emptyDir): its root filesystem is read-only, and the
# runner image points HOME, TMPDIR and XDG_CACHE_HOME here.
_SCRATCH_VOLUME, _SCRATCH = "scratch", "/tmp"
# The volume `spec.runner.compilationCache` (shared by the per-shard pods), mounted at COMPILATION_CACHE_MOUNT.
_CACHE_VOLUME = "compilation-cache"
# The names of the operator's own volumes: spec.runner.volumes may not take them.
RESERVED_VOLUMES = (_SCRATCH_VOLUME, _CACHE_VOLUME)
# What spec.runner.podSecurityContext may set; runAsNonRoot and the seccomp profile stay the operator's
# (the restricted Pod Security Standard). fsGroup lets a non-root runner write a root-owned volume.
POD_SECURITY_FIELDS = ("fsGroup", "fsGroupChangePolicy", "supplementalGroups")
# Pod spec fields copied from the step's settings as they are.
_POD_FIELDS = ("nodeSelector", "tolerations", "affinity", "topologySpreadConstraints", "priorityClassName",
               "serviceAccountName", "imagePullSecrets", "runtimeClassName", "schedulerName")
# Kueue's partial admission: the fewest pods of an Indexed Job it may admit at once (it lowers the
# Job's parallelism, never its completions). Kueue requires a value below the Job's parallelism.
KUEUE_MIN_PARALLELISM = "kueue.x-k8s.io/job-min-parallelism"


def round_step(kind: str, number: int) -> str:
    """The step of round `number` of `kind` (ROUND or UPDATE): `round-3`, `update-3`."""
    return f"{kind}-{number}"


def parse_step(step: str) -> tuple[str, int | None]:
    """A step's kind and round: ("round", 3) for `round-3`; (step, None) for a step without rounds."""
    kind, _, number = step.rpartition("-")
    return (kind, int(number)) if kind in (ROUND, UPDATE) and number.isdigit() else (step, None)


def is_per_shard(step: str) -> bool:
    return parse_step(step)[0] in _PER_SHARD


def samples_shards(step: str) -> bool:
    """Whether the step samples the shards' posteriors: sample, or an EP round."""
    return parse_step(step)[0] in _SAMPLING


def settings_step(step: str) -> str:
    """The key of spec.runner.steps that sets a step's pods: its kind; `sample` for an EP round."""
    kind = parse_step(step)[0]
    return SAMPLE if kind == ROUND else kind


def job_name(fit_name: str, step: str) -> str:
    return f"{fit_name}-{_SUFFIX.get(step, step)}"


def uses_rounds(fit: Mapping[str, Any]) -> bool:
    """EP samples in rounds; with one shard it is one-shot (the shard's posterior is the answer)."""
    spec = fit["spec"]
    return spec.get("combine", {}).get("method", contract.EP) == contract.EP and spec["shards"] > 1


def max_rounds(fit: Mapping[str, Any]) -> int:
    """spec.combine.maxRounds (the CRD's default fills it in)."""
    return int(fit["spec"].get("combine", {}).get("maxRounds", 8))


def steps(fit: Mapping[str, Any]) -> tuple[str, ...]:
    """The fit's steps in order: with `groupParameters: keep` there is nothing to re-sample; an EP
    fit has, instead of sample, the pilot and every round it may need (the planner stops early)."""
    keep = fit["spec"].get("combine", {}).get("groupParameters") == "keep"
    sampling: tuple[str, ...] = (SAMPLE,)
    if uses_rounds(fit):
        rounds = range(1, max_rounds(fit) + 1)
        sampling = (PILOT, *(round_step(kind, r) for r in rounds for kind in (ROUND, UPDATE)))
    order = (PARTITION, *sampling, *STEPS[STEPS.index(SAMPLE) + 1 :])
    return tuple(step for step in order if not (keep and step == RESAMPLE))


def shards_per_pod(fit: Mapping[str, Any]) -> int:
    """How many shards one sample pod takes (`spec.runner.shardsPerPod`, default 1)."""
    return int(fit["spec"].get("runner", {}).get("shardsPerPod", 1))


def pods(fit: Mapping[str, Any], step: str) -> int:
    """Pods (completion indexes) of a per-shard step: sampling packs shardsPerPod shards per pod."""
    per_pod = shards_per_pod(fit) if samples_shards(step) else 1
    return -(-fit["spec"]["shards"] // per_pod)


def result_root(fit: Mapping[str, Any]) -> str:
    """`<spec.output.uri>/<namespace>/<name>/<uid>/`: one fit's results, never shared."""
    metadata = fit["metadata"]
    base = fit["spec"]["output"]["uri"].rstrip("/")
    return f"{base}/{metadata['namespace']}/{metadata['name']}/{metadata['uid']}/"


def runner_spec_json(fit: Mapping[str, Any]) -> str:
    """The literal JSON the runner gets as `--spec`: the fit's identity and the answer-changing spec."""
    metadata, spec = fit["metadata"], fit["spec"]
    document = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": metadata["name"], "namespace": metadata["namespace"]},
        "spec": {key: spec[key] for key in _RUNNER_SPEC_FIELDS if key in spec},
    }
    return json.dumps(document, sort_keys=True, separators=(",", ":"))


def owner_reference(fit: Mapping[str, Any]) -> dict[str, Any]:
    """Makes the fit the Jobs' controller: deleting the fit deletes its Jobs (and their pods)."""
    metadata = fit["metadata"]
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "name": metadata["name"],
        "uid": metadata["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _quantities(resources: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, str]]:
    """Quantities as strings, the Job API's type (the CRD also allows `nvidia.com/gpu: 1`)."""
    return {kind: {name: str(value) for name, value in amounts.items()} for kind, amounts in resources.items()}


def _compilation_cache(step: str, runner: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The volume of `spec.runner.compilationCache`, for the per-shard steps (they compile NUTS)."""
    return runner.get("compilationCache") if is_per_shard(step) else None


def _container(fit: Mapping[str, Any], step: str, runner: Mapping[str, Any], image: str) -> dict:
    kind, number = parse_step(step)
    subcommand, options = _COMMAND[kind]
    if number is not None:
        options = (*options, "--round", str(number))
    packed = samples_shards(step) and shards_per_pod(fit) > 1
    if packed:
        options = (*options, "--shards-per-pod", str(shards_per_pod(fit)))
    command = [
        "consensusfit-runner", subcommand, "--spec", runner_spec_json(fit), "--out", result_root(fit), *options,
    ]
    env, mounts = list(runner.get("env", [])), [{"name": _SCRATCH_VOLUME, "mountPath": _SCRATCH}]
    requests_cpu = "cpu" in runner.get("resources", {}).get("requests", {})
    if packed and requests_cpu and not any(e.get("name") == CPU_LANES for e in env):
        # A pod of several shards samples one per core on a CPU; the cores it may use are its CPU
        # request (rounded up), which, unlike a limit, the runner cannot see in its cgroup.
        field = {"containerName": RUNNER_CONTAINER, "resource": "requests.cpu", "divisor": "1"}
        env.append({"name": CPU_LANES, "valueFrom": {"resourceFieldRef": field}})
    if _compilation_cache(step, runner):
        env.append({"name": COMPILATION_CACHE, "value": COMPILATION_CACHE_MOUNT})
        mounts.append({"name": _CACHE_VOLUME, "mountPath": COMPILATION_CACHE_MOUNT})
    mounts.extend(runner.get("volumeMounts", []))
    container = {
        "name": RUNNER_CONTAINER,
        "image": runner.get("image") or image,
        "command": command,
        "env": env,
        "resources": _quantities(runner.get("resources", {})),
        "volumeMounts": mounts,
        # The runner writes its JSON report here; if it dies first, the log tail stands in.
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    if runner.get("envFrom"):
        container["envFrom"] = runner["envFrom"]
    return container


def runner_settings(fit: Mapping[str, Any], runner_defaults: Mapping[str, Any], step: str) -> dict[str, Any]:
    """A step's pod settings, general to specific and the operator's before the fit's: the
    operator-wide defaults, their `steps.<step>`, the fit's spec.runner, its spec.runner.steps.<step>
    (deep_merge: mappings merge, lists and scalars are replaced)."""
    settings: dict[str, Any] = {}
    for layer in (runner_defaults, fit["spec"].get("runner", {})):
        general = {key: value for key, value in layer.items() if key != "steps"}
        settings = deep_merge(deep_merge(settings, general), layer.get("steps", {}).get(settings_step(step), {}))
    return settings


def volume_refusal(runner: Mapping[str, Any], allowed: Sequence[str]) -> str | None:
    """Why a step's volumes (spec.runner.compilationCache and spec.runner.volumes) cannot be its
    pod's: a name the operator's own volumes take, or a volume type not in `allowed`; None if they can."""
    volumes = [(f"spec.runner.volumes[{v.get('name')}]", v) for v in runner.get("volumes", [])]
    clash = sorted(name for _, v in volumes if (name := v.get("name")) in RESERVED_VOLUMES)
    if clash:
        return (f"spec.runner.volumes may not be named {', '.join(clash)}: the operator's own volumes are "
                f"{', '.join(RESERVED_VOLUMES)}")
    if runner.get("compilationCache"):
        volumes.insert(0, ("spec.runner.compilationCache", runner["compilationCache"]))
    for field, volume in volumes:
        refused = sorted(kind for kind in volume if kind != "name" and kind not in allowed)
        if refused:
            return (f"{field} may not be a {', '.join(refused)} volume: only {', '.join(allowed)} "
                    "(runner.policy.volumeTypes)")
    return None


def _pod_spec(fit: Mapping[str, Any], step: str, runner: Mapping[str, Any], image: str) -> dict:
    pod = {
        # podFailurePolicy requires Never: every retry is a new pod the Job controller counts.
        "restartPolicy": "Never",
        # The runner never calls the Kubernetes API: no token unless the fit asks for one.
        "automountServiceAccountToken": bool(runner.get("automountServiceAccountToken", False)),
        "containers": [_container(fit, step, runner, image)],
        "volumes": [{"name": _SCRATCH_VOLUME, "emptyDir": {}}],
        "securityContext": {**_pod_security(runner), "runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
    }
    if cache := _compilation_cache(step, runner):
        pod["volumes"].append({"name": _CACHE_VOLUME, **cache})
    pod["volumes"].extend(runner.get("volumes", []))
    for key in _POD_FIELDS:
        if runner.get(key):
            pod[key] = runner[key]
    return pod


def _pod_security(runner: Mapping[str, Any]) -> dict[str, Any]:
    """The part of the pod's security context a fit may set (POD_SECURITY_FIELDS)."""
    given = runner.get("podSecurityContext", {})
    return {key: given[key] for key in POD_SECURITY_FIELDS if key in given}


def _template_metadata(own: Mapping[str, str], runner: Mapping[str, Any]) -> dict[str, Any]:
    """The pods' labels and annotations: the step's podLabels and podAnnotations (e.g. an Istio
    opt-out, cost labels), never GitOps tracking keys, and the operator's own labels over them."""
    metadata: dict[str, Any] = {"labels": {**labels.inheritable(runner.get("podLabels")), **own}}
    if annotations := labels.inheritable(runner.get("podAnnotations")):
        metadata["annotations"] = annotations
    return metadata


def _failure_policy(action: str) -> dict:
    """Bad input fails at once; a disrupted pod (preemption, eviction) is retried for free."""
    return {
        "rules": [
            {
                "action": action,
                "onExitCodes": {
                    "containerName": RUNNER_CONTAINER,
                    "operator": "In",
                    "values": list(NO_RETRY_EXIT_CODES),
                },
            },
            {"action": "Ignore", "onPodConditions": [{"type": DISRUPTION_TARGET}]},
        ]
    }


def job_manifest(
    fit: Mapping[str, Any],
    step: str,
    runner_defaults: Mapping[str, Any],
    default_image: str,
) -> dict[str, Any]:
    """The Job for one step of a fit. `runner_defaults` (operator-wide) fill what spec.runner omits."""
    metadata, spec = fit["metadata"], fit["spec"]
    runner = runner_settings(fit, runner_defaults, step)
    own = labels.own(metadata["name"], step)
    job_labels = {
        **labels.inheritable(metadata.get("labels")),
        **labels.inheritable(runner.get("labels")),
        **own,
    }
    job_metadata: dict[str, Any] = {
        "name": job_name(metadata["name"], step),
        "namespace": metadata["namespace"],
        "labels": job_labels,
        "ownerReferences": [owner_reference(fit)],
    }
    retries = spec["maxRetriesPerShard"]
    if is_per_shard(step):
        count = pods(fit, step)
        parallelism = min(count, runner.get("parallelism", count))
        if parallelism > 1:
            job_metadata["annotations"] = {KUEUE_MIN_PARALLELISM: "1"}  # any number of shards at once will do
        job_spec = {
            "completionMode": "Indexed",
            "completions": count,
            "parallelism": parallelism,  # spec.runner.parallelism at most; Kueue may admit fewer
            "backoffLimitPerIndex": retries,
            # A fit needs every shard: one shard failed for good ends the Job and its other pods.
            "maxFailedIndexes": 0,
            "podFailurePolicy": _failure_policy("FailIndex"),
        }
    else:
        job_spec = {
            "completions": 1,
            "parallelism": 1,
            "backoffLimit": retries,
            "podFailurePolicy": _failure_policy("FailJob"),
        }
    job_spec["template"] = {
        "metadata": _template_metadata(own, runner),
        "spec": _pod_spec(fit, step, runner, default_image),
    }
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": job_metadata, "spec": job_spec}
