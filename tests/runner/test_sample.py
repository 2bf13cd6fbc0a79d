"""The `sample` step end to end: the pods' command line, its outputs, its refusals, S3 and faults."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from scipy import stats

from consensusfit.runner.cli import main
from consensusfit.runner.store.draws import from_parquet_bytes
from consensusfit.runner.store.storage import open_store

MODEL = '''
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist


def model(g, x, z=None):
    """x ~ N(mu, 1), mu ~ N(0, 10); z ~ N(0, 1/sqrt(tau)), tau ~ Gamma(3, 2); a group effect a_g."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    tau = numpyro.sample("tau", dist.Gamma(3.0, 2.0))
    with numpyro.plate("groups", int(g.max()) + 1):
        a = numpyro.sample("a", dist.Normal(0.0, 1.0))
    with numpyro.plate("rows", x.shape[0]):
        numpyro.sample("x", dist.Normal(mu + 0.0 * a[g], 1.0), obs=x)
        numpyro.sample("z", dist.Normal(0.0, 1.0 / jnp.sqrt(tau)), obs=z)
'''


def write_fit(tmp_path, shards=4, **sampler):
    (tmp_path / "model.py").write_text(MODEL)
    fit = {
        "apiVersion": "consensusfit.dev/v1alpha1",
        "kind": "ConsensusFit",
        "metadata": {"name": "conjugate"},
        "spec": {
            "data": {"uri": str(tmp_path / "data"), "groupColumn": "g"},
            "shards": shards,
            "model": {"python": {"uri": "model.py", "function": "model"}},
            "sampler": {"warmup": 300, "samples": 1000, "chains": 2, "seed": 3, **sampler},
        },
    }
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(fit))
    return str(path)


def write_data(path, rows=12, seed=0, **overrides):
    rng = np.random.default_rng(seed)
    columns = {
        "g": [f"group-{i % 3}" for i in range(rows)],
        "x": rng.normal(1.0, 1.0, rows),
        "z": rng.normal(0.0, 0.8, rows),
        **overrides,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return columns


def run(*argv, termination=None):
    extra = ["--termination-log", str(termination)] if termination else []
    return main(extra + list(argv))


def test_shard_posterior_is_the_exactly_tempered_one(tmp_path):
    """Closed form for shard k of K: μ ~ N, and τ ~ Gamma(a/K + n/2, b/K + Σz²/2).

    The τ shape carries the Jacobian: tempering τ's density but not its Jacobian would give shape
    (a−1)/K + 1 + n/2, which this test tells apart.
    """
    K = 4
    spec = write_fit(tmp_path, shards=K)
    columns = write_data(tmp_path / "shard.parquet")
    termination = tmp_path / "termination-log"
    termination.touch()
    out = tmp_path / "out"
    assert run("sample", "--spec", spec, "--shard", "1", "--shards", str(K), "--data",
               str(tmp_path / "shard.parquet"), "--out", str(out), termination=termination) == 0

    store = open_store(str(out / "shards" / "1"))
    assert store.list() == ["_SUCCESS.json", "diagnostics.json", "draws.parquet"]
    draws = from_parquet_bytes(store.read_bytes("draws.parquet"))
    x, z, n = columns["x"], columns["z"], len(columns["x"])

    precision = 1 / (100 * K) + n
    mu = draws.constrained["mu"].ravel()
    assert mu.mean() == pytest.approx(x.sum() / precision, abs=4 * precision**-0.5 / np.sqrt(500))
    assert mu.std() == pytest.approx(precision**-0.5, rel=0.1)

    shape, rate = 3.0 / K + n / 2, 2.0 / K + (z**2).sum() / 2
    tau = draws.constrained["tau"].ravel()
    exact = stats.gamma(shape, scale=1 / rate)
    wrong_jacobian = stats.gamma(2.0 / K + 1 + n / 2, scale=1 / rate)
    assert abs(tau.mean() - exact.mean()) < 4 * exact.std() / np.sqrt(500)
    assert abs(tau.mean() - wrong_jacobian.mean()) > 4 * exact.std() / np.sqrt(500)
    np.testing.assert_allclose(np.log(tau), draws.unconstrained["tau"].ravel())

    diagnostics = json.loads(store.read_bytes("diagnostics.json"))
    assert diagnostics["global_sites"] == ["mu", "tau"]
    assert set(diagnostics["parameters"]) == {"mu", "tau"}
    assert diagnostics["rows"] == n and diagnostics["groups"] == 3
    assert set(diagnostics["seconds"]) == {"load", "compile", "init", "warmup", "sampling", "write"}
    assert draws.sites["a"].is_global is False and draws.metadata["groups"] == ["group-0", "group-1", "group-2"]
    message = json.loads(termination.read_text())
    assert message["ok"] and message["shard"] == 1 and message["rhatMax"] < 1.05


def test_rerun_reuses_a_completed_shard_and_a_changed_spec_is_refused(tmp_path, capsys):
    spec = write_fit(tmp_path, shards=2, warmup=50, samples=50)
    write_data(tmp_path / "data" / "shard=0" / "part-0.parquet")
    out = str(tmp_path / "out")
    assert run("sample", "--spec", spec, "--shard", "0", "--out", out, "--data",
               str(tmp_path / "data" / "shard={shard}")) == 0
    draws_file = tmp_path / "out" / "shards" / "0" / "draws.parquet"
    before = draws_file.stat().st_mtime_ns
    assert run("sample", "--spec", spec, "--shard", "0", "--out", out, "--data",
               str(tmp_path / "data" / "shard={shard}")) == 0
    assert draws_file.stat().st_mtime_ns == before

    changed = write_fit(tmp_path, shards=2, warmup=50, samples=60)
    capsys.readouterr()
    assert run("sample", "--spec", changed, "--shard", "0", "--out", out, "--data",
               str(tmp_path / "data" / "shard=0")) == 3
    assert "completed for another spec" in capsys.readouterr().err
    assert draws_file.stat().st_mtime_ns == before


@pytest.mark.parametrize(
    "overrides, model, reason",
    [
        ({"x": None}, None, "missing column(s) x"),
        ({"z": [1.0, np.nan, np.inf] + [0.0] * 9}, None, "column z has 2 NaN or infinite value(s) of 12 rows"),
        ({"x": ["a"] * 12}, None, "column x must be numeric"),
        ("empty", None, "the shard is empty (0 rows)"),
        ({}, ("missing.py", "model"), "missing.py does not exist"),
        ({}, ("model.py", "nope"), "has no function 'nope'"),
        ({}, ("broken.py", "model"), "does not load: SyntaxError"),
    ],
)
def test_bad_input_exits_3_with_a_one_line_reason(tmp_path, capsys, overrides, model, reason):
    spec_path = write_fit(tmp_path, shards=2)
    (tmp_path / "broken.py").write_text("def model(:\n")
    if model:
        fit = yaml.safe_load(open(spec_path))
        fit["spec"]["model"]["python"] = {"uri": model[0], "function": model[1]}
        open(spec_path, "w").write(yaml.safe_dump(fit))
    data = tmp_path / "shard.parquet"
    if overrides == "empty":
        pq.write_table(pa.table({"g": pa.array([], pa.string()), "x": pa.array([], pa.float64()),
                                 "z": pa.array([], pa.float64())}), data)
    else:
        columns = write_data(data, **{k: v for k, v in overrides.items() if v is not None})
        if None in overrides.values():
            pq.write_table(pa.table({k: v for k, v in columns.items() if overrides.get(k, 0) is not None}), data)
    termination = tmp_path / "termination-log"
    termination.touch()
    code = run("sample", "--spec", spec_path, "--shard", "1", "--data", str(data), "--out",
               str(tmp_path / "out"), termination=termination)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3
    assert err[-1].startswith("consensusfit: error: ") and reason in err[-1]
    assert json.loads(termination.read_text())["reason"] == "BadInput"
    assert not (tmp_path / "out" / "shards" / "1" / "_SUCCESS.json").exists()


def test_shard_index_comes_from_the_indexed_job(tmp_path, monkeypatch, capsys):
    spec = write_fit(tmp_path, shards=2)
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "5")
    assert run("sample", "--spec", spec, "--out", str(tmp_path / "out")) == 3
    assert "shard 5 is out of range: the fit has 2 shards" in capsys.readouterr().err


def test_sample_on_s3_through_a_faulty_network(tmp_path, s3_bucket, fault_proxy, monkeypatch):
    """Data and results on a real S3 endpoint; the first requests fail and the shard completes."""
    monkeypatch.setenv("CONSENSUSFIT_S3_RETRY_SECONDS", "20")
    spec = write_fit(tmp_path, shards=2, warmup=50, samples=50)
    write_data(tmp_path / "local.parquet")
    open_store(f"{s3_bucket}/data/shard=1").write_bytes("part-0.parquet", (tmp_path / "local.parquet").read_bytes())
    proxy = fault_proxy(faults=["503", "drop", "503", "pass", "drop"])
    out = f"{s3_bucket}/fits/default/conjugate/uid-1"
    assert run("sample", "--spec", spec, "--shard", "1", "--data", f"{s3_bucket}/data/shard={{shard}}/",
               "--out", out) == 0
    assert proxy.seen > 5
    assert open_store(out).list("shards/1/") == [
        "shards/1/_SUCCESS.json", "shards/1/diagnostics.json", "shards/1/draws.parquet"]


def test_a_storage_outage_exits_1_so_the_pod_is_retried(tmp_path, s3_bucket, fault_proxy, monkeypatch, capsys):
    monkeypatch.setenv("CONSENSUSFIT_S3_MAX_ATTEMPTS", "3")
    spec = write_fit(tmp_path, shards=2)
    fault_proxy(then="503")
    assert run("sample", "--spec", spec, "--shard", "0", "--data", f"{s3_bucket}/data/",
               "--out", f"{s3_bucket}/out") == 1
    assert "still failing after 3 attempts" in capsys.readouterr().err


def strict(text: str):
    """json.loads that refuses NaN and Infinity, as the API server's parser does."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


STUCK = '''
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist


