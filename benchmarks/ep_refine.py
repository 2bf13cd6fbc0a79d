"""Experiment: one expectation-propagation pass over the shards (Vehtari et al. 2020, "Expectation
propagation as a way of life"), to test whether non-Gaussian shard posteriors cause the
many-shard bias and whether a second sampling pass removes it.

Round 1 is the ordinary run: shard k's global posterior p_k(u) ∝ p(θ)^(1/K) L_k(θ) and its
Gaussian approximation N(m_k, W_k⁻¹); the combined approximation has precision Λ = Σ W_k and
η = Σ W_k m_k. Round 2 samples every shard's *tilted* distribution

    p̃_k(u) ∝ p_k(u) · N(u; c_k, P_k⁻¹),   P_k = Λ − W_k,  P_k c_k = η − W_k m_k,

its own data times a Gaussian stand-in for all the other shards (the cavity). The tilted
distribution is about as narrow as the full posterior, so shard k's data are only asked where the
full posterior lives, where their likelihood is close to Gaussian even when the shard alone is
not. With tilted moments (m̃_k, Σ̃_k) the updated approximation is

    Λ' = Σ_k Σ̃_k⁻¹ − (K − 1) Λ,    η' = Σ_k Σ̃_k⁻¹ m̃_k − (K − 1) η,

(each site becomes Σ̃_k⁻¹ − P_k). The cavity is in the unconstrained space NUTS samples in: the
model adds log N(u(θ); c_k, P_k⁻¹) as a factor, with u(θ) the site's own unconstraining bijection.

    .venv/bin/python benchmarks/ep_refine.py --data small --shards 20
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import numpyro  # noqa: E402
from numpyro import handlers  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from consensusfit.runner.combine.packing import global_layout, pack, unpack  # noqa: E402
from consensusfit.runner.combine.supports import bijections, constrain  # noqa: E402
from consensusfit.runner.layout import FitLayout  # noqa: E402
from consensusfit.runner.steps.combine import read_shard  # noqa: E402
from consensusfit.runner.steps.inputs import shard_model  # noqa: E402
from consensusfit.runner.combine.methods import gaussian_product, moments  # noqa: E402
from consensusfit.runner.inference.nuts import SamplerSettings, run_nuts  # noqa: E402
from consensusfit.runner.spec import shard_seed  # noqa: E402
from consensusfit.runner.inference.tempering import temper  # noqa: E402

from accuracy import GLOBALS, cached_run  # noqa: E402


def with_cavity(fn, names, transforms, mean, precision):
    """The model plus a Gaussian factor on the unconstrained global vector."""

    def model(**kwargs):
        with handlers.trace() as trace:
            fn(**kwargs)
        u = jnp.concatenate([jnp.reshape(transforms[n].inv(trace[n]["value"]), (-1,)) for n in names])
        gap = u - mean
        numpyro.factor("cavity", -0.5 * gap @ precision @ gap)

    return model


def summarise(mean, cov, layout, transforms, rng, n=20000):
    draws = rng.multivariate_normal(mean, cov, size=(1, n))
    constrained = constrain(unpack(draws, layout), transforms)
    return {p: (float(constrained[p].mean()), float(constrained[p].std())) for p in GLOBALS}


def main() -> int:
    args, root, reference, spec = cached_run(__doc__.splitlines()[0])
    fit = FitLayout(str(root))
    shards = [read_shard(fit, spec, k) for k in range(spec.shards)]
    layout = global_layout(shards)
    names = list(layout)
    packed = [pack(d, layout) for d in shards]
    product = gaussian_product(packed)
    lam = np.sum(product.precisions, axis=0)
    eta = np.sum([w @ m.mean for w, m in zip(product.precisions, product.shards)], axis=0)

    tilted = []
    started = time.perf_counter()
    for k in range(spec.shards):
        cache = root / "ep1" / f"{k}.npy"
        if cache.exists():
            tilted.append(np.load(cache))
            continue
        model = shard_model(spec, FitLayout(str(root)), k, None, None)
        transforms = bijections(model.fn, model.arguments, layout)
        w_k = product.precisions[k]
        cavity_precision = lam - w_k
        cavity_mean = np.linalg.solve(cavity_precision, eta - w_k @ product.shards[k].mean)
        fn = with_cavity(
            temper(model.fn, frozenset(names), 1.0 / spec.shards), names, transforms,
            jnp.asarray(cavity_mean), jnp.asarray(cavity_precision),
        )
        settings = SamplerSettings(
            warmup=spec.sampler["warmup"], samples=spec.sampler["samples"], chains=spec.sampler["chains"],
            seed=shard_seed(1000 + spec.sampler["seed"], k),
        )
        samples = run_nuts(fn, model.arguments, settings)
        u = np.concatenate(
            [samples.unconstrained[n].reshape(settings.chains, settings.samples, -1) for n in names], axis=-1
        )
        cache.parent.mkdir(exist_ok=True)
        np.save(cache, u)
        tilted.append(u)
        print(f"  tilted shard {k} done ({time.perf_counter() - started:.0f}s)", end="\r", flush=True)

    stats = [moments(t) for t in tilted]
    inv = [np.linalg.inv(s.cov) for s in stats]
    k = spec.shards
    lam2 = np.sum(inv, axis=0) - (k - 1) * lam
    eta2 = np.sum([i @ s.mean for i, s in zip(inv, stats)], axis=0) - (k - 1) * eta
    ep_mean = np.linalg.solve(lam2, eta2)
    average_cov = np.mean([s.cov for s in stats], axis=0)
    average_mean = np.mean([s.mean for s in stats], axis=0)

    model = shard_model(spec, FitLayout(str(root)), 0, None, None)
    transforms = bijections(model.fn, model.arguments, layout)
    rng = np.random.default_rng(0)
    candidates = {
        "round 1 (gaussian product)": (product.mean, product.cov),
        "EP: Λ' and η'": (ep_mean, np.linalg.inv(lam2) if np.all(np.linalg.eigvalsh(lam2) > 0) else average_cov),
        "EP mean, average tilted covariance": (ep_mean, average_cov),
        "average of tilted means and covariances": (average_mean, average_cov),
    }
    print(f"\n{args.data}, K={k}: error in reference SDs / SD ratio")
    print("| estimate | " + " | ".join(GLOBALS) + " |")
    print("|---|" + "---|" * len(GLOBALS))
    for label, (mean, cov) in candidates.items():
        result = summarise(mean, cov, layout, transforms, rng)
        cells = [
            f"{(result[p][0] - reference[p]['mean']) / reference[p]['sd']:+.2f} / {result[p][1] / reference[p]['sd']:.2f}"
            for p in GLOBALS
        ]
        print(f"| {label} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
