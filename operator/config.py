"""Operator-wide settings, read once from the environment (the Helm chart sets them)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from . import __version__


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
        )
