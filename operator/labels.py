"""Label and annotation keys the operator puts on its children, and which keys it never copies."""

from __future__ import annotations

from collections.abc import Mapping

FIT = "consensusfit.dev/fit"  # the owning fit's name: how pods and Jobs are found again
STEP = "consensusfit.dev/step"  # one of children.STEPS
# On a Job this operator suspended because its fit was suspended. Only such Jobs are resumed by
# the operator, so a Job that Kueue holds suspended is never released behind Kueue's back.
SUSPENDED_BY_FIT = "consensusfit.dev/suspended-by-fit"
# Kueue's label naming the LocalQueue of a Job (set through spec.runner.labels): a Job that carries it
# and is suspended, not by the fit, waits in that queue.
QUEUE_NAME = "kueue.x-k8s.io/queue-name"

# Keys GitOps tools use to track what they applied. Copied onto children, they would make
# Argo CD or Flux believe it owns (and may prune) the Jobs the operator created.
_TRACKING_KEYS = ("app.kubernetes.io/instance",)
_TRACKING_PREFIXES = (
    "argocd.argoproj.io/",
    "kustomize.toolkit.fluxcd.io/",
    "helm.toolkit.fluxcd.io/",
)


def is_tracking(key: str) -> bool:
    return key in _TRACKING_KEYS or key.startswith(_TRACKING_PREFIXES)


def inheritable(given: Mapping[str, str] | None) -> dict[str, str]:
    """The labels a child may carry from its fit: all but the GitOps tracking ones and our own."""
    return {
        key: value
        for key, value in (given or {}).items()
        if not is_tracking(key) and key not in (FIT, STEP)
    }


def own(fit_name: str, step: str) -> dict[str, str]:
    """The labels by which the operator recognises its children."""
    return {
        "app.kubernetes.io/name": "consensusfit",
        "app.kubernetes.io/component": step,
        "app.kubernetes.io/managed-by": "consensusfit-operator",
        FIT: fit_name,
        STEP: step,
    }
