"""The combine step (runner/steps/combine.py): files, supports, refusals, and one real end-to-end run."""

import json

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from numpyro.distributions import constraints
from numpyro.distributions.transforms import biject_to

from consensusfit.runner.steps.combine import combine_fit
from consensusfit.runner.store.draws import Draws, Site, from_parquet_bytes, to_parquet_bytes
from consensusfit.runner.errors import BadInput
from consensusfit.runner.spec import parse

jax.config.update("jax_enable_x64", True)

MODEL = '''
import numpy as np
import numpyro
import numpyro.distributions as dist


def model(g, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    s = numpyro.sample("s", dist.HalfNormal(1.0))
    w = numpyro.sample("w", dist.Dirichlet(np.ones(3)))
    with numpyro.plate("groups", len(np.unique(g))):
        a = numpyro.sample("a", dist.Normal(mu, s))
    numpyro.sample("y", dist.Normal(a[g] + w[0], 1.0), obs=y)
'''

SUPPORTS = {"mu": constraints.real, "s": constraints.positive, "w": constraints.simplex}
USHAPES = {"mu": (), "s": (), "w": (2,)}


def make_fit(tmp_path, shards=3, method="consensus", groups="keep", rows_per_shard=12):
    model = tmp_path / "model.py"
    model.write_text(MODEL)
    root = tmp_path / "fit"
    rng = np.random.default_rng(0)
    for k in range(shards):
        labels = np.array([f"g{k}-{i}" for i in range(3)])
        g = labels[rng.integers(0, 3, rows_per_shard)]
        folder = root / "partition" / f"shard={k}"
        folder.mkdir(parents=True)
        pq.write_table(pa.table({"g": g, "y": rng.normal(1.0, 1.5, rows_per_shard)}), folder / "part-0.parquet")
    spec = parse(
        {
            "data": {"uri": str(root / "partition"), "groupColumn": "g"},
            "shards": shards,
            "model": {"python": {"uri": str(model), "function": "model"}},
            "sampler": {"warmup": 200, "samples": 300, "chains": 2, "seed": 0},
            "combine": {"method": method, "groupParameters": groups},
        }
    )
    return spec, root


def write_shard(root, spec, k, u, groups=3, fingerprint=None, success=True, nan=False):
    """A shard's outputs as the sample step writes them, from given unconstrained global draws."""
    constrained = {name: np.asarray(biject_to(SUPPORTS[name])(values)) for name, values in u.items()}
    chains, draws = u["mu"].shape[:2]
    constrained["a"] = np.random.default_rng(k).normal(size=(chains, draws, groups))
    if nan:
        constrained["a"][0, 5, 1] = np.nan
    sites = {
        name: Site(constrained[name].shape[2:], USHAPES[name], True, "latent") for name in USHAPES
    }
    sites["a"] = Site((groups,), None, False, "latent")
    metadata = {
        "fingerprint": fingerprint or spec.fingerprint(),
        "shard": k,
        "shards": spec.shards,
        "groups": [f"g{k}-{i}" for i in range(groups)],
    }
    folder = root / "shards" / str(k)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "draws.parquet").write_bytes(to_parquet_bytes(Draws(constrained, u, sites, metadata)))
    diagnostics = {"shard": k, "rows": 12, "groups": groups, "divergences": 0,
                   "parameters": {"mu": {"rhat": 1.0, "ess_bulk": 500.0}}}
    (folder / "diagnostics.json").write_text(json.dumps(diagnostics))
    if success:
        (folder / "_SUCCESS.json").write_text(json.dumps({"fingerprint": metadata["fingerprint"]}))


def gaussian_u(rng, k, chains=2, draws=1500):
    """Shard k's unconstrained draws: independent Gaussians with known means and SDs."""
    means = {"mu": 0.5 + 0.3 * k, "s": -0.5 + 0.1 * k, "w": np.array([0.2, -0.1 * k])}
    sds = {"mu": 1.0 + 0.2 * k, "s": 0.5, "w": np.array([0.4, 0.6])}
    u = {
        name: means[name] + sds[name] * rng.standard_normal((chains, draws) + USHAPES[name])
        for name in USHAPES
    }
    return u, means, sds


