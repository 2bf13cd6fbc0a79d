"""Formula models: an lme4 formula, a family and prior strings -> a `Model` a shard can sample.

    y ~ 1 + x + a + x:a + (1 + x | g) + (1 || h)

Families (link): gaussian (identity, residual sd `sigma`), bernoulli (logit), poisson (log),
negativebinomial (log; mean μ, concentration `alpha`, variance μ + μ²/alpha).

Parameters (NumPyro sites; names follow bambi):
- common terms: `Intercept`, `x`, `x:z`, `a[l2]`, `a:x[l2]`, `a:b[l2, m2]` (see formula_design);
  one scalar site each;
- group terms `(expr | g)`, per column c of expr (`1` for its intercept): the scale `c|g_sigma`
  (scalar) and the per-group values `c|g` (deterministic, shape (groups,)), sampled non-centred as
  `c|g = c|g_sigma * c|g_offset` with `c|g_offset` standard normal; a correlated block
  `(1 + x | g)` has one offset site `1|g_x|g_offset` of shape (groups, 2), the Cholesky factor of
  its correlation `1|g_x|g_corr_cholesky` (LKJ prior) and the correlation matrix `1|g_x|g_corr`
  (deterministic); `(1 + x || g)` is uncorrelated;
- `sigma` (gaussian), `alpha` (negativebinomial). The likelihood is the one observed site, named
  after the response.

The parameters mean the model as written: predictors are neither centred nor scaled.

Padding. A shard padded to a shape bucket (`ShardData.padded`) passes its row mask as `mask`: the
likelihood of padding rows is masked out, and padding groups (no rows) keep only their standard
normal offsets, which do not touch any other parameter. The log density of the real parameters is
exactly the unpadded one.

Groups and shards. A grouping factor equal to the fit's group column (`spec.data.groupColumn`, the
column the data are sharded by) is indexed by the shard's dense group index: its per-group sites
have one entry per group of the shard (local sites: never tempered). A factor nested in it
(`g:h` with g the group column, or `(1 | g/h)`) is local too (one entry per combination present in
the shard). Any other factor is crossed with the shards: its per-group sites have one entry per
whole-data level (from `stats`), whatever the shard, so the runner finds them global and tempers
them. The model itself tempers nothing.

Default priors (weakly informative, from whole-data statistics, the same on every shard). On the
linear-predictor scale let M, S be: gaussian M = mean(y), S = sd(y); bernoulli M = 0, S = 1;
poisson and negativebinomial M = log(mean(y)), S = 1. For a design column c let m_c, s_c be its
mean and sd (numeric columns from stats; a level indicator counts as mean 0.5, sd 0.5; products
as if independent). Then:
- a slope c: Normal(0, 2.5 S / s_c);
- Intercept: Normal(M, 2.5 S sqrt(1 + Σ_c (m_c / s_c)²)) over the common columns: the prior that
  Normal(M, 2.5 S) on the intercept at the predictors' means implies for the intercept at 0;
- a group scale `c|g_sigma`: HalfNormal(2.5 S / s_c); `1|g_sigma`: HalfNormal(2.5 S sqrt(1 +
  Σ (m_c / s_c)²)) over the block's other columns;
- a correlation: LKJ(2);
- `sigma`: Exponential(1 / sd(y)); `alpha`: Gamma(2, 0.1) (mean 20).
All defaults stay proper when raised to 1/K. `spec.model.priors` overrides them per parameter name;
a term's name (`a`, `a|g_sigma`) sets all of its columns at once, a column's name wins over it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

from ..errors import BadInput
from .formula_design import Column, Variable, codes, design, part_columns, rank_deficient, variable
from .formula_parse import GroupTerm, ParsedFormula, parse_formula
from ..data.shard import ShardData
from .base import Model
from .priors import CORRELATION, POSITIVE, REAL, Prior, check_support, check_tempered, make_prior, parse_prior

FAMILIES = ("gaussian", "bernoulli", "poisson", "negativebinomial")


@dataclass(frozen=True)
class Block:
    """One group term as sampled: its columns, sites and how its groups are indexed."""

    factor: tuple[str, ...]
    columns: tuple[Column, ...]
    correlated: bool
    local: bool  # indexed by the shard's groups (the group column is part of the factor)
    levels: tuple[int, ...]  # whole-data level counts of the factor's other columns

    @property
    def factor_name(self) -> str:
        return ":".join(self.factor)

    def value_name(self, column: Column) -> str:
        return f"{column.name}|{self.factor_name}"

    @property
    def values(self) -> tuple[str, ...]:
        return tuple(self.value_name(c) for c in self.columns)

    @property
    def sigmas(self) -> tuple[str, ...]:
        return tuple(f"{v}_sigma" for v in self.values)

    @property
    def block_name(self) -> str:
        return "_".join(self.values)

    @property
    def offsets(self) -> tuple[str, ...]:
        if self.correlated:
            return (f"{self.block_name}_offset",)
        return tuple(f"{v}_offset" for v in self.values)

    @property
    def corr(self) -> str:
        return f"{self.block_name}_corr"

    @property
    def cholesky(self) -> str:
        return f"{self.block_name}_corr_cholesky"


@dataclass(frozen=True)
class Structure:
    """Everything fixed before data: columns, blocks, priors, site names."""

    parsed: ParsedFormula
    family: str
    group_column: str | None
    variables: dict[str, Variable]
    common: tuple[Column, ...]
    blocks: tuple[Block, ...]
    priors: dict[str, Prior]  # every user-settable parameter -> its prior


def formula_columns(model_spec: dict) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(columns the formula reads, those that must be numeric), known without any data.

    Which predictors are categorical is known only from the whole-data statistics, so only the
    response of a gaussian, poisson or negativebinomial model is known to be numeric here.
    """
    parsed = parse_formula(model_spec.get("formula"))
    family = model_spec.get("family", "gaussian")
    numeric = () if family == "bernoulli" or parsed.response_level else (parsed.response,)
    return parsed.columns, numeric


