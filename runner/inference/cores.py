"""How many shards a process samples at the same time on a CPU: one per core it may use.

NUTS on a small shard runs one core (each of its many small kernels is single-threaded), so a
pod with several shards (`shardsPerPod`) and several cores samples one shard per core, in
threads sharing one compiled program. The cores a process may use are its CPU affinity, capped by
its cgroup's CPU quota (a Kubernetes CPU limit, which affinity does not show).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from ..contract import CPU_LANES  # set by the operator, or by the local pipeline for its processes

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def cgroup_quota(cpu_max: Path = CGROUP_CPU_MAX) -> float | None:
    """Cores allowed by a cgroup v2 `cpu.max` ("<quota> <period>" or "max <period>"); None if unlimited."""
    try:
        quota, period = cpu_max.read_text().split()
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def available_cores() -> int:
    affinity = len(os.sched_getaffinity(0))
    quota = cgroup_quota()
    return max(1, min(affinity, math.ceil(quota)) if quota else affinity)


def cpu_lanes() -> int:
    """Shards a process samples at once on a CPU: `CONSENSUSFIT_CPU_LANES`, else its cores."""
    value = os.environ.get(CPU_LANES)
    return max(1, int(value)) if value else available_cores()
