"""Combining shard posteriors of the global parameters: pure functions over arrays.

Every function takes one array per shard, shaped (chains_k, draws_k, D): the draws of the D global
components in the space where the shard densities multiply to the full posterior (the unconstrained
space NUTS samples in; see runner/inference/tempering.py). Shards may have different numbers of chains and
draws. Every function returns draws shaped (chains, draws, D) and never needs S ≥ D: covariances
are shrinkage estimates (runner/combine/covariance.py), always invertible.

Notation: shard k has draws θ_{k,s} with sample mean m_k and (shrunk) covariance Σ_k; its precision
is W_k = Σ_k⁻¹. If every shard posterior were Gaussian, N(m_k, Σ_k), their product would be the
Gaussian N(μ, Σ) with

    Σ = (Σ_k W_k)⁻¹,      μ = Σ Σ_k W_k m_k.                                     (1)

- `consensus` (Scott et al. 2016, "Bayes and big data: the consensus Monte Carlo algorithm"):
  θ_s = Σ Σ_k W_k θ_{k,s}, the precision-weighted average of the s-th draw of every shard. For
  Gaussian shards this is exact: a weighted sum of independent Gaussians with these weights has
  mean μ and covariance Σ (Σ_k W_k Σ_k W_k) Σ = Σ. For non-Gaussian shards it keeps some of their
  shape. Shards with fewer draws than the largest are stretched (draw i of N is shard draw
  ⌊i·N_k/N⌋), keeping each shard's chain order so that the combined draws' autocorrelation, and
  hence their ESS, stays honest.
- `gaussian`: independent draws from N(μ, Σ) of (1): the product of the shards' Gaussian
  approximations, with N = the largest shard's number of draws.
- `swiss` (Vyner, Nemeth & Sherlock 2023, "SwISS: a scalable Markov chain Monte Carlo
  divide-and-conquer strategy"): each shard's draws are moved by an affine map onto the combined
  mean and covariance, θ'_{k,s} = μ + A_k (θ_{k,s} − m_k) with A_k = Σ^{1/2} Σ_k^{-1/2} (symmetric
  square roots), so A_k Σ_k A_kᵀ = Σ: every shard's transformed draws have mean μ and covariance Σ
  and keep the shard's shape; the result is all K·S transformed draws. Each shard's chains stay
  chains of the result.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .covariance import shrunk_covariance


@dataclass(frozen=True)
class ShardMoments:
    mean: np.ndarray  # (D,)
    cov: np.ndarray  # (D, D), shrunk
    shrinkage: float  # Ledoit–Wolf λ used for this shard


@dataclass(frozen=True)
class Product:
    """The Gaussian product (1) and the pieces it was made of."""

    mean: np.ndarray
    cov: np.ndarray
    precisions: list[np.ndarray]  # W_k
    shards: list[ShardMoments]


def _flat(draws: np.ndarray) -> np.ndarray:
    draws = np.asarray(draws, dtype=float)
    if draws.ndim != 3:
        raise ValueError(f"shard draws must be shaped (chains, draws, D), got {draws.shape}")
    return draws.reshape(-1, draws.shape[-1])


def _check(shards: list[np.ndarray]) -> None:
    if not shards:
        raise ValueError("nothing to combine: no shards")
    dims = {np.shape(s)[-1] for s in shards}
    if len(dims) != 1:
        raise ValueError(f"shards have different numbers of global components: {sorted(dims)}")


def moments(draws: np.ndarray) -> ShardMoments:
    """Sample mean and shrunk covariance of one shard's draws shaped (chains, draws, D)."""
    flat = _flat(draws)
    cov, lam = shrunk_covariance(flat)
    return ShardMoments(flat.mean(axis=0), cov, lam)


def _inverse_spd(matrix: np.ndarray) -> np.ndarray:
    """Inverse of a symmetric positive definite matrix, through its Cholesky factor."""
    chol = np.linalg.cholesky(matrix)
    inv_chol = np.linalg.solve(chol, np.eye(len(matrix)))
    return inv_chol.T @ inv_chol


