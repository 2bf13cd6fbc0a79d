"""`consensusfit-runner`: the commands the pods run (docs/contract.md), and local use.

Exit codes: 0 done; 1 transient or unexpected failure (retry); 2 usage; 3 bad input (never retry).
A failure prints one line, `consensusfit: error: <reason>`, and, where a termination-log file
exists, a JSON reason there for the operator.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from dataclasses import replace
from pathlib import Path

from . import contract
from .contract import POD_COMMANDS, TERMINATION_LIMIT, TERMINATION_LOG
from .cores import available_cores
from .errors import BadInput, TransientError
from .spec import load, pod_shards



def configure_jax() -> None:
    """float64 on CPU (cheap there, and exact tests need it); float32 on accelerators, where
    float64 runs at a fraction of the speed. `CONSENSUSFIT_PRECISION=float32|float64` overrides.
    And the persistent compilation cache of $CONSENSUSFIT_COMPILATION_CACHE (runner/compilation.py).
    """
    import jax

    from .compilation import use_compilation_cache

    use_compilation_cache()

    choice = os.environ.get(contract.PRECISION, "auto")
    if choice not in contract.PRECISIONS:
        raise BadInput(f"{contract.PRECISION} must be auto, float32 or float64, not {choice!r}")
    if choice == "auto":
        choice = "float64" if jax.default_backend() == "cpu" else "float32"
    jax.config.update("jax_enable_x64", choice == "float64")


def write_termination_message(path: str, message: dict) -> None:
    """Best effort: the file exists only inside a Kubernetes container."""
    if not os.path.exists(path):
        return
    text = json.dumps(message, separators=(",", ":"))
    if len(text) > TERMINATION_LIMIT:
        parameters = message.get("parameters", {})
        trimmed = {**message, "parameters": {}, "truncated": True}
        for name, summary in parameters.items():
            candidate = {**trimmed, "parameters": {**trimmed["parameters"], name: summary}}
            if len(json.dumps(candidate, separators=(",", ":"))) > TERMINATION_LIMIT:
                break
            trimmed = candidate
        text = json.dumps(trimmed, separators=(",", ":"))[:TERMINATION_LIMIT]
    try:
        with open(path, "w") as handle:
            handle.write(text)
    except OSError:
        pass


def parse_shards(value: str) -> list[int]:
    """`7`, `4-7` (inclusive) or `1,3,5` -> shard indexes."""
    try:
        if "-" in value:
            first, last = (int(v) for v in value.split("-", 1))
            return list(range(first, last + 1))
        return [int(v) for v in value.split(",")]
    except ValueError:
        raise BadInput(f"--shard must be K, A-B or a comma list, got {value!r}") from None


def command_sample(args) -> dict:
    from .data import partition_manifest, shard_data_uri, whole_data_stats
    from .shard import sample_shards

    spec, _ = load(args.spec)
    if args.shards is not None and spec.shards != args.shards:
        raise BadInput(f"--shards {args.shards} but the spec declares {spec.shards} shards")
    if args.shards_per_pod < 1:
        raise BadInput(f"--shards-per-pod must be at least 1, got {args.shards_per_pod}")
    if args.shard is not None:
        shards = parse_shards(args.shard)
    else:
        index = shard_index(None)
        # an index past the last pod keeps its first shard, for the range check to name it
        shards = pod_shards(index, args.shards_per_pod, spec.shards) or [index * args.shards_per_pod]
    root = args.out.rstrip("/")
    stats = whole_data_stats(root, args.stats)
    # Shard sizes for the shape bucket describe the partition's output, not other data.
    sizes = None if args.data else (partition_manifest(root) or {}).get("per_shard")
    configure_jax()
    return sample_shards(
        spec, shards, lambda k: shard_data_uri(root, k, args.data), stats, root, sizes, vectorize=args.vectorize
    )


def command_partition(args) -> dict:
    from .partition import partition_fit

    spec, _ = load(args.spec)
    return partition_fit(spec, args.out.rstrip("/"), args.worker, args.workers)


def command_combine(args) -> dict:
    from .combiner import combine_fit

    spec, _ = load(args.spec)
    configure_jax()
    return combine_fit(spec, args.out.rstrip("/"), args.stage)


def shard_index(given: str | None) -> int:
    """`--shard`, else the Indexed Job's $JOB_COMPLETION_INDEX, as an integer."""
    shard = given if given is not None else os.environ.get(contract.JOB_COMPLETION_INDEX)
    if shard is None:
        raise BadInput("no --shard given and JOB_COMPLETION_INDEX is not set")
    try:
        return int(shard)
    except ValueError:
        raise BadInput(f"shard must be an integer, got {shard!r}") from None


