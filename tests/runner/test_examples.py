"""Every example manifest runs on its simulated data: partition, then one shard, with tiny settings."""

import json
from pathlib import Path

import pytest
import yaml

from consensusfit.runner.cli import main

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
DATA = {"fvc.yaml": "osic", "fvc-python.yaml": "osic", "gaussian.yaml": "sleep",
        "bernoulli.yaml": "clicks", "poisson.yaml": "visits"}


def test_every_example_has_simulated_data():
    assert sorted(DATA) == sorted(p.name for p in EXAMPLES.glob("*.yaml"))


@pytest.mark.parametrize("example", sorted(DATA))
def test_example_partitions_and_samples_a_shard(example, tmp_path):
    assert main(["simulate", DATA[example], "--folder", str(tmp_path / "data")]) == 0
    fit = yaml.safe_load((EXAMPLES / example).read_text())
    fit["spec"]["data"]["uri"] = str(tmp_path / "data" / Path(fit["spec"]["data"]["uri"]).name)
    if "python" in fit["spec"]["model"]:
        fit["spec"]["model"]["python"]["uri"] = str(EXAMPLES / fit["spec"]["model"]["python"]["uri"])
    # enough warmup for a step size that moves the chain (one that never moves fails the shard)
    fit["spec"]["sampler"] = {"warmup": 100, "samples": 20, "chains": 1, "seed": 0}
    manifest = tmp_path / example
    manifest.write_text(yaml.safe_dump(fit))
    out = str(tmp_path / "out")
    assert main(["partition", "--spec", str(manifest), "--out", out]) == 0
    assert main(["sample", "--spec", str(manifest), "--out", out, "--shard", "0"]) == 0
    diagnostics = json.loads((tmp_path / "out" / "shards" / "0" / "diagnostics.json").read_text())
    assert diagnostics["global_sites"] and diagnostics["rows"] > 0
