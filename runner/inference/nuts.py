"""NUTS on one shard or on a batch of shards at once, in phases a step can time.

The sampler is NumPyro's NUTS as three programs built ahead of time (`CompiledNuts`: init, a step
that both warms up and samples, and constrain), so compilation happens on its own instead of
hiding inside warmup (a step times building the sampler, then `start`, `warm_up` and `draw`:
runner/steps/timing.py), and the programs are reused for every batch of the same shapes. Chains are
vectorised (`vmap`), and so are shards: one program runs B shards × C chains, which is what fills
a GPU when one shard is too small to.

When the model allows it (`data_as_arguments`), its data are arguments of the compiled program
rather than constants baked into it, so shards of equal (padded) shapes share one compilation, in
this process and, through the program store and XLA's persistent cache, across processes. Python
models that compute shapes from their data (the thread's `len(np.unique(patient))`) need their
data as constants: they compile per shard, one shard at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import export, lax, random
from jax.flatten_util import ravel_pytree
from numpyro.infer.hmc import hmc
from numpyro.infer.util import initialize_model

from .programs import load_programs, program_key, store_programs


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
    programs: str = "traced"  # or "loaded": from the program store, without tracing
    global_gradient: np.ndarray | None = None  # (chains, draws, d): ∇ log density in the global u
    adaptation: "Adaptation | None" = None  # where each chain ended: a later run's warm start


@dataclass(frozen=True)
class Adaptation:
    """Per chain: the last position (raveled), the adapted step size and diagonal inverse mass.

    A later run of nearly the same target (the next EP round) starts here and only re-tunes the
    step size, instead of adapting from scratch.
    """

    position: np.ndarray  # (chains, dims)
    step_size: np.ndarray  # (chains,)
    inverse_mass: np.ndarray  # (chains, dims)


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


def ravel_batch(sites: dict[str, Any]) -> tuple[jax.Array, Callable]:
    """Sites with a leading batch axis -> (batch, dims) vectors, and the unravel of one vector."""
    unravel = ravel_pytree(jax.tree.map(lambda x: x[0], sites))[1]
    return jax.vmap(lambda one: ravel_pytree(one)[0])(sites), unravel


CAVITY = ("cavity_mean", "cavity_precision")  # a tilted model's arguments: always traced, never baked


def global_index(unravel: Callable, dims: int, names: Sequence[str]) -> np.ndarray:
    """Positions of the named sites' components in the raveled vector, in the order of `names`."""
    with jax.ensure_compile_time_eval():
        sites = unravel(jnp.arange(dims, dtype=jnp.result_type(float)))
    return np.concatenate([np.ravel(np.asarray(sites[n])) for n in names] or [np.zeros(0)]).astype(np.int32)


@dataclass(frozen=True)
class NutsParts:
    """What tracing `init` finds out about the model: the step and constrain programs are built
    from it."""

    unravel: Callable  # one raveled position -> the model's unconstrained sites
    postprocess: Callable  # model arguments -> (unconstrained sites -> constrained sites)
    sample: Callable  # NUTS's transition, vectorised over chains
    structure: Any  # the pytree structure of NUTS's state, whose leaves cross the programs
    globals: np.ndarray  # the global sites' components in the raveled position


def export_programs(
    model: Callable, arrays: dict[str, Any], constants: dict[str, Any], settings: SamplerSettings, batch: int,
    global_names: Sequence[str] = (), warm: int = 0,
) -> list[export.Exported]:
    """The init, step and constrain programs of `CompiledNuts`, traced once, as StableHLO.

    Exported programs can be stored and loaded by another process (runner/inference/programs.py), which
    then skips tracing NUTS, the part of compiling that XLA's cache does not keep. Their inputs
    and outputs are arrays, lists and string-keyed dicts: NUTS's state crosses as its list of
    leaves (its pytree has a tuple-keyed dict, which `jax.export` cannot serialise).

    `global_names`: the step also returns, with every draw, the gradient of the log density in
    those sites' unconstrained components (EP's tilted moments use it). `warm` (the raveled
    dimension; 0: a cold start): init takes every chain's position, step size and inverse mass
    (an `Adaptation`) and only re-tunes the step size during `settings.warmup`.
    """
    init_program, parts = _export_init(model, arrays, constants, settings, global_names, warm)
    leaves = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in init_program.out_avals]
    return [
        init_program,
        _export_step(parts, leaves, arrays, constants, batch),
        _export_constrain(parts, leaves, arrays, constants, settings),
    ]


