"""Convergence diagnostics: rank-normalised split R-hat, bulk ESS and tail ESS.

Vehtari, Gelman, Simpson, Carpenter & Bürkner (2021), "Rank-normalization, folding, and
localization: an improved R-hat for assessing convergence of MCMC". All functions take draws of
one scalar quantity shaped (chains, draws).

- Split: each chain is cut in half, so a chain that drifts looks like two chains that disagree.
- Rank-normalise: z = Φ⁻¹((r − 3/8) / (S + 1/4)) with r the pooled rank, so heavy tails and
  infinite variance do not break the diagnostics.
- R-hat = max(R̂(z), R̂(z of the folded draws |x − median|)), the second catching differences in
  scale that the first misses. R̂ is the classic √(var⁺ / W).
- Bulk ESS: ESS of z. Tail ESS: min ESS of the indicators 1{x ≤ q05} and 1{x ≤ q95}.
ESS itself uses Geyer's initial monotone sequence, as NumPyro and Stan do.
"""

from __future__ import annotations

import numpy as np
from numpyro.diagnostics import effective_sample_size
from scipy.special import ndtri
from scipy.stats import rankdata

from ..store.draws import scalar_components


def split_chains(draws: np.ndarray) -> np.ndarray:
    """(chains, n) -> (2·chains, n // 2); an odd middle draw is dropped."""
    half = draws.shape[1] // 2
    return np.concatenate([draws[:, :half], draws[:, draws.shape[1] - half :]], axis=0)


def rank_normalize(draws: np.ndarray) -> np.ndarray:
    ranks = rankdata(draws, method="average").reshape(draws.shape)
    return ndtri((ranks - 0.375) / (draws.size + 0.25))


def _rhat(draws: np.ndarray) -> float:
    """Classic R̂ of already-split chains."""
    n = draws.shape[1]
    within = draws.var(axis=1, ddof=1).mean()
    between = n * draws.mean(axis=1).var(ddof=1)
    if within == 0:
        return float("nan") if between == 0 else float("inf")
    pooled = (n - 1) / n * within + between / n
    return float(np.sqrt(pooled / within))


def _ess(draws: np.ndarray) -> float:
    if np.ptp(draws) == 0:
        return float("nan")
    return float(effective_sample_size(draws))


def rhat(draws: np.ndarray) -> float:
    split = split_chains(np.asarray(draws, dtype=float))
    folded = np.abs(split - np.median(split))
    return max(_rhat(rank_normalize(split)), _rhat(rank_normalize(folded)))


def ess_bulk(draws: np.ndarray) -> float:
    return _ess(rank_normalize(split_chains(np.asarray(draws, dtype=float))))


def ess_tail(draws: np.ndarray) -> float:
    split = split_chains(np.asarray(draws, dtype=float))
    low, high = np.quantile(split, [0.05, 0.95])
    return min(_ess((split <= low).astype(float)), _ess((split <= high).astype(float)))


def summarize(draws: np.ndarray) -> dict[str, float]:
    """Mean, sd, quantiles and the three diagnostics of one scalar, shaped (chains, draws)."""
    flat = np.asarray(draws, dtype=float).ravel()
    q05, q50, q95 = np.quantile(flat, [0.05, 0.5, 0.95])
    return {
        "mean": float(flat.mean()),
        "sd": float(flat.std(ddof=1)) if flat.size > 1 else 0.0,
        "q05": float(q05),
        "q50": float(q50),
        "q95": float(q95),
        "rhat": rhat(draws),
        "ess_bulk": ess_bulk(draws),
        "ess_tail": ess_tail(draws),
    }


def parameter_diagnostics(samples, names: list[str]) -> dict[str, dict]:
    """Summary and convergence diagnostics of every scalar component of the named sites."""
    components = scalar_components({name: samples.constrained[name] for name in names})
    return {component: summarize(values) for component, values in components.items()}


def unmoved_chains(unconstrained: dict[str, np.ndarray], names: list[str]) -> dict[str, list[int]]:
    """Per named site, the chains that never moved: every draw one value, or not finite, in the
    space NUTS moves in (draws shaped (chains, draws, ...)); sites whose chains all moved are left out.

    A NUTS transition that is accepted moves every unconstrained component, so a chain whose draws
    of a site are all one value never left its start: every transition diverged or was refused.
    Constrained sites may be constant by construction (a Cholesky factor's fixed entries), so the
    test is on the unconstrained ones.
    """
    unmoved = {}
    for name in names:
        draws = np.asarray(unconstrained[name], dtype=float)
        flat = draws.reshape(draws.shape[0], draws.shape[1], -1)
        if flat.shape[-1] == 0:
            continue
        bad = ~np.isfinite(flat).all(axis=(1, 2)) | (np.ptp(flat, axis=1).max(axis=-1) == 0)
        if bad.any():
            unmoved[name] = [int(c) for c in np.flatnonzero(bad)]
    return unmoved
