"""NUTS on one shard or on a batch of shards at once, with every phase timed.

The sampler is two programs compiled ahead of time (`CompiledNuts`: init, and a step that both
warms up and samples), so compilation is measured on its own instead of hiding inside warmup, and
the programs are reused for every batch of the same shapes. Chains are vectorised (`vmap`), and so are shards: one
program runs B shards × C chains, which is what fills a GPU when one shard is too small to.

When the model allows it (`data_as_arguments`), its data are arguments of the compiled program
rather than constants baked into it, so shards of equal (padded) shapes share one compilation, in
this process and, through the persistent cache, across processes. Python models that compute
shapes from their data (the thread's `len(np.unique(patient))`) need their data as constants: they
compile per shard, one shard at a time.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax, random
from jax.flatten_util import ravel_pytree
from numpyro.infer.hmc import hmc
from numpyro.infer.util import initialize_model


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


def _stack(trees: Sequence[Any]) -> Any:
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def _batched_shape(tree: Any, batch: int) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct((batch,) + tuple(x.shape), x.dtype), tree)


def _shape(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)), tree)


# Transitions per call of the step program: warmup and sampling both run in calls of at most
# CHUNK transitions, so one program serves both, and the draws it returns per call stay small.
CHUNK = 250

POSITION = "unconstrained"  # the one entry of the position NUTS moves: all latent sites, raveled


class CompiledNuts:
    """The programs that sample `batch` shards of one shape, compiled once.

    Two programs: `init` (one shard: initial point, step size, adaptation state, for every chain)
    and `step` (up to CHUNK NUTS transitions of every chain of every shard, vectorised, returning
    the draws). NUTS adapts during the first `settings.warmup` transitions of a state, so the same
    step program warms up and samples. Compiling both once and calling them for every shard
    replaces what `MCMC.run` retraces and recompiles per shard.

    `example` is one shard's arguments: it fixes the shapes (and, for a model that needs its data
    as constants, the data themselves). `run` then samples any batch of shards of those shapes.
    """

    def __init__(
        self,
        model: Callable,
        example: dict[str, Any],
        settings: SamplerSettings,
        batch: int = 1,
        data_as_arguments: bool = False,
    ):
        if batch > 1 and not data_as_arguments:
            raise ValueError("only a model that takes its data as arguments can sample shards in a batch")
        started = time.perf_counter()
        self.settings, self.batch = settings, batch
        self.data_as_arguments = data_as_arguments
        self.example = self._device(example)
        arrays, self.constants = self._split(self.example)

        def init(keys, data):
            # NumPyro's `HMC.init` (same keys, same adaptation), on the unconstrained sites
            # raveled into one vector: NUTS then moves, selects and stores one array per step
            # instead of one per site, and on a CPU each of those is a kernel launch that costs
            # more than the arithmetic. The vector sits in a one-entry dict so that the mass
            # matrix is the one-block dict `MCMC` builds, and momenta use the same random numbers.
            # Traced once; it also leaves the chain-vectorised kernel `step` uses on `self`.
            kwargs = {**data, **self.constants}
            keys, init_keys = jnp.swapaxes(jax.vmap(random.split)(keys), 0, 1)
            info = initialize_model(init_keys, model, model_kwargs=kwargs, dynamic_args=True)
            z = info.param_info.z
            self.unravel = ravel_pytree(jax.tree.map(lambda x: x[0], z))[1]
            self.postprocess = info.postprocess_fn

            def flat_potential(**kwargs):
                return lambda position: info.potential_fn(**kwargs)(self.unravel(position[POSITION]))

            init_kernel, sample_kernel = hmc(potential_fn_gen=flat_potential, algo="NUTS")
            self.sample_kernel = jax.vmap(sample_kernel, in_axes=(0, None, None))
            position = {POSITION: jax.vmap(lambda z: ravel_pytree(z)[0])(z)}
            return jax.vmap(
                lambda position, key: init_kernel(
                    position,
                    settings.warmup,
                    dense_mass=[],
                    target_accept_prob=settings.target_accept_prob,
                    max_tree_depth=settings.max_tree_depth,
                    model_kwargs=kwargs,
                    rng_key=key,
                )
            )(position, keys)

        keys = random.split(random.PRNGKey(0), settings.chains)
        lowered = jax.jit(init).lower(_shape(keys), _shape(arrays))
        self.init_program, state = lowered.compile(), lowered.out_info

        def advance(state, data):
            return self.sample_kernel(state, (), {**data, **self.constants})

        def step(state, data, n):
            def transition(i, carry):
                state, draws = carry
                state = jax.vmap(advance)(state, data)
                new = (state.z[POSITION], state.diverging, state.num_steps)
                return state, jax.tree.map(lambda drawn, value: drawn.at[i].set(value), draws, new)

            empty = jax.tree.map(
                lambda x: jnp.zeros((CHUNK,) + x.shape, x.dtype),
                (state.z[POSITION], state.diverging, state.num_steps),
            )
            return lax.fori_loop(0, n, transition, (state, empty))

        shapes = (_batched_shape(state, batch), _batched_shape(arrays, batch), jax.ShapeDtypeStruct((), jnp.int32))
        self.step_program = jax.jit(step).lower(*shapes).compile()

        def constrain(flat, data):
            """Raveled draws (chains, draws, dims) -> (unconstrained sites, constrained sites)."""
            z = jax.vmap(jax.vmap(self.unravel))(flat)
            return z, jax.vmap(jax.vmap(self.postprocess(**data, **self.constants)))(z)

        position = state.z[POSITION]
        draws = jax.ShapeDtypeStruct((settings.chains, settings.samples) + position.shape[1:], position.dtype)
        # Compiled here too: `run` then traces nothing, so threads may run batches at once
        # (NumPyro's handler stack, which tracing a model uses, is one global list).
        self.constrain_program = jax.jit(constrain).lower(draws, _shape(arrays)).compile()
        self.compile_seconds = time.perf_counter() - started
        self._unclaimed_compile = threading.Lock()

    def _claim_compile_seconds(self) -> float:
        """The compile time, for the first batch that asks; later batches reuse the programs."""
        with self._unclaimed_compile:
            seconds, self.compile_seconds = self.compile_seconds, 0.0
        return seconds

    def _device(self, arguments: dict[str, Any]) -> dict[str, Any]:
        return to_device(arguments) if self.data_as_arguments else arguments

    def _split(self, arguments: dict[str, Any]) -> tuple[dict, dict]:
        """(arrays traced as arguments, constants baked into the program)."""
        arrays = {k: v for k, v in arguments.items() if self.data_as_arguments and isinstance(v, jax.Array)}
        return arrays, {k: v for k, v in arguments.items() if k not in arrays}

    def _transitions(self, state, data, total: int):
        """`total` transitions in calls of CHUNK; the final state and the draws (total, ...)."""
        collected = []
        for done in range(0, total, CHUNK):
            n = min(CHUNK, total - done)
            state, draws = self.step_program(state, data, np.int32(n))
            collected.append(jax.tree.map(lambda x: x[:n], draws))
        return state, jax.tree.map(lambda *parts: jnp.concatenate(parts), *collected)

    def run(self, arguments: Sequence[dict[str, Any]], seeds: Sequence[int]) -> list[Samples]:
        """Warm up and sample shard i of `arguments` with seed i; one `Samples` per shard."""
        if len(arguments) != len(seeds) or not 0 < len(arguments) <= self.batch:
            raise ValueError(f"{len(arguments)} shards and {len(seeds)} seeds for a batch of {self.batch}")
        started = time.perf_counter()
        # Without data as arguments `example` is the caller's own dict, baked into the programs.
        if not self.data_as_arguments and not all(a is self.example for a in arguments):
            raise ValueError("a model with its data as constants samples only the data it was compiled for")
        arguments = [self._device(a) for a in arguments]
        data = [self._split(a)[0] for a in arguments]
        states = [
            self.init_program(random.split(random.PRNGKey(seed), self.settings.chains), shard)
            for shard, seed in zip(data, seeds)
        ]
        padding = self.batch - len(arguments)  # a short last batch repeats its first shard
        state, data_batch = _stack(states + states[:1] * padding), _stack(data + data[:1] * padding)
        initialised = time.perf_counter()

        state, _ = jax.block_until_ready(self._transitions(state, data_batch, self.settings.warmup))
        warmed = time.perf_counter()
        state, (z, diverging, num_steps) = jax.block_until_ready(
            self._transitions(state, data_batch, self.settings.samples)
        )
        sampled = time.perf_counter()

        seconds = {
            "compile": self._claim_compile_seconds(),
            "init": initialised - started,
            "warmup": warmed - initialised,
            "sampling": sampled - warmed,
        }
        results = []
        for i, shard_data in enumerate(data):
            # draws come stacked first: (draws, shards, chains, dims) -> (chains, draws, dims)
            shard_z, constrained = self.constrain_program(jnp.swapaxes(z[:, i], 0, 1), shard_data)
            results.append(
                Samples(
                    unconstrained={name: np.asarray(value) for name, value in shard_z.items()},
                    constrained={name: np.asarray(value) for name, value in constrained.items()},
                    diverging=np.asarray(diverging[:, i]).T,
                    num_steps=np.asarray(num_steps[:, i]).T,
                    step_size=np.asarray(state.adapt_state.step_size[i]),
                    seconds=dict(seconds),
                )
            )
        return results


def run_nuts(
    model: Callable,
    arguments: dict[str, Any],
    settings: SamplerSettings,
    data_as_arguments: bool = False,
) -> Samples:
    """Warm up and sample `settings.chains` vectorised NUTS chains of `model(**arguments)`."""
    sampler = CompiledNuts(model, arguments, settings, 1, data_as_arguments)
    return sampler.run([sampler.example], [settings.seed])[0]
