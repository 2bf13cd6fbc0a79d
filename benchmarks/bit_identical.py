"""Are a seeded fit's draws bit-identical to a recorded run? (issue 14: refactors change no draws)

Runs small seeded fits through the command line only (so the script does not depend on where
things live inside `runner/`): simulate the data, then `consensusfit run` of

- `sleep`: a formula model (padded shards, one program) with `groupParameters: resample`,
  two shards per pod;
- `fvc-python`: a Python model (data as constants, one program per shard), `keep`;
- `sleep-ep`: the formula model combined by EP: the pilot and two rounds of tilted draws;

and prints the SHA-256 of every `shards/<k>/draws.parquet`, `combined/draws.parquet` and
`combined/groups/<k>/draws.parquet`, as JSON. With `--compare FILE` (an earlier output) it exits
1 and names the files whose hashes differ. Hashes are of the Parquet bytes, so they hold on one
machine and library set, not across platforms: record before a change, compare after. The draws'
metadata holds the fit's fingerprint, which covers the data and model paths, so the fits run in
one fixed folder (`--folder`, emptied first) with their own copy of the model file: two
checkouts then write the same bytes.

    .venv/bin/python benchmarks/bit_identical.py > /tmp/before.json
    # ... change the code ...
    .venv/bin/python benchmarks/bit_identical.py --compare /tmp/before.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SAMPLER = {"warmup": 150, "samples": 100, "chains": 2, "seed": 3}

FITS = {
    "sleep": {
        "data": {"uri": "data/sleep.parquet", "groupColumn": "subject"},
        "shards": 4,
        "model": {"formula": "reaction ~ 1 + days + (1 + days | subject)", "family": "gaussian"},
        "runner": {"shardsPerPod": 2},
        "combine": {"method": "consensus", "groupParameters": "resample"},
    },
    "fvc-python": {
        "data": {"uri": "data/osic.parquet", "groupColumn": "Patient"},
        "shards": 3,
        "model": {"python": {"uri": "fvc_model.py", "function": "model"}},
        "combine": {"method": "gaussian", "groupParameters": "keep"},
    },
    "sleep-ep": {
        "data": {"uri": "data/sleep.parquet", "groupColumn": "subject"},
        "shards": 4,
        "model": {"formula": "reaction ~ 1 + days + (1 + days | subject)", "family": "gaussian"},
        "combine": {"method": "ep", "maxRounds": 2, "groupParameters": "keep"},
    },
}


def consensusfit(*args: str, cwd: Path) -> None:
    command = [sys.executable, "-m", "consensusfit.runner.cli", *args]
    subprocess.run(command, cwd=cwd, check=True, stdout=subprocess.DEVNULL)


def digests(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("draws.parquet"))
    }


def run_all(folder: Path, workers: int) -> dict[str, dict[str, str]]:
    shutil.copy(REPO / "examples" / "fvc_model.py", folder / "fvc_model.py")
    consensusfit("simulate", "sleep", "osic", "--folder", str(folder / "data"), "--seed", "0", cwd=folder)
    results = {}
    for name, spec in FITS.items():
        output = folder / "runs" / name
        manifest = {
            "apiVersion": "consensusfit.dev/v1alpha1",
            "kind": "ConsensusFit",
            "metadata": {"name": name},
            "spec": {**spec, "sampler": SAMPLER, "output": {"uri": str(output)}},
        }
        path = folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump(manifest))
        consensusfit("run", str(path), "--workers", str(workers), cwd=folder)
        (root,) = [p for p in output.rglob("local-*") if p.is_dir()]
        results[name] = digests(root)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", help="an earlier output of this script")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--folder", default=str(Path(tempfile.gettempdir()) / "consensusfit-bit-identical"),
                        help="where the fits run (emptied first; default: in the temporary folder)")
    args = parser.parse_args()
    os.environ.setdefault("CONSENSUSFIT_PRECISION", "float64")
    folder = Path(args.folder)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    results = run_all(folder, args.workers)
    print(json.dumps(results, indent=1, sort_keys=True))
    if not args.compare:
        return 0
    before = json.loads(Path(args.compare).read_text())
    differing = [
        f"{fit}/{file}" for fit in sorted(set(before) | set(results))
        for file in sorted(set(before.get(fit, {})) | set(results.get(fit, {})))
        if before.get(fit, {}).get(file) != results.get(fit, {}).get(file)
    ]
    for line in differing:
        print(f"differs: {line}", file=sys.stderr)
    print("bit-identical" if not differing else f"{len(differing)} file(s) differ", file=sys.stderr)
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main())
