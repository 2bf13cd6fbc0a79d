"""Design columns of formula terms, coded with whole-data statistics so every shard codes alike.

A column is numeric when its `stats` entry has a mean (and sd), categorical when it has `levels`
(the whole data set's levels, in the order the partition step wrote them; the first is the
reference level). Categorical factors use treatment coding by R's rule: within one part of the
formula (the common terms, or one group term's expression), a categorical factor `a` of a term is
coded by contrasts (levels after the first) when the term with `a` removed is also in that part
(the intercept counting as the empty term), and by one indicator per level otherwise. So
`1 + a` gives `a[l2]`, `a[l3]`; `0 + a` gives `a[l1]`, `a[l2]`, `a[l3]`; `x + a:x` gives `a:x[l2]`...

Column names follow bambi's coordinates: the term name (`a`, `a:x`, `a:b`), followed by the levels
of its categorical factors in brackets (`a[l2]`, `a:x[l2]`, `a:b[l2, m2]`); numeric-only terms
have no brackets (`x`, `x:z`).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product
from typing import Sequence

import numpy as np

from ..errors import BadInput

Term = tuple[str, ...]


@dataclass(frozen=True)
class Variable:
    """One data column as the whole data set describes it."""

    name: str
    levels: tuple | None = None  # categorical when not None
    mean: float = 0.0
    sd: float = 1.0

    @property
    def categorical(self) -> bool:
        return self.levels is not None

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(_label(level) for level in self.levels)


@dataclass(frozen=True)
class Column:
    """One design column: a product of numeric columns and level indicators."""

    name: str
    term: str
    parts: tuple[tuple[str, int | None], ...]  # (variable, level index or None for numeric)
    mean: float  # rough moments, for default prior scales only
    sd: float


def _label(level) -> str:
    if isinstance(level, float) and level.is_integer():
        return str(int(level))
    return str(level)


def _key(value):
    """A matching key that lets 1, 1.0 and np.int64(1) meet, and keeps strings as they are."""
    if isinstance(value, (bool, np.bool_)):
        return ("bool", bool(value))
    if isinstance(value, (int, float, np.integer, np.floating)):
        return ("number", float(value))
    return ("text", str(value))


def variable(stats: dict, name: str, where: str) -> Variable:
    entry = stats.get(name)
    if not isinstance(entry, dict) or not ("levels" in entry or "mean" in entry):
        raise BadInput(f"{where}: unknown column {name!r} (not in the data's statistics)")
    if "levels" in entry and entry["levels"] is not None:
        levels = tuple(entry["levels"])
        if not levels:
            raise BadInput(f"{where}: column {name!r} has no levels")
        return Variable(name, levels=levels)
    mean, sd = float(entry.get("mean", 0.0)), float(entry.get("sd", 1.0) or 0.0)
    if not np.isfinite(mean):
        mean = 0.0
    if not (np.isfinite(sd) and sd > 0):
        sd = 1.0
    return Variable(name, mean=mean, sd=sd)


def term_columns(
    term: Term, present: set[frozenset], variables: dict[str, Variable], where: str
) -> list[Column]:
    """The design columns of one term, coded by R's rule against the terms `present`."""
    choices: list[list[int | None]] = []
    for name in term:
        var = variables[name]
        if not var.categorical:
            choices.append([None])
            continue
        reduced = frozenset(term) - {name} in present
        indices = list(range(1 if reduced else 0, len(var.levels)))
        if not indices:
            raise BadInput(f"{where}: column {name!r} has a single level, so term {':'.join(term)!r} is constant")
        choices.append(indices)
    term_name = ":".join(term)
    columns = []
    for combination in product(*choices):
        parts = tuple(zip(term, combination))
        labels = [variables[n].labels[i] for n, i in parts if i is not None]
        name = f"{term_name}[{', '.join(labels)}]" if labels else term_name
        means, squares = [], []
        for n, i in parts:
            var = variables[n]
            m, s = (0.5, 0.5) if i is not None else (var.mean, var.sd)
            means.append(m)
            squares.append(m * m + s * s)
        mean = float(np.prod(means))
        variance = float(np.prod(squares) - mean * mean)
        sd = float(np.sqrt(variance)) if variance > 0 else 1.0
        columns.append(Column(name, term_name, parts, mean, sd))
    return columns


def part_columns(
    intercept: bool,
    terms: Sequence[Term],
    variables: dict[str, Variable],
    intercept_name: str,
    where: str,
) -> list[Column]:
    """All design columns of one part of a formula (intercept first)."""
    present = {frozenset(term) for term in terms}
    if intercept:
        present.add(frozenset())
    columns = [Column(intercept_name, intercept_name, (), 1.0, 1.0)] if intercept else []
    for term in terms:
        columns.extend(term_columns(term, present, variables, where))
    return columns


def codes(values: np.ndarray, var: Variable, where: str) -> np.ndarray:
    """Whole-data level codes (0..L-1) of one shard's column; unknown values are refused."""
    lookup = {_key(level): index for index, level in enumerate(var.levels)}
    values = np.asarray(values)
    unique, inverse = np.unique(values.astype(object) if values.dtype.kind == "O" else values, return_inverse=True)
    mapped = np.empty(len(unique), dtype=np.int64)
    for position, value in enumerate(unique.tolist()):
        code = lookup.get(_key(value))
        if code is None:
            raise BadInput(
                f"{where}: value {value!r} of column {var.name!r} is not one of its whole-data levels"
            )
        mapped[position] = code
    return mapped[inverse.reshape(-1)]


def design(
    columns: Sequence[Column],
    data: dict[str, np.ndarray],
    coded: dict[str, np.ndarray],
    rows: int,
) -> np.ndarray:
    """The (rows, len(columns)) float design matrix; `coded` holds level codes of categoricals."""
    matrix = np.ones((rows, len(columns)), dtype=np.float64)
    for j, column in enumerate(columns):
        for name, level in column.parts:
            if level is None:
                matrix[:, j] *= np.asarray(data[name], dtype=np.float64)
            else:
                matrix[:, j] *= coded[name] == level
    return matrix


def rank_deficient(
    columns: Sequence[Column], variables: dict[str, Variable], limit: int = 4096
) -> bool:
    """Whether the columns are collinear for every data set (structurally, e.g. `1 + a:b`).

    Checked on every combination of the categorical levels involved, with random numeric values;
    skipped (False) when there are more than `limit` combinations.
    """
    names = sorted({name for column in columns for name, _ in column.parts})
    categorical = [n for n in names if variables[n].categorical]
    sizes = [len(variables[n].levels) for n in categorical]
    if not columns or int(np.prod(sizes, dtype=np.int64)) > limit:
        return False
    grid = np.zeros((1, 0), dtype=np.int64)
    if categorical:
        grid = np.array(list(product(*[range(s) for s in sizes])), dtype=np.int64)
    rows = max(len(grid) * 3, len(columns) + 5)
    repeated = grid[np.arange(rows) % len(grid)]
    generator = np.random.default_rng(0)
    data = {n: generator.normal(size=rows) for n in names if not variables[n].categorical}
    coded = {n: repeated[:, i] for i, n in enumerate(categorical)}
    matrix = design(columns, data, coded, rows)
    return np.linalg.matrix_rank(matrix) < len(columns)
