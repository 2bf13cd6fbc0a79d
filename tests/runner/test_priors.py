"""Prior strings: the grammar, the distributions they mean, and the refusals."""

import jax
import numpy as np
import numpyro.distributions as dist
import pytest

jax.config.update("jax_enable_x64", True)

from consensusfit.runner.errors import BadInput  # noqa: E402
from consensusfit.runner.models.priors import (  # noqa: E402
    CORRELATION,
    POSITIVE,
    REAL,
    check_support,
    check_tempered,
    make_prior,
    parse_prior,
)

POINTS = np.array([0.1, 0.7, 2.5, 13.0])


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Normal(0, 500)", dist.Normal(0.0, 500.0)),
        ("Normal(mu=-1.5, sigma=2e1)", dist.Normal(-1.5, 20.0)),
        ("Normal(-1.5, scale=.5)", dist.Normal(-1.5, 0.5)),
        ("  StudentT( 3 , 0 , 2.5 ) ", dist.StudentT(3.0, 0.0, 2.5)),
        ("Cauchy(1, 2)", dist.Cauchy(1.0, 2.0)),
        ("Laplace(0, 3)", dist.Laplace(0.0, 3.0)),
        ("Uniform(0.05, 20)", dist.Uniform(0.05, 20.0)),
        ("HalfNormal(100)", dist.HalfNormal(100.0)),
        ("HalfCauchy(sigma=2)", dist.HalfCauchy(2.0)),
        ("Exponential(1)", dist.Exponential(1.0)),
        ("Gamma(2, 0.1)", dist.Gamma(2.0, 0.1)),
        ("InverseGamma(alpha=3, beta=2)", dist.InverseGamma(3.0, 2.0)),
        ("LogNormal(0, 1E0)", dist.LogNormal(0.0, 1.0)),
    ],
)
def test_prior_strings_mean_the_numpyro_distribution(text, expected):
    prior = parse_prior(text)
    points = POINTS if expected.support is not dist.constraints.real else POINTS - 3
    np.testing.assert_allclose(prior.distribution().log_prob(points), expected.log_prob(points), rtol=1e-12)


def test_half_student_t_is_the_folded_student_t():
    prior = parse_prior("HalfStudentT(4, 2.5)")
    expected = np.log(2.0) + dist.StudentT(4.0, 0.0, 2.5).log_prob(POINTS)
    np.testing.assert_allclose(prior.distribution().log_prob(POINTS), expected, rtol=1e-12)
    assert prior.support == POSITIVE


def test_lkj_is_an_lkj_cholesky_of_the_given_dimension():
    prior = parse_prior("LKJ(2)")
    assert prior.support == CORRELATION
    d = prior.distribution(3)
    assert isinstance(d, dist.LKJCholesky) and d.event_shape == (3, 3)
    assert float(d.concentration) == 2.0


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("Normal", "expected Name(arguments)"),
        ("Normal(0, 1", "missing ')'"),
        ("Normal(0 1)", "expected ','"),
        ("Normal(0, 1,)", "trailing ','"),
        ("Normal(0)", "missing argument(s) scale"),
        ("Normal(0, 1, 2)", "takes 2 argument(s)"),
        ("Normal(0, -1)", "scale must be positive"),
        ("Normal(0, 0)", "scale must be positive"),
        ("Normal(mu=0, 1)", "positional argument after a keyword"),
        ("Normal(0, mu=1)", "given twice"),
        ("Normal(0, width=1)", "has no argument 'width'"),
        ("Normal(0, inf)", "cannot parse"),
        ("Normal(0, 1) + 1", "cannot parse"),
        ("__import__('os')", "cannot parse"),
        ("Wishart(3)", "unknown prior 'Wishart'"),
        ("Uniform(3, 1)", "lower must be below upper"),
        ("LKJ(0)", "concentration must be positive"),
        ("", "expected Name(arguments)"),
        (5, "must be a string"),
    ],
)
def test_unparseable_priors_are_refused_with_the_part_named(text, fragment):
    with pytest.raises(BadInput) as error:
        parse_prior(text, "spec.model.priors['x']")
    message = str(error.value)
    assert fragment in message and "spec.model.priors['x']" in message and "\n" not in message


def test_support_must_fit_the_parameter():
    check_support(parse_prior("Normal(0, 1)"), REAL, "x")
    check_support(parse_prior("HalfNormal(1)"), POSITIVE, "x")
    check_support(parse_prior("Uniform(0, 10)"), POSITIVE, "x")
    check_support(parse_prior("LKJ(1)"), CORRELATION, "x")
    for text, support in [
        ("Normal(0, 1)", POSITIVE),
        ("Uniform(-1, 10)", POSITIVE),
        ("Exponential(1)", REAL),
        ("LKJ(2)", REAL),
        ("Normal(0, 1)", CORRELATION),
    ]:
        with pytest.raises(BadInput, match="does not fit|real line|positive-only|negative values"):
            check_support(parse_prior(text), support, "x")


def test_tempered_priors_must_stay_proper():
    """p^(1/K) of a Student-t with df ν has tails |θ|^-(ν+1)/K: proper iff ν > K - 1."""
    for text in ["HalfCauchy(1)", "Cauchy(0, 1)"]:
        check_tempered(parse_prior(text), 1, "x")
        with pytest.raises(BadInput, match=r"improper with K = 2 shards"):
            check_tempered(parse_prior(text), 2, "x")
    check_tempered(parse_prior("StudentT(3, 0, 1)"), 3, "x")  # 3 > 2
    with pytest.raises(BadInput, match=r"df > K - 1 = 3"):
        check_tempered(parse_prior("StudentT(3, 0, 1)"), 4, "x")
    check_tempered(parse_prior("HalfStudentT(4.5, 1)"), 5, "x")
    with pytest.raises(BadInput, match="improper"):
        check_tempered(parse_prior("HalfStudentT(4, 1)"), 5, "x")
    check_tempered(parse_prior("InverseGamma(10, 1)"), 10, "x")
    with pytest.raises(BadInput, match=r"alpha > K - 1"):
        check_tempered(parse_prior("InverseGamma(9, 1)"), 10, "x")
    for text in [
        "Normal(0, 1)", "HalfNormal(1)", "Exponential(1)", "Gamma(0.5, 1)", "LogNormal(0, 3)",
        "Laplace(0, 1)", "Uniform(0, 1)", "LKJ(0.5)",
    ]:
        check_tempered(parse_prior(text), 1000, "x")


def test_tempering_condition_matches_the_tail_of_the_tempered_density():
    """p^(1/K) is integrable at infinity iff its log-log slope there is below -1."""
    from scipy import stats

    for df, shards in [(1.0, 2), (2.0, 3), (3.0, 3), (2.5, 3), (30.0, 20), (5.0, 7)]:
        t = np.array([1e9, 1e10])
        log_density = stats.t.logpdf(t, df) / shards
        slope = (log_density[1] - log_density[0]) / np.log(10.0)
        proper = slope < -1 - 1e-9
        prior = make_prior("StudentT", df, 0.0, 1.0)
        if proper:
            check_tempered(prior, shards, "x")
        else:
            with pytest.raises(BadInput):
                check_tempered(prior, shards, "x")
