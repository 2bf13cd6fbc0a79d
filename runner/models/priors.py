"""Prior strings -> NumPyro distributions, by a small grammar (never `eval`).

Grammar (whitespace anywhere between tokens)::

    prior    := NAME "(" [argument ("," argument)*] ")"
    argument := [KEYWORD "="] NUMBER
    NUMBER   := [+-] digits [. digits] [(e|E) [+-] digits]   (also ".5")

Arguments are positional in the order below, or named by keyword (either name listed):

| prior | arguments | support |
|---|---|---|
| `Normal(mu, sigma)` | loc/mu, scale/sigma | real |
| `StudentT(df, mu, sigma)` | df/nu, loc/mu, scale/sigma | real |
| `Cauchy(mu, sigma)` | loc/mu, scale/sigma | real |
| `Laplace(mu, b)` | loc/mu, scale/b | real |
| `Uniform(lower, upper)` | low/lower, high/upper | [lower, upper] |
| `HalfNormal(sigma)` | scale/sigma | positive |
| `HalfStudentT(df, sigma)` | df/nu, scale/sigma | positive |
| `HalfCauchy(sigma)` | scale/sigma | positive |
| `Exponential(rate)` | rate/lam | positive |
| `Gamma(alpha, beta)` | concentration/alpha, rate/beta | positive |
| `InverseGamma(alpha, beta)` | concentration/alpha, rate/beta | positive |
| `LogNormal(mu, sigma)` | loc/mu, scale/sigma | positive |
| `LKJ(eta)` | concentration/eta | correlation matrices |

`HalfStudentT` is a Student-t folded at 0 (twice its density on x > 0).

Numbers. Every argument must be a finite float32 number (|x| <= 3.4e38), a positive one at least
float32's smallest normal number (1.2e-38), and a Uniform's width finite in float32: a GPU samples
in float32, where larger numbers overflow and smaller ones flush to zero.

Tempering. On a fit with K > 1 shards every global prior is raised to 1/K on each shard. A prior
whose tempered density p(θ)^(1/K) has no finite integral is refused:
- Student-t with df = ν (Cauchy: ν = 1; also the half versions): the tails go as |θ|^(-(ν+1)/K),
  integrable iff (ν + 1)/K > 1, i.e. ν > K − 1. Cauchy and HalfCauchy are refused for every K ≥ 2.
- InverseGamma(α, β): the upper tail goes as θ^(-(α+1)/K), so it needs α > K − 1.
- Normal, Laplace, Uniform, HalfNormal, Exponential, Gamma (near 0 it goes as θ^((α−1)/K), and
  (α−1)/K > −1 for every α > 0), LogNormal and LKJ stay proper for every K.
(NUTS samples log θ for a positive θ, with the Jacobian tempered too; there the half-t's tempered
density is integrable for every ν, but only with tails e^(−ν|log θ|/K): so wide for large K that
the shard posteriors of weakly identified scales wander off. The criterion used is the stricter
one, on θ as written.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist

from ..errors import BadInput

REAL, POSITIVE, CORRELATION = "real", "positive", "correlation"


@dataclass(frozen=True)
class _Family:
    arguments: tuple[tuple[str, ...], ...]  # per positional argument: accepted names, first canonical
    positive: tuple[str, ...]  # canonical names that must be > 0
    support: str
    build: Callable[..., dist.Distribution]
    tail_df: str | None = None  # argument that must exceed K - 1 for p^(1/K) to be proper
    fixed_df: float | None = None  # the same for a family with a fixed df (Cauchy: 1)


def _half_student_t(df, scale):
    return dist.FoldedDistribution(dist.StudentT(df, 0.0, scale))


_FAMILIES: dict[str, _Family] = {
    "Normal": _Family((("loc", "mu"), ("scale", "sigma")), ("scale",), REAL, dist.Normal),
    "StudentT": _Family(
        (("df", "nu"), ("loc", "mu"), ("scale", "sigma")), ("df", "scale"), REAL, dist.StudentT,
        tail_df="df",
    ),
    "Cauchy": _Family((("loc", "mu"), ("scale", "sigma")), ("scale",), REAL, dist.Cauchy, fixed_df=1.0),
    "Laplace": _Family((("loc", "mu"), ("scale", "b")), ("scale",), REAL, dist.Laplace),
    "Uniform": _Family((("low", "lower"), ("high", "upper")), (), REAL, dist.Uniform),
    "HalfNormal": _Family((("scale", "sigma"),), ("scale",), POSITIVE, dist.HalfNormal),
    "HalfStudentT": _Family(
        (("df", "nu"), ("scale", "sigma")), ("df", "scale"), POSITIVE, _half_student_t, tail_df="df"
    ),
    "HalfCauchy": _Family((("scale", "sigma"),), ("scale",), POSITIVE, dist.HalfCauchy, fixed_df=1.0),
    "Exponential": _Family((("rate", "lam"),), ("rate",), POSITIVE, dist.Exponential),
    "Gamma": _Family(
        (("concentration", "alpha"), ("rate", "beta")), ("concentration", "rate"), POSITIVE, dist.Gamma
    ),
    "InverseGamma": _Family(
        (("concentration", "alpha"), ("rate", "beta")),
        ("concentration", "rate"),
        POSITIVE,
        dist.InverseGamma,
        tail_df="concentration",
    ),
    "LogNormal": _Family((("loc", "mu"), ("scale", "sigma")), ("scale",), POSITIVE, dist.LogNormal),
    "LKJ": _Family((("concentration", "eta"),), ("concentration",), CORRELATION, None),
}

_TOKEN = re.compile(
    r"\s*(?:(?P<number>[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)|(?P<name>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<punct>[(),=]))"
)


@dataclass(frozen=True)
class Prior:
    """A parsed prior: its family name and canonical arguments (floats)."""

    family: str
    arguments: tuple[tuple[str, float], ...]
    text: str

    @property
    def support(self) -> str:
        return _FAMILIES[self.family].support

    def argument(self, name: str) -> float:
        return dict(self.arguments)[name]

    def distribution(self, dimension: int | None = None) -> dist.Distribution:
        """The NumPyro distribution; `dimension` is the matrix size for LKJ (a Cholesky factor)."""
        values = [jnp.asarray(value, dtype=float) for _, value in self.arguments]
        if self.family == "LKJ":
            return dist.LKJCholesky(dimension, concentration=values[0])
        return _FAMILIES[self.family].build(*values)

    def __str__(self) -> str:
        return f"{self.family}({', '.join(f'{v:g}' for _, v in self.arguments)})"


def _tokens(text: str, where: str) -> list[tuple[str, str]]:
    tokens, position = [], 0
    stripped = text.rstrip()
    while position < len(stripped):
        match = _TOKEN.match(stripped, position)
        if not match:
            raise BadInput(f"{where}: cannot parse prior {text!r} at {stripped[position:]!r}")
        kind = match.lastgroup
        tokens.append((kind, match.group(kind)))
        position = match.end()
    return tokens


def parse_prior(text: object, where: str = "prior") -> Prior:
    """Parse one prior string; `where` names it in the one-line refusal."""
    if not isinstance(text, str):
        raise BadInput(f"{where}: a prior must be a string such as 'Normal(0, 1)', got {text!r}")
    tokens = _tokens(text, where)
    if len(tokens) < 3 or tokens[0][0] != "name" or tokens[1] != ("punct", "("):
        raise BadInput(f"{where}: cannot parse prior {text!r}: expected Name(arguments)")
    family_name = tokens[0][1]
    family = _FAMILIES.get(family_name)
    if family is None:
        raise BadInput(
            f"{where}: unknown prior {family_name!r} in {text!r} (known: {', '.join(_FAMILIES)})"
        )
    if tokens[-1] != ("punct", ")"):
        raise BadInput(f"{where}: cannot parse prior {text!r}: missing ')' at the end")
    body = tokens[2:-1]
    given: dict[str, float] = {}
    positional = 0
    index = 0
    while index < len(body):
        keyword = None
        if body[index][0] == "name":
            if index + 1 >= len(body) or body[index + 1] != ("punct", "="):
                raise BadInput(f"{where}: cannot parse prior {text!r}: argument {body[index][1]!r}")
            keyword = body[index][1]
            index += 2
        if index >= len(body) or body[index][0] != "number":
            raise BadInput(f"{where}: cannot parse prior {text!r}: expected a number")
        value = float(body[index][1])
        index += 1
        if keyword is None:
            if given and positional < len(given):
                raise BadInput(f"{where}: prior {text!r}: positional argument after a keyword one")
            if positional >= len(family.arguments):
                raise BadInput(
                    f"{where}: prior {text!r}: {family_name} takes {len(family.arguments)} argument(s)"
                )
            canonical = family.arguments[positional][0]
            positional += 1
        else:
            matches = [names[0] for names in family.arguments if keyword in names]
            if not matches:
                names = ", ".join("/".join(names) for names in family.arguments)
                raise BadInput(f"{where}: prior {text!r}: {family_name} has no argument {keyword!r} ({names})")
            canonical = matches[0]
        if canonical in given:
            raise BadInput(f"{where}: prior {text!r}: argument {canonical!r} given twice")
        given[canonical] = value
        if index < len(body):
            if body[index] != ("punct", ","):
                raise BadInput(f"{where}: cannot parse prior {text!r}: expected ',' between arguments")
            index += 1
            if index == len(body):
                raise BadInput(f"{where}: cannot parse prior {text!r}: trailing ','")
    missing = [names[0] for names in family.arguments if names[0] not in given]
    if missing:
        raise BadInput(f"{where}: prior {text!r}: missing argument(s) {', '.join(missing)}")
    _check_numbers(family_name, family, given, f"{where}: prior {text!r}")
    ordered = tuple((names[0], given[names[0]]) for names in family.arguments)
    return Prior(family_name, ordered, text)


# A prior's numbers must survive float32, the precision on a GPU (runner/inference/runtime.py):
# beyond these NumPyro's log density is infinite or its scale flushes to zero, and sampling fails.
FLOAT32_MAX = float(np.finfo(np.float32).max)
FLOAT32_SMALLEST_NORMAL = float(np.finfo(np.float32).smallest_normal)


def _check_numbers(family_name: str, family: _Family, given: dict[str, float], where: str) -> None:
    """Refuse numbers no sampler can use: infinite or beyond float32, a positive one below
    float32's smallest normal number, or a Uniform whose width overflows."""
    for name, value in given.items():
        if not abs(value) <= FLOAT32_MAX:
            raise BadInput(f"{where}: {name} = {value:g} is not a finite float32 number (|x| <= {FLOAT32_MAX:.3g})")
    for name in family.positive:
        if not given[name] >= FLOAT32_SMALLEST_NORMAL:
            raise BadInput(f"{where}: {name} must be positive (at least {FLOAT32_SMALLEST_NORMAL:.3g}), got {given[name]:g}")
    if family_name == "Uniform":
        if not given["low"] < given["high"]:
            raise BadInput(f"{where}: lower must be below upper")
        if not given["high"] - given["low"] <= FLOAT32_MAX:
            raise BadInput(f"{where}: upper - lower overflows float32 (at most {FLOAT32_MAX:.3g})")


