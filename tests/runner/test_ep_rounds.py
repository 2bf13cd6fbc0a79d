"""EP rounds end to end: a conjugate hierarchical model at K = 20 against its closed-form posterior,
and the steps' order, refusals and restarts."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from consensusfit.runner.errors import BadInput
from consensusfit.runner.layout import FitLayout
from consensusfit.runner.local.pipeline import Progress, present, run_fit
from consensusfit.runner.spec import parse
from consensusfit.runner.steps import combine, partition, pilot, sample, update

TAU, SIGMA, PRIOR_SD = 0.8, 1.0, 10.0
# The group and noise SDs are held at TAU and SIGMA by priors of width 0.1% (0.45% once tempered by
# 1/20): the posterior of the intercept and slope is then, to that precision, the closed form with
# known variances. A formula model takes its data as program arguments, so every shard and round
# runs one compiled program.
PRIORS = {
    "Intercept": f"Normal(0, {PRIOR_SD})", "x": f"Normal(0, {PRIOR_SD})",
    "1|g_sigma": f"LogNormal({np.log(TAU)}, 0.001)", "sigma": f"LogNormal({np.log(SIGMA)}, 0.001)",
}


def exact_posterior(g, x, y):
    """(mu, beta) | y with the group intercepts integrated out: y_g ~ N(mu + beta x_g, σ²I + τ²11ᵀ)."""
    precision = np.eye(2) / PRIOR_SD**2
    shift = np.zeros(2)
    for group in np.unique(g):
        rows = g == group
        design = np.column_stack([np.ones(rows.sum()), x[rows]])
        inverse = np.linalg.inv(SIGMA**2 * np.eye(rows.sum()) + TAU**2 * np.ones((rows.sum(), rows.sum())))
        precision += design.T @ inverse @ design
        shift += design.T @ inverse @ y[rows]
    cov = np.linalg.inv(precision)
    return cov @ shift, np.sqrt(np.diag(cov))


def fit_spec(tmp_path, shards=20, **combine_fields):
    rng = np.random.default_rng(3)
    groups, per_group = 60, 5  # 3 groups a shard at K = 20
    g = np.repeat(np.arange(groups), per_group)
    x = rng.normal(size=g.size)
    y = rng.normal(0.5, TAU, groups)[g] - 0.7 * x + rng.normal(0.0, SIGMA, g.size)
    pq.write_table(pa.table({"g": [f"grp{i:02d}" for i in g], "x": x, "y": y}), tmp_path / "data.parquet")
    spec = parse({
        "metadata": {"name": "conjugate"},
        "spec": {
            "data": {"uri": str(tmp_path / "data.parquet"), "groupColumn": "g"},
            "shards": shards,
            "model": {"formula": "y ~ 1 + x + (1 | g)", "family": "gaussian", "priors": PRIORS},
            "sampler": {"warmup": 200, "samples": 800, "chains": 2, "seed": 2},
            "combine": {"method": "ep", "groupParameters": "keep", **combine_fields},
            "output": {"uri": str(tmp_path / "runs")},
            "runner": {"shardsPerPod": shards},
        },
    })
    return spec, exact_posterior(g, x, y)


@pytest.fixture(scope="module")
def conjugate_fit(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("ep")
    spec, exact = fit_spec(tmp_path)
    lines = []
    result = run_fit(spec, workers=2, reference=False, progress=Progress(spec.shards, write=lines.append))
    return spec, exact, result, lines


@pytest.mark.slow
def test_ep_recovers_the_closed_form_posterior_at_20_shards_of_3_groups(conjugate_fit):
    spec, (mean, sd), result, lines = conjugate_fit
    parameters = result.summary["parameters"]
    for i, name in enumerate(("Intercept", "x")):
        # Monte Carlo error of q's mean: about √(K / ESS) SDs a round, damped and averaged
        assert abs(parameters[name]["mean"] - mean[i]) < 0.15 * sd[i], name
        assert 0.85 < parameters[name]["sd"] / sd[i] < 1.15, name
    ep_report = result.summary["ep"]
    assert ep_report["converged"] and ep_report["rounds"] <= spec.combine["maxRounds"]
    assert not any("EP did not converge" in w for w in result.summary["warnings"])
    # progress names every round and its change
    assert any(line.endswith("converged") and "EP round" in line for line in lines)



def test_the_report_draws_every_rounds_mean_and_sd(conjugate_fit, capsys):
    spec, _, result, _ = conjugate_fit
    present(result, spec)
    layout = FitLayout(result.root)
    assert layout.store.read_bytes(layout.report.convergence)[:8] == b"\x89PNG\r\n\x1a\n"
    assert "EP rounds:" in capsys.readouterr().out


def test_a_completed_round_is_not_redone_and_the_final_round_has_no_successor(conjugate_fit):
    spec, _, result, _ = conjugate_fit
    layout = FitLayout(result.root)
    final = result.summary["ep"]["rounds"]
    state_before = layout.store.read_bytes(layout.round(final).state)
    again = update.run(spec, layout, update.UpdateOptions(final))
    assert again["final"] and layout.store.read_bytes(layout.round(final).state) == state_before
    if final < spec.combine["maxRounds"]:
        with pytest.raises(BadInput, match=f"round {final + 1} does not exist: round {final} was the last"):
            sample.run(spec, layout, sample.SampleOptions(shards=[0], round=final + 1))


def test_rounds_out_of_order_are_refused_naming_what_is_missing(tmp_path):
    spec, _ = fit_spec(tmp_path, shards=4, maxRounds=3)
    layout = FitLayout(str(tmp_path / "fit"))
    partition.run(spec, layout)
    with pytest.raises(BadInput, match="round 1 cannot start: the pilot is not complete"):
        sample.run(spec, layout, sample.SampleOptions(shards=[0], round=1))
    with pytest.raises(BadInput, match="round 4 is out of range: spec.combine.maxRounds is 3"):
        update.run(spec, layout, update.UpdateOptions(4))
    pilot.run(spec, layout)
    sample.run(spec, layout, sample.SampleOptions(shards=[0, 2], round=1))
    with pytest.raises(BadInput, match=r"cannot update round 1: shards 1, 3 \(2 of 4\) not sampled"):
        update.run(spec, layout, update.UpdateOptions(1))
    with pytest.raises(BadInput, match="round 2 cannot start: the update of round 1 is not complete"):
        sample.run(spec, layout, sample.SampleOptions(shards=[0], round=2))
    with pytest.raises(BadInput, match="cannot combine: EP round 1 is not complete"):
        combine.run(spec, layout, combine.CombineOptions("globals"))
    # the shards that finished keep their files: the next attempt samples only the others
    done = layout.store.read_bytes(layout.round(1).shard(0).marker)
    sample.run(spec, layout, sample.SampleOptions(shards=[0, 1, 3], round=1))
    assert layout.store.read_bytes(layout.round(1).shard(0).marker) == done
    message = update.run(spec, layout, update.UpdateOptions(1))
    assert message["round"] == 1 and not message["final"]
    state = json.loads(layout.store.read_bytes(layout.round(1).state))
    assert len(state["precision"]) == 4 and {"Intercept", "x"} <= set(state["components"])


def test_a_one_shot_fit_has_no_rounds(tmp_path):
    spec, _ = fit_spec(tmp_path, shards=2)
    one_shot = parse({**spec.raw, "combine": {"method": "consensus"}})
    with pytest.raises(BadInput, match="this fit has no EP rounds"):
        update.run(one_shot, FitLayout(str(tmp_path / "fit")), update.UpdateOptions(1))
    assert not parse({**spec.raw, "shards": 1}).uses_rounds  # one shard's posterior is the posterior
