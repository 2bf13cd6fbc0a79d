"""The model a spec declares: a Python model or a formula model, and the columns it reads."""

from __future__ import annotations

from ..data.read import model_rows
from ..data.shard import ShardData
from ..errors import BadInput
from .base import Model
from .formula import formula_columns, formula_model, given_priors
from .python import python_model, read_source


def model_from_spec(spec, stats: dict | None) -> Model:
    """The model a `FitSpec` declares (relative paths were resolved when the spec was loaded)."""
    python = spec.model.get("python")
    if python:
        source = read_source(python["uri"])
        return python_model(source, python["uri"], python["function"], spec.group_column, stats)
    return formula_model(spec.model, spec.group_column, stats or {}, spec.shards)


def required_columns(spec) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(columns the model reads, those of them that must be numeric), known before any data.

    Partitioning calls this before it reads any data, so that everything about the model that
    needs no data is refused first, once, with exit 3: a Python model that does not load, a
    formula that does not parse, priors that do not parse, whose numbers no sampler can use or
    that are improper once tempered. (Which parameters a formula has, and so which prior fits
    which, depends on the whole-data statistics.) Partitioning checks the columns over the
    whole data set, before any shard is sampled.
    """
    python = spec.model.get("python")
    if python:
        if spec.model.get("priors"):
            raise BadInput(
                "spec.model.priors sets the priors of a formula model; a Python model sets its own "
                f"(in {python['uri']})"
            )
        model = model_from_spec(spec, None)
        return model.columns, model.numeric
    given_priors(spec.model.get("priors"), spec.shards)
    return formula_columns(spec.model)


def model_and_data(spec, stats: dict | None, uri: str, where: str) -> tuple[Model, ShardData]:
    """The spec's model and the checked rows at `uri` it will be fed."""
    model = model_from_spec(spec, stats)
    return model, model_rows(model, spec, uri, where)
