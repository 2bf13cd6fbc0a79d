"""The forum thread's model (seeds/forum-thread.md), as a consensusfit Python model.

Unchanged from the NumPyro tutorial apart from two things: its arguments are named after the
data's columns (`Patient` arrives as dense integer codes 0..G-1 within the shard), and there is no
hand tempering: consensusfit finds the global sites (μ_α, σ_α, μ_β, σ_β, σ) and tempers each of
them, with its Jacobian, exactly once. The group-level intercepts and slopes are non-centred, the
reparameterisation the thread's last reply recommends.
"""

import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer.reparam import LocScaleReparam


def model(Patient, Weeks, FVC=None):
    μ_α = numpyro.sample("μ_α", dist.Normal(0.0, 500.0))
    σ_α = numpyro.sample("σ_α", dist.HalfNormal(100.0))
    μ_β = numpyro.sample("μ_β", dist.Normal(0.0, 3.0))
    σ_β = numpyro.sample("σ_β", dist.HalfNormal(3.0))

    n_patients = len(np.unique(Patient))
    with numpyro.plate("plate_i", n_patients), numpyro.handlers.reparam(
        config={"α": LocScaleReparam(0), "β": LocScaleReparam(0)}
    ):
        α = numpyro.sample("α", dist.Normal(μ_α, σ_α))
        β = numpyro.sample("β", dist.Normal(μ_β, σ_β))

    σ = numpyro.sample("σ", dist.HalfNormal(100.0))
    FVC_est = α[Patient] + β[Patient] * Weeks

    with numpyro.plate("data", len(Patient)):
        numpyro.sample("obs", dist.Normal(FVC_est, σ), obs=FVC)
