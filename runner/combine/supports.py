"""Combined values back to their support, with the bijection NumPyro itself uses for each site.

Global sites are combined in the unconstrained space NUTS sampled in (the `u:` columns), where the
tempered shard densities are exact factors of the full posterior (runner/inference/tempering.py),
and mapped back with `biject_to(support)`, found by tracing the model on one shard's data.
Combined values are therefore always inside the support.
"""

from __future__ import annotations

import jax
import numpy as np
from numpyro.distributions.transforms import biject_to

from ..errors import BadInput
from ..inference.tempering import trace_model
from ..store.draws import Site


def bijections(fn, arguments: dict, layout: dict[str, Site]) -> dict:
    """NumPyro's unconstrained→support transform of every global site, from one trace."""
    with jax.ensure_compile_time_eval():
        trace = trace_model(fn, arguments)
    transforms = {}
    for name in layout:
        site = trace.get(name)
        if site is None or site["type"] != "sample":
            raise BadInput(f"the model does not sample global site {name!r} that the shards recorded")
        transforms[name] = biject_to(site["fn"].support)
    return transforms


def constrain(unconstrained: dict[str, np.ndarray], transforms: dict) -> dict[str, np.ndarray]:
    return {name: np.asarray(transforms[name](values)) for name, values in unconstrained.items()}
