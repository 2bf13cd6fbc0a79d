"""Tempering is exact: the K shard densities multiply to the full posterior, in the space NUTS uses.

The ground truth is closed form: a Normal mean and a Gamma precision (conjugate), and a hierarchical
Normal model whose log joint is written out by hand in NumPy. A negative control shows the check
fails for the classic mistake (tempering a site but not its Jacobian), so it can catch regressions.
"""

import jax

jax.config.update("jax_enable_x64", True)

import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro import handlers
from numpyro.infer.util import potential_energy
from numpyro.primitives import Messenger
from scipy import stats

from consensusfit.runner.errors import BadInput
from consensusfit.runner.data.shard import ShardData
from consensusfit.runner.models.python import python_model
from consensusfit.runner.inference.tempering import resolve_global_sites, temper, trace_model

K = 7
RNG = np.random.default_rng(1)


def conjugate_model(x, z):
    """x ~ N(μ, 1), μ ~ N(0, 10); z ~ N(0, 1/τ), τ ~ Gamma(3, 2): both posteriors closed form."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    tau = numpyro.sample("tau", dist.Gamma(3.0, 2.0))
    with numpyro.plate("rows", len(x)):
        numpyro.sample("x", dist.Normal(mu, 1.0), obs=x)
        numpyro.sample("z", dist.Normal(0.0, 1.0 / jax.numpy.sqrt(tau)), obs=z)


def closed_form_log_posterior(mu, log_tau, x, z):
    """log p(μ, u = log τ | x, z) up to a constant, from the conjugate updates."""
    precision = 1 / 100 + len(x)
    mean = x.sum() / precision
    shape, rate = 3.0 + len(z) / 2, 2.0 + (z**2).sum() / 2
    tau = np.exp(log_tau)
    # density of u = log τ is Gamma(τ) · τ (the Jacobian of τ = e^u)
    return stats.norm.logpdf(mu, mean, precision**-0.5) + stats.gamma.logpdf(tau, shape, scale=1 / rate) + log_tau


def summed_shard_potentials(model, shards, globals_, points, tempering=temper):
    """Σ_k U_k(u) at each point, where U_k is the potential NUTS uses on shard k."""
    totals = []
    for point in points:
        total = 0.0
        for kwargs in shards:
            tempered = tempering(model, frozenset(globals_), 1 / len(shards))
            total += float(potential_energy(tempered, (), kwargs, point))
        totals.append(total)
    return np.array(totals)


def test_conjugate_shard_densities_multiply_to_the_closed_form_posterior():
    x, z = RNG.normal(1.5, 1.0, 700), RNG.normal(0.0, 0.7, 700)
    shards = [{"x": xs, "z": zs} for xs, zs in zip(np.array_split(x, K), np.array_split(z, K))]
    points = [{"mu": RNG.normal(1.5, 0.2), "tau": RNG.normal(0.7, 0.5)} for _ in range(12)]
    product = -summed_shard_potentials(conjugate_model, shards, ["mu", "tau"], points)
    truth = np.array([closed_form_log_posterior(p["mu"], p["tau"], x, z) for p in points])
    # equal up to one normalising constant: the differences do not vary across points
    assert np.ptp(product - truth) < 1e-8


class temper_named_site_only(Messenger):
    """The mistake runner/inference/tempering.py guards against: scale the named site but not its Jacobian factor."""

    def __init__(self, fn, sites, scale):
        self.sites, self.scale = sites, scale
        super().__init__(fn)

    def process_message(self, msg):
        if msg["type"] == "sample" and msg["name"] in self.sites:
            msg["scale"] = self.scale


def test_the_check_catches_an_untempered_jacobian():
    x, z = RNG.normal(1.5, 1.0, 700), RNG.normal(0.0, 0.7, 700)
    shards = [{"x": xs, "z": zs} for xs, zs in zip(np.array_split(x, K), np.array_split(z, K))]
    points = [{"mu": 1.5, "tau": u} for u in np.linspace(-1, 1, 5)]
    product = -summed_shard_potentials(
        conjugate_model, shards, ["mu", "tau"], points, tempering=temper_named_site_only
    )
    truth = np.array([closed_form_log_posterior(p["mu"], p["tau"], x, z) for p in points])
    # the leftover is |J|^(K-1) = exp((K-1)·u): linear in u with slope K-1
    slope = np.polyfit([p["tau"] for p in points], product - truth, 1)[0]
    assert slope == pytest.approx(K - 1, rel=1e-6)


def test_without_tempering_the_product_counts_the_prior_k_times():
    x, z = RNG.normal(1.5, 1.0, 70), RNG.normal(0.0, 0.7, 70)
    shards = [{"x": xs, "z": zs} for xs, zs in zip(np.array_split(x, K), np.array_split(z, K))]
    points = [{"mu": m, "tau": 0.3} for m in np.linspace(-20, 20, 5)]
    untempered = -summed_shard_potentials(conjugate_model, shards, [], points)
    truth = np.array([closed_form_log_posterior(p["mu"], p["tau"], x, z) for p in points])
    assert np.ptp(untempered - truth) > 1.0


def hierarchical_model(g, y):
    """y_gi ~ N(α_g, 1), α_g ~ N(μ, σ), μ ~ N(0, 10), σ ~ HalfNormal(2)."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(2.0))
    with numpyro.plate("groups", int(g.max()) + 1):
        alpha = numpyro.sample("alpha", dist.Normal(mu, sigma))
    with numpyro.plate("rows", len(y)):
        numpyro.sample("y", dist.Normal(alpha[g], 1.0), obs=y)