@pytest.mark.parametrize("method", ["consensus", "gaussian", "swiss"])
def test_combines_in_unconstrained_space_and_stays_in_support(tmp_path, method):
    spec, root = make_fit(tmp_path, method=method)
    rng = np.random.default_rng(1)
    exact_mean, exact_precision = {}, {}
    for k in range(spec.shards):
        u, means, sds = gaussian_u(rng, k)
        write_shard(root, spec, k, u)
        for name in USHAPES:
            exact_precision[name] = exact_precision.get(name, 0) + 1 / sds[name] ** 2
            exact_mean[name] = exact_mean.get(name, 0) + means[name] / sds[name] ** 2
    message = combine_fit(spec, str(root))
    assert message["ok"] and message["uri"].endswith("combined/")
    assert set(message["parameters"]) == {"mu", "s", "w[0]", "w[1]", "w[2]"}

    combined = from_parquet_bytes((root / "combined" / "draws.parquet").read_bytes())
    for name in USHAPES:
        u = combined.unconstrained[name].reshape(-1, *USHAPES[name])
        sd = 1 / np.sqrt(exact_precision[name])
        mean = exact_mean[name] / exact_precision[name]
        assert np.all(np.abs(u.mean(axis=0) - mean) < 5 * sd / np.sqrt(1500)), name
        assert np.all(np.abs(u.std(axis=0) / sd - 1) < 0.08), name
        # constrained values are the support's bijection of the combined unconstrained ones
        expected = np.asarray(biject_to(SUPPORTS[name])(combined.unconstrained[name]))
        np.testing.assert_allclose(combined.constrained[name], expected, rtol=1e-12)
    assert np.all(combined.constrained["s"] > 0)
    w = combined.constrained["w"]
    assert np.all(w > 0) and np.allclose(w.sum(axis=-1), 1)

    summary = json.loads((root / "combined" / "summary.json").read_text())
    assert summary["globals"] == ["mu", "s", "w[0]", "w[1]", "w[2]"]
    for name in summary["globals"]:
        assert {"mean", "sd", "q05", "q50", "q95", "ess_bulk"} <= set(summary["parameters"][name])
    # group parameters (keep): every group of every shard, named by its label
    assert "a[g2-1]" in summary["parameters"] and "a[g0-0]" in summary["parameters"]
    agreement = json.loads((root / "combined" / "agreement.json").read_text())
    assert len(agreement["shards"]) == 3 and "w[0]" not in agreement["shards"][0]["parameters"]
    assert "u:w[1]" in agreement["shards"][0]["parameters"]
    done = json.loads((root / "combined" / "_SUCCESS.json").read_text())
    assert done["fingerprint"] == spec.fingerprint() and set(done["files"]) == {
        "draws.parquet", "agreement.json", "summary.json"}


def test_agreement_warns_about_a_shard_that_tells_another_story(tmp_path):
    spec, root = make_fit(tmp_path, shards=4)
    rng = np.random.default_rng(2)
    for k in range(4):
        u = {name: rng.standard_normal((2, 2000) + USHAPES[name]) * 0.5 for name in USHAPES}
        if k == 3:
            u["mu"] = u["mu"] + 3.0  # six of its own SDs away from the others
        write_shard(root, spec, k, u)
    combine_fit(spec, str(root))
    agreement = json.loads((root / "combined" / "agreement.json").read_text())
    flagged = [s["shard"] for s in agreement["shards"] if s["warning"]]
    assert flagged == [3] or 3 in flagged
    assert any("shard 3" in w and "mu" in w for w in agreement["warnings"])
    summary = json.loads((root / "combined" / "summary.json").read_text())
    assert any("shard 3" in w for w in summary["warnings"])
    # shards that agree raise nothing
    calm = [s for s in agreement["shards"][:3] if s["parameters"]["s"]["warning"]]
    assert not calm


