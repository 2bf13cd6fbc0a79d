"""A tiny NumPyro model for the end-to-end fits: a random intercept per group."""

import numpy as np
import numpyro
import numpyro.distributions as dist


def model(g, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    tau = numpyro.sample("tau", dist.HalfNormal(2.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(2.0))
    with numpyro.plate("groups", len(np.unique(g))):
        a = numpyro.sample("a", dist.Normal(0.0, 1.0))
    with numpyro.plate("rows", len(g)):
        numpyro.sample("y", dist.Normal(mu + tau * a[g], sigma), obs=y)
