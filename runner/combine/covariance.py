"""Covariance of MCMC draws that stays well-conditioned when draws are few relative to dimensions.

Consensus weights are precision matrices, so a covariance estimate must be invertible and its
inverse must not explode in directions the draws barely explore. With S draws in D dimensions the
sample covariance has rank at most S − 1: when S ≤ D it is singular, and well before that its
smallest eigenvalues are biased towards zero, which inflates the weight a shard gets along them.
(NumPyro's `consensus` inverts it anyway and silently returns wrong weights.)

We use Ledoit & Wolf (2004) shrinkage applied to the correlation matrix, i.e. towards the diagonal
of the sample covariance (the "target D" of Schäfer & Strimmer 2005). Let x_i (i = 1..n) be the
draws standardised by their sample mean and SD, R = (1/n) Σ x_i x_iᵀ their correlation matrix and
I the identity. The estimate is

    R̂ = (1 − λ) R + λ I,     Σ̂ = diag(s) R̂ diag(s),

with the Ledoit–Wolf intensity λ = min(b̄², d²) / d², where d² = ‖R − I‖²_F measures how far R is
from the target and b̄² = (1/n²) Σ_i ‖x_i x_iᵀ − R‖²_F estimates the sampling error of R. With many
draws λ → 0 and Σ̂ is the sample covariance; with few draws λ grows and Σ̂ stays positive definite
(R̂'s eigenvalues are ≥ λ). Shrinking the correlation rather than the covariance keeps the
estimate invariant to the parameters' units (μ_α in thousands, σ in units), which a scaled
identity target would not be.
"""

from __future__ import annotations

import numpy as np

# A variance this small relative to the mean square is a constant component: refuse to weight it.
_TINY = 1e-300


def shrinkage_intensity(standardized: np.ndarray) -> float:
    """Ledoit–Wolf λ for the correlation of standardised draws shaped (n, D)."""
    n, dim = standardized.shape
    if dim == 1:
        return 0.0
    corr = standardized.T @ standardized / n
    target_gap = corr - np.eye(dim)
    d2 = float(np.sum(target_gap**2))
    if d2 <= 0:
        return 1.0
    # (1/n²) Σ_i ‖x_i x_iᵀ − R‖²_F = (1/n²) [Σ_i ‖x_i‖⁴ − n ‖R‖²_F]
    norms = np.sum(standardized**2, axis=1)
    b2 = float((np.sum(norms**2) - n * np.sum(corr**2)) / n**2)
    return float(np.clip(b2 / d2, 0.0, 1.0))


def shrunk_covariance(draws: np.ndarray) -> tuple[np.ndarray, float]:
    """(Σ̂, λ) for draws shaped (n, D), n ≥ 2. See the module docstring."""
    draws = np.asarray(draws, dtype=float)
    n, dim = draws.shape
    if n < 2:
        raise ValueError("a covariance needs at least 2 draws")
    centred = draws - draws.mean(axis=0)
    sd = np.sqrt(np.sum(centred**2, axis=0) / n)
    if np.any(sd <= _TINY):
        raise ValueError("a component does not vary across draws")
    standardized = centred / sd
    lam = shrinkage_intensity(standardized)
    corr = (1 - lam) * (standardized.T @ standardized / n) + lam * np.eye(dim)
    # unbiased variances on the diagonal (n − 1), as np.cov would give for n ≫ D
    scale = sd * np.sqrt(n / (n - 1))
    return corr * np.outer(scale, scale), lam