def command_resample(args) -> dict:
    from .combiner import resample_shard

    spec, _ = load(args.spec)
    shard = shard_index(args.shard)
    configure_jax()
    return resample_shard(spec, args.out.rstrip("/"), shard, args.data, args.stats)


def command_run(args) -> dict:
    from .pipeline import run_fit

    spec, _ = load(args.fit)
    return finish_run(run_fit(spec, args.workers, args.reference))


def finish_run(result) -> dict:
    """Print the report, draw the posteriors, and return the termination-style summary."""
    from .draws import from_parquet_bytes, scalar_components
    from .plots import posterior_figure
    from .report import fit_report
    from .storage import open_store

    store = open_store(result.root)
    names = list(result.diagnostics[0]["parameters"])
    shards = [
        scalar_components(from_parquet_bytes(store.read_bytes(f"shards/{k}/draws.parquet")).constrained)
        for k in range(len(result.diagnostics))
    ]
    combined = scalar_components(from_parquet_bytes(store.read_bytes("combined/draws.parquet")).constrained)
    store.write_bytes(
        "report/posteriors.png",
        posterior_figure(shards, combined, names, result.reference, f"{len(shards)} shards"),
    )
    print(fit_report(result.summary, result.diagnostics, result.reference))
    print(f"\nresults: {result.root}\nposteriors: {store.uri('report/posteriors.png')}")
    return {"ok": True, "uri": result.root}


def command_demo(args) -> dict:
    import pyarrow.parquet as pq

    from .pipeline import DEFAULT_OUTPUT, run_fit
    from .simulate import osic_like

    manifest = Path(__file__).resolve().parents[1] / "examples" / "fvc.yaml"
    if not manifest.is_file():
        raise BadInput(f"the demo needs a source checkout: {manifest} is missing")
    spec, _ = load(str(manifest))
    data = Path(DEFAULT_OUTPUT) / "data" / f"osic-{args.patients}.parquet"
    data.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(osic_like(args.patients), data)
    raw = {**spec.raw, "data": {**spec.data, "uri": str(data.resolve())}}
    spec = replace(spec, raw=raw, name=f"{spec.name}-{args.patients}")
    print(f"demo: {args.patients} OSIC-like patients in {data}, fitting {manifest.name} "
          f"on {spec.shards} shards and on the full data for reference", file=sys.stderr)
    return finish_run(run_fit(spec, args.workers, reference=True))


