"""How fast a shard samples, against one plain `numpyro.infer.MCMC` per shard, in the same run.

Three measurements (`--help` of each for its knobs):

    .venv/bin/python benchmarks/speed.py shards      # K = 20 shards of the seed-like data, CPU
    .venv/bin/python benchmarks/speed.py gradient    # gradient evaluations/s and memory bandwidth
    .venv/bin/python benchmarks/speed.py throughput  # shards per hour vs shardsPerPod (for a GPU)

Model: the seed's, as a formula, `FVC ~ 1 + Weeks + (1 + Weeks || Patient)` (random intercept and
slope per patient, non-centred), tempered by 1/K; data `runner/local/simulate.py:osic_like`, partitioned
by the real partition step (every patient in one shard, balanced by rows).

Baseline ("plain"): what the forum thread's user runs for every shard: a new
`MCMC(NUTS(model), chain_method="vectorized")` and `mcmc.run(key, **data)` on the same tempered
model and the same arguments, so it samples the same density; it compiles for every shard.
Ours: the real sample step (`runner/steps/sample.py:sample_shards`), one call per pod of shardsPerPod
shards: shards padded to the fit's shape bucket, the programs built ahead of time and kept in the
compilation cache folder (program store and XLA's cache; empty at the start, so the first shard
traces and compiles; shared by the measurements after the baseline, as pods of one fit share it),
shards of a pod vectorised on a GPU and sampled one per lane (core) on a CPU.
Times are wall-clock and CPU seconds on this machine; the ratios compare numbers taken in one run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import jax  # noqa: E402

from consensusfit.runner.inference.runtime import configure_jax  # noqa: E402
from consensusfit.runner.inference.runtime import use_compilation_cache  # noqa: E402
from consensusfit.runner.inference.cores import cpu_lanes  # noqa: E402
from consensusfit.runner.data.read import model_rows  # noqa: E402
from consensusfit.runner.steps.inputs import partition_manifest  # noqa: E402
from consensusfit.runner.models.from_spec import model_from_spec  # noqa: E402
from consensusfit.runner.steps.partition import partition_fit  # noqa: E402
from consensusfit.runner.steps.sample import sample_shards  # noqa: E402
from consensusfit.runner.spec import shard_seed  # noqa: E402
from consensusfit.runner.local.simulate import osic_like  # noqa: E402
from consensusfit.runner.spec import parse  # noqa: E402
from consensusfit.runner.inference.tempering import resolve_global_sites, temper  # noqa: E402

FORMULA = "FVC ~ 1 + Weeks + (1 + Weeks || Patient)"
PHASES = ("load", "compile", "init", "warmup", "sampling", "write")


def partitioned(folder: Path, patients: int, shards: int, sampler: dict):
    """Simulate, partition with the real step; (spec, root, whole-data stats, shard sizes)."""
    data = folder / "data.parquet"
    pq.write_table(osic_like(patients, seed=0), data)
    spec = parse(
        {
            "metadata": {"name": "speed"},
            "spec": {
                "data": {"uri": str(data), "groupColumn": "Patient"},
                "shards": shards,
                "model": {"formula": FORMULA},
                "sampler": sampler,
                "combine": {"groupParameters": "keep"},
            },
        }
    )
    root = str(folder / "fit")
    partition_fit(spec, root)
    manifest = partition_manifest(root)
    return spec, root, manifest["stats"], manifest["per_shard"]


def shard_uri(root: str):
    return lambda k: f"{root}/partition/shard={k}/"


def plain_mcmc(spec, root: str, stats: dict, shards: list[int]) -> tuple[list[float], float]:
    """Seconds per shard (read + `MCMC.run` + draws to host) of one plain MCMC per shard, and
    the CPU seconds of them all."""
    from numpyro.infer import MCMC, NUTS

    model = model_from_spec(spec, stats)
    sampler = spec.sampler
    seconds = []
    cpu_started = time.process_time()
    for k in shards:
        started = time.perf_counter()
        data = model_rows(model, spec, shard_uri(root)(k), f"shard {k}")
        arguments = model.prepare(data)
        sites = resolve_global_sites(model.fn, arguments, model.prepare(data.doubled()), None)
        tempered = temper(model.fn, frozenset(sites.latent), 1.0 / spec.shards)
        mcmc = MCMC(
            NUTS(tempered, target_accept_prob=sampler["targetAcceptProb"], max_tree_depth=sampler["maxTreeDepth"]),
            num_warmup=sampler["warmup"],
            num_samples=sampler["samples"],
            num_chains=sampler["chains"],
            chain_method="vectorized",
            progress_bar=False,
        )
        mcmc.run(jax.random.PRNGKey(shard_seed(sampler["seed"], k)), **arguments)
        jax.block_until_ready(mcmc.get_samples())
        seconds.append(time.perf_counter() - started)
        print(f"  plain MCMC: shard {k}: {seconds[-1]:.1f} s", file=sys.stderr)
    return seconds, time.process_time() - cpu_started


def ours(spec, root: str, stats: dict, sizes: list[dict], shards: list[int], per_pod: int, out: str,
         vectorize: int | None = None, lanes: int | None = None) -> dict:
    """Wall and CPU seconds, and per-phase seconds, of the sample step, `per_pod` shards per call
    (a pod; its default lanes: one per core on a CPU).

    Call `use_compilation_cache` first (after the baseline, which must not profit from it).
    """
    started, cpu_started = time.perf_counter(), time.process_time()
    for first in range(0, len(shards), per_pod):
        sample_shards(spec, shards[first:first + per_pod], shard_uri(root), stats, out, sizes,
                      vectorize=vectorize, lanes=lanes)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    phases = {phase: [] for phase in PHASES}
    evaluations = []
    for k in shards:
        diagnostics = json.loads((Path(out) / "shards" / str(k) / "diagnostics.json").read_text())
        for phase in PHASES:
            phases[phase].append(diagnostics["seconds"].get(phase, 0.0))
        evaluations.append(diagnostics["gradient_evaluations"] / diagnostics["seconds"]["sampling"])
    return {"wall": wall, "cpu": cpu, "phases": phases, "evaluations_per_second": evaluations}


def command_shards(args) -> None:
    sampler = {"warmup": args.warmup, "samples": args.samples, "chains": args.chains, "seed": 0}
    with tempfile.TemporaryDirectory() as folder:
        spec, root, stats, sizes = partitioned(Path(folder), args.patients, args.shards, sampler)
        shards = list(range(args.shards))
        rows = [s["rows"] for s in sizes]
        print(f"{args.shards} shards of {min(rows)}-{max(rows)} rows, {args.chains} chains x "
              f"({args.warmup} warmup + {args.samples} draws), {jax.default_backend()}, "
              f"{jax.config.jax_enable_x64 and 'float64' or 'float32'}\n")
        baseline, baseline_cpu = plain_mcmc(spec, root, stats, shards)
        use_compilation_cache(f"{folder}/compilation-cache")  # empty: ours compiles its first shard
        results = {}
        for per_pod, lanes in [(p, lanes) for p in args.per_pod for lanes in ([1] if p == 1 else args.lanes)]:
            print(f"  ours, {per_pod} shard(s) a pod, {lanes or 'default'} lanes", file=sys.stderr)
            out = f"{folder}/ours-{per_pod}-{lanes}"
            results[per_pod, lanes] = ours(spec, root, stats, sizes, shards, per_pod, out, lanes=lanes)
    plain, plain_cpu = float(np.mean(baseline)), baseline_cpu / len(shards)
    print("| sampler | seconds per shard | CPU seconds per shard | " + " | ".join(PHASES) + " | vs plain |")
    print("|---|---|---|" + "---|" * len(PHASES) + "---|")
    print(f"| plain MCMC per shard | {plain:.2f} | {plain_cpu:.2f} | " + " | ".join("" for _ in PHASES) + " | 1.0× |")
    for (per_pod, lanes), result in results.items():
        per_shard, cpu = result["wall"] / len(shards), result["cpu"] / len(shards)
        cells = " | ".join(f"{np.sum(result['phases'][p]) / len(shards):.2f}" for p in PHASES)
        name = f"shardsPerPod={per_pod}" + (f", {lanes or cpu_lanes()} lanes" if per_pod > 1 else "")
        print(f"| ours, {name} | {per_shard:.2f} | {cpu:.2f} | {cells} | {plain / per_shard:.1f}× |")
    print("\nPhase columns: seconds summed over the shards, divided by the number of shards (a batch's "
          "compile, warmup and sampling are counted once; lanes sample at the same time, so with "
          "several lanes the phases add up to more than the wall time). First plain shard "
          f"{baseline[0]:.1f} s, later ones {np.mean(baseline[1:]):.1f} s on average.")


def memory_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes/s of a streaming triad (c = a + 2b, XLA on this device): reads 2 arrays, writes 1."""
    n = megabytes * 2**20 // 8
    a, b = jax.numpy.ones(n), jax.numpy.full(n, 2.0)
    triad = jax.jit(lambda a, b: a + 2.0 * b)
    jax.block_until_ready(triad(a, b))
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        jax.block_until_ready(triad(a, b))
        best = min(best, time.perf_counter() - started)
    return 3 * n * a.dtype.itemsize / best


