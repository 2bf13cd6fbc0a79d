"""Agreement between each shard's posterior and the combined one: a warning signal.

For shard k and global component j (in the unconstrained space where shards are combined), let
m_kj and s_kj be the shard's posterior mean and SD and μ_j, σ_j the combined ones. We report

    z_kj = (m_kj − μ_j) / σ_j                     how far the shard sits, in combined SDs;
    d_kj = (m_kj − μ_j) / √(s_kj² − σ_j²)         the same distance in units of what the shard's
                                                  own spread explains.

Why √(s² − σ²): if all shards describe the same θ and their posteriors are roughly Gaussian,
shard k's mean is an estimate of θ with variance s_k², and the combined mean is the
precision-weighted pool of all shards, which includes shard k. Then Var(m_k − μ) = Var(m_k) −
Var(μ) = s_k² − σ² (the pooled estimate is efficient, so its difference from any one estimate is
uncorrelated with it), and d_kj is approximately N(0, 1) when the shards agree. A shard whose
posterior is no wider than the combined one (s ≤ σ) cannot be checked this way: d is reported as
±inf if it sits anywhere else than the combined mean.

Warning: |d_kj| > t with t = Φ⁻¹(1 − α / (2·K·D)), α = 0.01: a Bonferroni bound, so that a fit
whose shards all agree raises a warning on any of its K·D (shard, component) pairs with
probability at most 1%. A warning means the shard's data tell a different story about θ than the
others (a different population, a data problem, or a shard that did not converge), and the
combination, which assumes one θ, should not be trusted blindly.
"""

from __future__ import annotations

import numpy as np
from scipy.special import ndtri

FALSE_ALARM = 0.01


def threshold(shards: int, components: int, false_alarm: float = FALSE_ALARM) -> float:
    return float(ndtri(1 - false_alarm / (2 * shards * components)))


def agreement(
    shard_draws: list[np.ndarray], combined: np.ndarray, names: list[str], shard_ids: list[int]
) -> dict:
    """The agreement report (see module docstring) for shard draws shaped (chains, draws, D)."""
    flat = combined.reshape(-1, combined.shape[-1])
    mu, sigma = flat.mean(axis=0), flat.std(axis=0, ddof=1)
    limit = threshold(len(shard_draws), len(names))
    shards, warnings = [], []
    for k, draws in zip(shard_ids, shard_draws):
        x = draws.reshape(-1, draws.shape[-1])
        m, s = x.mean(axis=0), x.std(axis=0, ddof=1)
        parameters = {}
        for j, name in enumerate(names):
            gap = m[j] - mu[j]
            excess = s[j] ** 2 - sigma[j] ** 2
            if excess > 0:
                d = gap / np.sqrt(excess)
            else:
                d = 0.0 if gap == 0 else float(np.sign(gap) * np.inf)
            parameters[name] = {
                "z": float(gap / sigma[j]),
                "discrepancy": float(d),
                "sd_ratio": float(s[j] / sigma[j]),
                "warning": bool(abs(d) > limit),
            }
        flagged = [name for name, p in parameters.items() if p["warning"]]
        if flagged:
            worst = max(flagged, key=lambda name: abs(parameters[name]["discrepancy"]))
            warnings.append(
                f"shard {k} disagrees with the combined posterior on {', '.join(flagged)} "
                f"({worst}: {parameters[worst]['z']:+.2f} combined SDs away, "
                f"{abs(parameters[worst]['discrepancy']):.1f} times what its own spread explains; "
                f"threshold {limit:.2f})"
            )
        shards.append({"shard": k, "parameters": parameters, "warning": bool(flagged)})
    return {
        "definition": "z = (shard mean - combined mean) / combined sd; discrepancy = (shard mean - "
        "combined mean) / sqrt(shard sd^2 - combined sd^2), ~N(0,1) when shards agree; warning "
        "when |discrepancy| > threshold (Bonferroni, 1% false alarms per fit); unconstrained space",
        "threshold": limit,
        "space": "unconstrained",
        "shards": shards,
        "warnings": warnings,
    }
