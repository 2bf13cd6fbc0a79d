"""Tempering: which sites are global, and raising exactly their density to the power 1/K.

With the data split into K shards by group, the full posterior factorises as

    p(θ, α | y) ∝ p(θ) Π_g p(α_g | θ) p(y_g | α_g, θ)
               = Π_k [ p(θ)^(1/K) Π_{g∈k} p(α_g | θ) p(y_g | α_g, θ) ],

so shard k samples its bracket: only the global sites θ are tempered. NUTS works on the
unconstrained value u = T⁻¹(θ), whose density carries the Jacobian |J(u)| of the unconstraining
transform. For the shard densities to multiply back to the full posterior of u, that Jacobian must
be tempered too: p_k(u) ∝ (p(T(u)) |J(u)|)^(1/K) · (untempered terms). Tempering only the named
site would leave |J|^(K−1) in the product. NumPyro adds the Jacobian as a factor emitted *while*
the site is being processed, so `temper` scales every message that arrives while a global site is
in flight, which covers the site and its Jacobian and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
from numpyro import handlers
from numpyro.distributions import biject_to
from numpyro.primitives import Messenger

from ..errors import BadInput


class temper(Messenger):
    """Scale the log density of `sites`, and of whatever they emit while processed, by `scale`."""

    def __init__(self, fn: Callable | None, sites: frozenset[str], scale: float):
        self.sites = sites
        self.scale = scale
        self._in_flight: list[str] = []
        super().__init__(fn)

    def process_message(self, msg: dict) -> None:
        if msg["type"] != "sample":
            return
        if msg["name"] in self.sites or self._in_flight:
            msg["scale"] = self.scale if msg["scale"] is None else msg["scale"] * self.scale
        if msg["name"] in self.sites:
            self._in_flight.append(msg["name"])

    def postprocess_message(self, msg: dict) -> None:
        if self._in_flight and msg["name"] == self._in_flight[-1]:
            self._in_flight.pop()


def trace_model(model: Callable, kwargs: dict[str, Any], seed: int = 0) -> dict:
    """One forward run of the model (latent sites drawn from their priors), as a trace."""
    with handlers.trace() as trace, handlers.seed(rng_seed=seed):
        model(**kwargs)
    return trace


def site_shapes(trace: dict, kind: str) -> dict[str, tuple[int, ...]]:
    """Shapes of the latent sites (sampled, not observed) or of the deterministic sites."""
    if kind == "latent":
        chosen = (n for n, s in trace.items() if s["type"] == "sample" and not s["is_observed"])
    else:
        chosen = (n for n, s in trace.items() if s["type"] == "deterministic")
    return {name: tuple(np.shape(trace[name]["value"])) for name in chosen}


def refuse_hand_tempering(trace: dict) -> None:
    """A model that scales its own sites would be tempered twice: refuse it with a reason."""
    for name, site in trace.items():
        if site["type"] == "sample" and site.get("scale") is not None:
            raise BadInput(
                f"site {name!r} is already scaled by {float(np.mean(site['scale'])):.4g} in the model "
                "(handlers.scale or a subsampled plate); remove hand tempering: consensusfit tempers "
                "the global sites by 1/K itself"
            )


def same_shape_sites(shapes: dict, doubled_shapes: dict) -> list[str]:
    """Sites whose shape is the same for the shard and for the shard doubled.

    Doubling the rows and the groups changes the shape of every site that lives on a data or group
    plate, and of nothing else.
    """
    return [name for name, shape in shapes.items() if doubled_shapes.get(name) == shape]


@dataclass(frozen=True)
class GlobalSites:
    """The global latent sites (tempered, combined) and global deterministic sites (reported),
    and the shape of every other (local) latent and deterministic site on the shard as given: what
    the draws of a padded shard are trimmed back to (global sites are never padded)."""

    latent: list[str]
    deterministic: list[str]
    local_shapes: dict[str, tuple[int, ...]]


def resolve_global_sites(
    model: Callable,
    kwargs: dict[str, Any],
    doubled_kwargs: dict[str, Any],
    declared: list[str] | None,
) -> GlobalSites:
    """The global sites of a model: the declared latent list if given (checked), else found."""
    with jax.ensure_compile_time_eval():
        trace = trace_model(model, kwargs)
        doubled_trace = trace_model(model, doubled_kwargs)
    refuse_hand_tempering(trace)
    latent = site_shapes(trace, "latent")
    deterministic_shapes = site_shapes(trace, "deterministic")
    deterministic = same_shape_sites(deterministic_shapes, site_shapes(doubled_trace, "deterministic"))
    shapes = {**latent, **deterministic_shapes}

    def sites(latent_names: list[str]) -> GlobalSites:
        local = {name: shape for name, shape in shapes.items() if name not in {*latent_names, *deterministic}}
        return GlobalSites(latent_names, deterministic, local)

    if declared is None:
        return sites(same_shape_sites(latent, site_shapes(doubled_trace, "latent")))
    unknown = [name for name in declared if name not in latent]
    if unknown:
        raise BadInput(
            f"spec.model.globalSites names {', '.join(unknown)}, which the model does not "
            f"sample; its latent sites are {', '.join(latent)}"
        )
    return sites(list(declared))


def with_cavity(model: Callable, names: list[str]) -> Callable:
    """EP's tilted model: `model` times the Gaussian cavity N(u; c, P⁻¹) on the global vector u.

    u is the sites `names`, each mapped to the unconstrained space NUTS moves in (the inverse of
    the bijection NumPyro uses for the site's support) and raveled, in that order. The cavity's
    mean and precision are the model's arguments `cavity_mean` and `cavity_precision`, so one
    compiled program serves every round and shard (runner/sampling.py).
    """

    def tilted(*, cavity_mean, cavity_precision, **kwargs):
        with handlers.trace() as trace:
            model(**kwargs)
        u = jnp.concatenate(
            [jnp.ravel(biject_to(trace[n]["fn"].support).inv(trace[n]["value"])) for n in names]
        )
        gap = u - cavity_mean
        numpyro.factor("cavity", -0.5 * gap @ cavity_precision @ gap)

    return tilted