def command_gradient(args) -> None:
    """Gradient evaluations/s of one shard's tempered log density, and the bytes they move."""
    from numpyro.infer.util import initialize_model

    patients = max(args.rows // 8, 1)  # osic_like has 8 visits per patient on average
    sampler = {"warmup": args.warmup, "samples": max(args.samples, 1), "chains": args.chains, "seed": 0}
    with tempfile.TemporaryDirectory() as folder:
        spec, root, stats, sizes = partitioned(Path(folder), patients, 1, sampler)
        model = model_from_spec(spec, stats)
        data = model_rows(model, spec, shard_uri(root)(0), "shard 0")
        arguments = {k: jax.numpy.asarray(v) for k, v in model.prepare(data).items()}
        info = initialize_model(jax.random.PRNGKey(0), model.fn, model_kwargs=arguments, dynamic_args=True)
        potential = info.potential_fn
        gradient = jax.jit(lambda z, kwargs: jax.value_and_grad(potential(**kwargs))(z))
        z = info.param_info.z
        jax.block_until_ready(gradient(z, arguments))
        started = time.perf_counter()
        for _ in range(args.evaluations):
            value, grad = gradient(z, arguments)
        jax.block_until_ready(grad)
        per_second = args.evaluations / (time.perf_counter() - started)
        argument_bytes = sum(v.nbytes for v in arguments.values())
        column_bytes = sum(np.asarray(data.columns[c]).nbytes for c in ("FVC", "Weeks")) + data.group_index.nbytes
        bandwidth = memory_bandwidth()
        print(f"one shard of {data.rows} rows / {data.groups} patients, {jax.default_backend()}, "
              f"{'float64' if jax.config.jax_enable_x64 else 'float32'}\n")
        print("| measure | value |\n|---|---|")
        print(f"| gradient evaluations/s (jit, one point) | {per_second:,.0f} |")
        print(f"| bytes the gradient reads (its arguments) | {argument_bytes / 2**20:.1f} MiB |")
        print(f"| bytes of the raw columns (FVC, Weeks, group index) | {column_bytes / 2**20:.1f} MiB |")
        print(f"| memory bandwidth, streaming triad | {bandwidth / 1e9:.1f} GB/s |")
        print(f"| bandwidth used by the gradient (its arguments) | {per_second * argument_bytes / 1e9:.2f} GB/s "
              f"= {per_second * argument_bytes / bandwidth:.1%} |")
        print(f"| limit: one pass over the raw columns per gradient | {bandwidth / column_bytes:,.0f} evaluations/s "
              f"(we reach {per_second * column_bytes / bandwidth:.1%}) |", flush=True)
        if args.samples:
            sample_shards(spec, [0], shard_uri(root), stats, f"{folder}/out", sizes)
            diagnostics = json.loads(Path(f"{folder}/out/shards/0/diagnostics.json").read_text())
            in_nuts = diagnostics["gradient_evaluations"] / diagnostics["seconds"]["sampling"]
            print(f"| gradient evaluations/s inside NUTS ({args.chains} chains, all counted) | {in_nuts:,.0f} |")
            print(f"\nsample step on this shard: {json.dumps(diagnostics['seconds'])}")


def command_throughput(args) -> None:
    """Shards per hour for each shardsPerPod, against plain MCMC per shard (a few shards)."""
    patients = max(args.rows * args.shards // 8, 1)
    sampler = {"warmup": args.warmup, "samples": args.samples, "chains": args.chains, "seed": 0}
    with tempfile.TemporaryDirectory() as folder:
        spec, root, stats, sizes = partitioned(Path(folder), patients, args.shards, sampler)
        shards = list(range(args.shards))
        plain, _ = plain_mcmc(spec, root, stats, shards[: args.plain_shards])
        use_compilation_cache(f"{folder}/compilation-cache")
        results = {
            per_pod: ours(spec, root, stats, sizes, shards, per_pod, f"{folder}/ours-{per_pod}", args.vectorize)
            for per_pod in args.per_pod
        }
    rows = [s["rows"] for s in sizes]
    print(f"{args.shards} shards of {min(rows)}-{max(rows)} rows, {args.chains} chains x ({args.warmup} warmup "
          f"+ {args.samples} draws), {jax.devices()[0].device_kind}, "
          f"{'float64' if jax.config.jax_enable_x64 else 'float32'}\n")
    baseline = 3600 / np.mean(plain)
    print("| sampler | shards per hour | vs plain |\n|---|---|---|")
    print(f"| plain MCMC per shard ({len(plain)} shards) | {baseline:,.0f} | 1.0× |")
    for per_pod, result in results.items():
        rate = 3600 * args.shards / result["wall"]
        print(f"| ours, shardsPerPod={per_pod} | {rate:,.0f} | {rate / baseline:.1f}× |")


def main(argv: list[str] | None = None) -> int:
    top = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = top.add_subparsers(dest="command", required=True)

    def sampler_flags(command, warmup, samples, chains):
        command.add_argument("--warmup", type=int, default=warmup)
        command.add_argument("--samples", type=int, default=samples)
        command.add_argument("--chains", type=int, default=chains)

    def per_pod_flag(command, default):
        command.add_argument("--per-pod", type=lambda s: [int(v) for v in s.split(",")], default=default,
                             help="comma list of shardsPerPod values to measure")

    shards = commands.add_parser("shards", help="per-shard time: ours vs plain MCMC (K shards)")
    shards.add_argument("--shards", type=int, default=20)
    shards.add_argument("--patients", type=int, default=176)
    sampler_flags(shards, 1000, 1000, 4)
    per_pod_flag(shards, [1, 20])
    shards.add_argument("--lanes", type=lambda s: [int(v) or None for v in s.split(",")], default=[1, None],
                        help="comma list of lanes (shards sampled at once) for shardsPerPod > 1; 0: one per core")
    shards.set_defaults(handler=command_shards)

    gradient = commands.add_parser("gradient", help="gradient evaluations/s and bandwidth on one shard")
    gradient.add_argument("--rows", type=int, default=100_000)
    gradient.add_argument("--evaluations", type=int, default=200)
    sampler_flags(gradient, 20, 20, 4)  # --samples 0: no NUTS run (slow at 100k rows on a CPU)
    gradient.set_defaults(handler=command_gradient)

    throughput = commands.add_parser("throughput", help="shards per hour vs shardsPerPod (meant for a GPU)")
    throughput.add_argument("--rows", type=int, default=100_000, help="rows per shard")
    throughput.add_argument("--shards", type=int, default=64)
    throughput.add_argument("--plain-shards", type=int, default=4, help="shards the plain baseline samples")
    sampler_flags(throughput, 500, 500, 4)
    per_pod_flag(throughput, [1, 8, 64])
    throughput.add_argument("--vectorize", type=int, help="shards per program call (default: all on a GPU)")
    throughput.set_defaults(handler=command_throughput)

    args = top.parse_args(argv)
    configure_jax()
    args.handler(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
