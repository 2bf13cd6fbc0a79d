"""Python models (`spec.model.python`): a user's NumPyro function loaded from a file.

A model (runner/models/base.py) is a NumPyro model function plus a `prepare` step that turns one
shard's columns into the function's keyword arguments. Preparation happens in NumPy, outside JAX tracing, so categorical
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
from pathlib import Path
from typing import Any


from ..data.shard import ShardData
from ..errors import BadInput
from ..store.storage import NotFound, split_uri
from .base import Model


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


def read_source(uri: str) -> str:
    store, key = split_uri(uri)
    try:
        return store.read_bytes(key).decode()
    except NotFound:
        raise BadInput(f"model file {uri} does not exist") from None