def test_shards_with_different_numbers_of_draws(tmp_path):
    spec, root = make_fit(tmp_path)
    rng = np.random.default_rng(3)
    for k, (chains, draws) in enumerate([(2, 1500), (4, 200), (1, 999)]):
        u, _, _ = gaussian_u(rng, k, chains, draws)
        write_shard(root, spec, k, u)
    combine_fit(spec, str(root))
    combined = from_parquet_bytes((root / "combined" / "draws.parquet").read_bytes())
    assert combined.constrained["mu"].shape == (2, 1500)


def complete_fit(tmp_path, **kwargs):
    spec, root = make_fit(tmp_path, **kwargs)
    rng = np.random.default_rng(4)
    for k in range(spec.shards):
        write_shard(root, spec, k, gaussian_u(rng, k, draws=200)[0])
    return spec, root


def test_refuses_a_missing_shard(tmp_path):
    spec, root = complete_fit(tmp_path)
    for path in (root / "shards" / "1").iterdir():
        path.unlink()
    with pytest.raises(BadInput, match=r"shard 1 missing"):
        combine_fit(spec, str(root))
    assert not (root / "combined").exists()


def test_refuses_an_incomplete_shard(tmp_path):
    spec, root = complete_fit(tmp_path)
    (root / "shards" / "2" / "_SUCCESS.json").unlink()
    with pytest.raises(BadInput, match=r"shard 2 incomplete \(draws but no _SUCCESS.json\)"):
        combine_fit(spec, str(root))


def test_refuses_a_shard_fitted_with_another_spec(tmp_path):
    spec, root = complete_fit(tmp_path)
    write_shard(root, spec, 1, gaussian_u(np.random.default_rng(0), 1, draws=200)[0], fingerprint="0123456789abcdef")
    with pytest.raises(BadInput, match=r"shard 1 \(.*\) was completed for another spec \(fingerprint 0123456789abcdef"):
        combine_fit(spec, str(root))


def test_refuses_nan_draws_naming_shard_and_column(tmp_path):
    spec, root = complete_fit(tmp_path)
    write_shard(root, spec, 2, gaussian_u(np.random.default_rng(0), 2, draws=200)[0], nan=True)
    with pytest.raises(BadInput, match=r"shard 2: 1 NaN or infinite draw value\(s\) in a \(first in column a\[1\]\)"):
        combine_fit(spec, str(root))


def test_a_finished_combination_is_returned_never_redone_or_overwritten(tmp_path):
    spec, root = complete_fit(tmp_path)
    first = combine_fit(spec, str(root))
    stamp = (root / "combined" / "draws.parquet").stat().st_mtime_ns
    assert combine_fit(spec, str(root)) == first
    assert (root / "combined" / "draws.parquet").stat().st_mtime_ns == stamp
    other = parse({**spec.raw, "combine": {"method": "swiss", "groupParameters": "keep"}})
    # whether or not the combine settings are part of the fingerprint, it is refused
    with pytest.raises(BadInput, match="not overwritten|another spec"):
        combine_fit(other, str(root))
    changed = parse({**spec.raw, "sampler": {**spec.sampler, "seed": 9}})
    with pytest.raises(BadInput, match="another spec"):
        combine_fit(changed, str(root))
    assert (root / "combined" / "draws.parquet").stat().st_mtime_ns == stamp


def test_termination_message_fits_in_4_kib():
    from consensusfit.runner.steps.messages import combine_message as termination_message

    stats = {"mean": 1.0, "sd": 0.1, "q05": 0.8, "q50": 1.0, "q95": 1.2}
    message = termination_message("s3://bucket/fit/combined/", {f"beta[{i}]": stats for i in range(500)})
    assert len(json.dumps(message)) <= 4096 and message["truncated"]