def command_simulate(args) -> dict:
    import pyarrow.parquet as pq

    from .simulate import DATASETS

    examples = Path(__file__).resolve().parents[1] / "examples"
    unknown = [name for name in args.names if name not in DATASETS]
    if unknown:
        raise BadInput(f"unknown data set(s) {', '.join(unknown)}; choose from {', '.join(DATASETS)}")
    for name in args.names or list(DATASETS):
        generate, relative = DATASETS[name]
        target = Path(args.folder) / Path(relative).name if args.folder else examples / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        table = generate(seed=args.seed)
        pq.write_table(table, target)
        print(f"{name}: {table.num_rows} rows -> {target}")
    return {"ok": True}


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog=Path(sys.argv[0]).name if sys.argv[0].startswith("consensusfit") else "consensusfit",
        description="Consensus Monte Carlo steps: partition, sample one shard, combine.",
    )
    top.add_argument(
        "--termination-log",
        default=TERMINATION_LOG,
        help="file for a JSON summary Kubernetes shows in pod status (written only if it exists)",
    )
    steps = top.add_subparsers(dest="step", required=True)

    def step(name: str, help: str, handler) -> argparse.ArgumentParser:
        sub = steps.add_parser(name, help=help)
        sub.add_argument("--spec", required=True, help="ConsensusFit manifest: file, s3:// URI or JSON")
        sub.add_argument("--out", required=True, help="the fit's result folder (local or s3://)")
        sub.set_defaults(handler=handler)
        return sub

    partition = step("partition", "split the data into shards by group", command_partition)
    partition.add_argument("--worker", type=int, default=0, help="this worker's index (default 0)")
    partition.add_argument("--workers", type=int, default=1, help="number of workers (default 1)")

    sample = step("sample", "run tempered NUTS on one shard or several", command_sample)
    sample.add_argument(
        "--shard", help="shard K, shards A-B or a comma list (default: from $JOB_COMPLETION_INDEX)"
    )
    sample.add_argument(
        "--shards-per-pod", type=int, default=1,
        help="with $JOB_COMPLETION_INDEX I: sample shards I*P .. I*P+P-1 together (default 1)",
    )
    sample.add_argument(
        "--vectorize", type=int,
        help="shards per call of the compiled sampler (default: all on a GPU, 1 on a CPU)",
    )
    sample.add_argument(
        "--data", help="the shard's Parquet file or prefix; {shard} is replaced (default: partition output)"
    )
    sample.add_argument("--stats", help="whole-data statistics JSON (default: the partition manifest)")
    sample.add_argument("--shards", type=int, help="check: the number of shards the spec must declare")

    combine = step("combine", "combine the shards' draws into the full-data posterior", command_combine)
    combine.add_argument(
        "--stage",
        choices=("globals", "finish", "all"),
        default="all",
        help="globals: combine the global draws; finish: summarise once every shard is re-sampled; "
        "all (default): both, re-sampling the shards in between",
    )

    resample = step("resample", "re-sample one shard's group-level draws given the combined draws",
                    command_resample)
    resample.add_argument("--shard", help="shard index (default: $JOB_COMPLETION_INDEX)")
    resample.add_argument("--data", help="the shard's Parquet file or prefix; {shard} is replaced "
                          "(default: partition output)")
    resample.add_argument("--stats", help="whole-data statistics JSON (default: the partition manifest)")

    workers = dict(type=int, default=available_cores(), help="processes sampling at once (default: cores)")
    run = steps.add_parser("run", help="run a whole fit locally: partition, shards, combine")
    run.add_argument("fit", help="a ConsensusFit manifest (the file you would kubectl apply)")
    run.add_argument("--workers", **workers)
    run.add_argument("--reference", action="store_true", help="also run NUTS on the full data and compare")
    run.set_defaults(handler=command_run)

    demo = steps.add_parser("demo", help="simulate OSIC-like data and fit examples/fvc.yaml with a reference")
    demo.add_argument("--patients", type=int, default=176, help="patients to simulate (default 176)")
    demo.add_argument("--workers", **workers)
    demo.set_defaults(handler=command_demo)

    simulate = steps.add_parser("simulate", help="write the simulated data sets the examples read")
    simulate.add_argument("names", nargs="*", help="osic, sleep, clicks, visits (default: all)")
    simulate.add_argument("--folder", help="write here instead of examples/data/")
    simulate.add_argument("--seed", type=int, default=0)
    simulate.set_defaults(handler=command_simulate)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        message = args.handler(args)
    except (BadInput, TransientError) as error:
        reason = "BadInput" if isinstance(error, BadInput) else "Error"
        return _fail(args, reason, str(error), error.exit_code)
    except KeyboardInterrupt:
        return _fail(args, "Error", "interrupted", contract.EXIT_INTERRUPTED)
    except Exception as error:  # an unexpected failure: show where, then the one-line reason
        traceback.print_exc()
        return _fail(args, "Error", f"{type(error).__name__}: {error}", contract.EXIT_TRANSIENT)
    write_termination_message(args.termination_log, message)
    if args.step in POD_COMMANDS:
        print(json.dumps(message, ensure_ascii=False))
    return contract.EXIT_OK


def _fail(args, reason: str, message: str, code: int) -> int:
    line = message.splitlines()[0] if message else reason
    print(f"consensusfit: error: {line}", file=sys.stderr)
    write_termination_message(args.termination_log, {"ok": False, "reason": reason, "message": line})
    return code


if __name__ == "__main__":
    sys.exit(main())
