"""Global draws as one matrix: the shards' global sites, checked alike, packed to (chains, draws, D).

The combination methods (runner/combine/methods.py) and the agreement (runner/combine/agreement.py)
work on packed unconstrained draws; `unpack` returns the sites, `unconstrained_names` names the
packed columns.
"""

from __future__ import annotations

import numpy as np

from ..errors import BadInput
from ..store.draws import Draws, Site, component_names


def global_layout(shards: list[Draws]) -> dict[str, Site]:
    """The global latent sites, the same in every shard (else a refusal naming the shard)."""
    first = {name: shards[0].sites[name] for name in shards[0].global_names()}
    if not first:
        raise BadInput("shard 0 has no global latent sites: nothing to combine")
    for k, draws in enumerate(shards[1:], start=1):
        other = {name: draws.sites[name] for name in draws.global_names()}
        if other != first:
            raise BadInput(
                f"shard {k} has global sites {sorted(other)} with other shapes or names than shard 0's "
                f"{sorted(first)}"
            )
    return first


def pack(draws: Draws, layout: dict[str, Site]) -> np.ndarray:
    """The unconstrained global components of one shard, shaped (chains, draws, D)."""
    parts = [
        np.asarray(draws.unconstrained[name], dtype=float).reshape(draws.chains, draws.draws, -1)
        for name in layout
    ]
    return np.concatenate(parts, axis=-1)


def unpack(values: np.ndarray, layout: dict[str, Site]) -> dict[str, np.ndarray]:
    out, start = {}, 0
    for name, site in layout.items():
        size = int(np.prod(site.unconstrained_shape, dtype=int))
        out[name] = values[..., start : start + size].reshape(values.shape[:2] + site.unconstrained_shape)
        start += size
    return out


def unconstrained_names(layout: dict[str, Site]) -> list[str]:
    """Component names in the packed order: the site's own names where the shapes agree."""
    names = []
    for name, site in layout.items():
        prefix = "" if site.unconstrained_shape == site.shape else "u:"
        names += component_names(prefix + name, site.unconstrained_shape)
    return names