CONJUGATE = '''
import numpy as np
import numpyro
import numpyro.distributions as dist


def model(g, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    with numpyro.plate("groups", len(np.unique(g))):
        a = numpyro.sample("a", dist.Normal(mu, 1.0))
    numpyro.sample("y", dist.Normal(a[g], 1.0), obs=y)
'''


@pytest.mark.slow
def test_end_to_end_sample_combine_resample_on_a_conjugate_model(tmp_path):
    """Real shards (tempered NUTS), combined, groups re-sampled; all against closed forms.

    μ ~ N(0, 10²), a_g ~ N(μ, 1), y ~ N(a_g, 1): with ȳ_g ~ N(μ, 1 + 1/n_g) the full posterior of μ
    is Normal with precision 1/100 + Σ_g n_g/(n_g + 1), and a_g | μ, y ~ N((μ + Σy)/(1 + n_g),
    1/(1 + n_g)).
    """
    from consensusfit.runner.steps.sample import sample_shard

    (tmp_path / "model.py").write_text(CONJUGATE)
    root = tmp_path / "fit"
    rng = np.random.default_rng(5)
    shards, tables = 3, []
    for k in range(shards):
        n = rng.integers(1, 6, 4)
        labels = np.repeat([f"g{k}-{i}" for i in range(4)], n)
        y = rng.normal(2.0, 1.0, 4).repeat(n) + rng.normal(0, 1, n.sum())
        tables.append((labels, y))
        folder = root / "partition" / f"shard={k}"
        folder.mkdir(parents=True)
        pq.write_table(pa.table({"g": labels, "y": y}), folder / "part-0.parquet")
    spec = parse(
        {
            "data": {"uri": str(root / "partition"), "groupColumn": "g"},
            "shards": shards,
            "model": {"python": {"uri": str(tmp_path / "model.py"), "function": "model"}},
            "sampler": {"warmup": 300, "samples": 500, "chains": 2, "seed": 0},
            "combine": {"method": "consensus", "groupParameters": "resample"},
        }
    )
    for k in range(shards):
        sample_shard(spec, k, str(root / "partition" / f"shard={k}"), None, str(root))
    combine_fit(spec, str(root))

    groups = [np.unique(labels, return_counts=True) for labels, _ in tables]
    n = np.concatenate([c for _, c in groups])
    precision = 1 / 100 + np.sum(n / (n + 1))
    sums = np.concatenate([[y[labels == g].sum() for g in names] for (labels, y), (names, _) in zip(tables, groups)])
    mean = np.sum(sums / (n + 1)) / precision
    combined = from_parquet_bytes((root / "combined" / "draws.parquet").read_bytes())
    mu = combined.constrained["mu"]
    assert abs(mu.mean() - mean) < 0.15 / np.sqrt(precision)  # within 0.15 posterior SD
    assert abs(mu.std() * np.sqrt(precision) - 1) < 0.1

    for k in range(shards):
        resampled = from_parquet_bytes((root / "combined" / "groups" / str(k) / "draws.parquet").read_bytes())
        assert resampled.metadata["groups"] == list(groups[k][0])
        a = resampled.constrained["a"]
        assert a.shape[:2] == mu.shape  # draw s belongs with combined draw s
        labels, y = tables[k]
        nk = groups[k][1]
        sk = np.array([y[labels == g].sum() for g in groups[k][0]])
        z = (a - (mu[..., None] + sk) / (1 + nk)) * np.sqrt(1 + nk)
        assert np.all(np.abs(z.mean(axis=(0, 1))) < 0.15) and np.all(np.abs(z.std(axis=(0, 1)) - 1) < 0.1)
    summary = json.loads((root / "combined" / "summary.json").read_text())
    assert f"a[{groups[2][0][3]}]" in summary["parameters"]
    assert summary["shard_diagnostics"][0]["rows"] == len(tables[0][0])


