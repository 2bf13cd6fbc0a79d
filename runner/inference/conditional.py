"""Group-level parameters given the combined global draws (the two-stage step).

Combination only concerns the global parameters θ. Every group g lives in exactly one shard k, so
its parameters α_g never need averaging; what they need is to be drawn *given the combined θ*
rather than given shard k's own (√K times wider) θ. Two-stage schemes for hierarchical models
(Bumbaca, Misra & Rossi 2020, "Scalable target marketing: distributed MCMC for Bayesian
hierarchical models") do this in a second pass over each shard.

Why it is exact. Shard k samples p_k(θ, α_k) ∝ p(θ)^(1/K) Π_{g∈k} p(α_g | θ) p(y_g | α_g, θ).
Conditional on θ, the tempered factor p(θ)^(1/K) is a constant, so

    p_k(α_k | θ) ∝ Π_{g∈k} p(α_g | θ) p(y_g | α_g, θ) ∝ p(α_k | θ, y),

the same conditional as under the full posterior (the full posterior's other factors involve θ and
other shards' groups only). Hence if θ_s is a draw from the full posterior p(θ | y) and
α_{k,s} ~ p(α_k | θ_s, y_k) for every k, then (θ_s, α_{1,s}, …, α_{K,s}) is a draw from the full
joint posterior: the combination's error in θ is the only approximation left, and each shard can
do its part on its own (in parallel, like sampling).

Algorithm, for one shard with combined draws θ_1..θ_N:
1. Adapt once: NUTS (runner/inference/nuts.py `run_nuts`) on the model conditioned on a central combined draw
   θ* (numpyro.handlers.condition), with its usual warmup. This gives a step size ε, a diagonal
   inverse mass matrix (the variance of its draws, in the unconstrained space NUTS moves in) and a
   pool of draws from p(α_k | θ*, y_k).
2. For every combined draw θ_s, in one vectorised program: start at a pool draw and take T NUTS
   transitions (NumPyro's NUTS kernel, `numpyro.infer.hmc.hmc`, with ε and the mass matrix fixed)
   whose target is p(α_k | θ_s, y_k), the model conditioned on θ_s. Every transition leaves that
   conditional invariant, and the chain starts from p(α_k | θ*, y_k), which differs from it only
   by how far θ_s sits from θ* within the (narrow) combined posterior, so a few transitions
   forget the start; the last state is the draw α_{k,s}.
3. Constrained values and deterministic sites (e.g. the centred α of a non-centred model) come from
   running the model with θ_s and α_{k,s} substituted (numpyro.infer.util.constrain_fn).
The draws keep the combined draws' (chain, draw) layout, so draw s of every shard belongs with
combined draw s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax, random
from numpyro import handlers
from numpyro.infer.hmc import hmc
from numpyro.infer.util import constrain_fn, potential_energy

from .nuts import SamplerSettings, ravel_batch, run_nuts

TRANSITIONS = 20  # T: NUTS transitions per combined draw
POOL = 200  # draws from p(α | θ*, y) kept from the adaptation run


@dataclass(frozen=True)
class Resampled:
    """Group-level draws given the combined θ, shaped (chains, draws, ...) like the combined draws."""

    latent: dict[str, np.ndarray]  # constrained values of the group-level latent sites
    deterministic: dict[str, np.ndarray]  # deterministic sites that are not global
    accept_prob: float  # mean acceptance probability of the T transitions
    step_size: float


def central_draw(theta: dict[str, np.ndarray]) -> int:
    """Index of the flat draw nearest the mean (standardised): a real draw, so inside the support."""
    n = next(iter(theta.values())).shape[0]
    distance = np.zeros(n)
    for values in theta.values():
        flat = values.reshape(n, -1)
        sd = flat.std(axis=0)
        sd[sd == 0] = 1.0
        distance += np.sum(((flat - flat.mean(axis=0)) / sd) ** 2, axis=1)
    return int(np.argmin(distance))


def resample_groups(
    model: Callable,
    arguments: dict[str, Any],
    theta: dict[str, np.ndarray],
    settings: SamplerSettings,
    transitions: int = TRANSITIONS,
    batch: int = 1000,
    transition_seed: int | None = None,
) -> Resampled:
    """Draw every group-level site of one shard given each combined global draw (module docstring):
    `adapt_at_centre`, then `draw_given`.

    theta: constrained combined draws of the global latent sites, shaped (chains, draws, ...).
    settings: warmup, tree depth, target acceptance and seed for the adaptation run.
    transition_seed: the seed of the transitions' keys (runner/spec.py `Seeds`; default
    `settings.seed + 1`, the stream the step uses).
    """
    adaptation = adapt_at_centre(model, arguments, theta, settings)
    return draw_given(model, arguments, theta, adaptation, settings, transitions, batch, transition_seed)


def flat_draws(theta: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """(chains, draws, ...) -> (chains·draws, ...)."""
    return {name: np.asarray(v).reshape((-1,) + v.shape[2:]) for name, v in theta.items()}


def adapt_at_centre(
    model: Callable, arguments: dict[str, Any], theta: dict[str, np.ndarray], settings: SamplerSettings
) -> "Adaptation | None":
    """Step 1: NUTS with its usual warmup on the model conditioned on the central combined draw θ*;
    None when every latent site is global (nothing is left to draw given θ)."""
    flat_theta = flat_draws(theta)
    centre = {name: v[central_draw(flat_theta)] for name, v in flat_theta.items()}
    if not _has_group_sites(model, arguments, centre):
        return None
    return _adapt(model, arguments, centre, settings)


def draw_given(
    model: Callable,
    arguments: dict[str, Any],
    theta: dict[str, np.ndarray],
    adaptation: "Adaptation | None",
    settings: SamplerSettings,
    transitions: int = TRANSITIONS,
    batch: int = 1000,
    transition_seed: int | None = None,
) -> Resampled:
    """Steps 2 and 3: T transitions per combined draw, vectorised over draws, from the pool of
    `adaptation` with its step size and mass; the draws in the combined draws' layout."""
    if adaptation is None:
        return Resampled({}, {}, float("nan"), float("nan"))
    chains, draws = next(iter(theta.values())).shape[:2]
    n = chains * draws
    program = _conditional_program(model, arguments, adaptation, settings.max_tree_depth, transitions)
    seed = settings.seed + 1 if transition_seed is None else transition_seed
    keys = random.split(random.PRNGKey(seed), n)
    starts = adaptation.flat_pool[np.arange(n) % len(adaptation.flat_pool)]
    merged, accept_prob = _in_batches(program, flat_draws(theta), starts, keys, n, batch)

    latent_names = set(adaptation.pool)
    shaped = {name: v.reshape((chains, draws) + v.shape[1:]) for name, v in merged.items() if name not in theta}
    return Resampled(
        latent={name: v for name, v in shaped.items() if name in latent_names},
        deterministic={name: v for name, v in shaped.items() if name not in latent_names},
        accept_prob=accept_prob,
        step_size=adaptation.step_size,
    )


