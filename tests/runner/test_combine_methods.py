"""Exactness of the combination methods on Gaussian shards, whose product is known in closed form."""

import numpy as np
import pytest

from consensusfit.runner.combine import methods as combine
from consensusfit.runner.combine.covariance import shrunk_covariance

METHODS = ("consensus", "gaussian", "swiss")


def random_covariance(rng, dim, scales, correlation):
    """A covariance with the given component scales and an AR(1)-like correlation, rotated a bit."""
    index = np.arange(dim)
    corr = correlation ** np.abs(index[:, None] - index[None, :])
    return corr * np.outer(scales, scales)


def exact_product(means, covs):
    precisions = [np.linalg.inv(c) for c in covs]
    cov = np.linalg.inv(np.sum(precisions, axis=0))
    mean = cov @ np.sum([w @ m for w, m in zip(precisions, means)], axis=0)
    return mean, cov


def gaussian_shards(rng, dim, shards, chains, draws, correlation=0.5):
    """Shard posteriors N(m_k, Σ_k) with wildly different scales per component (units matter)."""
    scales = np.exp(rng.uniform(-3, 5, size=dim))
    means, covs, samples = [], [], []
    for k in range(shards):
        cov = random_covariance(rng, dim, scales * np.exp(rng.uniform(-0.3, 0.3, dim)), correlation)
        mean = rng.normal(0, 1, dim) * scales
        counts = draws[k] if isinstance(draws, list) else draws
        x = rng.multivariate_normal(mean, cov, size=(chains, counts))
        means.append(mean), covs.append(cov), samples.append(x)
    return means, covs, samples


def errors(result, mean, cov):
    """(mean error, SD ratio) per component, the error in units of the exact product's SD."""
    flat = result.reshape(-1, result.shape[-1])
    sd = np.sqrt(np.diag(cov))
    return (flat.mean(axis=0) - mean) / sd, flat.std(axis=0) / sd


def replicate(method, make, replications):
    """Combine `replications` independent sets of shard draws of the same shard posteriors.

    Monte Carlo error in a consensus has two parts: each shard's draws are a finite sample, and the
    weights (precisions) are estimated from those same draws; the second part grows with how far
    the shards' means sit from each other. Rather than derive a formula for both, the test
    measures the spread over independent replications and checks that the average error is zero
    within that spread (no bias) and that each replication is close.
    """
    rng = np.random.default_rng(11)
    errs, ratios = [], []
    for r in range(replications):
        means, covs, samples = make(np.random.default_rng(100 + r))
        result, product = combine.combine(method, samples, rng)
        mean, cov = exact_product(means, covs)
        e, q = errors(result, mean, cov)
        errs.append(e), ratios.append(q)
    return np.array(errs), np.array(ratios), result, product


def assert_unbiased(values, target, what):
    average = values.mean(axis=0)
    standard_error = values.std(axis=0, ddof=1) / np.sqrt(len(values))
    t = (average - target) / standard_error
    assert np.all(np.abs(t) < 4.5), f"{what}: average {average}, t {t}"


