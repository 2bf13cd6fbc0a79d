"""Formula models: parsing, coding, names, the exact log density per family, refusals, recovery."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer import MCMC, NUTS
from numpyro.infer.util import log_density

jax.config.update("jax_enable_x64", True)

from consensusfit.runner.errors import BadInput  # noqa: E402
from consensusfit.runner.models.formula import (  # noqa: E402
    build_structure,
    formula_columns,
    formula_model,
    site_names,
)
from consensusfit.runner.models.formula_parse import parse_formula  # noqa: E402
from consensusfit.runner.data.shard import ShardData  # noqa: E402
from consensusfit.runner.inference.tempering import resolve_global_sites  # noqa: E402


def shard_of(columns, group_column="g"):
    columns = {k: np.asarray(v) for k, v in columns.items()}
    if group_column is None:
        return ShardData(columns)
    labels, index = np.unique(columns[group_column], return_inverse=True)
    return ShardData(columns, group_column, labels, index.astype(np.int32))


def stats_of(columns, categorical=()):
    stats = {}
    for name, values in columns.items():
        if name in categorical:
            stats[name] = {"levels": sorted(set(np.asarray(values).tolist()))}
        else:
            values = np.asarray(values, dtype=float)
            stats[name] = {"mean": float(values.mean()), "sd": float(values.std()),
                           "min": float(values.min()), "max": float(values.max())}
    return stats


def synthetic(rows=120, groups=8, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "g": np.array([f"G{i:02d}" for i in rng.integers(0, groups, rows)]),
        "h": rng.choice(["u", "v", "w"], rows),
        "a": rng.choice(["p", "q", "r"], rows),
        "b": rng.choice(["m", "n"], rows),
        "x": rng.normal(5.0, 2.0, rows),
        "z": rng.normal(-1.0, 0.5, rows),
        "y": rng.normal(3.0, 1.5, rows),
        "k": rng.poisson(3.0, rows).astype(float),
        "c": rng.integers(0, 2, rows).astype(float),
    }


DATA = synthetic()
STATS = stats_of(DATA, categorical=("g", "h", "a", "b"))


def model_for(formula, family="gaussian", priors=None, shards=1, group_column="g", stats=STATS):
    spec = {"formula": formula, "family": family, "priors": priors or {}}
    return formula_model(spec, group_column, stats, shards)


def trace_of(model, shard, seed=0):
    with numpyro.handlers.trace() as trace, numpyro.handlers.seed(rng_seed=seed):
        model.fn(**model.prepare(shard))
    return trace


# ---------------------------------------------------------------- parsing and names


def test_the_forum_model_has_bambi_names():
    model = model_for("y ~ 1 + x + (1 + x || g)")
    trace = trace_of(model, shard_of(DATA))
    groups = len(np.unique(DATA["g"]))
    shapes = {name: (site["type"], np.shape(site["value"])) for name, site in trace.items()}
    assert shapes == {
        "Intercept": ("sample", ()),
        "x": ("sample", ()),
        "1|g_sigma": ("sample", ()),
        "x|g_sigma": ("sample", ()),
        "1|g_offset": ("sample", (groups,)),
        "x|g_offset": ("sample", (groups,)),
        "1|g": ("deterministic", (groups,)),
        "x|g": ("deterministic", (groups,)),
        "sigma": ("sample", ()),
        "y": ("sample", (len(DATA["y"]),)),
    }
    assert trace["y"]["is_observed"]


def test_correlated_block_has_lkj_cholesky_and_correlation():
    model = model_for("y ~ x + (1 + x | g)")
    trace = trace_of(model, shard_of(DATA))
    groups = len(np.unique(DATA["g"]))
    assert np.shape(trace["1|g_x|g_corr_cholesky"]["value"]) == (2, 2)
    assert isinstance(trace["1|g_x|g_corr_cholesky"]["fn"], dist.LKJCholesky)
    assert trace["1|g_x|g_corr"]["type"] == "deterministic"
    assert np.shape(trace["1|g_x|g_offset"]["value"]) == (groups, 2)
    corr = np.asarray(trace["1|g_x|g_corr"]["value"])
    np.testing.assert_allclose(np.diag(corr), 1.0)


@pytest.mark.parametrize(
    "formula, names",
    [
        ("y ~ x", ["Intercept", "x"]),
        ("y ~ 0 + x", ["x"]),
        ("y ~ x - 1", ["x"]),
        ("y ~ 1", ["Intercept"]),
        ("y ~ a", ["Intercept", "a[q]", "a[r]"]),
        ("y ~ 0 + a", ["a[p]", "a[q]", "a[r]"]),
        ("y ~ a - 1 + x", ["a[p]", "a[q]", "a[r]", "x"]),
        ("y ~ x:z", ["Intercept", "x:z"]),
        ("y ~ x*z", ["Intercept", "x", "z", "x:z"]),
        ("y ~ a*b", ["Intercept", "a[q]", "a[r]", "b[n]", "a:b[q, n]", "a:b[r, n]"]),
        ("y ~ x + a:x", ["Intercept", "x", "a:x[q]", "a:x[r]"]),
        ("y ~ a:x", ["Intercept", "a:x[p]", "a:x[q]", "a:x[r]"]),
        ("y ~ a/x", ["Intercept", "a[q]", "a[r]", "a:x[p]", "a:x[q]", "a:x[r]"]),
        ("y ~ (x + z)**2", ["Intercept", "x", "z", "x:z"]),
        ("y ~ `x` + z - z", ["Intercept", "x"]),
    ],
)
def test_common_terms_and_treatment_coding(formula, names):
    structure = build_structure({"formula": formula, "family": "gaussian"}, "g", STATS, 1)
    assert [c.name for c in structure.common] == names


@pytest.mark.parametrize(
    "formula, sites",
    [
        ("y ~ (1 | g)", ["1|g_sigma", "1|g_offset", "1|g"]),
        ("y ~ (x | g)", ["1|g_sigma", "x|g_sigma", "1|g_x|g_corr_cholesky", "1|g_x|g_corr",
                         "1|g_x|g_offset", "1|g", "x|g"]),
        ("y ~ (0 + x | g)", ["x|g_sigma", "x|g_offset", "x|g"]),
        ("y ~ (1 + x || g)", ["1|g_sigma", "x|g_sigma", "1|g_offset", "x|g_offset", "1|g", "x|g"]),
        ("y ~ (1 | g) + (0 + x | g)", ["1|g_sigma", "1|g_offset", "1|g", "x|g_sigma", "x|g_offset", "x|g"]),
        ("y ~ (1 | g) + (1 | h)", ["1|g_sigma", "1|g_offset", "1|g", "1|h_sigma", "1|h_offset", "1|h"]),
        ("y ~ (1 | g/h)", ["1|g_sigma", "1|g_offset", "1|g", "1|g:h_sigma", "1|g:h_offset", "1|g:h"]),
        ("y ~ (1 + b || h)", ["1|h_sigma", "b[n]|h_sigma", "1|h_offset", "b[n]|h_offset", "1|h", "b[n]|h"]),
    ],
)
def test_group_terms_and_their_sites(formula, sites):
    structure = build_structure({"formula": formula, "family": "gaussian"}, "g", STATS, 1)
    assert site_names(structure) == ["Intercept"] + sites + ["sigma", "y"]


def test_family_parameters():
    for family, extra in [("gaussian", ["sigma"]), ("bernoulli", []), ("poisson", []),
                          ("negativebinomial", ["alpha"])]:
        response = {"gaussian": "y", "bernoulli": "c"}.get(family, "k")
        structure = build_structure({"formula": f"{response} ~ x", "family": family}, "g", STATS, 1)
        assert site_names(structure) == ["Intercept", "x"] + extra + [response]


def test_categorical_response_with_success_level():
    data = dict(DATA, yes=np.where(DATA["c"] > 0, "yes", "no"))
    stats = dict(STATS, yes={"levels": ["no", "yes"]})
    for formula in ["yes ~ x", "yes[yes] ~ x"]:
        model = model_for(formula, "bernoulli", stats=stats)
        np.testing.assert_array_equal(model.prepare(shard_of(data))["y"], DATA["c"])
    model = model_for("yes[no] ~ x", "bernoulli", stats=stats)
    np.testing.assert_array_equal(model.prepare(shard_of(data))["y"], 1 - DATA["c"])


def test_columns_and_numeric():
    model = model_for("y ~ x + a + (1 + z | g) + (1 | h)")
    assert model.columns == ("y", "x", "a", "z", "g", "h")
    assert model.numeric == ("y", "x", "z")
    assert model.data_as_arguments
    assert formula_columns({"formula": "y ~ x + a + (1 + z | g)", "family": "gaussian"}) == (
        ("y", "x", "a", "z", "g"), ("y",))
    assert formula_columns({"formula": "c ~ x", "family": "bernoulli"}) == (("c", "x"), ())


# ---------------------------------------------------------------- shards


def test_categories_are_coded_with_whole_data_levels():
    model = model_for("y ~ a + (1 | h)", group_column="g")
    only_p = {k: v[DATA["a"] == "p"] for k, v in DATA.items()}
    full, part = model.prepare(shard_of(DATA)), model.prepare(shard_of(only_p))
    assert full["X"].shape[1] == part["X"].shape[1] == 3
    np.testing.assert_array_equal(part["X"][:, 1:], 0.0)  # a[q], a[r] are zero for level p
    # crossed factor h: one entry per whole-data level even where the shard lacks some
    only_u = {k: v[DATA["h"] == "u"] for k, v in DATA.items()}
    assert model.prepare(shard_of(only_u))["groups0"].shape == (3, 0)
    np.testing.assert_array_equal(model.prepare(shard_of(only_u))["index0"], 0)


def test_local_and_crossed_groups_and_the_runners_global_sites():
    model = model_for("y ~ x + (1 + x | g) + (1 | h) + (1 | g:b)", shards=4)
    shard = shard_of(DATA)
    arguments, doubled = model.prepare(shard), model.prepare(shard.doubled())
    groups = shard.groups
    combos = len({(g, b) for g, b in zip(DATA["g"], DATA["b"])})
    assert arguments["groups0"].shape == (groups, 0)
    assert arguments["groups1"].shape == (3, 0)
    assert arguments["groups2"].shape == (combos, 0)
    assert doubled["groups0"].shape == (2 * groups, 0)
    assert doubled["groups2"].shape == (2 * combos, 0)
    found = resolve_global_sites(model.fn, arguments, doubled, None)
    assert sorted(found.latent) == sorted([
        "Intercept", "x", "1|g_sigma", "x|g_sigma", "1|g_x|g_corr_cholesky", "1|h_sigma",
        "1|h_offset", "1|g:b_sigma", "sigma",
    ])
    assert "1|h" in found.deterministic and "1|g" not in found.deterministic


def test_the_group_index_comes_from_the_shard():
    model = model_for("y ~ (1 | g)")
    shard = shard_of(DATA)
    np.testing.assert_array_equal(model.prepare(shard)["index0"], shard.group_index)


def test_no_group_column_means_every_factor_is_crossed():
    model = model_for("y ~ (1 | g)", group_column=None)
    arguments = model.prepare(shard_of(DATA, None))
    assert arguments["groups0"].shape == (len(STATS["g"]["levels"]), 0)


def test_model_takes_its_data_as_traced_arguments():
    model = model_for("k ~ x + a + (1 + x | g) + (1 | h)", "negativebinomial")
    arguments = model.prepare(shard_of(DATA))
    trace = trace_of(model, shard_of(DATA))
    params = {n: s["value"] for n, s in trace.items() if s["type"] == "sample" and not s["is_observed"]}
    eager = log_density(model.fn, (), arguments, params)[0]
    traced = jax.jit(lambda data: log_density(model.fn, (), data, params)[0])(
        {k: jnp.asarray(v) for k, v in arguments.items()})
    np.testing.assert_allclose(traced, eager, rtol=1e-12)


# ---------------------------------------------------------------- exact log densities


def random_points(model, shard, seeds=(0, 1, 2, 3)):
    for seed in seeds:
        trace = trace_of(model, shard, seed)
        yield {n: s["value"] for n, s in trace.items() if s["type"] == "sample" and not s["is_observed"]}


def assert_same_log_density(model, hand, hand_arguments, shard):
    arguments = model.prepare(shard)
    for params in random_points(model, shard):
        ours, _ = log_density(model.fn, (), arguments, params)
        theirs, _ = log_density(hand, (), hand_arguments, params)
        assert np.isfinite(float(theirs))
        np.testing.assert_allclose(float(ours), float(theirs), rtol=1e-11)


def codes_of(values):
    labels, index = np.unique(values, return_inverse=True)
    return index, len(labels)


def test_log_density_gaussian_uncorrelated_with_categorical():
    priors = {
        "Intercept": "Normal(1, 10)", "x": "Normal(0, 2)", "a": "Normal(0, 3)", "a[r]": "Normal(1, 1)",
        "1|g_sigma": "HalfNormal(2)", "x|g_sigma": "Exponential(1)", "sigma": "HalfStudentT(5, 1)",
    }
    model = model_for("y ~ 1 + x + a + (1 + x || g)", priors=priors)
    g, groups = codes_of(DATA["g"])

    def hand(y, x, a, g, groups):
        b0 = numpyro.sample("Intercept", dist.Normal(1.0, 10.0))
        b1 = numpyro.sample("x", dist.Normal(0.0, 2.0))
        bq = numpyro.sample("a[q]", dist.Normal(0.0, 3.0))
        br = numpyro.sample("a[r]", dist.Normal(1.0, 1.0))
        s0 = numpyro.sample("1|g_sigma", dist.HalfNormal(2.0))
        s1 = numpyro.sample("x|g_sigma", dist.Exponential(1.0))
        with numpyro.plate("groups", groups):
            z0 = numpyro.sample("1|g_offset", dist.Normal(0.0, 1.0))
            z1 = numpyro.sample("x|g_offset", dist.Normal(0.0, 1.0))
        sigma = numpyro.sample("sigma", dist.FoldedDistribution(dist.StudentT(5.0, 0.0, 1.0)))
        mu = b0 + b1 * x + bq * (a == "q") + br * (a == "r") + s0 * z0[g] + s1 * z1[g] * x
        with numpyro.plate("rows", len(y)):
            numpyro.sample("y", dist.Normal(mu, sigma), obs=y)

    arguments = dict(y=DATA["y"], x=DATA["x"], a=DATA["a"], g=g, groups=groups)
    assert_same_log_density(model, hand, arguments, shard_of(DATA))


def test_log_density_bernoulli_correlated():
    priors = {
        "Intercept": "Normal(0, 2)", "x": "StudentT(3, 0, 1)", "1|g_sigma": "HalfNormal(1)",
        "x|g_sigma": "HalfNormal(0.5)", "1|g_x|g_corr": "LKJ(3)",
    }
    model = model_for("c ~ x + (1 + x | g)", "bernoulli", priors)
    g, groups = codes_of(DATA["g"])

    def hand(c, x, g, groups):
        b0 = numpyro.sample("Intercept", dist.Normal(0.0, 2.0))
        b1 = numpyro.sample("x", dist.StudentT(3.0, 0.0, 1.0))
        s = jnp.stack([numpyro.sample("1|g_sigma", dist.HalfNormal(1.0)),
                       numpyro.sample("x|g_sigma", dist.HalfNormal(0.5))])
        L = numpyro.sample("1|g_x|g_corr_cholesky", dist.LKJCholesky(2, 3.0))
        z = numpyro.sample("1|g_x|g_offset", dist.Normal(0.0, 1.0).expand([groups, 2]).to_event(2))
        r = jnp.diag(s) @ L @ z.T  # (2, groups): column g ~ MVN(0, diag(s) R diag(s))
        logits = b0 + b1 * x + r[0, g] + r[1, g] * x
        numpyro.sample("c", dist.Bernoulli(logits=logits).to_event(1), obs=c)

    arguments = dict(c=DATA["c"], x=DATA["x"], g=g, groups=groups)
    assert_same_log_density(model, hand, arguments, shard_of(DATA))


def test_log_density_poisson_crossed_with_default_priors():
    model = model_for("k ~ x * b + (1 | g) + (1 | h)", "poisson", shards=3)
    g, groups = codes_of(DATA["g"])
    h = np.searchsorted(["u", "v", "w"], DATA["h"])
    mx, sx = STATS["x"]["mean"], STATS["x"]["sd"]
    # the documented defaults: M = log(mean k), S = 1; an indicator counts as mean 0.5, sd 0.5
    sd_xb = math.sqrt(0.5 * (mx**2 + sx**2) - (0.5 * mx) ** 2)
    intercept_sd = 2.5 * math.sqrt(1 + (mx / sx) ** 2 + 1 + (0.5 * mx / sd_xb) ** 2)

    def hand(k, x, b, g, h, groups):
        b0 = numpyro.sample("Intercept", dist.Normal(math.log(STATS["k"]["mean"]), intercept_sd))
        b1 = numpyro.sample("x", dist.Normal(0.0, 2.5 / sx))
        b2 = numpyro.sample("b[n]", dist.Normal(0.0, 2.5 / 0.5))
        b3 = numpyro.sample("x:b[n]", dist.Normal(0.0, 2.5 / sd_xb))
        sg = numpyro.sample("1|g_sigma", dist.HalfNormal(2.5))
        zg = numpyro.sample("1|g_offset", dist.Normal(0.0, 1.0).expand([groups]).to_event(1))
        sh = numpyro.sample("1|h_sigma", dist.HalfNormal(2.5))
        zh = numpyro.sample("1|h_offset", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
        n = b == "n"
        log_rate = b0 + b1 * x + b2 * n + b3 * x * n + sg * zg[g] + sh * zh[h]
        numpyro.sample("k", dist.Poisson(jnp.exp(log_rate)).to_event(1), obs=k)

    arguments = dict(k=DATA["k"], x=DATA["x"], b=DATA["b"], g=g, h=h, groups=groups)
    assert_same_log_density(model, hand, arguments, shard_of(DATA))


def test_log_density_negativebinomial_without_intercept():
    priors = {"a": "Normal(0, 2)", "x": "Laplace(0, 0.5)", "1|g_sigma": "Gamma(2, 2)",
              "alpha": "Gamma(3, 0.5)"}
    model = model_for("k ~ 0 + a + x + (1 | g)", "negativebinomial", priors)
    g, groups = codes_of(DATA["g"])

    def hand(k, x, a, g, groups):
        beta = {level: numpyro.sample(f"a[{level}]", dist.Normal(0.0, 2.0)) for level in "pqr"}
        b1 = numpyro.sample("x", dist.Laplace(0.0, 0.5))
        s = numpyro.sample("1|g_sigma", dist.Gamma(2.0, 2.0))
        z = numpyro.sample("1|g_offset", dist.Normal(0.0, 1.0).expand([groups]).to_event(1))
        alpha = numpyro.sample("alpha", dist.Gamma(3.0, 0.5))
        eta = sum(beta[level] * (a == level) for level in "pqr") + b1 * x + s * z[g]
        mean = jnp.exp(eta)
        # NB with mean μ and concentration α: p = α / (α + μ) of failure
        numpyro.sample("k", dist.GammaPoisson(alpha, alpha / mean).to_event(1), obs=k)

    arguments = dict(k=DATA["k"], x=DATA["x"], a=DATA["a"], g=g, groups=groups)
    assert_same_log_density(model, hand, arguments, shard_of(DATA))


def test_default_priors_gaussian():
    structure = build_structure({"formula": "y ~ x + (1 + x | g)", "family": "gaussian"}, "g", STATS, 50)
    my, sy = STATS["y"]["mean"], STATS["y"]["sd"]
    mx, sx = STATS["x"]["mean"], STATS["x"]["sd"]
    inflation = math.sqrt(1 + (mx / sx) ** 2)
    expected = {
        "Intercept": ("Normal", (my, 2.5 * sy * inflation)),
        "x": ("Normal", (0.0, 2.5 * sy / sx)),
        "1|g_sigma": ("HalfNormal", (2.5 * sy * inflation,)),
        "x|g_sigma": ("HalfNormal", (2.5 * sy / sx,)),
        "1|g_x|g_corr": ("LKJ", (2.0,)),
        "sigma": ("Exponential", (1.0 / sy,)),
    }
    got = {name: (p.family, tuple(v for _, v in p.arguments)) for name, p in structure.priors.items()}
    assert got.keys() == expected.keys()
    for name, (family, values) in expected.items():
        assert got[name][0] == family
        np.testing.assert_allclose(got[name][1], values, rtol=1e-12)
    nb = build_structure({"formula": "k ~ x", "family": "negativebinomial"}, "g", STATS, 50)
    assert str(nb.priors["alpha"]) == "Gamma(2, 0.1)"


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "formula, fragment",
    [
        ("y ~ x +", "cannot parse"),
        ("y ~ ", "no terms"),
        ("~ x", "no response"),
        ("y ~ x ~ z", "exactly one '~'"),
        ("y ~ log(x)", "function call 'log(x)'"),
        ("log(y) ~ x", "must be one column"),
        ("y ~ x + 2", "not a column name"),
        ("y ~ x | g", "needs parentheses"),
        ("y ~ x * (1 | g)", "at the top level"),
        ("y ~ ((1 | g))", "on its own"),
        ("y ~ (0 | g)", "has no columns"),
        ("y ~ (1 | g + h)", "columns joined by : or /"),
        ("y ~ (1 | )", "columns joined by : or /"),
        ("y ~ (1 | g | h)", "more than one bar"),
        ("y ~ (1 | g) + (1 | g)", "appears twice"),
        ("y ~ y + x", "also appears as a predictor"),
        ("y ~ (x + z", "unbalanced parentheses"),
        ("", "non-empty string"),
    ],
)
def test_bad_formulas_are_refused_in_one_line(formula, fragment):
    with pytest.raises(BadInput) as error:
        parse_formula(formula)
    assert fragment in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    "spec, shards, fragment",
    [
        ({"formula": "y ~ w"}, 1, "unknown column 'w'"),
        ({"formula": "q ~ x"}, 1, "unknown column 'q'"),
        ({"formula": "y ~ x + (1 | w)"}, 1, "unknown column 'w'"),
        ({"formula": "y ~ x", "family": "binomial"}, 1, "family 'binomial'"),
        ({"formula": "y ~ x", "priors": {"x": "Normal(0, "}}, 1, "priors['x']"),
        ({"formula": "y ~ x", "priors": {"z": "Normal(0, 1)"}}, 1, "no parameter 'z'"),
        ({"formula": "y ~ x", "priors": {"sigma": "Normal(0, 1)"}}, 1, "real line"),
        ({"formula": "y ~ x", "priors": {"x": "HalfNormal(1)"}}, 1, "positive-only"),
        ({"formula": "y ~ (x | g)", "priors": {"1|g_x|g_corr": "Normal(0, 1)"}}, 1, "needs LKJ"),
        ({"formula": "y ~ (x || g)", "priors": {"1|g_x|g_corr": "LKJ(2)"}}, 1, "no parameter"),
        ({"formula": "y ~ x + (1 | g)", "priors": {"1|g_sigma": "HalfCauchy(5)"}}, 5, "improper"),
        ({"formula": "y ~ x", "priors": {"x": "StudentT(2, 0, 1)"}}, 4, "df > K - 1 = 3"),
        ({"formula": "y ~ a:b"}, 1, "collinear"),
        ({"formula": "y ~ x + g"}, 1, "group column 'g' can only be a grouping factor"),
        ({"formula": "y ~ x + (1 | x)"}, 1, "needs whole-data levels"),
        ({"formula": "a ~ x"}, 1, "categorical"),
        ({"formula": "a ~ x", "family": "bernoulli"}, 1, "has 3 levels"),
        ({"formula": "a[s] ~ x", "family": "bernoulli"}, 1, "not a level"),
        ({"formula": "c[yes] ~ x", "family": "bernoulli"}, 1, "needs a categorical response"),
        ({"formula": "c[1] ~ x", "family": "bernoulli"}, 1, "cannot parse 'c[1]'"),
        ({"formula": "y ~ (1 | g) + (x | g)"}, 1, "two parameters would be named '1|g_sigma'"),
    ],
)
def test_bad_models_are_refused_in_one_line(spec, shards, fragment):
    with pytest.raises(BadInput) as error:
        formula_model({"family": "gaussian", "priors": {}, **spec}, "g", STATS, shards)
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_tempering_refusal_depends_on_k():
    spec = {"formula": "y ~ x + (1 | g)", "family": "gaussian", "priors": {"1|g_sigma": "HalfCauchy(5)"}}
    formula_model(spec, "g", STATS, 1)  # one shard: nothing is tempered
    with pytest.raises(BadInput, match=r"priors\['1\|g_sigma'\].*HalfCauchy\(5\).*K = 2"):
        formula_model(spec, "g", STATS, 2)


@pytest.mark.parametrize(
    "formula, family, column, values, fragment",
    [
        ("c ~ x", "bernoulli", "c", 2.0, "must be 0 or 1"),
        ("k ~ x", "poisson", "k", -1.0, "must be counts"),
        ("k ~ x", "negativebinomial", "k", 0.5, "must be counts"),
        ("y ~ a", "gaussian", "a", "s", "value 's' of column 'a'"),
        ("y ~ (1 | h)", "gaussian", "h", "t", "value 't' of column 'h'"),
    ],
)
def test_bad_shard_data_is_refused(formula, family, column, values, fragment):
    model = model_for(formula, family)
    data = {k: v.copy() if v.dtype.kind != "U" else v.astype(object) for k, v in DATA.items()}
    data[column][3] = values
    with pytest.raises(BadInput, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        model.prepare(shard_of(data))


# ---------------------------------------------------------------- recovery


def simulate(groups, per_group, seed):
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(groups), per_group)
    return rng, g, rng.normal(1.0, 1.0, groups * per_group)


def centred(effects):
    """Group effects with mean exactly 0: then the common terms' true values are also the values
    realised in the data (with few groups the realised mean of the effects moves them by
    sd/sqrt(groups), which is not what a recovery test is about)."""
    return effects - effects.mean(axis=0)


def fit(model, shard, seed=0, warmup=400, samples=400):
    mcmc = MCMC(NUTS(model.fn), num_warmup=warmup, num_samples=samples, progress_bar=False)
    mcmc.run(jax.random.PRNGKey(seed), **model.prepare(shard))
    return {name: np.asarray(value) for name, value in mcmc.get_samples().items()}


def assert_recovered(draws, truth):
    for name, value in truth.items():
        low, high = np.quantile(draws[name], [0.05, 0.95])
        assert low <= value <= high, f"{name}: true {value} outside 90% interval [{low:.3f}, {high:.3f}]"


def test_recovery_gaussian_correlated():
    rng, g, x = simulate(30, 20, seed=11)
    a = rng.choice(["p", "q"], len(g))
    sd, corr = np.array([0.8, 0.3]), 0.4
    cov = np.diag(sd) @ np.array([[1, corr], [corr, 1]]) @ np.diag(sd)
    effects = centred(rng.multivariate_normal([0, 0], cov, 30))
    y = 1.0 + 0.5 * x - 0.7 * (a == "q") + effects[g, 0] + effects[g, 1] * x + rng.normal(0, 0.5, len(g))
    data = {"y": y, "x": x, "a": a, "g": g}
    model = formula_model({"formula": "y ~ x + a + (1 + x | g)", "family": "gaussian", "priors": {}},
                          "g", stats_of(data, ("a", "g")), 1)
    draws = fit(model, shard_of(data))
    draws["corr"] = draws["1|g_x|g_corr"][:, 0, 1]
    assert_recovered(draws, {"Intercept": 1.0, "x": 0.5, "a[q]": -0.7, "1|g_sigma": 0.8,
                             "x|g_sigma": 0.3, "corr": corr, "sigma": 0.5})


def test_recovery_bernoulli():
    rng, g, x = simulate(40, 40, seed=12)
    effects = centred(rng.normal(0, 0.7, 40))
    logits = -0.3 + 1.0 * (x - 1.0) + effects[g]
    c = (rng.random(len(g)) < 1 / (1 + np.exp(-logits))).astype(float)
    data = {"c": c, "x": x, "g": g}
    model = formula_model({"formula": "c ~ x + (1 | g)", "family": "bernoulli", "priors": {}},
                          "g", stats_of(data, ("g",)), 1)
    draws = fit(model, shard_of(data))
    assert_recovered(draws, {"Intercept": -1.3, "x": 1.0, "1|g_sigma": 0.7})


def test_recovery_poisson_with_crossed_factor():
    rng, g, x = simulate(30, 20, seed=22)
    h = rng.choice(["u", "v", "w", "s", "t", "o"], len(g))
    effects_g = centred(rng.normal(0, 0.5, 30))
    effects_h = dict(zip(["o", "s", "t", "u", "v", "w"], centred(rng.normal(0, 0.4, 6))))
    log_rate = 0.5 + 0.3 * x + effects_g[g] + np.array([effects_h[v] for v in h])
    k = rng.poisson(np.exp(log_rate)).astype(float)
    data = {"k": k, "x": x, "g": g, "h": h}
    model = formula_model({"formula": "k ~ x + (1 | g) + (1 | h)", "family": "poisson", "priors": {}},
                          "g", stats_of(data, ("g", "h")), 1)
    draws = fit(model, shard_of(data))
    assert_recovered(draws, {"Intercept": 0.5, "x": 0.3, "1|g_sigma": 0.5, "1|h_sigma": 0.4})


def test_recovery_negativebinomial():
    rng, g, x = simulate(30, 20, seed=14)
    effects = centred(rng.normal(0, 0.6, 30))
    mean = np.exp(1.0 - 0.4 * x + effects[g])
    alpha = 5.0
    k = rng.poisson(rng.gamma(alpha, mean / alpha)).astype(float)
    data = {"k": k, "x": x, "g": g}
    model = formula_model({"formula": "k ~ x + (1 | g)", "family": "negativebinomial", "priors": {}},
                          "g", stats_of(data, ("g",)), 1)
    draws = fit(model, shard_of(data))
    assert_recovered(draws, {"Intercept": 1.0, "x": -0.4, "1|g_sigma": 0.6, "alpha": alpha})


# ---------------------------------------------------------------- examples


@pytest.mark.parametrize(
    "name, categorical",
    [("gaussian", ("subject",)), ("bernoulli", ("device", "user", "campaign")), ("poisson", ("store",))],
)
def test_examples_build_and_trace(name, categorical):
    from pathlib import Path

    from consensusfit.runner.spec import loads

    path = Path(__file__).resolve().parents[2] / "examples" / f"{name}.yaml"
    spec = loads(path.read_text())
    columns, _ = formula_columns(spec.model)
    rng = np.random.default_rng(0)
    data = {}
    for column in columns:
        if column in categorical:
            data[column] = rng.choice([f"{column}{i}" for i in range(4)], 50)
        elif column == columns[0] and spec.model["family"] != "gaussian":
            data[column] = rng.integers(0, 2, 50).astype(float)
        else:
            data[column] = rng.normal(size=50)
    model = formula_model(spec.model, spec.group_column, stats_of(data, categorical), spec.shards)
    trace = trace_of(model, shard_of(data, spec.group_column))
    assert trace[columns[0]]["is_observed"]
