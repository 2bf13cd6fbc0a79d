"""NUTS on one shard, with every phase timed.

The warmup and sampling loops are `lax.scan`s compiled ahead of time, so compilation is measured
on its own instead of hiding inside warmup. Chains are vectorised (`vmap`): one compiled program
runs all chains, which is what a GPU wants. When the model allows it (`data_as_arguments`), its
data are arguments of the compiled program rather than constants baked into it, so shards of equal
shapes can share one compilation; Python models that compute shapes from their data (the thread's
`len(np.unique(patient))`) need their data as constants.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax, random
from numpyro.infer import NUTS


@dataclass(frozen=True)
class SamplerSettings:
    warmup: int = 1000
    samples: int = 1000
    chains: int = 4
    seed: int = 0
    target_accept_prob: float = 0.8
    max_tree_depth: int = 10

    @classmethod
    def from_spec(cls, sampler: dict) -> "SamplerSettings":
        return cls(
            warmup=sampler["warmup"],
            samples=sampler["samples"],
            chains=sampler["chains"],
            seed=sampler["seed"],
            target_accept_prob=sampler["targetAcceptProb"],
            max_tree_depth=sampler["maxTreeDepth"],
        )


@dataclass(frozen=True)
class Samples:
    """Draws shaped (chains, draws, ...) and what the sampler saw on the way."""

    unconstrained: dict[str, np.ndarray]  # latent sites, in the space NUTS moves in
    constrained: dict[str, np.ndarray]  # latent and deterministic sites
    diverging: np.ndarray  # (chains, draws) bool
    num_steps: np.ndarray  # (chains, draws) leapfrog steps per draw
    step_size: np.ndarray  # (chains,) adapted step size
    seconds: dict[str, float]  # compile, warmup, sampling


def to_device(arguments: dict[str, Any]) -> dict[str, Any]:
    """NumPy columns -> JAX arrays (in the default float precision); other values unchanged.

    Only for models that take their data as traced arguments: a model that computes shapes from
    its data (`int(g.max())`) needs NumPy arrays, which stay concrete while the sampler is traced.
    """
    converted = {}
    for name, value in arguments.items():
        if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
            dtype = jnp.int32 if value.dtype.kind in "iu" else None
            converted[name] = jnp.asarray(value, dtype=dtype)
        else:
            converted[name] = value
    return converted


def tree_depth(num_steps: np.ndarray) -> np.ndarray:
    """A NUTS tree of depth d takes up to 2^d − 1 leapfrog steps."""
    return np.ceil(np.log2(np.asarray(num_steps) + 1))


def run_nuts(
    model: Callable,
    arguments: dict[str, Any],
    settings: SamplerSettings,
    data_as_arguments: bool = False,
) -> Samples:
    """Warm up and sample `settings.chains` vectorised NUTS chains of `model(**arguments)`."""
    started = time.perf_counter()
    if data_as_arguments:
        arguments = to_device(arguments)
    kernel = NUTS(
        model,
        target_accept_prob=settings.target_accept_prob,
        max_tree_depth=settings.max_tree_depth,
    )
    arrays = {
        k: v for k, v in arguments.items() if data_as_arguments and isinstance(v, jax.Array)
    }
    constants = {k: v for k, v in arguments.items() if k not in arrays}
    keys = random.split(random.PRNGKey(settings.seed), settings.chains)
    state = kernel.init(keys, settings.warmup, model_kwargs=arguments)

    def advance(state, data):
        return kernel.sample(state, (), {**data, **constants})

    def warmup(state, data):
        return lax.scan(lambda s, _: (advance(s, data), None), state, None, length=settings.warmup)[0]

    def sample(state, data):
        def step(s, _):
            s = advance(s, data)
            return s, (s.z, s.diverging, s.num_steps)

        return lax.scan(step, state, None, length=settings.samples)

    warmup_program = jax.jit(warmup).lower(state, arrays).compile()
    sample_program = jax.jit(sample).lower(state, arrays).compile()
    compiled = time.perf_counter()

    state = jax.block_until_ready(warmup_program(state, arrays))
    warmed = time.perf_counter()
    state, (z, diverging, num_steps) = jax.block_until_ready(sample_program(state, arrays))
    sampled = time.perf_counter()

    # scan stacks draws first: (draws, chains, ...) -> (chains, draws, ...)
    z = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), z)
    postprocess = kernel.postprocess_fn((), arguments)
    constrained = jax.vmap(jax.vmap(postprocess))(z)
    return Samples(
        unconstrained={name: np.asarray(value) for name, value in z.items()},
        constrained={name: np.asarray(value) for name, value in constrained.items()},
        diverging=np.asarray(diverging).T,
        num_steps=np.asarray(num_steps).T,
        step_size=np.asarray(state.adapt_state.step_size),
        seconds={
            "compile": compiled - started,
            "warmup": warmed - compiled,
            "sampling": sampled - warmed,
        },
    )
