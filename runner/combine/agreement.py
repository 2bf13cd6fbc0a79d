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

Two more warnings catch what the distance cannot: every method here is exact only for Gaussian
shard posteriors, and a badly non-Gaussian shard can pull the combination towards itself without
sitting far from it.
- share_kj = s_kj⁻² / Σ_l s_lj⁻², the shard's part of the combined (marginal) precision; about 1/K
  when shards are alike. Warned when above min(1, 3/K) for K ≥ 4: one shard is far more certain
  than its share of the data justifies. The typical cause is a hierarchical scale that collapses
  towards 0 in a shard with few groups (then every group's parameter equals the mean, and the
  mean's posterior becomes spuriously narrow); that shard then dominates the combination.
- skewness_kj of the shard's draws: warned when |skewness| > 1 (a Gaussian has 0): the shard's
  Gaussian approximation, which the weights rest on, is poor.
"""

from __future__ import annotations

import numpy as np
from scipy.special import ndtri

FALSE_ALARM = 0.01
SHARE_FACTOR = 3.0
SKEWNESS_LIMIT = 1.0


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
    flats = [d.reshape(-1, d.shape[-1]) for d in shard_draws]
    precision = np.array([1 / f.var(axis=0, ddof=1) for f in flats])
    shares = precision / precision.sum(axis=0)
    share_limit = min(1.0, SHARE_FACTOR / len(flats)) if len(flats) >= 4 else 1.0
    for index, (k, x) in enumerate(zip(shard_ids, flats)):
        m, s = x.mean(axis=0), x.std(axis=0, ddof=1)
        skew = np.mean(((x - m) / x.std(axis=0)) ** 3, axis=0)
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
                "share": float(shares[index, j]),
                "skewness": float(skew[j]),
                "warning": bool(abs(d) > limit),
                "dominant": bool(shares[index, j] > share_limit),
                "non_gaussian": bool(abs(skew[j]) > SKEWNESS_LIMIT),
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
        dominant = [name for name, p in parameters.items() if p["dominant"]]
        if dominant:
            worst = max(dominant, key=lambda name: parameters[name]["share"])
            warnings.append(
                f"shard {k} carries {parameters[worst]['share']:.0%} of the combined precision on "
                f"{', '.join(dominant)} (alike shards would carry {1 / len(flats):.0%}): its posterior is "
                "narrower than its data justify (a collapsed group-level scale?) and dominates the combination"
            )
        skewed = [name for name, p in parameters.items() if p["non_gaussian"]]
        if skewed:
            worst = max(skewed, key=lambda name: abs(parameters[name]["skewness"]))
            warnings.append(
                f"shard {k}'s posterior is far from Gaussian on {', '.join(skewed)} (skewness "
                f"{parameters[worst]['skewness']:+.1f} on {worst}): the combination, exact for Gaussian "
                "shards, is unreliable there; use fewer, larger shards"
            )
        shards.append(
            {"shard": k, "parameters": parameters, "warning": bool(flagged or dominant or skewed)}
        )
    return {
        "definition": "z = (shard mean - combined mean) / combined sd; discrepancy = (shard mean - "
        "combined mean) / sqrt(shard sd^2 - combined sd^2), ~N(0,1) when shards agree; warning "
        "when |discrepancy| > threshold (Bonferroni, 1% false alarms per fit); share = the shard's "
        "part of the combined marginal precision, dominant when > 3/K; non_gaussian when "
        "|skewness| > 1; unconstrained space",
        "threshold": limit,
        "space": "unconstrained",
        "shards": shards,
        "warnings": warnings,
    }