def _export_init(
    model: Callable, arrays: dict[str, Any], constants: dict[str, Any], settings: SamplerSettings,
    global_names: Sequence[str], warm: int,
) -> tuple[export.Exported, NutsParts]:
    """The init program, and the parts its tracing finds (`NutsParts`)."""
    # The parts exist only inside the trace (they close over the model's traced structure), so
    # tracing hands them out through this list, once.
    found: list[NutsParts] = []

    def init(keys, data, *start):
        # NumPyro's `HMC.init` (same keys, same adaptation), on the unconstrained sites
        # raveled into one vector: NUTS then moves, selects and stores one array per step
        # instead of one per site, and on a CPU each of those is a kernel launch that costs
        # more than the arithmetic. The vector sits in a one-entry dict so that the mass
        # matrix is the one-block dict `MCMC` builds, and momenta use the same random numbers.
        kwargs = {**data, **constants}
        keys, init_keys = jnp.swapaxes(jax.vmap(random.split)(keys), 0, 1)
        info = initialize_model(init_keys, model, model_kwargs=kwargs, dynamic_args=True)
        flat, unravel = ravel_batch(info.param_info.z)

        def flat_potential(**kwargs):
            return lambda position: info.potential_fn(**kwargs)(unravel(position[POSITION]))

        init_kernel, sample_kernel = hmc(potential_fn_gen=flat_potential, algo="NUTS")
        common = dict(
            dense_mass=[], target_accept_prob=settings.target_accept_prob,
            max_tree_depth=settings.max_tree_depth, model_kwargs=kwargs,
        )
        if warm:
            position, step_size, inverse_mass = start
            state = jax.vmap(
                lambda position, key, step, mass: init_kernel(
                    {POSITION: position}, settings.warmup, step_size=step, inverse_mass_matrix=mass,
                    adapt_mass_matrix=False, rng_key=key, **common,
                )
            )(position, keys, step_size, inverse_mass)
        else:
            state = jax.vmap(
                lambda position, key: init_kernel(position, settings.warmup, rng_key=key, **common)
            )({POSITION: flat}, keys)
        leaves, structure = jax.tree.flatten(state)
        found.append(NutsParts(
            unravel=unravel,
            postprocess=info.postprocess_fn,
            sample=jax.vmap(sample_kernel, in_axes=(0, None, None)),
            structure=structure,
            globals=global_index(unravel, flat.shape[-1], global_names),
        ))
        return leaves

    keys = random.split(random.PRNGKey(0), settings.chains)
    start_shapes = ()
    if warm:
        dtype = jnp.result_type(float)
        start_shapes = (
            jax.ShapeDtypeStruct((settings.chains, warm), dtype), jax.ShapeDtypeStruct((settings.chains,), dtype),
            jax.ShapeDtypeStruct((settings.chains, warm), dtype),
        )
    program = export.export(jax.jit(init))(_shape(keys), _shape(arrays), *start_shapes)
    (parts,) = found
    return program, parts


def _export_step(
    parts: NutsParts, leaves: list, arrays: dict[str, Any], constants: dict[str, Any], batch: int
) -> export.Exported:
    """The step program: n ≤ CHUNK transitions of every chain of every shard of a batch."""

    def step(leaves, data, n):
        """(leaves, draws, adaptation) after n transitions."""

        def advance(state, data):
            return parts.sample(state, (), {**data, **constants})

        def record(state):
            return (state.z[POSITION], state.diverging, state.num_steps, -state.z_grad[POSITION][..., parts.globals])

        def transition(i, carry):
            state, draws = carry
            state = jax.vmap(advance)(state, data)
            return state, jax.tree.map(lambda drawn, value: drawn.at[i].set(value), draws, record(state))

        state = jax.tree.unflatten(parts.structure, leaves)
        empty = jax.tree.map(lambda x: jnp.zeros((CHUNK,) + x.shape, x.dtype), record(state))
        state, draws = lax.fori_loop(0, n, transition, (state, empty))
        adaptation = (state.adapt_state.step_size, jax.tree.leaves(state.adapt_state.inverse_mass_matrix)[0])
        return jax.tree.leaves(state), draws, adaptation

    return export.export(jax.jit(step))(
        _batched_shape(leaves, batch), _batched_shape(arrays, batch), jax.ShapeDtypeStruct((), jnp.int32)
    )


