"""Experiment: temper and combine positive global parameters (scales) on their own scale.

Diagnosis (benchmarks/shard_shapes.py): with few groups per shard, a shard cannot rule out
σ_β = 0, and its posterior of log σ_β grows a tail towards −∞. The tail is the tempered prior's:
NUTS moves in u = log σ, where the prior density including its Jacobian is p(σ)·σ, and raised to
1/K it decays like e^{u/K} as u → −∞ — hardly at all for K = 20. When σ_β → 0 all slopes
equal μ_β, so μ_β's posterior in that shard becomes spuriously narrow, and precision weighting
lets those shards dominate μ_β.

The product Π_k p_k is the full posterior in whichever space the shards were tempered in. In u
space the K tempered priors must share the Jacobian σ = e^u, so each gets e^{u/K}: the tail is
unavoidable there. In σ space the prior density p(σ) is finite at 0 and p(σ)^{1/K} is flat
there: no shard can escape to σ → 0 unless its data demand it. So: temper a positive site's own
density but not its Jacobian (the shard density is then p(σ)^{1/K} L_k(σ) in σ space; NUTS
still moves in log σ, where it now has a light e^{u} tail) and combine that site's *constrained*
draws. This pairing is exact (DESIGN.md's |J|^(K−1) bias arises only if such shards are combined
in u space). Other sites stay as they are (tempered with Jacobian, combined in u).

    .venv/bin/python benchmarks/scale_space.py --data small --shards 20
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402
from numpyro.distributions import constraints  # noqa: E402
from numpyro.primitives import Messenger  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from consensusfit.runner.combine.packing import global_layout, unpack  # noqa: E402
from consensusfit.runner.combine.supports import bijections  # noqa: E402
from consensusfit.runner.layout import FitLayout  # noqa: E402
from consensusfit.runner.steps.combine import read_shard  # noqa: E402
from consensusfit.runner.steps.inputs import shard_model  # noqa: E402
from consensusfit.runner.combine.methods import METHODS, combine  # noqa: E402
from consensusfit.runner.inference.nuts import SamplerSettings, run_nuts  # noqa: E402
from consensusfit.runner.spec import shard_seed  # noqa: E402
from consensusfit.runner.inference.tempering import temper  # noqa: E402

from accuracy import GLOBALS, cached_run  # noqa: E402


class temper_density(Messenger):
    """Scale the named sites' own log density by `scale`, not the Jacobian NumPyro adds for them."""

    def __init__(self, fn, sites, scale):
        self.sites, self.scale = sites, scale
        super().__init__(fn)

    def process_message(self, msg):
        if msg["type"] == "sample" and msg["name"] in self.sites:
            msg["scale"] = self.scale if msg["scale"] is None else msg["scale"] * self.scale


def main() -> int:
    args, root, reference, spec = cached_run(__doc__.splitlines()[0])
    fit = FitLayout(str(root))
    layout = global_layout([read_shard(fit, spec, 0)])
    names = list(layout)
    model0 = shard_model(spec, FitLayout(str(root)), 0, None, None)
    transforms = bijections(model0.fn, model0.arguments, layout)
    positive = [n for n in names if transforms[n].codomain is constraints.positive]
    others = [n for n in names if n not in positive]
    print(f"tempered and combined on their own scale: {positive}; in u space: {others}")

    shards, started, health = [], time.perf_counter(), []
    for k in range(spec.shards):
        cache = root / "scale-space" / f"{k}.npz"
        if not cache.exists():
            model = shard_model(spec, FitLayout(str(root)), k, None, None)
            fn = temper_density(temper(model.fn, frozenset(others), 1.0 / spec.shards), frozenset(positive), 1.0 / spec.shards)
            settings = SamplerSettings(
                warmup=spec.sampler["warmup"], samples=spec.sampler["samples"], chains=spec.sampler["chains"],
                seed=shard_seed(spec.sampler["seed"], k),
            )
            samples = run_nuts(fn, model.arguments, settings)
            values = {n: samples.constrained[n] if n in positive else samples.unconstrained[n] for n in names}
            cache.parent.mkdir(exist_ok=True)
            np.savez(cache, divergences=samples.diverging.sum(), **values)
            print(f"  shard {k} done ({time.perf_counter() - started:.0f}s)", end="\r", flush=True)
        data = np.load(cache)
        health.append(int(data["divergences"]))
        shards.append(np.concatenate([data[n].reshape(data[n].shape[:2] + (-1,)) for n in names], axis=-1))

    print(f"\n{args.data}, K={spec.shards}: {sum(health)} divergences in all shards")
    print("| method | " + " | ".join(GLOBALS) + " | max |err| | SD ratio range | negative draws |")
    print("|---|" + "---|" * (len(GLOBALS) + 3))
    rng = np.random.default_rng(0)
    for method in METHODS:
        values, _ = combine(method, shards, rng)
        sites = unpack(values, layout)
        constrained = {n: sites[n] if n in positive else np.asarray(transforms[n](sites[n])) for n in names}
        negative = int(sum((constrained[n] <= 0).sum() for n in positive))
        err = {p: (constrained[p].mean() - reference[p]["mean"]) / reference[p]["sd"] for p in GLOBALS}
        ratio = {p: constrained[p].std() / reference[p]["sd"] for p in GLOBALS}
        cells = [f"{err[p]:+.2f} / {ratio[p]:.2f}" for p in GLOBALS]
        print(
            f"| {method} | " + " | ".join(cells)
            + f" | {max(abs(e) for e in err.values()):.2f} | {min(ratio.values()):.2f}–{max(ratio.values()):.2f} | {negative} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
