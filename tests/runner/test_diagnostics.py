"""Rank-normalised R-hat and ESS behave as Vehtari et al. (2021) describe on known chains."""

import numpy as np
import pytest

from consensusfit.runner.inference.diagnostics import ess_bulk, ess_tail, rhat, split_chains, summarize

RNG = np.random.default_rng(7)


def ar1(chains, draws, phi):
    x = np.zeros((chains, draws))
    noise = RNG.normal(size=(chains, draws))
    for t in range(1, draws):
        x[:, t] = phi * x[:, t - 1] + noise[:, t]
    return x


def test_independent_draws_converge_with_full_ess():
    draws = RNG.normal(size=(4, 1000))
    assert rhat(draws) == pytest.approx(1.0, abs=0.01)
    assert 3000 < ess_bulk(draws) < 5000
    assert 2500 < ess_tail(draws) < 5500


def test_autocorrelated_chains_have_the_ess_theory_predicts():
    phi = 0.9
    draws = ar1(4, 4000, phi)
    expected = draws.size * (1 - phi) / (1 + phi)  # ESS of an AR(1) process
    assert ess_bulk(draws) == pytest.approx(expected, rel=0.25)


def test_chains_stuck_in_different_places_fail_rhat():
    draws = RNG.normal(size=(4, 500)) + np.array([[0.0], [0.0], [0.0], [3.0]])
    assert rhat(draws) > 1.1


def test_folding_catches_chains_that_differ_only_in_scale():
    draws = RNG.normal(size=(4, 2000)) * np.array([[1.0], [1.0], [1.0], [4.0]])
    assert rhat(draws) > 1.01


def test_a_drifting_chain_is_caught_by_splitting():
    draws = np.linspace(0, 5, 1000)[None, :] + RNG.normal(size=(1, 1000)) * 0.1
    assert rhat(draws) > 1.5
    assert split_chains(np.arange(10).reshape(1, 10)).tolist() == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]


def test_heavy_tails_do_not_break_the_diagnostics():
    draws = RNG.standard_cauchy(size=(4, 1000))
    assert rhat(draws) == pytest.approx(1.0, abs=0.02)
    assert ess_bulk(draws) > 2500


def test_summary_has_quantiles_and_diagnostics():
    summary = summarize(RNG.normal(3, 2, size=(2, 5000)))
    assert summary["mean"] == pytest.approx(3, abs=0.1)
    assert summary["sd"] == pytest.approx(2, rel=0.05)
    assert summary["q05"] < summary["q50"] < summary["q95"]
    assert set(summary) == {"mean", "sd", "q05", "q50", "q95", "rhat", "ess_bulk", "ess_tail"}