def model(g, x, z=None):
    """A finite log density whose gradient is NaN everywhere: no NUTS transition can move."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    numpyro.factor("stuck", jnp.sqrt(mu - mu))
    with numpyro.plate("rows", x.shape[0]):
        numpyro.sample("x", dist.Normal(mu, 1.0), obs=x)
'''


def test_a_shard_whose_chains_never_move_fails_naming_the_shard_and_site(tmp_path, capsys):
    """All transitions divergent, every draw the same: exit 3 (a retry draws the same), a strict
    JSON reason naming the shard and the site, and no marker."""
    spec_path = write_fit(tmp_path, shards=2, warmup=20, samples=20)
    (tmp_path / "model.py").write_text(STUCK)
    write_data(tmp_path / "shard.parquet")
    termination = tmp_path / "termination-log"
    termination.touch()
    code = run("sample", "--spec", spec_path, "--shard", "1", "--data", str(tmp_path / "shard.parquet"),
               "--out", str(tmp_path / "out"), termination=termination)
    assert code == 3
    message = strict(termination.read_text())
    assert message["reason"] == "BadInput"
    assert message["message"].startswith("shard 1: NUTS never moved any of the 2 chain(s) in site mu (40 of 40")
    assert not (tmp_path / "out" / "shards" / "1" / "_SUCCESS.json").exists()


def test_a_correlated_model_reports_strict_json_whatever_its_constant_components(tmp_path):
    """A correlated random effect's Cholesky factor has entries fixed at 0 and 1 (R-hat not a
    number): the shard succeeds, its message and diagnostics are strict JSON, its worst R-hat a
    number."""
    spec_path = write_fit(tmp_path, shards=2, warmup=100, samples=100)
    fit = yaml.safe_load(open(spec_path))
    fit["spec"]["model"] = {"formula": "x ~ 1 + z + (1 + z | g)", "family": "gaussian"}
    open(spec_path, "w").write(yaml.safe_dump(fit))
    write_data(tmp_path / "data" / "part-0.parquet", rows=30)
    out = str(tmp_path / "out")
    assert run("partition", "--spec", spec_path, "--out", out) == 0  # a formula needs the data's statistics
    termination = tmp_path / "termination-log"
    termination.touch()
    assert run("sample", "--spec", spec_path, "--shard", "0", "--out", out, termination=termination) == 0
    message = strict(termination.read_text())
    diagnostics = strict((tmp_path / "out" / "shards" / "0" / "diagnostics.json").read_text())
    constant = [name for name, p in diagnostics["parameters"].items() if p["rhat"] is None]
    assert constant and all("cholesky" in name for name in constant)
    finite = [p["rhat"] for p in diagnostics["parameters"].values() if p["rhat"] is not None]
    assert message["ok"] and message["rhatMax"] == max(finite)
