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
from pathlib import Path

from .errors import BadInput, TransientError

TERMINATION_LOG = "/dev/termination-log"
TERMINATION_LIMIT = 4096


def configure_precision() -> None:
    """float64 on CPU (cheap there, and exact tests need it); float32 on accelerators.

    `CONSENSUSFIT_PRECISION=float32|float64` overrides.
    """
    import jax

    choice = os.environ.get("CONSENSUSFIT_PRECISION", "auto")
    if choice not in ("auto", "float32", "float64"):
        raise BadInput(f"CONSENSUSFIT_PRECISION must be auto, float32 or float64, not {choice!r}")
    if choice == "auto":
        choice = "float64" if jax.default_backend() == "cpu" else "float32"
    jax.config.update("jax_enable_x64", choice == "float64")


def load_spec(argument: str):
    """A spec from literal JSON, a local file or an object-store URI; and the folder it came from."""
    from . import spec as specs
    from .storage import NotFound, split_uri

    if argument.lstrip().startswith("{"):
        return specs.loads(argument), "."
    if "://" in argument:
        store, key = split_uri(argument)
        try:
            return specs.loads(store.read_bytes(key).decode()), "."
        except NotFound:
            raise BadInput(f"spec {argument} does not exist") from None
    path = Path(argument)
    if not path.is_file():
        raise BadInput(f"spec file {argument} does not exist")
    return specs.loads(path.read_text()), str(path.parent)


def load_json(uri: str) -> dict:
    from .storage import NotFound, split_uri

    store, key = split_uri(uri)
    try:
        return json.loads(store.read_bytes(key))
    except NotFound:
        raise BadInput(f"{uri} does not exist") from None


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


def command_sample(args) -> dict:
    from .shard import sample_shard

    spec, base = load_spec(args.spec)
    if args.shards is not None and spec.shards != args.shards:
        raise BadInput(f"--shards {args.shards} but the spec declares {spec.shards} shards")
    shard = args.shard if args.shard is not None else os.environ.get("JOB_COMPLETION_INDEX")
    if shard is None:
        raise BadInput("no --shard given and JOB_COMPLETION_INDEX is not set")
    try:
        shard = int(shard)
    except ValueError:
        raise BadInput(f"shard must be an integer, got {shard!r}") from None
    root = args.out.rstrip("/")
    data_uri = (args.data or f"{root}/partition/shard={{shard}}/").replace("{shard}", str(shard))
    stats_uri = args.stats or f"{root}/partition/manifest.json"
    stats = load_json(stats_uri).get("stats") if (args.stats or _exists(stats_uri)) else None
    configure_precision()
    return sample_shard(spec, shard, data_uri, stats, root, base)


def _exists(uri: str) -> bool:
    from .storage import split_uri

    store, key = split_uri(uri)
    return store.exists(key)


def command_partition(args) -> dict:
    from .partition import partition_fit

    spec, base = load_spec(args.spec)
    return partition_fit(spec, args.out.rstrip("/"), base, args.worker, args.workers)


def command_combine(args) -> dict:
    from .combiner import combine_fit

    spec, base = load_spec(args.spec)
    configure_precision()
    return combine_fit(spec, args.out.rstrip("/"), base)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="consensusfit-runner",
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

    sample = step("sample", "run tempered NUTS on one shard", command_sample)
    sample.add_argument("--shard", help="shard index (default: $JOB_COMPLETION_INDEX)")
    sample.add_argument(
        "--data", help="the shard's Parquet file or prefix; {shard} is replaced (default: partition output)"
    )
    sample.add_argument("--stats", help="whole-data statistics JSON (default: the partition manifest)")
    sample.add_argument("--shards", type=int, help="check: the number of shards the spec must declare")

    step("combine", "combine the shards' draws into the full-data posterior", command_combine)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        message = args.handler(args)
    except (BadInput, TransientError) as error:
        reason = "BadInput" if isinstance(error, BadInput) else "Error"
        return _fail(args, reason, str(error), error.exit_code)
    except KeyboardInterrupt:
        return _fail(args, "Error", "interrupted", 130)
    except Exception as error:  # an unexpected failure: show where, then the one-line reason
        traceback.print_exc()
        return _fail(args, "Error", f"{type(error).__name__}: {error}", 1)
    write_termination_message(args.termination_log, message)
    print(json.dumps(message))
    return 0


def _fail(args, reason: str, message: str, code: int) -> int:
    line = message.splitlines()[0] if message else reason
    print(f"consensusfit: error: {line}", file=sys.stderr)
    write_termination_message(args.termination_log, {"ok": False, "reason": reason, "message": line})
    return code


if __name__ == "__main__":
    sys.exit(main())