def gaussian_product(shards: list[np.ndarray]) -> Product:
    """μ and Σ of (1) from the shards' draws."""
    _check(shards)
    stats, precisions = [], []
    for k, draws in enumerate(shards):
        try:
            stats.append(moments(draws))
            precisions.append(_inverse_spd(stats[-1].cov))
        except (ValueError, np.linalg.LinAlgError) as error:
            raise ValueError(f"shard {k}'s global draws have no positive definite covariance ({error})") from None
    total = np.sum(precisions, axis=0)
    cov = _inverse_spd(total)
    mean = cov @ np.sum([w @ m.mean for w, m in zip(precisions, stats)], axis=0)
    return Product(mean, (cov + cov.T) / 2, precisions, stats)


def _layout(shards: list[np.ndarray]) -> tuple[int, int]:
    """(chains, draws) of the output: those of the shard with the most draws."""
    largest = max(shards, key=lambda s: s.shape[0] * s.shape[1])
    return largest.shape[0], largest.shape[1]


def stretch(flat: np.ndarray, n: int) -> np.ndarray:
    """n draws from a shard's N_k ≤ n flat draws, in order: draw i is draw ⌊i·N_k/n⌋."""
    index = (np.arange(n) * len(flat)) // n
    return flat[index]


def consensus(shards: list[np.ndarray], product: Product | None = None) -> np.ndarray:
    """Scott et al.'s consensus draws, shaped like the largest shard's (see module docstring)."""
    product = product or gaussian_product(shards)
    chains, draws = _layout(shards)
    n = chains * draws
    total = np.zeros((n, product.mean.shape[0]))
    for weight, shard in zip(product.precisions, shards):
        total += stretch(_flat(shard), n) @ weight.T
    return (total @ product.cov.T).reshape(chains, draws, -1)


def gaussian(
    shards: list[np.ndarray], rng: np.random.Generator, product: Product | None = None
) -> np.ndarray:
    """Independent draws from the product of the shards' Gaussian approximations."""
    product = product or gaussian_product(shards)
    chains, draws = _layout(shards)
    chol = np.linalg.cholesky(product.cov)
    noise = rng.standard_normal((chains * draws, product.mean.shape[0]))
    return (product.mean + noise @ chol.T).reshape(chains, draws, -1)


def _sqrt_spd(matrix: np.ndarray, inverse: bool = False) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    values = np.clip(values, np.finfo(float).tiny, None)
    power = -0.5 if inverse else 0.5
    return (vectors * values**power) @ vectors.T


def swiss_maps(product: Product) -> list[np.ndarray]:
    """A_k = Σ^{1/2} Σ_k^{-1/2} for every shard."""
    root = _sqrt_spd(product.cov)
    return [root @ _sqrt_spd(m.cov, inverse=True) for m in product.shards]


def swiss(shards: list[np.ndarray], product: Product | None = None) -> np.ndarray:
    """SwISS draws: every shard's draws moved onto (μ, Σ); K·S draws in all.

    Shards with equal numbers of draws give (Σ_k chains_k, draws, D), each shard's chains kept as
    chains; otherwise one chain of all draws, shard after shard.
    """
    product = product or gaussian_product(shards)
    moved = [
        product.mean + (np.asarray(s, dtype=float) - m.mean) @ a.T
        for s, m, a in zip(shards, product.shards, swiss_maps(product))
    ]
    if len({s.shape[1] for s in moved}) == 1:
        return np.concatenate(moved, axis=0)
    return np.concatenate([_flat(s) for s in moved], axis=0)[None]


METHODS = ("consensus", "gaussian", "swiss")


def combine(method: str, shards: list[np.ndarray], rng: np.random.Generator) -> tuple[np.ndarray, Product]:
    """Dispatch on `spec.combine.method`; returns the draws and the Gaussian product used."""
    product = gaussian_product(shards)
    if method == "consensus":
        return consensus(shards, product), product
    if method == "gaussian":
        return gaussian(shards, rng, product), product
    if method == "swiss":
        return swiss(shards, product), product
    raise ValueError(f"unknown combine method {method!r}; expected one of {', '.join(METHODS)}")