def check_support(prior: Prior, support: str, where: str) -> None:
    """Refuse a prior whose support does not fit the parameter (a scale needs a positive prior)."""
    if support == CORRELATION or prior.support == CORRELATION:
        if prior.support != support:
            wanted = "LKJ(eta)" if support == CORRELATION else "a prior on numbers, not LKJ"
            raise BadInput(f"{where}: prior {prior.text!r} does not fit: it needs {wanted}")
        return
    if support == POSITIVE:
        if prior.family == "Uniform":
            if prior.argument("low") < 0:
                raise BadInput(f"{where}: prior {prior.text!r} allows negative values for a positive parameter")
        elif prior.support != POSITIVE:
            raise BadInput(
                f"{where}: prior {prior.text!r} is on the real line; this parameter is positive "
                "(use e.g. HalfNormal, Exponential, Gamma)"
            )
    elif support == REAL and prior.support == POSITIVE:
        raise BadInput(
            f"{where}: prior {prior.text!r} is positive-only; this parameter is real-valued "
            "(use e.g. Normal, StudentT)"
        )


def check_tempered(prior: Prior, shards: int, where: str) -> None:
    """Refuse a prior that is improper once raised to 1/K (see the module docstring)."""
    if shards <= 1:
        return
    family = _FAMILIES[prior.family]
    if family.fixed_df is not None:
        df = family.fixed_df
    elif family.tail_df is not None:
        df = prior.argument(family.tail_df)
    else:
        return
    if not df > shards - 1:
        name = "alpha" if prior.family == "InverseGamma" else "df"
        raise BadInput(
            f"{where}: prior {prior.text!r} raised to 1/K is improper with K = {shards} shards "
            f"(needs {name} > K - 1 = {shards - 1}); use a lighter-tailed prior such as HalfNormal "
            "or Normal, or a larger df"
        )


def make_prior(family: str, *values: float) -> Prior:
    """A prior from numbers (the default priors), checked like a parsed one."""
    arguments = tuple((names[0], float(v)) for names, v in zip(_FAMILIES[family].arguments, values))
    text = f"{family}({', '.join(f'{float(v):.6g}' for v in values)})"
    return Prior(family, arguments, text)