def hand_written_log_joint(mu, log_sigma, alpha, g, y):
    """The full-data log joint of (μ, u = log σ, α), written out without NumPyro."""
    sigma = np.exp(log_sigma)
    return (
        stats.norm.logpdf(mu, 0, 10)
        + stats.halfnorm.logpdf(sigma, scale=2.0)
        + log_sigma  # Jacobian of σ = e^u
        + stats.norm.logpdf(alpha, mu, sigma).sum()
        + stats.norm.logpdf(y, alpha[g], 1.0).sum()
    )


def test_hierarchical_shards_temper_only_global_sites():
    groups = 21
    g = np.repeat(np.arange(groups), RNG.integers(3, 9, groups))
    true_alpha = RNG.normal(2.0, 1.5, groups)
    y = RNG.normal(true_alpha[g], 1.0)
    shard_of_group = np.arange(groups) % K
    model = hierarchical_model
    points = []
    for _ in range(8):
        points.append((RNG.normal(2, 1), RNG.normal(0.3, 0.4), RNG.normal(2, 1.5, groups)))
    product, truth = [], []
    for mu, log_sigma, alpha in points:
        total = 0.0
        for k in range(K):
            members = np.flatnonzero(shard_of_group == k)
            rows = np.isin(g, members)
            local = np.searchsorted(members, g[rows])
            kwargs = {"g": local, "y": y[rows]}
            doubled = {"g": np.concatenate([local, local + len(members)]), "y": np.tile(y[rows], 2)}
            found = resolve_global_sites(model, kwargs, doubled, None)
            assert found.latent == ["mu", "sigma"]
            params = {"mu": mu, "sigma": log_sigma, "alpha": alpha[members]}
            total += float(potential_energy(temper(model, frozenset(found.latent), 1 / K), (), kwargs, params))
        product.append(-total)
        truth.append(hand_written_log_joint(mu, log_sigma, alpha, g, y))
    assert np.ptp(np.array(product) - np.array(truth)) < 1e-8


FVC_MODEL = open("examples/fvc_model.py").read()


def fvc_shard(patients=12):
    visits = RNG.integers(6, 11, patients)
    codes = np.repeat(np.arange(patients), visits)
    labels = np.array([f"ID{c:03d}" for c in codes])
    weeks = RNG.uniform(-5, 133, len(codes))
    fvc = RNG.normal(2800, 700, patients)[codes] - 4 * weeks + RNG.normal(0, 130, len(codes))
    unique, index = np.unique(labels, return_inverse=True)
    return ShardData({"Patient": labels, "Weeks": weeks, "FVC": fvc}, "Patient", unique, index.astype(np.int32))


def test_forum_model_globals_found_and_each_tempered_exactly_once():
    model = python_model(FVC_MODEL, "examples/fvc_model.py", "model", "Patient", None)
    data = fvc_shard()
    kwargs = model.prepare(data)
    found = resolve_global_sites(model.fn, kwargs, model.prepare(data.doubled()), None)
    assert sorted(found.latent) == sorted(["μ_α", "σ_α", "μ_β", "σ_β", "σ"])
    trace = trace_model(temper(model.fn, frozenset(found.latent), 1 / K), kwargs)
    for name, site in trace.items():
        if site["type"] != "sample":
            continue
        expected = 1 / K if name in found.latent else None
        assert site["scale"] == expected, name


def test_hand_tempered_model_is_refused_with_a_reason():
    def hand_tempered(x):
        with handlers.scale(scale=1 / 5):
            mu = numpyro.sample("mu", dist.Normal(0, 10))
        numpyro.sample("x", dist.Normal(mu, 1), obs=x)

    x = np.ones(4)
    with pytest.raises(BadInput, match="site 'mu' is already scaled by 0.2.*remove hand tempering"):
        resolve_global_sites(hand_tempered, {"x": x}, {"x": np.ones(8)}, None)


def test_declared_global_sites_override_and_unknown_names_are_refused():
    data = fvc_shard()
    model = python_model(FVC_MODEL, "fvc", "model", "Patient", None)
    kwargs, doubled = model.prepare(data), model.prepare(data.doubled())
    assert resolve_global_sites(model.fn, kwargs, doubled, ["σ"]).latent == ["σ"]
    with pytest.raises(BadInput, match="globalSites names nope"):
        resolve_global_sites(model.fn, kwargs, doubled, ["nope"])
