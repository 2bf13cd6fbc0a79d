"""Shape buckets, padding, shards sampled together, and the persistent compilation cache."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import numpyro.distributions as dist
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from numpyro import handlers
from numpyro.infer.util import log_density

jax.config.update("jax_enable_x64", True)

from consensusfit.runner.data.buckets import bucket_size, fit_bucket  # noqa: E402
from consensusfit.runner.cli import main  # noqa: E402
from consensusfit.runner.store.draws import from_parquet_bytes  # noqa: E402
from consensusfit.runner.models.formula import formula_model  # noqa: E402
from consensusfit.runner.data.shard import ShardData  # noqa: E402
from consensusfit.runner.spec import parse  # noqa: E402
from consensusfit.runner.steps.sample import sample_shards  # noqa: E402
from consensusfit.runner.store.storage import open_store  # noqa: E402
from consensusfit.runner.inference.tempering import site_shapes, trace_model  # noqa: E402


def test_buckets_bound_the_padding_and_are_few():
    sizes = range(1, 200_000)
    assert all(n <= bucket_size(n) <= max(n, 1.125 * n) for n in sizes)
    # shards of 90k-110k rows (a balanced partition) fall into a handful of buckets
    assert len({bucket_size(n) for n in range(90_000, 110_000)}) <= 4
    assert fit_bucket([{"rows": 290, "groups": 35}, {"rows": 301, "groups": 37}], 285, 35).rows == bucket_size(301)
    assert fit_bucket(None, 285, 35) == fit_bucket([{"rows": 285, "groups": 35}], 1, 1)


def synthetic(rows, groups, seed):
    rng = np.random.default_rng(seed)
    g = np.array([f"P{seed}-{i:03d}" for i in rng.integers(0, groups, rows)])
    x = rng.normal(60.0, 40.0, rows)
    effect = {label: rng.normal(0, 200) for label in set(g)}
    y = 2500 - 8.0 * x + np.array([effect[label] for label in g]) + rng.normal(0, 150, rows)
    return {
        "g": g,
        "x": x,
        "h": rng.choice(["u", "v", "w"], rows),
        "y": y,
        "k": rng.poisson(3.0, rows).astype(float),
        "c": rng.integers(0, 2, rows).astype(float),
    }


def whole_stats(columns):
    stats = {}
    for name, values in columns.items():
        if name == "h":
            stats[name] = {"levels": sorted(set(values.tolist()))}
        elif name != "g":
            values = np.asarray(values, dtype=float)
            stats[name] = {"mean": float(values.mean()), "sd": float(values.std()),
                           "min": float(values.min()), "max": float(values.max())}
    return stats


def shard_of(columns):
    labels, index = np.unique(columns["g"], return_inverse=True)
    return ShardData({k: np.asarray(v) for k, v in columns.items()}, "g", labels, index.astype(np.int32))


@pytest.mark.parametrize(
    "formula, family",
    [
        ("y ~ 1 + x + (1 + x || g)", "gaussian"),
        ("y ~ x + h + (1 + x | g) + (1 | h)", "gaussian"),
        ("c ~ x + (1 | g)", "bernoulli"),
        ("k ~ x + (1 | g) + (1 | g:h)", "negativebinomial"),
    ],
)
def test_padding_leaves_the_log_density_of_the_real_parameters_exactly_unchanged(formula, family):
    """log p_padded(θ, α, α_pad) = log p(θ, α) + Σ log N(α_pad offsets; 0, 1), at any values."""
    columns = synthetic(rows=57, groups=9, seed=1)
    model = formula_model({"formula": formula, "family": family}, "g", whole_stats(columns), shards=4)
    shard = shard_of(columns)
    padded = shard.padded(64, 12)
    assert padded.rows == 64 and padded.groups == 12 and padded.row_mask.sum() == 57
    arguments, padded_arguments = model.prepare(shard), model.prepare(padded)
    shapes = site_shapes(trace_model(model.fn, arguments), "latent")
    for seed in range(3):
        trace = trace_model(model.fn, padded_arguments, seed=seed)
        values = {name: trace[name]["value"] for name in shapes}
        real = {name: value[tuple(slice(0, n) for n in shapes[name])] for name, value in values.items()}
        padding_terms = sum(
            float(dist.Normal(0, 1).log_prob(value).sum() - dist.Normal(0, 1).log_prob(real[name]).sum())
            for name, value in values.items()
            if name.endswith("_offset")
        )
        with handlers.seed(rng_seed=0):
            padded_density, _ = log_density(model.fn, (), padded_arguments, values)
            density, _ = log_density(model.fn, (), arguments, real)
        assert float(padded_density) == pytest.approx(float(density) + padding_terms, rel=1e-12, abs=1e-9)


FIT = {
    "metadata": {"name": "buckets"},
    "spec": {
        "data": {"uri": "unused", "groupColumn": "g"},
        "shards": 3,
        "model": {"formula": "y ~ 1 + x + (1 | g)"},
        "sampler": {"warmup": 150, "samples": 100, "chains": 2, "seed": 5},
    },
}


@pytest.fixture
def three_shards(tmp_path):
    """Three shards of different sizes as Parquet, their whole-data statistics and sizes."""
    parts = [synthetic(rows, groups, seed) for seed, (rows, groups) in enumerate([(40, 6), (47, 8), (35, 5)])]
    for k, columns in enumerate(parts):
        folder = tmp_path / "data" / f"shard={k}"
        folder.mkdir(parents=True)
        pq.write_table(pa.table(columns), folder / "part-0.parquet")
    whole = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    sizes = [{"rows": len(p["y"]), "groups": len(set(p["g"]))} for p in parts]
    return parse(FIT), whole_stats(whole), sizes, str(tmp_path / "data" / "shard={shard}")


def draws_of(root, k):
    return from_parquet_bytes(open_store(root).read_bytes(f"shards/{k}/draws.parquet"))


def test_shards_sampled_together_equal_shards_sampled_alone(tmp_path, three_shards):
    """One vectorised program over three padded shards gives each shard the draws it gets alone
    (same bucket, same seed), trimmed back to its own groups.

    A few transitions only: the batched program rounds differently from the single one, and NUTS
    amplifies a last-bit difference into another (equally valid) chain within ~30 transitions.
    Enough of them warm up for the chains to move (a shard whose chains never move fails).
    Mixing up shards' data or seeds would differ from the first draw.
    """
    _, stats, sizes, data = three_shards
    spec = parse({**FIT, "spec": {**FIT["spec"], "sampler": {"warmup": 16, "samples": 4, "chains": 2, "seed": 5}}})
    uri = lambda k: data.replace("{shard}", str(k))  # noqa: E731
    together, alone = str(tmp_path / "together"), str(tmp_path / "alone")
    summary = sample_shards(spec, [0, 1, 2], uri, stats, together, sizes, vectorize=3)
    assert summary["shards"] == [0, 1, 2] and summary["ok"]
    for k in range(3):
        sample_shards(spec, [k], uri, stats, alone, sizes)
        a, b = draws_of(together, k), draws_of(alone, k)
        assert a.constrained["1|g"].shape[2:] == (sizes[k]["groups"],)
        assert len(a.metadata["groups"]) == sizes[k]["groups"]
        for name in a.constrained:
            np.testing.assert_allclose(a.constrained[name], b.constrained[name], rtol=1e-9, atol=1e-12)
        diagnostics = json.loads(open_store(together).read_bytes(f"shards/{k}/diagnostics.json"))
        assert diagnostics["padded"] == {"rows": bucket_size(47), "groups": bucket_size(8)}
        assert diagnostics["rows"] == sizes[k]["rows"] and diagnostics["gradient_evaluations"] > 0


def test_a_pod_samples_its_slice_of_the_shards(tmp_path, three_shards, monkeypatch):
    spec, stats, sizes, data = three_shards
    (tmp_path / "stats.json").write_text(json.dumps({"stats": stats}))
    (tmp_path / "fit.json").write_text(json.dumps(FIT))
    termination = tmp_path / "termination-log"
    termination.touch()
    out = str(tmp_path / "out")
    argv = ["--termination-log", str(termination), "sample", "--spec", str(tmp_path / "fit.json"),
            "--out", out, "--data", data, "--stats", str(tmp_path / "stats.json"), "--shards-per-pod", "2"]
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")
    assert main(argv) == 0
    assert open_store(out).list("shards/") == [f"shards/2/{f}" for f in ("_SUCCESS.json", "diagnostics.json", "draws.parquet")]
    assert json.loads(termination.read_text())["shard"] == 2
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "0")
    assert main(argv) == 0
    message = json.loads(termination.read_text())
    reports = [json.loads(open_store(out).read_bytes(f"shards/{k}/diagnostics.json")) for k in (0, 1)]
    assert message["shards"] == [0, 1]
    assert message["rhatMax"] == pytest.approx(max(p["rhat"] for r in reports for p in r["parameters"].values()))
    assert message["divergences"] == sum(r["divergences"] for r in reports)
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "2")
    assert main(argv) == 3  # no pod 2: three shards, two per pod


def test_the_compilation_cache_compiles_a_bucket_once(tmp_path, three_shards):
    """The second shard's process finds its traced programs in the program store and XLA's
    compiled ones in JAX's cache: it traces nothing and adds no entry to either."""
    spec, stats, sizes, data = three_shards
    manifest = {"stats": stats, "per_shard": sizes}
    out = tmp_path / "out"
    (out / "partition").mkdir(parents=True)
    (out / "partition" / "manifest.json").write_text(json.dumps(manifest))
    for k in range(3):  # where the partition step would have put them
        (out / "partition" / f"shard={k}").mkdir()
        (out / "partition" / f"shard={k}" / "part-0.parquet").write_bytes(
            (tmp_path / "data" / f"shard={k}" / "part-0.parquet").read_bytes())
    (tmp_path / "fit.json").write_text(json.dumps(FIT))
    cache = tmp_path / "cache"
    environment = {**os.environ, "CONSENSUSFIT_COMPILATION_CACHE": str(cache)}

    def sample(shard):
        command = [sys.executable, "-m", "consensusfit.runner.cli", "--termination-log", os.devnull, "sample",
                   "--spec", str(tmp_path / "fit.json"), "--out", str(out), "--shard", str(shard)]
        subprocess.run(command, env=environment, check=True, capture_output=True)
        diagnostics = json.loads((out / "shards" / str(shard) / "diagnostics.json").read_text())
        # XLA's entries of the sampler's programs (the cache keeps small eager operations too)
        compiled = sorted(name for name in os.listdir(cache) if name.startswith("jit_call-"))
        return diagnostics["programs"], compiled, sorted(os.listdir(cache / "programs"))

    how, compiled, stored = sample(0)
    assert how == "traced" and len(stored) == 1 and len(compiled) == 3  # init, step, constrain
    # shard 1 differs from shard 0 in rows and groups, not in bucket: it finds every program
    assert sample(1) == ("loaded", compiled, stored)
    # a damaged entry is rebuilt, not trusted
    (cache / "programs" / stored[0]).write_bytes(b"\0" * 12)
    assert sample(2) == ("traced", compiled, stored)
    assert len((cache / "programs" / stored[0]).read_bytes()) > 12



