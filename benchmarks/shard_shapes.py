"""How Gaussian are the shard posteriors? The diagnosis behind the accuracy table.

Every combination method here is exact when the shard posteriors (of the global parameters, in
the unconstrained space) are Gaussian. This reads the shard draws the accuracy benchmark kept
(consensusfit-runs/accuracy/<data>/<run>/shards/) and prints, per run and unconstrained global
component: the median over shards of the skewness and excess kurtosis, the worst shard's
skewness, the median shard SD relative to the narrowest shard's, and the median within-shard
correlation with u:σ_β (how much a component's shard posterior leans on the slope variance).

    .venv/bin/python benchmarks/shard_shapes.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from consensusfit.runner.store.draws import from_parquet_bytes  # noqa: E402

RUNS = REPO / "consensusfit-runs" / "accuracy"


def moments(x: np.ndarray) -> tuple[float, float]:
    z = (x - x.mean()) / x.std()
    return float(np.mean(z**3)), float(np.mean(z**4) - 3)


def main() -> int:
    print("| run | component | median skew | worst skew | median excess kurtosis | median corr with u:σ_β |")
    print("|---|---|---|---|---|---|")
    for run in sorted(RUNS.glob("*/K*")):
        shards = sorted((run / "shards").glob("*/draws.parquet"), key=lambda p: int(p.parent.name))
        k = int(run.name.split("-")[0][1:])
        if len(shards) != k or not all((p.parent / "_SUCCESS.json").exists() for p in shards):
            continue
        draws = [from_parquet_bytes(p.read_bytes()) for p in shards]
        names = draws[0].global_names()
        flat = [{n: d.unconstrained[n].reshape(-1) for n in names} for d in draws]
        for name in names:
            stats = np.array([moments(f[name]) for f in flat])
            corr = np.median([np.corrcoef(f[name], f["σ_β"])[0, 1] for f in flat])
            worst = stats[np.argmax(np.abs(stats[:, 0])), 0]
            label = name if name.startswith("μ") else f"log {name}"
            print(
                f"| {run.parent.name}/{run.name} | {label} | {np.median(stats[:, 0]):+.2f} | {worst:+.2f} | "
                f"{np.median(stats[:, 1]):+.2f} | {corr:+.2f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