def _scales(family: str, response: Variable | None) -> tuple[float, float]:
    """(M, S): prior location and scale on the linear-predictor scale."""
    if family == "gaussian":
        return response.mean, response.sd
    if family == "bernoulli":
        return 0.0, 1.0
    mean = response.mean
    return (math.log(mean) if mean > 0 else 0.0), 1.0


def _inflation(columns) -> float:
    return math.sqrt(1.0 + sum((c.mean / c.sd) ** 2 for c in columns))


def _parameters(
    family: str, common, blocks, response: Variable | None
) -> dict[str, tuple[str, tuple[str, ...], Prior]]:
    """name -> (support, prior keys that may set it (own name first), default prior)."""
    M, S = _scales(family, response)
    table: dict[str, tuple[str, tuple[str, ...], Prior]] = {}
    slopes = [c for c in common if c.parts]
    for column in common:
        if not column.parts:
            default = make_prior("Normal", M, 2.5 * S * _inflation(slopes))
        else:
            default = make_prior("Normal", 0.0, 2.5 * S / column.sd)
        table[column.name] = (REAL, (column.name, column.term), default)
    for block in blocks:
        others = [c for c in block.columns if c.parts]
        for column, sigma in zip(block.columns, block.sigmas):
            scale = _inflation(others) if not column.parts else 1.0 / column.sd
            keys = (sigma, f"{column.term}|{block.factor_name}_sigma")
            table[sigma] = (POSITIVE, keys, make_prior("HalfNormal", 2.5 * S * scale))
        if block.correlated:
            table[block.corr] = (CORRELATION, (block.corr,), make_prior("LKJ", 2.0))
    if family == "gaussian":
        table["sigma"] = (POSITIVE, ("sigma",), make_prior("Exponential", 1.0 / response.sd))
    if family == "negativebinomial":
        table["alpha"] = (POSITIVE, ("alpha",), make_prior("Gamma", 2.0, 0.1))
    return table


def given_priors(given: dict | None, shards: int) -> dict[str, Prior]:
    """`spec.model.priors` parsed, each prior refused if it does not parse, has numbers no sampler
    can use or is improper once tempered by 1/K: all of it known before any data (every prior a
    user sets is on a global parameter, so each is tempered)."""
    if given is None:
        return {}
    if not isinstance(given, dict):
        raise BadInput("spec.model.priors must be a mapping of parameter name to prior string")
    parsed = {}
    for key, text in given.items():
        where = f"spec.model.priors[{key!r}]"
        parsed[key] = parse_prior(text, where)
        check_tempered(parsed[key], shards, where)
    return parsed


def _resolve_priors(table, given: dict | None, shards: int) -> dict[str, Prior]:
    parsed = given_priors(given, shards)
    known = {key for _, keys, _ in table.values() for key in keys}
    for key in parsed:
        if key not in known:
            names = ", ".join(table)
            raise BadInput(f"spec.model.priors: no parameter {key!r} in this model (parameters: {names})")
    resolved = {}
    for name, (support, keys, default) in table.items():
        key = next((k for k in keys if k in parsed), None)
        if key is None:
            resolved[name] = default
            continue
        check_support(parsed[key], support, f"spec.model.priors[{key!r}]")
        resolved[name] = parsed[key]
    return resolved


def _block(group: GroupTerm, group_column, variables, formula: str) -> Block:
    where = f"formula {formula!r}: group term {group.text!r}"
    columns = part_columns(group.intercept, group.terms, variables, "1", where)
    local = group_column is not None and group_column in group.factor
    levels = []
    for name in group.factor:
        if name == group_column:
            continue
        var = variables[name]
        if not var.categorical:
            raise BadInput(
                f"{where}: grouping column {name!r} needs whole-data levels in the statistics "
                "(a string or categorical column)"
            )
        levels.append(len(var.levels))
    correlated = group.correlated and len(columns) > 1
    return Block(group.factor, tuple(columns), correlated, local, tuple(levels))


