"""The draws table: site arrays <-> one Parquet row per draw, one column per scalar component.

Columns: `chain`, `draw`, then for every site `name` (scalar) or `name[i]`, `name[i,j]` (C order),
and for global latent sites also their unconstrained components, prefixed `u:`. The table's schema
metadata (key `consensusfit`) records each site's shapes, so a reader rebuilds the arrays without
parsing column names. See docs/contract.md.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from itertools import product

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

UNCONSTRAINED = "u:"
METADATA_KEY = b"consensusfit"


def component_names(name: str, shape: tuple[int, ...]) -> list[str]:
    """`name` for a scalar, `name[i]` or `name[i,j]` for the components of an array, in C order."""
    if not shape:
        return [name]
    return [f"{name}[{','.join(map(str, index))}]" for index in product(*map(range, shape))]


@dataclass(frozen=True)
class Site:
    shape: tuple[int, ...]
    unconstrained_shape: tuple[int, ...] | None  # None: not stored unconstrained
    is_global: bool
    kind: str  # "latent" or "deterministic"

    def to_json(self) -> dict:
        return {
            "shape": list(self.shape),
            "unconstrained_shape": (
                None if self.unconstrained_shape is None else list(self.unconstrained_shape)
            ),
            "global": self.is_global,
            "kind": self.kind,
        }

    @classmethod
    def from_json(cls, data: dict) -> "Site":
        shape = data["unconstrained_shape"]
        return cls(
            tuple(data["shape"]), None if shape is None else tuple(shape), data["global"], data["kind"]
        )


@dataclass(frozen=True)
class Draws:
    """Arrays shaped (chains, draws, *site shape) plus what the table's metadata says."""

    constrained: dict[str, np.ndarray]
    unconstrained: dict[str, np.ndarray]
    sites: dict[str, Site]
    metadata: dict  # the rest of the `consensusfit` metadata: fingerprint, shard, groups, ...

    @property
    def chains(self) -> int:
        return next(iter(self.constrained.values())).shape[0]

    @property
    def draws(self) -> int:
        return next(iter(self.constrained.values())).shape[1]

    def global_names(self) -> list[str]:
        return [name for name, site in self.sites.items() if site.is_global and site.kind == "latent"]


def _flatten(prefix: str, name: str, values: np.ndarray, chains: int, draws: int) -> dict:
    shape = values.shape[2:]
    flat = np.asarray(values).reshape(chains * draws, -1)
    return {column: flat[:, i] for i, column in enumerate(component_names(prefix + name, shape))}


def to_table(draws: Draws) -> pa.Table:
    chains, n = draws.chains, draws.draws
    columns = {
        "chain": np.repeat(np.arange(chains, dtype=np.int32), n),
        "draw": np.tile(np.arange(n, dtype=np.int32), chains),
    }
    for name, values in draws.constrained.items():
        columns.update(_flatten("", name, values, chains, n))
    for name, values in draws.unconstrained.items():
        columns.update(_flatten(UNCONSTRAINED, name, values, chains, n))
    metadata = {**draws.metadata, "sites": {name: s.to_json() for name, s in draws.sites.items()}}
    table = pa.table(columns)
    return table.replace_schema_metadata({METADATA_KEY: json.dumps(metadata).encode()})


def from_table(table: pa.Table) -> Draws:
    metadata = json.loads(table.schema.metadata[METADATA_KEY])
    sites = {name: Site.from_json(data) for name, data in metadata.pop("sites").items()}
    chain = table.column("chain").to_numpy()
    chains = int(chain.max()) + 1
    n = table.num_rows // chains

    def gather(prefix: str, name: str, shape: tuple[int, ...]) -> np.ndarray:
        names = component_names(prefix + name, shape)
        stacked = np.stack([table.column(c).to_numpy() for c in names], axis=-1)
        return stacked.reshape((chains, n) + shape)

    constrained = {name: gather("", name, site.shape) for name, site in sites.items()}
    unconstrained = {
        name: gather(UNCONSTRAINED, name, site.unconstrained_shape)
        for name, site in sites.items()
        if site.unconstrained_shape is not None
    }
    return Draws(constrained, unconstrained, sites, metadata)


def to_parquet_bytes(draws: Draws) -> bytes:
    sink = io.BytesIO()
    pq.write_table(to_table(draws), sink)
    return sink.getvalue()


def from_parquet_bytes(data: bytes) -> Draws:
    return from_table(pq.read_table(io.BytesIO(data)))


def scalar_components(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{site: (chains, draws, *shape)} -> {component name: (chains, draws)}, names as in columns."""
    result = {}
    for name, values in arrays.items():
        flat = values.reshape(values.shape[:2] + (-1,))
        for i, component in enumerate(component_names(name, values.shape[2:])):
            result[component] = flat[:, :, i]
    return result
