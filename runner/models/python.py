"""Models: what a shard samples, whether written in Python or as a formula.

A model is a NumPyro model function plus a `prepare` step that turns one shard's columns into the
function's keyword arguments. Preparation happens in NumPy, outside JAX tracing, so categorical
coding and design matrices are built once per shard with whole-data statistics (`stats`), never
with statistics of the shard: every shard then has the same prior.

Python models (`spec.model.python`) bind arguments by name:
- an argument named like a data column receives that column (the group column arrives as dense
  integer codes 0..G-1, in the order of `ShardData.group_labels`);
- an argument named `stats` receives the whole-data statistics (docs/contract.md);
- an argument with a default other than None that names no column keeps its default (a constant);
  an argument defaulting to None (the NumPyro idiom for observations, `y=None`) must be a column, so
  a misspelled observation column is an error instead of a silent prior-only fit.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import BadInput


@dataclass(frozen=True)
class ShardData:
    """One shard's rows as NumPy columns, with its groups indexed densely."""

    columns: dict[str, np.ndarray]
    group_column: str | None = None
    group_labels: np.ndarray = field(default_factory=lambda: np.array([]))
    group_index: np.ndarray = field(default_factory=lambda: np.array([], dtype=np.int32))
    row_mask: np.ndarray | None = None  # set on a padded shard: True for real rows

    @property
    def rows(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0

    @property
    def groups(self) -> int:
        return len(self.group_labels)

    def doubled(self) -> "ShardData":
        """The shard stacked on a copy of itself whose groups are new ones.

        Used to find global sites: a site whose shape is the same for a shard and for its doubled
        version does not depend on the shard's data.
        """
        columns = {name: np.concatenate([values, values]) for name, values in self.columns.items()}
        labels = np.concatenate(
            [self.group_labels, np.array([f"{label}#copy" for label in self.group_labels])]
        )
        index = np.concatenate([self.group_index, self.group_index + self.groups])
        return ShardData(columns, self.group_column, labels, index)

    def padded(self, rows: int, groups: int) -> "ShardData":
        """The shard padded to `rows` rows and `groups` groups (shape buckets, runner/buckets.py).

        Padding rows repeat row 0 (valid values of every column, so every log density stays
        finite) and belong to group 0; `row_mask` marks them, and a model that honours it drops
        their likelihood. Padding groups have no rows, so their parameters are drawn from their
        prior, which integrates to one: the posterior of the real parameters is exactly the
        shard's own.
        """
        if rows < self.rows or groups < self.groups:
            raise ValueError(f"cannot pad {self.rows} rows / {self.groups} groups down to {rows} / {groups}")
        extra = rows - self.rows
        columns = {name: np.concatenate([values, np.repeat(values[:1], extra)]) for name, values in self.columns.items()}
        mask = np.arange(rows) < self.rows
        if self.group_column is None:
            return ShardData(columns, row_mask=mask)
        labels = np.concatenate(
            [self.group_labels.astype(object), np.array([f"<padding {i}>" for i in range(groups - self.groups)], dtype=object)]
        )
        index = np.concatenate([self.group_index, np.zeros(extra, dtype=self.group_index.dtype)])
        return ShardData(columns, self.group_column, labels, index, mask)


@dataclass(frozen=True)
class Model:
    """A NumPyro model and how to feed it one shard.

    fn: the NumPyro model, called as `fn(**prepare(shard))`.
    columns: the data columns it reads (checked before sampling, with a reason naming the column).
    numeric: the subset of `columns` that must be numeric and finite.
    prepare: shard data -> keyword arguments of `fn` (NumPy arrays or Python values).
    data_as_arguments: whether `fn` can take its arrays as traced JAX values (it computes no shape
        from their contents) and honours a padded shard's `row_mask`: then shards padded to one
        shape bucket share one compiled sampler.
    """

    fn: Callable[..., Any]
    columns: tuple[str, ...]
    numeric: tuple[str, ...]
    prepare: Callable[[ShardData], dict[str, Any]]
    data_as_arguments: bool = False


def _load_module(source: str, origin: str):
    """Import a model file's source as a fresh module (so two fits never share module state)."""
    module_name = f"consensusfit_user_model_{abs(hash(origin))}"
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.py"
        path.write_text(source)
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as error:  # any failure inside user code is bad input
            raise BadInput(f"model file {origin} does not load: {type(error).__name__}: {error}")
    sys.modules.pop(module_name, None)
    return module


def python_model(
    source: str, origin: str, function: str, group_column: str | None, stats: dict | None
) -> Model:
    """A model from a Python file's source; arguments are bound by name (see module docstring)."""
    module = _load_module(source, origin)
    fn = getattr(module, function, None)
    if not callable(fn):
        raise BadInput(f"model file {origin} has no function {function!r}")
    parameters = inspect.signature(fn).parameters
    columns = tuple(
        name
        for name, parameter in parameters.items()
        if name != "stats" and parameter.default in (inspect.Parameter.empty, None)
    )
    constants = tuple(name for name in parameters if name != "stats" and name not in columns)

    def prepare(shard: ShardData) -> dict[str, Any]:
        arguments: dict[str, Any] = {}
        for name in columns + constants:
            if name == group_column:
                arguments[name] = shard.group_index
            elif name in shard.columns:
                arguments[name] = shard.columns[name]
        if "stats" in parameters:
            if stats is None:
                raise BadInput(
                    f"model {function!r} in {origin} takes whole-data `stats`, but none were "
                    "given (partition the data first, or pass --stats)"
                )
            arguments["stats"] = stats
        return arguments

    numeric = tuple(name for name in columns if name != group_column)
    return Model(fn=fn, columns=columns, numeric=numeric, prepare=prepare)


def _read_source(uri: str) -> str:
    from .storage import NotFound, split_uri

    store, key = split_uri(uri)
    try:
        return store.read_bytes(key).decode()
    except NotFound:
        raise BadInput(f"model file {uri} does not exist") from None


def model_from_spec(spec, stats: dict | None) -> Model:
    """The model a `FitSpec` declares (relative paths were resolved when the spec was loaded)."""
    python = spec.model.get("python")
    if python:
        source = _read_source(python["uri"])
        return python_model(source, python["uri"], python["function"], spec.group_column, stats)
    from .formula import formula_model

    return formula_model(spec.model, spec.group_column, stats or {}, spec.shards)


def required_columns(spec) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(columns the model reads, those of them that must be numeric), known before any data.

    Partitioning checks these over the whole data set, before any shard is sampled.
    """
    python = spec.model.get("python")
    if python:
        model = model_from_spec(spec, None)
        return model.columns, model.numeric
    from .formula import formula_columns

    return formula_columns(spec.model)