def _has_group_sites(model: Callable, arguments: dict[str, Any], centre: dict) -> bool:
    """Whether the model, with the global sites given, still samples a latent site."""
    with jax.ensure_compile_time_eval(), handlers.trace() as trace, handlers.seed(rng_seed=0):
        handlers.condition(model, data=centre)(**arguments)
    return any(s["type"] == "sample" and not s["is_observed"] for s in trace.values())


@dataclass(frozen=True)
class Adaptation:
    """What step 1 leaves for step 2: a pool of draws given θ*, and NUTS's adapted step size and
    diagonal inverse mass matrix (in the raveled unconstrained space)."""

    pool: dict[str, Any]  # unconstrained group-level sites, (POOL, ...)
    flat_pool: jax.Array  # the pool raveled, (POOL, dims)
    unravel: Callable
    step_size: float
    inverse_mass: jax.Array


def _adapt(model: Callable, arguments: dict[str, Any], centre: dict, settings: SamplerSettings) -> Adaptation:
    """NUTS with its usual warmup on the model conditioned on the central draw θ*."""
    pool_settings = SamplerSettings(
        warmup=settings.warmup,
        samples=POOL,
        chains=1,
        seed=settings.seed,
        target_accept_prob=settings.target_accept_prob,
        max_tree_depth=settings.max_tree_depth,
    )
    adapted = run_nuts(handlers.condition(model, data=centre), arguments, pool_settings)
    pool = {name: value[0] for name, value in adapted.unconstrained.items()}  # (POOL, ...)
    flat_pool, unravel = ravel_batch(pool)
    inverse_mass = jnp.clip(jnp.var(flat_pool, axis=0), 1e-12, None)
    return Adaptation(pool, flat_pool, unravel, float(adapted.step_size[0]), inverse_mass)


def _conditional_program(
    model: Callable, arguments: dict[str, Any], adaptation: Adaptation, max_tree_depth: int, transitions: int
) -> Callable:
    """One compiled program: for each (θ_s, start, key), T NUTS transitions targeting
    p(α | θ_s, y) with the adapted step size and mass fixed; the constrained sites of the last
    state and the mean acceptance. On the raveled sites, as in runner/inference/nuts.py: one array
    per NUTS operation instead of one per site."""
    unravel = adaptation.unravel

    def potential_given(values):
        conditioned = handlers.condition(model, data=values)
        return lambda x: potential_energy(conditioned, (), arguments, unravel(x))

    init_kernel, sample_kernel = hmc(potential_fn_gen=potential_given, algo="NUTS")

    def one(values, start, key):
        state = init_kernel(
            start,
            num_warmup=0,
            step_size=adaptation.step_size,
            inverse_mass_matrix=adaptation.inverse_mass,
            adapt_step_size=False,
            adapt_mass_matrix=False,
            max_tree_depth=max_tree_depth,
            model_args=(values,),
            rng_key=key,
        )

        def transition(s, _):
            s = sample_kernel(s, model_args=(values,))
            return s, s.accept_prob

        state, accept = lax.scan(transition, state, None, length=transitions)
        constrained = constrain_fn(
            handlers.condition(model, data=values), (), arguments, unravel(state.z), return_deterministic=True
        )
        return constrained, accept.mean()

    return jax.jit(jax.vmap(one))


def _in_batches(program: Callable, flat_theta: dict, starts, keys, n: int, batch: int) -> tuple[dict, float]:
    """`program` over all n draws, `batch` at a time; the merged sites and the mean acceptance."""
    outputs, accepts = [], []
    for begin in range(0, n, batch):
        part = slice(begin, min(n, begin + batch))
        # pad the last batch to the batch size so the program compiles once
        index = np.arange(part.start, part.start + batch) % n
        values = {name: jnp.asarray(v[index]) for name, v in flat_theta.items()}
        result, accept = program(values, starts[index], keys[index])
        size = part.stop - part.start
        outputs.append(jax.tree.map(lambda v: np.asarray(v)[:size], result))
        accepts.append(np.asarray(accept)[:size])
    merged = {name: np.concatenate([o[name] for o in outputs]) for name in outputs[0]}
    return merged, float(np.concatenate(accepts).mean())
