"""The compiled sampler is NumPyro's NUTS: the same keys give the same transitions as `MCMC`."""

import jax
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer import MCMC, NUTS

jax.config.update("jax_enable_x64", True)

from consensusfit.runner.inference.nuts import CompiledNuts, SamplerSettings, run_nuts  # noqa: E402


def hierarchical(y, group, groups: int):
    mu = numpyro.sample("mu", dist.Normal(0, 5))
    tau = numpyro.sample("tau", dist.HalfNormal(2))
    offset = numpyro.sample("offset", dist.Normal(0, 1).expand([groups]))
    sigma = numpyro.sample("sigma", dist.Exponential(1))
    numpyro.deterministic("effect", mu + tau * offset)
    numpyro.sample("y", dist.Normal(mu + tau * offset[group], sigma), obs=y)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    group = rng.integers(0, 5, 60)
    return {"y": rng.normal(1.0 + 0.5 * group, 1.0), "group": group}


def test_same_transitions_as_numpyro_mcmc(data):
    """Warmup and draws equal `MCMC(NUTS, chain_method="vectorized")`'s with the same key, to
    rounding: the sampler ravels the sites into one vector, which changes only the order of
    floating-point work. Short, because NUTS turns a last-bit difference into another chain."""
    settings = SamplerSettings(warmup=12, samples=8, chains=3, seed=4)
    arguments = {**data, "groups": 5}
    ours = run_nuts(hierarchical, arguments, settings)
    mcmc = MCMC(NUTS(hierarchical), num_warmup=12, num_samples=8, num_chains=3,
                chain_method="vectorized", progress_bar=False)
    mcmc.run(jax.random.PRNGKey(4), extra_fields=("num_steps", "diverging"), **arguments)
    theirs = mcmc.get_samples(group_by_chain=True)
    assert set(ours.constrained) == set(theirs) == {"mu", "tau", "offset", "sigma", "effect"}
    for name, value in theirs.items():
        np.testing.assert_allclose(ours.constrained[name], value, rtol=1e-9, atol=1e-12)
    extra = mcmc.get_extra_fields(group_by_chain=True)
    np.testing.assert_array_equal(ours.num_steps, extra["num_steps"])
    np.testing.assert_array_equal(ours.diverging, extra["diverging"])
    assert ours.unconstrained["offset"].shape == (3, 8, 5)
    assert np.all(ours.constrained["tau"] > 0) and np.all(ours.unconstrained["tau"] != ours.constrained["tau"])


def test_batches_run_in_threads_at_once(data):
    """`run` traces nothing, so threads may share one compiled sampler (the CPU lanes of a pod);
    each batch gets the draws it gets alone."""
    from concurrent.futures import ThreadPoolExecutor

    settings = SamplerSettings(warmup=10, samples=10, chains=2)
    arguments = {k: jax.numpy.asarray(v) for k, v in data.items()}
    sampler = CompiledNuts(lambda y, group: hierarchical(y, group, 5), arguments, settings, 1, True)
    alone = [sampler.run([arguments], [seed])[0] for seed in range(4)]
    with ThreadPoolExecutor(2) as threads:
        together = list(threads.map(lambda seed: sampler.run([arguments], [seed])[0], range(4)))
    for a, b in zip(alone, together):
        np.testing.assert_array_equal(a.constrained["mu"], b.constrained["mu"])
