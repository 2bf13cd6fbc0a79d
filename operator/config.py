"""Operator-wide settings, read once from the environment (the Helm chart sets them)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from . import __version__

# Volume types a compilation cache may never be, whatever the policy says: a hostPath mounts the node.
FORBIDDEN_VOLUMES = ("hostPath",)


@dataclass(frozen=True)
class Policy:
    """What a fit's spec may ask of its pods, as the cluster admin allows (chart: runner.policy).

    The operator's own runner defaults (image, ServiceAccount) are always allowed.
    """

    images: tuple[str, ...] = ()  # further images (fnmatch patterns) spec.runner.image may name
    service_accounts: tuple[str, ...] = ()  # further ServiceAccounts spec.runner.serviceAccountName may name
    cache_volumes: tuple[str, ...] = ("persistentVolumeClaim", "emptyDir", "csi")  # spec.runner.compilationCache
    python_models: bool = True  # spec.model.python: trusted code, run in every step beside the credentials

    @classmethod
    def from_json(cls, text: str) -> Policy:
        given = json.loads(text)
        defaults = cls()
        return cls(
            images=tuple(given.get("images", defaults.images)),
            service_accounts=tuple(given.get("serviceAccounts", defaults.service_accounts)),
            cache_volumes=tuple(given.get("cacheVolumes", defaults.cache_volumes)),
            python_models=bool(given.get("pythonModels", defaults.python_models)),
        )


@dataclass(frozen=True)
class Config:
    # How often every fit is reconciled; also the latency of reacting to Job and pod changes.
    resync_seconds: float = 5.0
    # The runner image for fits whose spec.runner.image is absent.
    runner_image: str = f"ghcr.io/consensusfit/consensusfit-runner:{__version__}"
    # spec.runner defaults for every fit (e.g. S3 env, cpu/memory); a fit's own spec.runner wins.
    runner_defaults: Mapping[str, Any] = field(default_factory=dict)
    metrics_port: int = 8080
    liveness_endpoint: str = "http://0.0.0.0:8081/healthz"
    # Namespaces to watch; empty: the whole cluster.
    namespaces: tuple[str, ...] = ()
    # How long a fit may be Blocked (pods that cannot start, Jobs that cannot create them) before it
    # fails with the block's reason: long enough for a cluster autoscaler to add a GPU node.
    blocked_grace_seconds: float = 600.0
    policy: Policy = field(default_factory=Policy)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Config:
        defaults = cls()
        return cls(
            resync_seconds=float(env.get("CONSENSUSFIT_RESYNC_SECONDS", defaults.resync_seconds)),
            runner_image=env.get("CONSENSUSFIT_RUNNER_IMAGE", defaults.runner_image),
            runner_defaults=json.loads(env.get("CONSENSUSFIT_RUNNER_DEFAULTS", "{}")),
            metrics_port=int(env.get("CONSENSUSFIT_METRICS_PORT", defaults.metrics_port)),
            liveness_endpoint=env.get("CONSENSUSFIT_LIVENESS_ENDPOINT", defaults.liveness_endpoint),
            namespaces=tuple(filter(None, env.get("CONSENSUSFIT_WATCH_NAMESPACES", "").split(","))),
            blocked_grace_seconds=float(env.get("CONSENSUSFIT_BLOCKED_GRACE_SECONDS", defaults.blocked_grace_seconds)),
            policy=Policy.from_json(env.get("CONSENSUSFIT_RUNNER_POLICY", "{}")),
        )
