"""Metrics from planner passes, bounded labels, and the operator's import boundary."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta

from cfit_support import COMBINE_REPORT, T0, ep_fit, job, make_fit, pod, round_report, shard_report, update_report
from prometheus_client import generate_latest

from consensusfit.operator.children import STEPS
from consensusfit.operator.config import Config
from consensusfit.operator.metrics import Metrics
from consensusfit.operator.planner import plan

NOW = T0 + timedelta(minutes=10)


def test_phase_durations_fit_duration_and_per_fit_series():
    metrics = Metrics()
    fit = make_fit(status={"phase": "Combining", "startTime": "2026-01-01T00:01:00Z"})
    jobs = {step: job(step, "Complete", succeeded=1) for step in STEPS}
    pods = [pod("sample", 0, report=shard_report(0, rhat=1.02, seconds=42)),
            pod("sample", 0, phase="Failed", attempt=1), pod("combine", report=COMBINE_REPORT)]
    result = plan(fit, jobs, pods, NOW, Config())
    metrics.record("default", "fvc", result, jobs, pods)
    text = generate_latest(metrics.registry).decode()
    assert 'consensusfit_fit_duration_seconds_sum{namespace="default",outcome="Succeeded"} 540.0' in text
    assert 'consensusfit_phase_duration_seconds_count{namespace="default",phase="Combining"} 1.0' in text
    assert 'consensusfit_shard_duration_seconds_sum{fit="fvc",namespace="default"} 42.0' in text
    assert 'consensusfit_shard_retries_total{fit="fvc",namespace="default"} 1.0' in text
    assert 'consensusfit_fit_rhat_max{fit="fvc",namespace="default"} 1.02' in text
    # Queue wait: a first pod waits from its Job's creation (1 s -> 5 s: 4 s, for the shard and
    # for combine); a retry from its own creation (102 s -> 105 s: 3 s).
    assert 'consensusfit_queue_wait_seconds_sum{fit="fvc",namespace="default"} 11.0' in text
    assert "shard=" not in text and "index=" not in text  # never a per-shard label

    metrics.forget("default", "fvc")
    assert 'fit="fvc"' not in generate_latest(metrics.registry).decode()


def test_ep_rounds_are_exported_per_fit_from_the_status():
    metrics = Metrics()
    fit = ep_fit(status={"phase": "Sampling", "startTime": "2026-01-01T00:01:00Z"})
    jobs = {s: job(s, "Complete", succeeded=3) for s in ("partition", "pilot", "round-1", "update-1")}
    jobs["round-2"] = job("round-2", active=2, succeeded=1)
    pods = [pod("round-1", 0, report=round_report(1, 0, seconds=30)),
            pod("round-2", 0, report=round_report(2, 0, seconds=8)),  # the same shard, another round
            pod("update-1", report=update_report(1, False, mean=0.25, sd=0.125))]
    result = plan(fit, jobs, pods, NOW, Config())
    metrics.record("default", "fvc", result, jobs, pods)
    text = generate_latest(metrics.registry).decode()
    series = '{fit="fvc",namespace="default"}'
    assert f"consensusfit_ep_round{series} 2.0" in text
    assert f"consensusfit_ep_rounds_completed_total{series} 1.0" in text
    assert f"consensusfit_ep_max_rounds{series} 8.0" in text
    assert f"consensusfit_ep_mean_change{series} 0.25" in text and f"consensusfit_ep_sd_change{series} 0.125" in text
    assert f"consensusfit_ep_converged{series} 0.0" in text
    assert f"consensusfit_shard_duration_seconds_sum{series} 38.0" in text  # every round's shard pods
    assert f"consensusfit_shard_retries_total{series} 0.0" in text  # a new round is no retry
    one_shot = Metrics()
    one_shot.record("default", "fvc", plan(make_fit(), {}, [], NOW, Config()), {}, [])
    assert "consensusfit_ep_round{" not in generate_latest(one_shot.registry).decode()


def test_the_operator_never_imports_jax_or_the_runner():
    """Of the runner, the operator imports only the jax-free names of the contract (runner/contract.py)."""
    code = ("import sys, consensusfit.operator.__main__, consensusfit.operator.handlers; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'numpy', 'numpyro') "
            "or m.startswith('consensusfit.runner')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['consensusfit.runner', 'consensusfit.runner.contract']"


def test_config_from_the_environment():
    config = Config.from_env({"CONSENSUSFIT_RESYNC_SECONDS": "2", "CONSENSUSFIT_WATCH_NAMESPACES": "a,b",
                              "CONSENSUSFIT_RUNNER_DEFAULTS": '{"envFrom": [{"secretRef": {"name": "s3"}}]}'})
    assert config.resync_seconds == 2.0 and config.namespaces == ("a", "b")
    assert config.runner_defaults == {"envFrom": [{"secretRef": {"name": "s3"}}]}
    assert Config.from_env({}).namespaces == ()