def test_python_models_sample_their_shards_one_after_the_other(tmp_path):
    """A model that needs its data as constants is not padded: each shard its own program."""
    from test_sample import write_data, write_fit

    spec = write_fit(tmp_path, shards=4, warmup=100, samples=100)
    for k, rows in enumerate([12, 15]):
        write_data(tmp_path / "data" / f"{k}.parquet", rows=rows, seed=k)
    out = str(tmp_path / "out")
    assert main(["sample", "--spec", spec, "--shard", "0-1", "--data", str(tmp_path / "data" / "{shard}.parquet"),
                 "--out", out]) == 0
    for k, rows in enumerate([12, 15]):
        diagnostics = json.loads(open_store(out).read_bytes(f"shards/{k}/diagnostics.json"))
        assert diagnostics["rows"] == rows and diagnostics["padded"] is None
        assert draws_of(out, k).constrained["a"].shape[2:] == (3,)


def test_a_bad_shard_fails_a_packed_pod_at_once_and_names_itself(tmp_path, three_shards):
    """Shards of a pod sampled in two lanes: a NaN in shard 1 fails the pod with a reason that
    names the shard and the column, and leaves shard 1 without a marker."""
    from consensusfit.runner.errors import BadInput

    spec, stats, sizes, data = three_shards
    path = tmp_path / "data" / "shard=1" / "part-0.parquet"
    table = pq.read_table(path)
    y = table["y"].to_numpy().copy()
    y[3] = np.nan
    pq.write_table(table.set_column(table.schema.get_field_index("y"), "y", pa.array(y)), path)
    out = str(tmp_path / "out")
    with pytest.raises(BadInput, match=r"shard 1 .*column y has 1 NaN"):
        sample_shards(spec, [0, 1, 2], lambda k: data.replace("{shard}", str(k)), stats, out, sizes, lanes=2)
    assert not open_store(out).child("shards/1").exists("_SUCCESS.json")


def test_the_first_batch_is_charged_the_compile_time_and_the_others_reuse_it(tmp_path, three_shards):
    """Three shards, one a call, in two lanes: one compile, reported by shard 0 only; every
    shard reports each phase the step timed."""
    spec, stats, sizes, data = three_shards
    out = str(tmp_path / "out")
    sample_shards(spec, [0, 1, 2], lambda k: data.replace("{shard}", str(k)), stats, out, sizes, lanes=2)
    store = open_store(out)
    seconds = [json.loads(store.read_bytes(f"shards/{k}/diagnostics.json"))["seconds"] for k in range(3)]
    assert [set(s) for s in seconds] == [{"load", "compile", "init", "warmup", "sampling", "write"}] * 3
    assert seconds[0]["compile"] > 0 and [s["compile"] for s in seconds[1:]] == [0.0, 0.0]
    assert all(s["warmup"] > 0 and s["sampling"] > 0 for s in seconds)
