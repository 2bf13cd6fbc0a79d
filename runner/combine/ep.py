"""Expectation propagation over the global parameters: sites, cavities, tilted moments, updates.

Shard k contributes the site f_k(u) = p(θ)^(1/K) L_k(θ), in the unconstrained space u of the
global parameters (the space where the tempered shard densities multiply to the posterior, see
runner/inference/tempering.py). EP approximates each site by a Gaussian factor g_k(u) ∝ exp(−½uᵀλ_k u + η_kᵀu)
and the posterior by their product q = Π_k g_k, a Gaussian with precision Λ = Σ_k λ_k and shift
η = Σ_k η_k (mean Λ⁻¹η). A round refits every site where the posterior lives:

    cavity   P_k = Λ − λ_k,  P_k c_k = η − η_k        (q without site k)
    tilted   p̃_k(u) ∝ f_k(u) · N(u; c_k, P_k⁻¹)       (site k exact, the rest Gaussian; NUTS)
    update   λ_k* = Λ̃_k − P_k,  η_k* = Λ̃_k m̃_k − P_k c_k   (so that g_k·cavity has p̃_k's moments)
    damping  λ_k ← (1−δ)λ_k + δλ_k*,  η_k ← (1−δ)η_k + δη_k*

with (m̃_k, Λ̃_k⁻¹) the tilted mean and covariance (Vehtari, Gelman et al. 2020, "Expectation
propagation as a way of life"; Xu et al. 2014). δ is shrunk until Λ and every cavity are positive
definite (individual sites may be indefinite).

Tilted moments from draws. NUTS gives, with every draw u_i, the gradient g_i = ∇_u log p̃_k(u_i, α_i)
(group-level sites α held at their draw). By Stein's identity E[g] = 0, so g is a control variate
for the mean:

    m̂ = ū − Cov(u, g) Cov(g)⁻¹ ḡ      (the intercept of regressing u on g: a zero-variance
                                        control variate, exact for any draws of a Gaussian p̃_k)

The precision is the inverse sample covariance, debiased for the draws' ESS. (Stein's second
identity, Σ̃ = P_k⁻¹(I + Cov(∇ log f_k, u)), gives a covariance estimate too, but in a
hierarchical model the site's gradient given the group-level draws is far sharper than its
marginal, and that estimate was measured to scatter more than the sample covariance.)

Monte Carlo error in the tilted means adds about √(K / ESS) posterior SDs to q's mean in an
undamped round (each of the K sites carries a full posterior's precision times its tilted mean's
error): damping averages it over rounds, and `average` over the last rounds.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Sites(NamedTuple):
    """The K Gaussian site approximations in natural parameters."""

    precision: np.ndarray  # (K, d, d): λ_k
    shift: np.ndarray  # (K, d): η_k


class Gaussian(NamedTuple):
    mean: np.ndarray  # (d,)
    precision: np.ndarray  # (d, d)

    @property
    def cov(self) -> np.ndarray:
        return np.linalg.inv(self.precision)

    @property
    def sd(self) -> np.ndarray:
        return np.sqrt(np.diag(self.cov))


class Moments(NamedTuple):
    """A tilted distribution's mean and precision, estimated from draws."""

    mean: np.ndarray
    precision: np.ndarray
    estimator: str  # how the mean was estimated: "control variate" | "sample"


def is_positive_definite(matrix: np.ndarray) -> bool:
    try:
        np.linalg.cholesky(0.5 * (matrix + matrix.T))
    except np.linalg.LinAlgError:
        return False
    return True


def symmetric(matrix: np.ndarray) -> np.ndarray:
    return 0.5 * (matrix + np.swapaxes(matrix, -1, -2))


def robust_moments(draws: np.ndarray) -> Gaussian:
    """A Gaussian for draws (n, d) that a long tail does not stretch: per component the median and
    the interquartile range / 1.349 (the SD of a Gaussian), with the draws' correlation.

    A pilot on a few groups often has a hierarchical scale whose log runs far left (nothing in so
    few groups rules out σ → 0); its sample SD then makes a start so wide that EP needs many
    rounds to come in, while the tail is exactly what the other shards' data will cut off.
    """
    draws = draws.reshape(-1, draws.shape[-1])
    low, median, high = np.quantile(draws, [0.25, 0.5, 0.75], axis=0)
    sd = np.where(high > low, (high - low) / 1.349, draws.std(0))
    correlation = np.atleast_2d(np.corrcoef(draws.T)) if draws.shape[-1] > 1 else np.ones((1, 1))
    return Gaussian(median, np.linalg.inv(correlation * np.outer(sd, sd)))


