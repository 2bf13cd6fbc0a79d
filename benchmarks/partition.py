"""Partition throughput and peak memory on a seed-like data set (10 million rows by default).

    .venv/bin/python benchmarks/partition.py [--rows 10000000] [--files 10] [--shards 100]
        [--memory-mb 512] [--data DIR] [--workers M]

The data (Patient string, Weeks int64, FVC float64; 6-10 visits per patient, ~8 on average) is
generated once, seeded, into `--data` (default: $TMPDIR/consensusfit-benchmark/seed-<rows>) and
reused by later runs. Every partition worker runs in a fresh child process, so its peak resident
memory (getrusage of the child: ru_maxrss) is the partition step's own, interpreter and pyarrow
included. Prints one JSON line: rows, seconds, rows/s, peak RSS per worker, shard balance.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def generate(folder: Path, rows: int, files: int, seed: int = 0) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    marker = folder / "_GENERATED.json"
    if marker.exists() and json.loads(marker.read_text()) == {"rows": rows, "files": files, "seed": seed}:
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    per_file = rows // files
    first_patient = 0
    for index in range(files):
        target = per_file if index < files - 1 else rows - per_file * (files - 1)
        visits = rng.integers(6, 11, target // 6 + 1)
        cumulative = np.cumsum(visits)
        patients = int(np.searchsorted(cumulative, target)) + 1
        visits = visits[:patients]
        visits[-1] -= cumulative[patients - 1] - target
        ids = np.arange(first_patient, first_patient + patients)
        first_patient += patients
        patient_of_row = np.repeat(ids, visits)
        order = rng.permutation(target)
        slope = rng.normal(-3, 3, patients)[patient_of_row - ids[0]]
        intercept = rng.normal(2700, 800, patients)[patient_of_row - ids[0]]
        weeks = rng.integers(-12, 134, target)
        fvc = intercept + slope * weeks + rng.normal(0, 150, target)
        table = pa.table({
            "Patient": pa.array([f"ID{i:08d}" for i in ids.tolist()]).take(pa.array(patient_of_row[order] - ids[0])),
            "Weeks": weeks[order],
            "FVC": fvc[order],
        })
        pq.write_table(table, folder / f"part-{index:04d}.parquet", row_group_size=256 * 1024)
    marker.write_text(json.dumps({"rows": rows, "files": files, "seed": seed}))


def child(arguments: argparse.Namespace) -> None:
    """One partition worker (run in its own process so its peak RSS is measured alone)."""
    from consensusfit.runner.steps.partition import partition
    from consensusfit.runner.spec import parse

    spec = parse({
        "data": {"uri": str(arguments.data), "groupColumn": "Patient"},
        "shards": arguments.shards,
        "model": {"python": {"uri": "examples/fvc_model.py", "function": "model"}},
        "sampler": {"seed": 0},
    })
    started = time.perf_counter()
    message = partition(
        spec, arguments.out, ("Patient", "Weeks", "FVC"), ("Weeks", "FVC"),
        worker=arguments.worker, workers=arguments.workers,
        memory_bytes=arguments.memory_mb * 2**20,
        log=lambda line: print(f"  {time.perf_counter() - started:7.1f}s {line}", file=sys.stderr),
    )
    print(json.dumps({"seconds": time.perf_counter() - started, **message}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--files", type=int, default=10)
    parser.add_argument("--shards", type=int, default=100)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--memory-mb", type=int, default=512)
    parser.add_argument("--data", type=Path)
    parser.add_argument("--out")
    parser.add_argument("--worker", type=int, default=0)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.child:
        child(arguments)
        return
    arguments.data = arguments.data or Path(tempfile.gettempdir()) / "consensusfit-benchmark" / f"seed-{arguments.rows}"
    started = time.perf_counter()
    generate(arguments.data, arguments.rows, arguments.files)
    print(f"data: {arguments.data} ({time.perf_counter() - started:.1f}s to generate or check)", file=sys.stderr)
    out = tempfile.mkdtemp(prefix="consensusfit-partition-")
    try:
        results = []
        wall = time.perf_counter()
        for worker in range(arguments.workers):  # one after another: peak RSS per worker
            command = [
                sys.executable, __file__, "--child", "--data", str(arguments.data), "--out", out,
                "--shards", str(arguments.shards), "--workers", str(arguments.workers),
                "--worker", str(worker), "--memory-mb", str(arguments.memory_mb),
            ]
            finished = subprocess.run(command, check=True, capture_output=False, stdout=subprocess.PIPE, text=True)
            peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux; max over children
            results.append({**json.loads(finished.stdout), "peak_rss_mib": round(peak / 1024, 1)})
        seconds = time.perf_counter() - wall
        manifest = json.loads((Path(out) / "partition/manifest.json").read_text())
        sizes = [entry["rows"] for entry in manifest["per_shard"]]
        input_bytes = sum(path.stat().st_size for path in Path(arguments.data).glob("*.parquet"))
        print(json.dumps({
            "rows": manifest["rows"],
            "groups": manifest["groups"],
            "files": arguments.files,
            "input_mib": round(input_bytes / 2**20, 1),
            "shards": arguments.shards,
            "workers": arguments.workers,
            "memory_budget_mib": arguments.memory_mb,
            "seconds": round(seconds, 1),
            "rows_per_second": round(manifest["rows"] / seconds),
            "peak_rss_mib": max(result["peak_rss_mib"] for result in results),
            "shard_rows_min_max": [min(sizes), max(sizes)],
            "cpu_count": os.cpu_count(),
        }))
    finally:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
