"""The two-stage resample of group-level parameters, on a conjugate hierarchical Normal model.

Model: μ ~ N(0, 10), τ ~ HalfNormal(2), α_g ~ N(μ, τ), y_gi ~ N(α_g, 1). Given θ = (μ, τ) the
group parameters are independent Normals in closed form:

    α_g | θ, y ~ N( (μ/τ² + Σ_i y_gi) / (1/τ² + n_g),  1 / (1/τ² + n_g) ).

So for resampled draws α_{g,s} given combined draws θ_s, z = (α − mean(θ_s)) / sd(θ_s) must be
standard normal, whatever θ_s is.
"""

import jax
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer.reparam import LocScaleReparam

from consensusfit.runner.inference.conditional import resample_groups
from consensusfit.runner.inference.nuts import SamplerSettings

jax.config.update("jax_enable_x64", True)


def centred(group, y=None):
    μ = numpyro.sample("μ", dist.Normal(0.0, 10.0))
    τ = numpyro.sample("τ", dist.HalfNormal(2.0))
    with numpyro.plate("groups", int(group.max()) + 1):
        α = numpyro.sample("α", dist.Normal(μ, τ))
    with numpyro.plate("rows", len(group)):
        numpyro.sample("y", dist.Normal(α[group], 1.0), obs=y)


def non_centred(group, y=None):
    with numpyro.handlers.reparam(config={"α": LocScaleReparam(0)}):
        centred(group, y)


def conditional(theta_mu, theta_tau, group, y):
    groups = int(group.max()) + 1
    n = np.bincount(group, minlength=groups)
    total = np.bincount(group, weights=y, minlength=groups)
    precision = 1 / theta_tau[:, None] ** 2 + n
    mean = (theta_mu[:, None] / theta_tau[:, None] ** 2 + total) / precision
    return mean, 1 / np.sqrt(precision)


@pytest.mark.parametrize("model", [centred, non_centred], ids=["centred", "non-centred"])
def test_resampled_groups_follow_the_exact_conditional(model):
    rng = np.random.default_rng(0)
    group = np.repeat(np.arange(6), [1, 2, 3, 5, 8, 2])
    y = rng.normal(rng.normal(1.0, 1.5, 6)[group], 1.0)
    # "combined" θ draws spread well beyond one posterior: the conditional must hold for any θ
    chains, draws = 2, 300
    mu = rng.normal(1.0, 0.6, (chains, draws))
    tau = np.exp(rng.normal(np.log(1.2), 0.4, (chains, draws)))
    settings = SamplerSettings(warmup=300, samples=0, chains=1, seed=3)
    result = resample_groups(model, {"group": group, "y": y}, {"μ": mu, "τ": tau}, settings)

    alpha = result.latent["α"] if "α" in result.latent else result.deterministic["α"]
    assert alpha.shape == (chains, draws, 6)
    if model is non_centred:
        assert "α_decentered" in result.latent
    mean, sd = conditional(mu.ravel(), tau.ravel(), group, y)
    z = (alpha.reshape(-1, 6) - mean) / sd
    # 600 draws per group: the mean of z is N(0, 1/600) and its SD within a few % of 1
    assert np.all(np.abs(z.mean(axis=0)) < 4 / np.sqrt(chains * draws)), z.mean(axis=0)
    assert np.all(np.abs(z.std(axis=0) - 1) < 0.12), z.std(axis=0)
    # and α tracks θ draw by draw: z is uncorrelated with μ and τ
    for theta in (mu.ravel(), np.log(tau.ravel())):
        corr = [np.corrcoef(theta, z[:, g])[0, 1] for g in range(6)]
        assert np.max(np.abs(corr)) < 4 / np.sqrt(chains * draws), corr
    assert 0.5 < result.accept_prob <= 1.0


def test_a_model_without_group_level_sites_has_nothing_to_resample():
    def flat(x, y=None):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        with numpyro.plate("rows", len(x)):
            numpyro.sample("y", dist.Normal(mu * x, 1.0), obs=y)

    x = np.linspace(0, 1, 5)
    result = resample_groups(flat, {"x": x, "y": x}, {"mu": np.zeros((1, 10))}, SamplerSettings(warmup=10))
    assert result.latent == {} and result.deterministic == {}
