"""EP's tilted sampling: the cavity as program arguments, gradients with the draws, warm starts."""

import numpy as np
import numpyro
import numpyro.distributions as dist

from consensusfit.runner.inference.nuts import CompiledNuts, SamplerSettings
from consensusfit.runner.inference.tempering import with_cavity


def model(y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 3.0))
    sigma = numpyro.sample("sigma", dist.LogNormal(0.5, 1.0))  # log σ ~ N(0.5, 1) exactly
    numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)
    numpyro.deterministic("sigma_squared", sigma**2)


def exact_tilted(y, mean, precision):
    """Closed form: the tilted distribution of (mu, log σ) is Gaussian."""
    site_precision = np.diag([1 / 9 + len(y), 1.0])
    site_shift = np.array([y.sum(), 0.5])
    total = site_precision + precision
    return np.linalg.solve(total, site_shift + precision @ mean), total


def test_tilted_draws_and_gradients_match_the_closed_form_for_any_cavity_without_recompiling():
    y = np.random.default_rng(0).normal(1.0, 1.0, size=12)
    settings = SamplerSettings(warmup=300, samples=1500, chains=2, seed=0)
    sampler = CompiledNuts(
        with_cavity(model, ["mu", "sigma"]), {"y": y}, settings, global_names=["mu", "sigma"], cavity_dims=2
    )
    cavities = [
        (np.array([0.0, 0.0]), np.diag([4.0, 1.0])),
        (np.array([2.0, -1.0]), np.array([[30.0, 5.0], [5.0, 9.0]])),
    ]
    for seed, (mean, precision) in enumerate(cavities):
        samples = sampler.run([sampler.example], [seed], cavities=[(mean, precision)])[0]
        exact_mean, exact_precision = exact_tilted(y, mean, precision)
        u = np.stack([samples.unconstrained["mu"], samples.unconstrained["sigma"]], -1)
        sd = np.sqrt(np.diag(np.linalg.inv(exact_precision)))
        assert np.all(np.abs(u.mean((0, 1)) - exact_mean) < 5 * sd / np.sqrt(1000))
        # ∇_u log p̃ at each draw: exact for a Gaussian
        np.testing.assert_allclose(samples.global_gradient, -(u - exact_mean) @ exact_precision, rtol=1e-4, atol=1e-4)
        assert "sigma_squared" in samples.constrained and "cavity_mean" not in samples.constrained


def test_a_warm_start_continues_from_the_adaptation_of_an_earlier_run():
    y = np.random.default_rng(1).normal(1.0, 1.0, size=12)
    tilted = with_cavity(model, ["mu", "sigma"])
    cavity = (np.array([1.0, 0.0]), np.diag([2.0, 2.0]))
    cold = CompiledNuts(tilted, {"y": y}, SamplerSettings(warmup=400, samples=200, chains=2), global_names=["mu", "sigma"], cavity_dims=2)
    first = cold.run([cold.example], [0], cavities=[cavity])[0]
    start = first.adaptation
    assert start.position.shape == (2, 2) and start.inverse_mass.shape == (2, 2)

    warm = CompiledNuts(
        tilted, {"y": y}, SamplerSettings(warmup=50, samples=1500, chains=2), global_names=["mu", "sigma"],
        cavity_dims=2, warm=2,
    )
    second = warm.run([warm.example], [1], cavities=[cavity], starts=[start])[0]
    # the mass matrix is kept, the step size re-tuned near the cold run's
    np.testing.assert_allclose(second.adaptation.inverse_mass, start.inverse_mass)
    assert np.all(np.abs(np.log(second.step_size / first.step_size)) < 1.0)
    exact_mean, exact_precision = exact_tilted(y, *cavity)
    u = np.stack([second.unconstrained["mu"], second.unconstrained["sigma"]], -1)
    sd = np.sqrt(np.diag(np.linalg.inv(exact_precision)))
    assert np.all(np.abs(u.mean((0, 1)) - exact_mean) < 5 * sd / np.sqrt(1000))