def test_agreement_flags_a_collapsed_shard_that_dominates_and_skewed_shards():
    """The failure seen with few groups per shard: a shard whose group-level scale collapses has a
    spuriously narrow posterior on the mean (it dominates the precision) and a skewed one on the
    scale; neither sits far from the combination it dominates, so the distance alone misses it."""
    from consensusfit.runner.combine.agreement import agreement
    from consensusfit.runner.combine.methods import consensus

    rng = np.random.default_rng(7)
    shards = [rng.normal(0, 1, (2, 1000, 2)) for _ in range(10)]
    shards[4][..., 0] = rng.normal(0.3, 0.15, (2, 1000))  # narrow: ~44x the precision of another
    shards[6][..., 1] = -rng.exponential(1.0, (2, 1000))  # skewness -2
    report = agreement(shards, consensus(shards), ["mu", "log_tau"], list(range(10)))
    flagged = {s["shard"] for s in report["shards"] if s["warning"]}
    assert flagged == {4, 6}
    assert report["shards"][4]["parameters"]["mu"]["dominant"]
    assert report["shards"][6]["parameters"]["log_tau"]["non_gaussian"]
    assert any("shard 4 carries" in w and "mu" in w for w in report["warnings"])
    assert any("shard 6's posterior is far from Gaussian on log_tau" in w for w in report["warnings"])



# -- the stages: globals -> resample per shard -> finish (the operator's Jobs) ----------------------

OUTPUTS = ("combined/draws.parquet", "combined/agreement.json", "combined/summary.json",
           "combined/groups/0/draws.parquet", "combined/groups/1/draws.parquet")


def runner(spec, root, *arguments):
    """`consensusfit-runner <arguments> --spec --out` in this process: (exit code, termination message)."""
    from consensusfit.runner.cli import main

    log = root.parent / f"{root.name}-termination-log"
    log.write_text("")  # the runner writes it only if it exists, as in a pod
    code = main(["--termination-log", str(log), arguments[0], "--spec", json.dumps(spec.raw),
                 "--out", str(root), *arguments[1:]])
    return code, json.loads(log.read_text())


def stamps(root):
    return {path: path.stat().st_mtime_ns for path in root.rglob("*") if path.is_file()}


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    """A resample fit combined twice from the same shards: by one `combine`, and stage by stage
    through the CLI as the operator's Jobs run it. (Short warmup: re-sampling is the slow part.)"""
    import shutil

    tmp = tmp_path_factory.mktemp("staged")
    spec, whole = make_fit(tmp, shards=2, groups="resample")
    spec = parse({**spec.raw, "sampler": {**spec.sampler, "warmup": 30}})
    rng = np.random.default_rng(4)
    for k in range(spec.shards):
        write_shard(whole, spec, k, gaussian_u(rng, k, draws=50)[0])
    stages = tmp / "stages"
    shutil.copytree(whole, stages)
    refusals = [runner(spec, stages, "resample", "--shard", "0"), runner(spec, stages, "combine", "--stage", "finish")]
    messages = {"globals": runner(spec, stages, "combine", "--stage", "globals")}
    for k in range(spec.shards):
        messages[k] = runner(spec, stages, "resample", "--shard", str(k))
    messages["finish"] = runner(spec, stages, "combine", "--stage", "finish")
    messages["whole"] = runner(spec, whole, "combine")
    return spec, whole, stages, messages, refusals


