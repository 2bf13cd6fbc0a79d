"""The names both sides of docs/contract.md use: the runner and the operator import them from here.

Nothing in this module imports JAX, NumPy or another runner module, so the operator image (which
has no JAX) imports it as it is. The file tree each step writes is `runner/layout.py`; the
operator reads none of it, only termination messages and the Jobs' counts.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping
from typing import Any

# ---------------------------------------------------------------- exit codes (docs/contract.md)

EXIT_OK = 0
EXIT_TRANSIENT = 1  # transient or unknown failure: the operator retries the pod
EXIT_USAGE = 2  # command-line usage error (argparse's own code): fail, no retry
EXIT_BAD_INPUT = 3  # invalid spec, data or model: fail the index at once, no retry
EXIT_INTERRUPTED = 130  # Ctrl-C (local use)
# The exit codes that no retry can fix (podFailurePolicy `FailIndex` / `FailJob`).
NO_RETRY_EXIT_CODES = (EXIT_USAGE, EXIT_BAD_INPUT)

# ---------------------------------------------------------------- the runner's commands

PARTITION, SAMPLE, COMBINE, RESAMPLE = "partition", "sample", "combine", "resample"
PILOT, UPDATE = "pilot", "update"  # EP rounds: the pilot, and the update after each round's `sample --round R`
EP = "ep"  # spec.combine.method that runs the pilot and rounds (the default; one-shot with one shard)
# The commands a pod runs (`consensusfit-runner <command> --spec ... --out ...`).
POD_COMMANDS = (PARTITION, PILOT, SAMPLE, UPDATE, COMBINE, RESAMPLE)
# `combine --stage ...`: the globals stage, the finish stage, or both with re-sampling between.
GLOBALS_STAGE, FINISH_STAGE, ALL_STAGES = "globals", "finish", "all"
COMBINE_STAGES = (GLOBALS_STAGE, FINISH_STAGE, ALL_STAGES)
# The commands that take their shard from --shard or the Indexed Job's completion index.
PER_SHARD_COMMANDS = (SAMPLE, RESAMPLE)

# ---------------------------------------------------------------- environment variables

# Set by the Job controller on the pods of an Indexed Job: the pod's index.
JOB_COMPLETION_INDEX = "JOB_COMPLETION_INDEX"
# A folder for JAX's persistent compilation cache and the program store (runner/inference/).
COMPILATION_CACHE = "CONSENSUSFIT_COMPILATION_CACHE"
# Shards a sample pod samples at once on a CPU (default: its cores).
CPU_LANES = "CONSENSUSFIT_CPU_LANES"
# `float32` | `float64` | `auto` (default: float64 on a CPU, float32 on an accelerator).
PRECISION = "CONSENSUSFIT_PRECISION"
PRECISIONS = ("auto", "float32", "float64")
# The partition step's memory budget for buffered rows, in MiB (default 512).
PARTITION_MEMORY_MB = "CONSENSUSFIT_PARTITION_MEMORY_MB"

# ---------------------------------------------------------------- the pod

RUNNER_CONTAINER = "runner"  # the container that runs the runner, named in podFailurePolicy
TERMINATION_LOG = "/dev/termination-log"  # where the runner writes its JSON termination message
TERMINATION_LIMIT = 4096  # Kubernetes keeps at most this many bytes of it
# Where `spec.runner.compilationCache` (a volume the sampling pods share) is mounted.
COMPILATION_CACHE_MOUNT = "/var/cache/consensusfit/jax"


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """`override` over `base`, recursively for mappings (lists and scalars are replaced).

    How defaults apply to a spec, on both sides: the runner's spec defaults, the operator's
    runner defaults.
    """
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def finite(document: Any) -> Any:
    """`document` with every NaN and ±inf replaced by None: JSON has no such numbers (Python
    writes bare `NaN`, which the API server and most parsers refuse). A diagnostic that is not
    a number (the R-hat of a component that is constant by construction) is then `null`."""
    if isinstance(document, float):
        return document if math.isfinite(document) else None
    if isinstance(document, Mapping):
        return {key: finite(value) for key, value in document.items()}
    if isinstance(document, (list, tuple)):
        return [finite(value) for value in document]
    return document


def strict_json(document: Any, **options: Any) -> str:
    """Every JSON file and message of the contract: `finite(document)`, refused if still not JSON."""
    return json.dumps(finite(document), allow_nan=False, **options)
