"""How close does each combination method get to a long full-data NUTS run?

The seed's model (examples/fvc_model.py: random intercept and slope per patient, non-centred) on
OSIC-like synthetic data: ~176 patients and ~2,000 patients, 6–10 visits each, weeks −5..133,
intercepts N(2800, 700), slopes N(−4, 5), noise 130. For each data set: a long NUTS run on all the
data (the reference), then for K = 5, 20, 50 shards (by patient, balanced by rows) every shard is
sampled by the real sample step (runner/steps/sample.py: tempering, NUTS, draws table) and combined by
every method with the real combine code (runner/py). Printed: per data set, method and K,
the largest |mean error| over the global parameters in reference SDs, and the range of SD ratios
(combined SD / reference SD); then every parameter's error.

    .venv/bin/python benchmarks/accuracy.py --quick          # 176 patients, K = 5, 20; minutes
    .venv/bin/python benchmarks/accuracy.py --out benchmarks/accuracy.md   # the full table

Shard draws are kept under consensusfit-runs/accuracy/ and reused by later runs with the same
settings (delete the folder to sample afresh).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from consensusfit.runner.combine.supports import bijections  # noqa: E402
from consensusfit.runner.layout import FitLayout  # noqa: E402
from consensusfit.runner.steps.combine import combined_globals, read_shard  # noqa: E402
from consensusfit.runner.steps.inputs import shard_model  # noqa: E402
from consensusfit.runner.combine.methods import METHODS  # noqa: E402
from consensusfit.runner.data.balance import assign_groups, key_hashes  # noqa: E402
from consensusfit.runner.data.shard import ShardData  # noqa: E402
from consensusfit.runner.models.python import python_model  # noqa: E402
from consensusfit.runner.inference.nuts import SamplerSettings, run_nuts  # noqa: E402
from consensusfit.runner.steps.sample import sample_shard  # noqa: E402
from consensusfit.runner.local.simulate import osic_like  # noqa: E402
from consensusfit.runner.spec import parse  # noqa: E402

MODEL = REPO / "examples" / "fvc_model.py"
GLOBALS = ("μ_α", "σ_α", "μ_β", "σ_β", "σ")
RUNS = REPO / "consensusfit-runs" / "accuracy"


def partition(table: pa.Table, shards: int, seed: int) -> list[pa.Table]:
    """Every patient in one shard, balanced by rows: the partition step's own assignment."""
    labels, index, counts = np.unique(table.column("Patient").to_numpy(), return_inverse=True, return_counts=True)
    assignment = assign_groups(counts, key_hashes(labels.tolist(), seed), shards)
    return [table.filter(pa.array(assignment[index] == k)) for k in range(shards)]


def model_for(table: pa.Table):
    model = python_model(MODEL.read_text(), str(MODEL), "model", "Patient", None)
    labels, index = np.unique(table.column("Patient").to_numpy(), return_inverse=True)
    columns = {name: table.column(name).to_numpy() for name in ("Patient", "Weeks", "FVC")}
    return model, model.prepare(ShardData(columns, "Patient", labels, index.astype(np.int32)))


