"""`consensusfit-runner`: the commands the pods run (docs/contract.md), and local use.

Exit codes (runner/contract.py): 0 done; 1 transient or unexpected failure (retry); 2 usage; 3
bad input (never retry). A failure prints one line, `consensusfit: error: <reason>`, and, where a
termination-log file exists, a JSON reason there for the operator (runner/steps/messages.py).

This module only parses arguments: each step resolves its own inputs from the spec, the layout
and its options (runner/steps/).
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
from .contract import COMBINE_STAGES, POD_COMMANDS, TERMINATION_LOG
from .errors import BadInput, TransientError
from .inference.cores import available_cores
from .inference.runtime import configure_jax
from .layout import FitLayout
from .spec import REPOSITORY, load
from .steps.messages import encode, failure


def write_termination_message(path: str, message: dict) -> None:
    """Best effort: the file exists only inside a Kubernetes container."""
    if not os.path.exists(path):
        return
    try:
        with open(path, "w") as handle:
            handle.write(encode(message))
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


def parse_shard(value: str | None) -> int | None:
    """`--shard` of `resample`: one index, or None (the step takes $JOB_COMPLETION_INDEX)."""
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise BadInput(f"shard must be an integer, got {value!r}") from None


# Each command imports its step here, not at the top: the steps import JAX, which `--help`,
# `simulate` and the partition step do not need.


def command_partition(args) -> dict:
    from .steps import partition

    options = partition.PartitionOptions(args.worker, args.workers)
    return partition.run(load(args.spec)[0], FitLayout(args.out), options)


def command_sample(args) -> dict:
    from .steps import sample

    shards = parse_shards(args.shard) if args.shard is not None else None
    options = sample.SampleOptions(
        shards, args.shards_per_pod, args.vectorize, args.data, args.stats, args.shards, args.round
    )
    spec = load(args.spec)[0]
    configure_jax()
    return sample.run(spec, FitLayout(args.out), options)


def command_pilot(args) -> dict:
    from .steps import pilot

    spec = load(args.spec)[0]
    configure_jax()
    return pilot.run(spec, FitLayout(args.out), pilot.PilotOptions(args.data, args.stats))


def command_update(args) -> dict:
    from .steps import update

    return update.run(load(args.spec)[0], FitLayout(args.out), update.UpdateOptions(args.round))


def command_combine(args) -> dict:
    from .steps import combine

    spec = load(args.spec)[0]
    configure_jax()
    return combine.run(spec, FitLayout(args.out), combine.CombineOptions(args.stage))


def command_resample(args) -> dict:
    from .steps import resample

    spec = load(args.spec)[0]
    options = resample.ResampleOptions(parse_shard(args.shard), args.data, args.stats)
    configure_jax()
    return resample.run(spec, FitLayout(args.out), options)


def command_run(args) -> dict:
    from .local.pipeline import present, run_fit

    spec, _ = load(args.fit)
    return present(run_fit(spec, args.workers, args.reference), spec)


def command_demo(args) -> dict:
    import pyarrow.parquet as pq

    from .local.pipeline import DEFAULT_OUTPUT, present, run_fit
    from .local.simulate import osic_like

    manifest = REPOSITORY / "examples" / "fvc.yaml"
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
    return present(run_fit(spec, args.workers, reference=True), spec)


def command_simulate(args) -> dict:
    import pyarrow.parquet as pq

    from .local.simulate import DATASETS

    examples = REPOSITORY / "examples"
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
    sample.add_argument(
        "--round", type=int, help="EP round R >= 1: sample each shard's tilted distribution (needs round R-1's state)"
    )

    pilot = step("pilot", "EP's start: NUTS on the pilot shards, every site's first approximation", command_pilot)
    pilot.add_argument(
        "--data", help="the shards' Parquet file or prefix; {shard} is replaced (default: partition output)"
    )
    pilot.add_argument("--stats", help="whole-data statistics JSON (default: the partition manifest)")

    update = step("update", "EP's update after a round: the shards' tilted moments to the next sites", command_update)
    update.add_argument("--round", type=int, required=True, help="the round R >= 1 whose shards are sampled")

    combine = step("combine", "combine the shards' draws into the full-data posterior", command_combine)
    combine.add_argument(
        "--stage",
        choices=COMBINE_STAGES,
        default=contract.ALL_STAGES,
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
    write_termination_message(args.termination_log, failure(reason, line))
    return code


if __name__ == "__main__":
    sys.exit(main())