def test_the_stages_write_exactly_what_one_combine_writes(staged):
    spec, whole, stages, messages, _ = staged
    for name in OUTPUTS:
        assert (stages / name).read_bytes() == (whole / name).read_bytes(), name
    assert messages["finish"] == (0, {**messages["whole"][1], "uri": f"{stages}/combined/"})
    code, message = messages["globals"]
    assert code == 0 and message == {"ok": True, "stage": "globals", "uri": f"{stages}/combined/draws.parquet",
                                      "draws": 100, "warnings": 0}
    for k in range(spec.shards):
        code, message = messages[k]
        assert code == 0 and message["ok"] and message["shard"] == k and message["seconds"] > 0
        assert 0 < message["acceptProb"] <= 1
    for root in (whole, stages):
        marker = json.loads((root / "combined" / "globals" / "_SUCCESS.json").read_text())
        assert marker["fingerprint"] == spec.fingerprint()
        assert set(marker["files"]) == {"draws.parquet", "agreement.json"}
        done = json.loads((root / "combined" / "_SUCCESS.json").read_text())
        assert set(done["files"]) == {"draws.parquet", "agreement.json", "summary.json"}
    summary = json.loads((stages / "combined" / "summary.json").read_text())
    assert "a[g1-2]" in summary["parameters"]  # the re-sampled group draws, by label


def test_a_stage_before_the_globals_is_refused_with_one_line(staged):
    _, _, stages, _, (resample, finish) = staged
    for code, message in (resample, finish):
        assert code == 3 and message["reason"] == "BadInput" and "\n" not in message["message"]
        assert f"the globals stage is not complete (no {stages}/combined/globals/_SUCCESS.json)" in message["message"]
        assert "combine --stage globals" in message["message"]
    assert resample[1]["message"].startswith("cannot re-sample shard 0: ")
    assert finish[1]["message"].startswith("cannot finish the combination: ")


def test_a_completed_stage_returns_at_once_and_is_never_rewritten(staged):
    spec, _, stages, messages, _ = staged
    before = stamps(stages)
    assert runner(spec, stages, "combine", "--stage", "globals") == messages["globals"]
    assert runner(spec, stages, "resample", "--shard", "1") == messages[1]
    assert runner(spec, stages, "combine", "--stage", "finish") == messages["finish"]
    assert runner(spec, stages, "combine") == messages["finish"]
    assert stamps(stages) == before


def test_finish_names_the_shards_not_re_sampled_and_all_re_samples_only_those(staged, tmp_path):
    import shutil

    spec, whole, stages, _, _ = staged
    root = tmp_path / "fit"
    shutil.copytree(stages, root)
    (root / "combined" / "_SUCCESS.json").unlink()
    (root / "combined" / "groups" / "1" / "_SUCCESS.json").unlink()
    kept = (root / "combined" / "groups" / "0" / "draws.parquet").stat().st_mtime_ns
    with pytest.raises(BadInput, match=r"cannot finish the combination: shard 1 not re-sampled \(no _SUCCESS.json"):
        combine_fit(spec, str(root), "finish")
    combine_fit(spec, str(root))  # all: re-samples shard 1 only, then finishes
    assert (root / "combined" / "groups" / "0" / "draws.parquet").stat().st_mtime_ns == kept
    for name in OUTPUTS:
        assert (root / name).read_bytes() == (whole / name).read_bytes(), name


def test_worst_over_shards_ignores_non_numbers_in_any_order_and_messages_are_strict_json():
    """A NaN R-hat (a component constant by construction) first or last gives the same worst case;
    the message written has null where a number is missing, never a bare NaN."""
    import itertools
    import math

    from consensusfit.runner.steps.messages import encode, pod_message

    shards = [{"ok": True, "shard": k, "rhatMax": r, "essBulkMin": e, "divergences": 0, "seconds": 1.0}
              for k, (r, e) in enumerate([(1.01, 400.0), (math.nan, math.nan), (1.03, 350.0)])]
    for order in itertools.permutations(shards):
        message = pod_message(list(order))
        assert (message["rhatMax"], message["essBulkMin"]) == (1.03, 350.0)
    written = encode({**shards[1], "parameters": {"L[0,0]": {"rhat": math.inf}}})
    assert "NaN" not in written and "Infinity" not in written
    assert json.loads(written)["rhatMax"] is None
    only_nan = pod_message([shards[1], shards[1]])
    assert only_nan["rhatMax"] is None and json.loads(encode(only_nan))["essBulkMin"] is None
