"""`consensusfit run` end to end on a small fit: results, report, picture, reuse, Ctrl-C and resume."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from consensusfit.runner.cli import main

MODEL = '''
import numpyro
import numpyro.distributions as dist


def model(g, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(2.0))
    with numpyro.plate("groups", int(g.max()) + 1):
        alpha = numpyro.sample("alpha", dist.Normal(mu, sigma))
    numpyro.sample("y", dist.Normal(alpha[g], 1.0), obs=y)
'''


def small_fit(tmp_path, shards=3, samples=200, name="small", group_parameters="keep", runner=None):
    rng = np.random.default_rng(0)
    groups = 24
    g = np.repeat(np.arange(groups), 5)
    y = rng.normal(rng.normal(1.0, 0.7, groups)[g], 1.0)
    pq.write_table(pa.table({"g": [f"grp{i:02d}" for i in g], "y": y}), tmp_path / "data.parquet")
    (tmp_path / "model.py").write_text(MODEL)
    fit = {
        "apiVersion": "consensusfit.dev/v1alpha1", "kind": "ConsensusFit", "metadata": {"name": name},
        "spec": {
            "data": {"uri": "data.parquet", "groupColumn": "g"},
            "shards": shards,
            "model": {"python": {"uri": "model.py", "function": "model"}},
            "sampler": {"warmup": 150, "samples": samples, "chains": 2, "seed": 1},
            "combine": {"method": "consensus", "groupParameters": group_parameters},
            "output": {"uri": str(tmp_path / "runs")},
            **({"runner": runner} if runner else {}),
        },
    }
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(fit))
    return path


def fit_folder(tmp_path, name="small"):
    [folder] = (tmp_path / "runs" / "default" / name).iterdir()
    return folder


def test_run_writes_results_report_and_picture_and_reuses_them(tmp_path, capsys):
    path = small_fit(tmp_path)
    assert main(["run", str(path), "--workers", "2", "--reference"]) == 0
    printed, progress = capsys.readouterr()
    folder = fit_folder(tmp_path)
    assert "sampling: 3/3 shards done" in progress
    assert "re-sampling" not in progress and not (folder / "combined" / "groups").exists()  # keep
    for k in range(3):
        assert (folder / "shards" / str(k) / "_SUCCESS.json").exists()
    summary = json.loads((folder / "combined" / "summary.json").read_text())
    assert {"mu", "sigma"} <= set(summary["parameters"])
    png = folder / "report" / "posteriors.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "reference mean" in printed and "mu" in printed and str(png) in printed
    reference = json.loads((folder / "reference" / "summary.json").read_text())
    # the combined answer agrees with the full-data fit on this easy problem
    assert abs(summary["parameters"]["mu"]["mean"] - reference["mu"]["mean"]) < 0.5 * reference["mu"]["sd"]

    stamps = {p: p.stat().st_mtime_ns for p in folder.rglob("*.parquet")}
    assert main(["run", str(path), "--workers", "2"]) == 0
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*.parquet")} == stamps


def test_group_parameters_are_re_sampled_by_one_process_per_shard(tmp_path, capsys, monkeypatch):
    from consensusfit.runner.steps import combine as combiner

    def in_this_process(*args, **kwargs):
        raise AssertionError("the pipeline re-sampled a shard in its own process")

    monkeypatch.setattr(combiner, "resample_shard", in_this_process)  # the shard processes are not touched
    path = small_fit(tmp_path, shards=2, samples=100, group_parameters="resample")
    assert main(["run", str(path), "--workers", "2"]) == 0
    progress = capsys.readouterr().err
    assert "re-sampling: 0/2 shards done" in progress and "re-sampling: 2/2 shards done" in progress
    folder = fit_folder(tmp_path)
    for k in range(2):
        assert (folder / "combined" / "groups" / str(k) / "_SUCCESS.json").exists()
    summary = json.loads((folder / "combined" / "summary.json").read_text())
    assert summary["group_parameters"] == "resample" and "alpha[grp00]" in summary["parameters"]


def test_a_changed_spec_is_a_new_folder_and_never_overwrites(tmp_path):
    path = small_fit(tmp_path, shards=2, samples=100)
    assert main(["run", str(path), "--workers", "2"]) == 0
    first = fit_folder(tmp_path)
    before = (first / "combined" / "summary.json").read_bytes()
    fit = yaml.safe_load(path.read_text())
    fit["spec"]["sampler"]["seed"] = 2
    path.write_text(yaml.safe_dump(fit))
    assert main(["run", str(path), "--workers", "2"]) == 0
    folders = list((tmp_path / "runs" / "default" / "small").iterdir())
    assert len(folders) == 2 and (first / "combined" / "summary.json").read_bytes() == before


def test_ctrl_c_stops_workers_and_a_rerun_resumes(tmp_path):
    path = small_fit(tmp_path, shards=4, samples=3000)
    command = [sys.executable, "-m", "consensusfit.runner.cli", "run", str(path), "--workers", "1"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        done = list((tmp_path / "runs").rglob("_SUCCESS.json")) if (tmp_path / "runs").exists() else []
        if any("shards" in str(p) for p in done):
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) != 0
    assert "interrupted" in process.stderr.read()
    folder = fit_folder(tmp_path)
    completed = {p.parent.name: p.stat().st_mtime_ns for p in (folder / "shards").glob("*/_SUCCESS.json")}
    assert 1 <= len(completed) < 4 and not (folder / "combined").exists()
    # no shard process outlives the interrupted run
    leftovers = subprocess.run(["pgrep", "-f", f"--out {folder}"], capture_output=True, text=True).stdout
    assert leftovers.strip() == ""

    assert main(["run", str(path), "--workers", "2"]) == 0
    for shard, stamp in completed.items():
        assert (folder / "shards" / shard / "_SUCCESS.json").stat().st_mtime_ns == stamp
    assert (folder / "combined" / "_SUCCESS.json").exists()


def test_a_bad_input_shard_stops_the_run_with_its_reason(tmp_path, capsys):
    path = small_fit(tmp_path, shards=2, samples=100)
    table = pq.read_table(tmp_path / "data.parquet").to_pydict()
    table["y"][3] = float("nan")
    pq.write_table(pa.table(table), tmp_path / "data.parquet")
    assert main(["run", str(path)]) == 3
    assert "column y has 1 NaN or infinite value(s)" in capsys.readouterr().err


def test_run_with_data_and_results_on_s3(tmp_path, s3_bucket):
    from consensusfit.runner.store.storage import open_store

    path = small_fit(tmp_path, shards=2, samples=100)
    open_store(f"{s3_bucket}/input").write_bytes("data.parquet", (tmp_path / "data.parquet").read_bytes())
    fit = yaml.safe_load(path.read_text())
    fit["spec"]["data"]["uri"] = f"{s3_bucket}/input/data.parquet"
    fit["spec"]["output"]["uri"] = f"{s3_bucket}/runs"
    path.write_text(yaml.safe_dump(fit))
    assert main(["run", str(path), "--workers", "2"]) == 0
    keys = open_store(f"{s3_bucket}/runs").list()
    assert any(key.endswith("combined/summary.json") for key in keys)
    assert any(key.endswith("report/posteriors.png") for key in keys)
    assert sum(key.endswith("/_SUCCESS.json") and "/shards/" in key for key in keys) == 2


def test_shards_per_pod_packs_shards_into_one_process_with_a_compilation_cache(tmp_path, capsys, monkeypatch):
    cache = tmp_path / "jax-cache"
    monkeypatch.setenv("CONSENSUSFIT_COMPILATION_CACHE", str(cache))
    path = small_fit(tmp_path, samples=50, runner={"shardsPerPod": 3})
    assert main(["run", str(path), "--workers", "2"]) == 0
    progress = capsys.readouterr().err
    # one process took all three shards: progress jumps from 0 to 3
    assert "sampling: 3/3 shards done" in progress
    assert "sampling: 1/3" not in progress and "sampling: 2/3" not in progress
    assert all((fit_folder(tmp_path) / "shards" / str(k) / "_SUCCESS.json").exists() for k in range(3))
    assert any(cache.iterdir())  # the shard process compiled into the cache it was given