def build_structure(model_spec: dict, group_column: str | None, stats: dict, shards: int) -> Structure:
    family = model_spec.get("family", "gaussian")
    if family not in FAMILIES:
        raise BadInput(f"spec.model.family {family!r} is not one of {', '.join(FAMILIES)}")
    parsed = parse_formula(model_spec.get("formula"))
    formula = parsed.text
    where = f"formula {formula!r}"
    variables = {}
    for name in parsed.columns:
        if name == group_column and name != parsed.response:
            # read through the shard's group index; its statistics are not needed
            variables[name] = Variable(name, levels=("<groups>",))
            continue
        variables[name] = variable(stats, name, where)
    response = variables[parsed.response]
    if response.categorical:
        if family != "bernoulli":
            raise BadInput(f"{where}: response {parsed.response!r} is categorical; family {family} needs numbers")
        if parsed.response_level is not None:
            if parsed.response_level not in response.labels:
                raise BadInput(
                    f"{where}: level {parsed.response_level!r} is not a level of {parsed.response!r}"
                )
        elif len(response.levels) != 2:
            raise BadInput(
                f"{where}: categorical response {parsed.response!r} has {len(response.levels)} levels; "
                f"name the success level, e.g. {parsed.response}[{response.labels[-1]}]"
            )
    elif parsed.response_level is not None:
        raise BadInput(f"{where}: {parsed.response}[{parsed.response_level}] needs a categorical response")
    for term in parsed.terms + tuple(t for g in parsed.groups for t in g.terms):
        if group_column in term:
            raise BadInput(f"{where}: the group column {group_column!r} can only be a grouping factor")
    common = part_columns(parsed.intercept, parsed.terms, variables, "Intercept", where)
    if rank_deficient(common, variables):
        raise BadInput(
            f"{where}: the common terms are collinear whatever the data (e.g. an interaction "
            "without its main effects next to an intercept); add the main effects or drop the intercept"
        )
    blocks = tuple(_block(group, group_column, variables, formula) for group in parsed.groups)
    for block in blocks:
        if rank_deficient(list(block.columns), variables):
            raise BadInput(f"{where}: the columns of a group term for {block.factor_name} are collinear")
    table = _parameters(family, common, blocks, response if not response.categorical else None)
    priors = _resolve_priors(table, model_spec.get("priors"), shards)
    structure = Structure(parsed, family, group_column, variables, tuple(common), blocks, priors)
    _check_names(structure)
    return structure


def site_names(structure: Structure) -> list[str]:
    """Every site the model has (latent, deterministic and observed), in order."""
    names = [c.name for c in structure.common]
    for block in structure.blocks:
        names.extend(block.sigmas)
        if block.correlated:
            names.extend([block.cholesky, block.corr])
        names.extend(block.offsets)
        names.extend(block.values)
    names.extend([n for n in ("sigma", "alpha") if n in structure.priors])
    names.append(structure.parsed.response)
    return names


def _check_names(structure: Structure) -> None:
    seen = set()
    for name in site_names(structure):
        if name in seen:
            raise BadInput(
                f"formula {structure.parsed.text!r}: two parameters would be named {name!r} "
                "(a term given twice, e.g. (1 | g) + (x | g): write (0 + x | g))"
            )
        seen.add(name)


def _response(structure: Structure, values: np.ndarray) -> np.ndarray:
    parsed, family = structure.parsed, structure.family
    name = parsed.response
    var = structure.variables[name]
    if var.categorical:
        success = parsed.response_level if parsed.response_level is not None else var.labels[-1]
        level = var.labels.index(success)
        return (codes(values, var, f"response {name!r}") == level).astype(np.float64)
    y = np.asarray(values, dtype=np.float64)
    if family == "bernoulli" and not np.all((y == 0) | (y == 1)):
        raise BadInput(f"response {name!r} must be 0 or 1 for family bernoulli")
    if family in ("poisson", "negativebinomial") and not np.all((y >= 0) & (y == np.round(y))):
        raise BadInput(f"response {name!r} must be counts (integers >= 0) for family {family}")
    return y


def _group_index(block: Block, shard: ShardData, coded: dict, variables) -> tuple[np.ndarray, int]:
    """(index of each row's group in the block's per-group sites, number of groups)."""
    key = np.zeros(shard.rows, dtype=np.int64)
    for name in block.factor:
        if name == shard.group_column and block.local:
            key = key * max(shard.groups, 1) + np.asarray(shard.group_index, dtype=np.int64)
        else:
            key = key * len(variables[name].levels) + coded[name]
    if not block.local:
        return key, int(np.prod(block.levels, dtype=np.int64))
    if block.factor == (shard.group_column,):
        return np.asarray(shard.group_index, dtype=np.int64), shard.groups
    unique, inverse = np.unique(key, return_inverse=True)
    return inverse.reshape(-1).astype(np.int64), len(unique)


