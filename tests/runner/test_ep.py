"""EP's algebra against closed forms: Gaussian sites, Stein moments, damping safeguards."""

import numpy as np
import pytest

from consensusfit.runner.combine import ep


def random_spd(rng, d, scale=1.0):
    a = rng.normal(size=(d, d))
    return scale * (a @ a.T + d * np.eye(d))


def exact_tilted(site_precision, site_shift, cav: ep.Gaussian) -> ep.Moments:
    """The tilted distribution of a Gaussian site is Gaussian: its moments in closed form."""
    precision = site_precision + cav.precision
    return ep.Moments(np.linalg.solve(precision, site_shift + cav.precision @ cav.mean), precision, "exact")


def test_gaussian_sites_converge_to_the_exact_product():
    rng = np.random.default_rng(0)
    d, shards = 3, 7
    true_precision = np.stack([random_spd(rng, d, 0.2) for _ in range(shards)])
    true_shift = rng.normal(size=(shards, d))
    exact = ep.approximation(ep.Sites(true_precision, true_shift))

    sites = ep.from_pilot(ep.Gaussian(np.zeros(d), np.eye(d) / 10), shards)
    for _ in range(60):
        tilted = [exact_tilted(true_precision[k], true_shift[k], ep.cavity(sites, k)) for k in range(shards)]
        sites = ep.update(sites, tilted, damping=0.5).sites
    q = ep.approximation(sites)
    np.testing.assert_allclose(q.mean, exact.mean, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(q.precision, exact.precision, rtol=1e-8)
    # a Gaussian site is recovered exactly, whatever the start
    np.testing.assert_allclose(sites.precision, true_precision, rtol=1e-7)


def test_undamped_gaussian_sites_are_exact_after_one_round():
    rng = np.random.default_rng(1)
    d, shards = 2, 4
    true_precision = np.stack([random_spd(rng, d) for _ in range(shards)])
    true_shift = rng.normal(size=(shards, d))
    sites = ep.from_pilot(ep.Gaussian(rng.normal(size=d), random_spd(rng, d)), shards)
    tilted = [exact_tilted(true_precision[k], true_shift[k], ep.cavity(sites, k)) for k in range(shards)]
    updated = ep.update(sites, tilted, damping=1.0)
    assert updated.damping == 1.0
    np.testing.assert_allclose(updated.sites.precision, true_precision, rtol=1e-9)
    np.testing.assert_allclose(updated.sites.shift, true_shift, rtol=1e-9, atol=1e-12)


def gaussian_draws(rng, mean, precision, n):
    cov = np.linalg.inv(precision)
    u = rng.multivariate_normal(mean, cov, size=n)
    return u, -(u - mean) @ precision  # ∇ log N(u; mean, cov)


def test_the_control_variate_mean_of_a_gaussian_tilted_distribution_is_exact():
    rng = np.random.default_rng(2)
    d = 4
    precision, mean = random_spd(rng, d), rng.normal(size=d)
    u, g = gaussian_draws(rng, mean, precision, 300)
    moments = ep.tilted_moments(u, g, ess=300)
    assert moments.estimator == "control variate"
    np.testing.assert_allclose(moments.mean, mean, atol=1e-9)  # zero variance for a Gaussian
    np.testing.assert_allclose(moments.precision, ep.sample_moments(u, ess=300).precision)


def test_the_control_variate_mean_has_less_noise_than_the_sample_mean_for_a_skewed_tilted_distribution():
    """A skewed site (log-density u − eᵘ) under a Gaussian cavity: over repetitions the control
    variate mean scatters far less than the sample mean, around the same value."""
    rng = np.random.default_rng(3)

    def tilted_draws(n):
        # p̃(u) ∝ exp(u − e^u) N(u; 0, 1/19), by importance resampling from a wide Gaussian
        proposal = rng.normal(0.0, 0.5, size=200 * n)
        log_w = proposal - np.exp(proposal) - 0.5 * 19 * proposal**2 + 0.5 * (proposal / 0.5) ** 2
        w = np.exp(log_w - log_w.max())
        u = rng.choice(proposal, size=n, p=w / w.sum())[:, None]
        return u, 1.0 - np.exp(u) - 19 * u

    controlled, plain = [], []
    for _ in range(200):
        u, g = tilted_draws(400)
        controlled.append(ep.tilted_moments(u, g, ess=400).mean[0])
        plain.append(ep.sample_moments(u, ess=400).mean[0])
    assert np.std(controlled) < np.std(plain) / 3
    assert abs(np.mean(controlled) - np.mean(plain)) < 0.01


def test_a_gradient_that_never_varies_leaves_the_sample_mean():
    u = np.random.default_rng(5).normal(size=(200, 2))
    moments = ep.tilted_moments(u, np.zeros_like(u), ess=200)
    assert moments.estimator == "sample"
    np.testing.assert_allclose(moments.mean, u.mean(0))


def test_sample_moments_debias_the_inverse_covariance():
    rng = np.random.default_rng(4)
    d, n = 5, 40
    estimates = [ep.sample_moments(rng.normal(size=(n, d)), ess=n).precision for _ in range(3000)]
    np.testing.assert_allclose(np.mean(estimates, 0), np.eye(d), atol=0.03)


def test_damping_shrinks_until_every_cavity_is_positive_definite():
    d, shards = 1, 3
    sites = ep.Sites(np.full((shards, d, d), 1.0), np.zeros((shards, d)))
    # a tilted precision far below the cavity's asks site 0 for λ* = 0.2 − 2 = −1.8: undamped,
    # Λ = −1.8 + 1 + 1 < 0.5... the full step makes Λ − λ_1 = −0.8 < 0.
    tilted = [ep.Moments(np.zeros(d), np.array([[0.2]]), "sample")] + [
        ep.Moments(np.zeros(d), np.array([[3.0]]), "sample") for _ in range(shards - 1)
    ]
    updated = ep.update(sites, tilted, damping=1.0)
    assert 0 < updated.damping < 1.0
    assert ep.valid(updated.sites)


def test_an_update_that_no_damping_can_save_keeps_the_sites():
    sites = ep.Sites(np.full((2, 1, 1), 1.0), np.zeros((2, 1)))
    broken = [ep.Moments(np.zeros(1), np.array([[-50.0]]), "sample")] * 2
    updated = ep.update(sites, broken, damping=1.0, tries=3)
    assert updated.damping == 0.0
    assert updated.sites is sites


def test_change_is_measured_in_posterior_sds():
    before = ep.Gaussian(np.array([0.0, 10.0]), np.diag([1.0, 4.0]))
    after = ep.Gaussian(np.array([0.1, 10.0]), np.diag([1.0, 1.0]))
    change = ep.change(before, after)
    assert change.mean == pytest.approx(0.1)
    assert change.sd == pytest.approx(1.0)  # sd 0.5 -> 1


def test_robust_pilot_moments_ignore_a_long_tail_and_match_a_gaussian():
    rng = np.random.default_rng(6)
    gaussian = rng.multivariate_normal([1.0, -2.0], [[1.0, 0.6], [0.6, 4.0]], size=20000)
    robust = ep.robust_moments(gaussian)
    np.testing.assert_allclose(robust.mean, [1.0, -2.0], atol=0.05)
    np.testing.assert_allclose(robust.cov, [[1.0, 0.6], [0.6, 4.0]], rtol=0.06, atol=0.03)
    # a log-scale whose left tail runs off: 10% of the draws far out
    tailed = np.concatenate([rng.normal(0.0, 1.0, 9000), rng.normal(-30.0, 10.0, 1000)])[:, None]
    assert ep.robust_moments(tailed).sd[0] < 1.5 < tailed.std()
