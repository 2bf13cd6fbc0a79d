"""The model interface: a NumPyro function and how to feed it one shard (runner/models/)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..data.shard import ShardData


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