def from_pilot(pilot: Gaussian, shards: int) -> Sites:
    """Every site equal to q₀^(1/K): q starts as the pilot's Gaussian q₀."""
    return Sites(
        np.repeat(pilot.precision[None] / shards, shards, 0),
        np.repeat((pilot.precision @ pilot.mean)[None] / shards, shards, 0),
    )


def approximation(sites: Sites) -> Gaussian:
    """q = Π_k g_k: precision Λ = Σ λ_k, mean Λ⁻¹ Σ η_k."""
    precision = symmetric(sites.precision.sum(0))
    return Gaussian(np.linalg.solve(precision, sites.shift.sum(0)), precision)


def cavity(sites: Sites, k: int) -> Gaussian:
    """q without site k: precision P_k = Λ − λ_k, mean c_k = P_k⁻¹(η − η_k)."""
    precision = symmetric(sites.precision.sum(0) - sites.precision[k])
    return Gaussian(np.linalg.solve(precision, sites.shift.sum(0) - sites.shift[k]), precision)


def sample_moments(u: np.ndarray, ess: float) -> Moments:
    """Sample mean, and inverse sample covariance debiased for `ess` draws in d dimensions.

    For a Gaussian sample of n, E[S⁻¹] = (n − 1)/(n − d − 2) Σ⁻¹: the plain inverse overstates the
    precision, and with it every site's, by d/n.
    """
    u = u.reshape(-1, u.shape[-1])
    d = u.shape[-1]
    factor = max(ess - d - 2, 1.0) / max(ess - 1, 1.0)
    return Moments(u.mean(0), factor * np.linalg.inv(np.atleast_2d(np.cov(u.T))), "sample")


def tilted_moments(u: np.ndarray, gradient: np.ndarray, ess: float) -> Moments:
    """Tilted mean (control variate `gradient` = ∇_u log p̃ at each draw) and debiased precision."""
    u = u.reshape(-1, u.shape[-1])
    g = gradient.reshape(u.shape)
    plain = sample_moments(u, ess)
    centred_u, centred_g = u - u.mean(0), g - g.mean(0)
    g_cov = np.atleast_2d(centred_g.T @ centred_g) / len(u)
    if not is_positive_definite(g_cov):  # a component whose gradient never varies: no control variate
        return plain
    coefficient = np.linalg.solve(g_cov, centred_g.T @ centred_u / len(u))  # Cov(g)⁻¹ Cov(g, u)
    return Moments(u.mean(0) - g.mean(0) @ coefficient, plain.precision, "control variate")


class Update(NamedTuple):
    sites: Sites
    damping: float  # the δ used (shrunk from the one asked for when needed; 0: no step kept)


def update(sites: Sites, tilted: list[Moments], damping: float, shrink: float = 0.5, tries: int = 8) -> Update:
    """One damped EP update of every site from its tilted moments under the current cavities.

    δ is halved until the new Λ and every cavity are positive definite; after `tries` halvings the
    sites stay as they were (δ = 0).
    """
    cavities = [cavity(sites, k) for k in range(len(tilted))]
    target_precision = np.stack([m.precision - c.precision for m, c in zip(tilted, cavities)])
    target_shift = np.stack(
        [m.precision @ m.mean - c.precision @ c.mean for m, c in zip(tilted, cavities)]
    )
    delta = damping
    for _ in range(tries):
        candidate = Sites(
            symmetric((1 - delta) * sites.precision + delta * target_precision),
            (1 - delta) * sites.shift + delta * target_shift,
        )
        if valid(candidate):
            return Update(candidate, delta)
        delta *= shrink
    return Update(sites, 0.0)


def valid(sites: Sites) -> bool:
    """Λ and every cavity Λ − λ_k positive definite."""
    total = sites.precision.sum(0)
    return is_positive_definite(total) and all(is_positive_definite(total - p) for p in sites.precision)


class Change(NamedTuple):
    mean: float  # max over components of |Δmean| / sd
    sd: float  # max over components of |Δsd| / sd


def change(before: Gaussian, after: Gaussian) -> Change:
    sd_before, sd_after = before.sd, after.sd
    return Change(
        float(np.max(np.abs(after.mean - before.mean) / sd_after)),
        float(np.max(np.abs(sd_after - sd_before) / sd_before)),
    )


def average(sites: list[Sites]) -> Sites:
    """Mean of the natural parameters of several rounds' sites (less Monte Carlo noise)."""
    return Sites(np.mean([s.precision for s in sites], 0), np.mean([s.shift for s in sites], 0))