def reference(name: str, table: pa.Table, settings: SamplerSettings) -> dict:
    """Mean and SD of every global parameter from NUTS on all the data (cached)."""
    path = RUNS / name / f"reference-{settings.warmup}-{settings.samples}-{settings.chains}.json"
    if path.exists():
        return json.loads(path.read_text())
    model, arguments = model_for(table)
    started = time.perf_counter()
    samples = run_nuts(model.fn, arguments, settings)
    result = {
        p: {"mean": float(samples.constrained[p].mean()), "sd": float(samples.constrained[p].std(ddof=1))}
        for p in GLOBALS
    }
    from consensusfit.runner.inference.diagnostics import ess_bulk, rhat

    result["_diagnostics"] = {
        "seconds": time.perf_counter() - started,
        "rhat_max": max(rhat(samples.constrained[p]) for p in GLOBALS),
        "ess_min": min(ess_bulk(samples.constrained[p]) for p in GLOBALS),
        "divergences": int(samples.diverging.sum()),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return result


def longest_reference(name: str) -> dict:
    """The cached reference run with the most draws for data set `name`."""

    def draws_of(path):
        warmup, samples, chains = map(int, path.stem.split("-")[1:])
        return samples * chains

    return json.loads(max((RUNS / name).glob("reference-*.json"), key=draws_of).read_text())


def cached_run(description: str):
    """For the experiments: parse --data/--shards/--run and return (args, root, reference, spec)
    of a run this script sampled and cached."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data", default="small")
    parser.add_argument("--shards", type=int, default=20)
    parser.add_argument("--run", default="w500-s1000-c2")
    args = parser.parse_args()
    root = RUNS / args.data / f"K{args.shards}-{args.run}"
    sampler = dict(zip(("warmup", "samples", "chains"), (int(x[1:]) for x in args.run.split("-"))), seed=0)
    return args, root, longest_reference(args.data), fit_spec(root, args.shards, sampler)


def fit_spec(root: Path, shards: int, sampler: dict):
    return parse(
        {
            "data": {"uri": str(root / "partition"), "groupColumn": "Patient"},
            "shards": shards,
            "model": {"python": {"uri": str(MODEL), "function": "model"}},
            "sampler": sampler,
            "combine": {"method": "consensus", "groupParameters": "keep"},
        }
    )


def sample_all(name: str, table: pa.Table, shards: int, sampler: dict) -> tuple:
    """Sample every shard with the real sample step; returns (spec, root)."""
    tag = f"K{shards}-w{sampler['warmup']}-s{sampler['samples']}-c{sampler['chains']}"
    root = RUNS / name / tag
    spec = fit_spec(root, shards, sampler)
    parts = partition(table, shards, seed=sampler["seed"])
    started = time.perf_counter()
    for k, part in enumerate(parts):
        folder = root / "partition" / f"shard={k}"
        if not (folder / "part-0.parquet").exists():
            folder.mkdir(parents=True, exist_ok=True)
            pq.write_table(part, folder / "part-0.parquet")
        sample_shard(spec, k, str(folder), None, str(root))
        print(f"  {name} K={shards}: shard {k} done", end="\r", flush=True)
    return spec, root, time.perf_counter() - started


def combine_all(spec, root: Path, method: str) -> dict:
    """Combined mean and SD of every global parameter, by the combiner's own code."""
    fit = FitLayout(str(root))
    shards = [read_shard(fit, spec, k) for k in range(spec.shards)]
    variant = parse({**spec.raw, "combine": {"method": method, "groupParameters": "keep"}})

    def transforms_of(layout):
        model = shard_model(variant, FitLayout(str(root)), 0, None, None)
        return bijections(model.fn, model.arguments, layout)

    _, _, constrained, _, _ = combined_globals(shards, variant, transforms_of)
    return {p: {"mean": float(constrained[p].mean()), "sd": float(constrained[p].std(ddof=1))} for p in GLOBALS}


def shard_health(root: Path, shards: int) -> dict:
    rhats, divergences, seconds = [], 0, 0.0
    for k in range(shards):
        d = json.loads((root / "shards" / str(k) / "diagnostics.json").read_text())
        rhats += [p["rhat"] for p in d["parameters"].values()]
        divergences += d["divergences"]
        seconds += sum(d["seconds"].values())
    return {"rhat_max": max(rhats), "divergences": divergences, "seconds": seconds}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="176 patients, K = 5 and 20, short chains")
    parser.add_argument("--out", help="also write the tables (Markdown) to this file")
    parser.add_argument("--datasets", default=None, help="comma-separated: small,large")
    parser.add_argument("--shards", default=None, help="comma-separated K values")
    args = parser.parse_args(argv)

    # CPU time is scarce (the seed model's non-centred geometry needs NUTS trees of depth ~8):
    # shards run 2 chains of 500 + 1000 iterations; the references run longer.
    if args.quick:
        datasets = {"small": (176, 0, SamplerSettings(warmup=500, samples=1000, chains=2, seed=1))}
        ks = [5, 20]
        sampler = {"warmup": 300, "samples": 500, "chains": 2, "seed": 0}
    else:
        datasets = {
            "small": (176, 0, SamplerSettings(warmup=1000, samples=2000, chains=4, seed=1)),
            "large": (2000, 1, SamplerSettings(warmup=500, samples=1500, chains=2, seed=1)),
        }
        ks = [5, 20, 50]
        sampler = {"warmup": 500, "samples": 1000, "chains": 2, "seed": 0}
    if args.datasets:
        datasets = {k: v for k, v in datasets.items() if k in args.datasets.split(",")}
    if args.shards:
        ks = [int(k) for k in args.shards.split(",")]

    rows, detail, notes = [], [], []
    def tables() -> str:
        return "\n".join(
            [
                "| data | method | K | max \\|mean error\\| (reference SDs) | SD ratio range |",
                "|---|---|---|---|---|",
                *rows,
                "",
                "Per parameter: mean error (reference SDs) / SD ratio",
                "",
                "| data | method | K | " + " | ".join(GLOBALS) + " |",
                "|---|---|---|" + "---|" * len(GLOBALS),
                *detail,
                "",
                *[f"- {n}" for n in notes],
            ]
        )

    for name, (patients, seed, ref_settings) in datasets.items():
        table = osic_like(patients, seed)
        label = f"{patients} patients ({table.num_rows} rows)"
        ref = reference(name, table, ref_settings)
        d = ref["_diagnostics"]
        notes.append(
            f"{label}: reference {ref_settings.chains}×{ref_settings.samples} draws, R-hat max "
            f"{d['rhat_max']:.3f}, bulk ESS min {d['ess_min']:.0f}, {d['divergences']} divergences, {d['seconds']:.0f}s"
        )
        print(notes[-1], flush=True)
        for k in ks:
            spec, root, _ = sample_all(name, table, k, sampler)
            health = shard_health(root, k)
            notes.append(
                f"{label}, K={k}: shards R-hat max {health['rhat_max']:.3f}, "
                f"{health['divergences']} divergences in all, {health['seconds']:.0f}s in all shards "
                "(load, compile, warmup, sampling, write)"
            )
            print(notes[-1], flush=True)
            for method in METHODS:
                result = combine_all(spec, root, method)
                errors = {p: (result[p]["mean"] - ref[p]["mean"]) / ref[p]["sd"] for p in GLOBALS}
                ratios = {p: result[p]["sd"] / ref[p]["sd"] for p in GLOBALS}
                worst = max(GLOBALS, key=lambda p: abs(errors[p]))
                rows.append(
                    f"| {label} | {method} | {k} | {abs(errors[worst]):.2f} ({worst}) | "
                    f"{min(ratios.values()):.2f}–{max(ratios.values()):.2f} |"
                )
                detail.append(
                    f"| {label} | {method} | {k} | "
                    + " | ".join(f"{errors[p]:+.2f} / {ratios[p]:.2f}" for p in GLOBALS)
                    + " |"
                )
                print(rows[-1], flush=True)
            if args.out:
                Path(args.out).write_text(tables() + "\n")

    text = tables()
    print()
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