def make_prepare(structure: Structure):
    variables = structure.variables

    def prepare(shard: ShardData) -> dict[str, Any]:
        if structure.group_column is not None and shard.group_column not in (None, structure.group_column):
            raise BadInput(
                f"shard is grouped by {shard.group_column!r}, the fit by {structure.group_column!r}"
            )
        for block in structure.blocks:
            if block.local and shard.group_column is None:
                raise BadInput(f"group term for {block.factor_name}: the shard has no group index")
        coded = {
            name: codes(shard.columns[name], var, f"column {name!r}")
            for name, var in variables.items()
            if var.categorical and name != structure.group_column and name != structure.parsed.response
            and name in shard.columns
        }
        missing = [n for n in structure.parsed.columns if n not in shard.columns and n != structure.group_column]
        if missing:
            raise BadInput(f"the data have no column {missing[0]!r} (formula {structure.parsed.text!r})")
        rows = shard.rows
        arguments: dict[str, Any] = {
            "y": _response(structure, shard.columns[structure.parsed.response]),
            "X": design(structure.common, shard.columns, coded, rows),
        }
        if shard.row_mask is not None:
            arguments["mask"] = shard.row_mask
        for i, block in enumerate(structure.blocks):
            index, groups = _group_index(block, shard, coded, variables)
            arguments[f"Z{i}"] = design(block.columns, shard.columns, coded, rows)
            arguments[f"index{i}"] = index.astype(np.int32)
            # the number of groups travels as a shape, so the model computes no shape from values
            arguments[f"groups{i}"] = np.zeros((groups, 0), dtype=np.float64)
        return arguments

    return prepare


def make_fn(structure: Structure):
    priors = structure.priors
    common = structure.common
    blocks = structure.blocks
    family = structure.family
    response = structure.parsed.response

    def model(y=None, X=None, mask=None, **data):
        if X.shape[1]:
            beta = jnp.stack([numpyro.sample(c.name, priors[c.name].distribution()) for c in common])
            eta = X @ beta
        else:
            eta = jnp.zeros(X.shape[0])
        for i, block in enumerate(blocks):
            Z, index, groups = data[f"Z{i}"], data[f"index{i}"], data[f"groups{i}"].shape[0]
            sigmas = [numpyro.sample(s, priors[s].distribution()) for s in block.sigmas]
            width = len(block.columns)
            if block.correlated:
                cholesky = numpyro.sample(block.cholesky, priors[block.corr].distribution(width))
                numpyro.deterministic(block.corr, cholesky @ cholesky.T)
                offset = numpyro.sample(block.offsets[0], dist.Normal(0.0, 1.0).expand([groups, width]).to_event(2))
                scale_tril = jnp.stack(sigmas)[:, None] * cholesky
                values = offset @ scale_tril.T  # row g: diag(sigma) L z_g
                columns = [values[:, j] for j in range(width)]
            else:
                columns = [
                    sigma * numpyro.sample(name, dist.Normal(0.0, 1.0).expand([groups]).to_event(1))
                    for sigma, name in zip(sigmas, block.offsets)
                ]
            for j, (name, value) in enumerate(zip(block.values, columns)):
                numpyro.deterministic(name, value)
                eta = eta + value[index] * Z[:, j]
        if family == "gaussian":
            likelihood = dist.Normal(eta, numpyro.sample("sigma", priors["sigma"].distribution()))
        elif family == "bernoulli":
            likelihood = dist.BernoulliLogits(eta)
        elif family == "poisson":
            likelihood = dist.Poisson(jnp.exp(eta))
        else:
            alpha = numpyro.sample("alpha", priors["alpha"].distribution())
            likelihood = dist.NegativeBinomial2(jnp.exp(eta), alpha)
        if mask is not None:  # a padded shard: padding rows add nothing
            likelihood = likelihood.mask(mask)
        numpyro.sample(response, likelihood.to_event(1), obs=y)

    return model


def formula_model(model_spec: dict, group_column: str | None, stats: dict, shards: int) -> Model:
    """The `Model` of `spec.model` (formula, family, priors); see the module docstring."""
    structure = build_structure(model_spec, group_column, stats or {}, shards)
    columns = structure.parsed.columns
    numeric = tuple(
        name for name in columns if not structure.variables[name].categorical and name != group_column
    )
    return Model(
        fn=make_fn(structure),
        columns=columns,
        numeric=numeric,
        prepare=make_prepare(structure),
        data_as_arguments=True,
    )