def fixed_posteriors(dim, shards, draws, correlation=0.5, seed=1):
    """The same K shard posteriors every replication; only the draws change."""
    structure = np.random.default_rng(seed)
    means, covs, _ = gaussian_shards(structure, dim, shards, 1, 2, correlation)

    def make(rng):
        samples = []
        for k, (m, c) in enumerate(zip(means, covs)):
            counts = draws[k] if isinstance(draws, list) else draws
            samples.append(rng.multivariate_normal(m, c, size=(2, counts // 2)))
        return means, covs, samples

    return make


@pytest.mark.parametrize("method", METHODS)
def test_every_method_recovers_the_exact_product(method):
    # 8 shards whose means disagree by about their own SDs (as shards of one data set do), with
    # components on scales from 0.05 to 150: 4,000 draws each.
    make = fixed_posteriors(dim=6, shards=8, draws=4000)
    errs, ratios, result, _ = replicate(method, make, 12)
    assert_unbiased(errs, 0.0, "mean error")
    assert np.max(np.abs(errs)) < 0.2
    assert np.max(np.abs(ratios - 1)) < 0.05
    # the combined correlation too, not only the marginals
    means, covs, _ = make(np.random.default_rng(0))
    _, cov = exact_product(means, covs)
    exact_corr = cov / np.outer(np.sqrt(np.diag(cov)), np.sqrt(np.diag(cov)))
    assert np.max(np.abs(np.corrcoef(result.reshape(-1, 6).T) - exact_corr)) < 0.05


@pytest.mark.parametrize("method", METHODS)
def test_more_dimensions_than_draws(method):
    # D = 40 components, 30 draws per shard: the sample covariance is singular (rank 29), and
    # NumPyro's consensus inverts it anyway. The shrinkage estimate keeps the weights finite and
    # sane. Thirty draws pin a shard's mean down only to ±σ_k/√30, and its covariance (hence its
    # weight) far worse, so "within Monte Carlo error" here means: the typical error is of the
    # order of the sampling error of 30 draws (median |N(0,1)| / √30 = 0.12 combined SDs) and the
    # SDs are right to within the ±25% that 30 draws allow.
    draws = 30
    make = fixed_posteriors(dim=40, shards=4, draws=draws, correlation=0.3)
    errs, ratios, result, product = replicate(method, make, 20)
    assert all(m.shrinkage > 0 for m in product.shards)
    assert np.all(np.isfinite(result))
    sampling = 0.674 / np.sqrt(draws)
    assert np.median(np.abs(errs)) < 2.5 * sampling
    assert 0.8 < np.median(ratios) < 1.2


@pytest.mark.parametrize("method", METHODS)
def test_a_scalar_model(method):
    means = [np.array([m]) for m in (1.0, 2.0, -0.5)]
    covs = [np.array([[v]]) for v in (1.0, 0.25, 4.0)]

    def make(rng):
        return means, covs, [rng.normal(m, np.sqrt(c[0]), size=(2, 1000, 1)) for m, c in zip(means, covs)]

    errs, ratios, result, _ = replicate(method, make, 12)
    assert result.shape[-1] == 1
    assert_unbiased(errs, 0.0, "mean error")
    assert np.max(np.abs(ratios - 1)) < 0.1


@pytest.mark.parametrize("method", METHODS)
def test_shards_with_different_numbers_of_draws(method):
    make = fixed_posteriors(dim=3, shards=3, draws=[3000, 500, 1200])
    errs, ratios, result, _ = replicate(method, make, 12)
    expected = {"consensus": (2, 1500), "gaussian": (2, 1500), "swiss": (1, 4700)}[method]
    assert result.shape[:2] == expected
    assert_unbiased(errs, 0.0, "mean error")
    assert np.max(np.abs(errs)) < 0.3  # the 500-draw shard sets the Monte Carlo error
    assert np.max(np.abs(ratios - 1)) < 0.1


def test_consensus_of_one_shard_is_the_shard():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2, 100, 3))
    np.testing.assert_allclose(combine.consensus([x]), x, atol=1e-10)


def test_shrinkage_vanishes_with_many_draws_and_keeps_units():
    rng = np.random.default_rng(6)
    cov = np.array([[1e6, 300.0], [300.0, 1.0]])
    x = rng.multivariate_normal([0, 0], cov, size=20000)
    estimate, lam = shrunk_covariance(x)
    assert lam < 0.01
    np.testing.assert_allclose(estimate, np.cov(x.T), rtol=0.02)
    # rescaling a component rescales the estimate, nothing else (shrinking the correlation)
    rescaled, lam2 = shrunk_covariance(x * [1e-3, 1.0])
    assert lam2 == pytest.approx(lam)
    np.testing.assert_allclose(rescaled, estimate * np.outer([1e-3, 1], [1e-3, 1]), rtol=1e-10)


def test_refuses_what_cannot_be_combined():
    with pytest.raises(ValueError, match="no shards"):
        combine.combine("consensus", [], np.random.default_rng())
    with pytest.raises(ValueError, match="different numbers"):
        combine.combine("consensus", [np.zeros((1, 5, 2)), np.zeros((1, 5, 3))], np.random.default_rng())
    with pytest.raises(ValueError, match="unknown combine method"):
        combine.combine("median", [np.random.default_rng().normal(size=(1, 5, 2))], np.random.default_rng())


def test_a_shard_of_constant_draws_is_named_by_the_product():
    rng = np.random.default_rng(0)
    shards = [rng.normal(size=(2, 50, 2)) for _ in range(3)]
    shards[1][..., 0] = 0.5
    with pytest.raises(ValueError, match=r"shard 1's global draws have no positive definite covariance \(a component does not vary"):
        combine.gaussian_product(shards)