def _export_constrain(
    parts: NutsParts, leaves: list, arrays: dict[str, Any], constants: dict[str, Any], settings: SamplerSettings
) -> export.Exported:
    """The constrain program: one shard's raveled draws to its unconstrained and constrained sites."""

    def constrain(flat, data):
        """(chains, draws, dims) -> (unconstrained sites, constrained sites)."""
        z = jax.vmap(jax.vmap(parts.unravel))(flat)
        return z, jax.vmap(jax.vmap(parts.postprocess(**data, **constants)))(z)

    position = jax.tree.unflatten(parts.structure, leaves).z[POSITION]
    draws = jax.ShapeDtypeStruct((settings.chains, settings.samples) + position.shape[1:], position.dtype)
    return export.export(jax.jit(constrain))(draws, _shape(arrays))


def _compiled(program: export.Exported):
    """An exported program compiled for this device (XLA's persistent cache applies)."""
    arguments, _ = jax.tree.unflatten(
        program.in_tree, [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in program.in_avals]
    )
    return jax.jit(program.call).lower(*arguments).compile()


class CompiledNuts:
    """The programs that sample `batch` shards of one shape, compiled once.

    Three programs (`export_programs`): `init` (one shard: initial point, step size, adaptation
    state, for every chain), `step` (up to CHUNK NUTS transitions of every chain of every shard,
    vectorised, returning the draws) and `constrain` (draws to the model's sites). NUTS adapts
    during the first `settings.warmup` transitions of a state, so the same step program warms up
    and samples. Compiling them once and calling them for every shard replaces what `MCMC.run`
    retraces and recompiles per shard; `run` traces nothing, so threads may run batches at once
    (NumPyro's handler stack, which tracing a model uses, is one global list).

    `example` is one shard's arguments: it fixes the shapes (and, for a model that needs its data
    as constants, the data themselves). `run` then samples any batch of shards of those shapes.
    `identity` names the model for the program store (runner/inference/programs.py): programs of a model
    with its data as arguments are kept there, and a later sampler with the same identity, shapes
    and settings loads them instead of tracing.
    """

    def __init__(
        self,
        model: Callable,
        example: dict[str, Any],
        settings: SamplerSettings,
        batch: int = 1,
        data_as_arguments: bool = False,
        identity: str | None = None,
        global_names: Sequence[str] = (),
        cavity_dims: int = 0,
        warm: int = 0,
    ):
        if batch > 1 and not data_as_arguments:
            raise ValueError("only a model that takes its data as arguments can sample shards in a batch")
        self.settings, self.batch, self.warm = settings, batch, warm
        self.data_as_arguments = data_as_arguments
        self.example = self._device(example)
        self.cavity_dims = cavity_dims
        arrays, constants = self._split({**self.example, **self._cavity_example()})
        key = None
        if identity is not None and data_as_arguments:
            key = program_key(
                identity, repr(settings), str(batch), repr(_shape(arrays)), repr(list(global_names)), str(warm)
            )
        programs = load_programs(key) if key else None
        self.loaded_programs = programs is not None
        if programs is None:
            programs = export_programs(model, arrays, constants, settings, batch, global_names, warm)
            if key:
                store_programs(key, programs)
        self.init_program, self.step_program, self.constrain_program = (_compiled(p) for p in programs)

    def _cavity_example(self) -> dict[str, Any]:
        if not self.cavity_dims:
            return {}
        d = self.cavity_dims
        return {CAVITY[0]: jnp.zeros(d), CAVITY[1]: jnp.eye(d)}

    def _device(self, arguments: dict[str, Any]) -> dict[str, Any]:
        return to_device(arguments) if self.data_as_arguments else arguments

    def _split(self, arguments: dict[str, Any]) -> tuple[dict, dict]:
        """(arrays traced as arguments, constants baked into the program)."""
        arrays = {
            k: v for k, v in arguments.items()
            if k in CAVITY or (self.data_as_arguments and isinstance(v, jax.Array))
        }
        return arrays, {k: v for k, v in arguments.items() if k not in arrays}

    def _transitions(self, state, data, total: int):
        """`total` transitions in calls of CHUNK; the final state, the draws (total, ...), the
        adapted (step size, inverse mass)."""
        collected = []
        for done in range(0, total, CHUNK):
            n = min(CHUNK, total - done)
            state, draws, adaptation = self.step_program(state, data, np.int32(n))
            collected.append(jax.tree.map(lambda x: x[:n], draws))
        return state, jax.tree.map(lambda *parts: jnp.concatenate(parts), *collected), adaptation

    def start(
        self,
        arguments: Sequence[dict[str, Any]],
        seeds: Sequence[int],
        cavities: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
        starts: Sequence["Adaptation"] | None = None,
    ) -> "Batch":
        """Every chain's initial state, for shard i of `arguments` with seed i.

        `cavities`: shard i's (mean, precision) of the Gaussian cavity of a tilted model (EP);
        `starts`: shard i's warm start, for a sampler built with `warm`.
        """
        if len(arguments) != len(seeds) or not 0 < len(arguments) <= self.batch:
            raise ValueError(f"{len(arguments)} shards and {len(seeds)} seeds for a batch of {self.batch}")
        if (cavities is not None) != bool(self.cavity_dims) or (starts is not None) != bool(self.warm):
            raise ValueError("cavities and warm starts are given exactly to the samplers built for them")
        # Without data as arguments `example` is the caller's own dict, baked into the programs.
        if not self.data_as_arguments and not all(a is self.example for a in arguments):
            raise ValueError("a model with its data as constants samples only the data it was compiled for")
        arguments = [self._device(a) for a in arguments]
        if cavities is not None:
            arguments = [
                {**a, CAVITY[0]: jnp.asarray(mean), CAVITY[1]: jnp.asarray(precision)}
                for a, (mean, precision) in zip(arguments, cavities)
            ]
        data = [self._split(a)[0] for a in arguments]
        chain_keys = [random.split(random.PRNGKey(seed), self.settings.chains) for seed in seeds]
        if starts is None:
            states = [self.init_program(keys, shard) for keys, shard in zip(chain_keys, data)]
        else:
            states = [
                self.init_program(keys, shard, s.position, s.step_size, s.inverse_mass)
                for keys, shard, s in zip(chain_keys, data, starts)
            ]
        padding = self.batch - len(arguments)  # a short last batch repeats its first shard
        return jax.block_until_ready(
            Batch(_stack(states + states[:1] * padding), _stack(data + data[:1] * padding), data)
        )

    def warm_up(self, batch: "Batch") -> "Batch":
        """The batch after `settings.warmup` transitions (NUTS adapts during them)."""
        state, _, _ = jax.block_until_ready(self._transitions(batch.state, batch.data, self.settings.warmup))
        return batch._replace(state=state)

    def draw(self, batch: "Batch") -> list[Samples]:
        """`settings.samples` transitions of a warmed-up batch: one `Samples` per shard."""
        _, (z, diverging, num_steps, gradient), (step_size, inverse_mass) = self._transitions(
            batch.state, batch.data, self.settings.samples
        )
        results = []
        for i, shard_data in enumerate(batch.shards):
            # draws come stacked first: (draws, shards, chains, dims) -> (chains, draws, dims)
            shard_z, constrained = self.constrain_program(jnp.swapaxes(z[:, i], 0, 1), shard_data)
            results.append(
                Samples(
                    unconstrained={name: np.asarray(value) for name, value in shard_z.items()},
                    constrained={name: np.asarray(value) for name, value in constrained.items()},
                    diverging=np.asarray(diverging[:, i]).T,
                    num_steps=np.asarray(num_steps[:, i]).T,
                    step_size=np.asarray(step_size[i]),
                    programs="loaded" if self.loaded_programs else "traced",
                    global_gradient=np.swapaxes(np.asarray(gradient[:, i]), 0, 1),
                    adaptation=Adaptation(
                        np.asarray(z[-1, i]), np.asarray(step_size[i]), np.asarray(inverse_mass[i])
                    ),
                )
            )
        return results

    def run(
        self,
        arguments: Sequence[dict[str, Any]],
        seeds: Sequence[int],
        cavities: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
        starts: Sequence["Adaptation"] | None = None,
    ) -> list[Samples]:
        """Warm up and sample shard i of `arguments` with seed i (`start`, `warm_up`, `draw`)."""
        return self.draw(self.warm_up(self.start(arguments, seeds, cavities, starts)))


class Batch(NamedTuple):
    """Shards on their way through `CompiledNuts`: NUTS's state and the shards' traced arguments,
    stacked (a short batch padded with its first shard), and each shard's own arguments."""

    state: Any
    data: Any
    shards: list[dict[str, Any]]


def run_nuts(
    model: Callable,
    arguments: dict[str, Any],
    settings: SamplerSettings,
    data_as_arguments: bool = False,
) -> Samples:
    """Warm up and sample `settings.chains` vectorised NUTS chains of `model(**arguments)`."""
    sampler = CompiledNuts(model, arguments, settings, 1, data_as_arguments)
    return sampler.run([sampler.example], [settings.seed])[0]
