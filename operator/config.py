"""Operator-wide settings, read once from the environment (the Helm chart sets them)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from . import __version__, children
from .leadership import Timing

# Volume types a runner pod's volume may never be, whatever the policy says: a hostPath mounts the node.
FORBIDDEN_VOLUMES = ("hostPath",)

# The runner defaults of an operator the Helm chart did not configure (run by hand, or `Config()`):
# the steps that sample ask for one GPU and tolerate the GPU nodes' usual taint; the other steps ask
# for nothing, so they run on any node. The chart's runner values replace these as a whole.
_GPU = {"resources": {"limits": {"nvidia.com/gpu": 1}},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}
BUILT_IN_RUNNER_DEFAULTS: Mapping[str, Any] = {"steps": {step: _GPU for step in children.GPU_STEPS}}


@dataclass(frozen=True)
class Policy:
    """What a fit's spec may ask of its pods, as the cluster admin allows (chart: runner.policy).

    The operator's own runner defaults (image, ServiceAccount) are always allowed.
    """

    images: tuple[str, ...] = ()  # further images (fnmatch patterns) spec.runner.image may name
    service_accounts: tuple[str, ...] = ()  # further ServiceAccounts spec.runner.serviceAccountName may name
    # spec.runner.compilationCache and spec.runner.volumes (FORBIDDEN_VOLUMES never)
    volume_types: tuple[str, ...] = ("persistentVolumeClaim", "emptyDir", "csi", "configMap", "secret")
    python_models: bool = True  # spec.model.python: trusted code, run in every step beside the credentials

    @classmethod
    def from_json(cls, text: str) -> Policy:
        given = json.loads(text)
        defaults = cls()
        return cls(
            images=tuple(given.get("images", defaults.images)),
            service_accounts=tuple(given.get("serviceAccounts", defaults.service_accounts)),
            volume_types=tuple(given.get("volumeTypes", defaults.volume_types)),
            python_models=bool(given.get("pythonModels", defaults.python_models)),
        )

    @property
    def allowed_volumes(self) -> tuple[str, ...]:
        """The volume types the runner pods may have: the policy's, never a forbidden one."""
        return tuple(kind for kind in self.volume_types if kind not in FORBIDDEN_VOLUMES)


@dataclass(frozen=True)
class Config:
    # How often every fit is reconciled; also the latency of reacting to Job and pod changes.
    resync_seconds: float = 5.0
    # The runner image for fits whose spec.runner.image is absent.
    runner_image: str = f"ghcr.io/consensusfit/consensusfit-runner:{__version__}"
    # spec.runner defaults for every fit (e.g. S3 env, cpu/memory, per step under `steps`); a fit's
    # own spec.runner wins (children.runner_settings).
    runner_defaults: Mapping[str, Any] = field(default_factory=lambda: BUILT_IN_RUNNER_DEFAULTS)
    metrics_port: int = 8080
    liveness_endpoint: str = "http://0.0.0.0:8081/healthz"
    # Namespaces to watch; empty: the whole cluster.
    namespaces: tuple[str, ...] = ()
    # How long a fit may be Blocked (pods that cannot start, Jobs that cannot create them) before it
    # fails with the block's reason: long enough for a cluster autoscaler to add a GPU node.
    blocked_grace_seconds: float = 600.0
    policy: Policy = field(default_factory=Policy)
    # Leader election (operator/leadership.py): of the replicas, only the holder of this Lease
    # reconciles. Off: this process reconciles alone (one replica, replaced with Recreate).
    leader_election: bool = False
    lease_name: str = "consensusfit-operator"
    lease_namespace: str = "default"  # the chart sets the operator's own namespace
    lease_seconds: float = Timing.lease_seconds  # client-go's leaseDuration, renewDeadline, retryPeriod
    renew_deadline_seconds: float = Timing.renew_deadline_seconds
    retry_seconds: float = Timing.retry_seconds
    # /readyz: ready once the reconcile loop runs (leader or warm follower).
    readiness_port: int = 8082

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Config:
        defaults = cls()
        return cls(
            resync_seconds=float(env.get("CONSENSUSFIT_RESYNC_SECONDS", defaults.resync_seconds)),
            runner_image=env.get("CONSENSUSFIT_RUNNER_IMAGE", defaults.runner_image),
            runner_defaults=json.loads(env["CONSENSUSFIT_RUNNER_DEFAULTS"]) if "CONSENSUSFIT_RUNNER_DEFAULTS" in env
            else defaults.runner_defaults,
            metrics_port=int(env.get("CONSENSUSFIT_METRICS_PORT", defaults.metrics_port)),
            liveness_endpoint=env.get("CONSENSUSFIT_LIVENESS_ENDPOINT", defaults.liveness_endpoint),
            namespaces=tuple(filter(None, env.get("CONSENSUSFIT_WATCH_NAMESPACES", "").split(","))),
            blocked_grace_seconds=float(env.get("CONSENSUSFIT_BLOCKED_GRACE_SECONDS", defaults.blocked_grace_seconds)),
            policy=Policy.from_json(env.get("CONSENSUSFIT_RUNNER_POLICY", "{}")),
            leader_election=env.get("CONSENSUSFIT_LEADER_ELECTION", "false").lower() == "true",
            lease_name=env.get("CONSENSUSFIT_LEASE_NAME", defaults.lease_name),
            lease_namespace=env.get("CONSENSUSFIT_LEASE_NAMESPACE", defaults.lease_namespace),
            lease_seconds=float(env.get("CONSENSUSFIT_LEASE_SECONDS", defaults.lease_seconds)),
            renew_deadline_seconds=float(env.get("CONSENSUSFIT_RENEW_DEADLINE_SECONDS", defaults.renew_deadline_seconds)),
            retry_seconds=float(env.get("CONSENSUSFIT_RETRY_SECONDS", defaults.retry_seconds)),
            readiness_port=int(env.get("CONSENSUSFIT_READINESS_PORT", defaults.readiness_port)),
        )
