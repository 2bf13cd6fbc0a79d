"""Metrics from planner passes, bounded labels, the operator's own health (against kmock), and the
operator's import boundary."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta

import kmock as kmocklib
import pytest
from cfit_support import COMBINE_REPORT, T0, ep_fit, job, make_fit, pod, round_report, shard_report, update_report
from prometheus_client import generate_latest
from test_operator_kmock import fit_posted, operator

from consensusfit.operator.children import STEPS
from consensusfit.operator.config import Config
from consensusfit.operator.kube import request_info
from consensusfit.operator.metrics import NO_ANSWER, Metrics
from consensusfit.operator.planner import plan

NOW = T0 + timedelta(minutes=10)
FIT = {"namespace": "default", "fit": "fvc"}


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


def test_shard_retries_never_fall_when_pods_are_deleted():
    """The counter is the planner's status.retries.total, carried from pass to pass in the status: a
    failed pod that is deleted (by a user, the pod garbage collector, a node going away) leaves it
    where it was, so increase() and rate() never read a reset."""
    metrics = Metrics()
    fit = make_fit(status={"phase": "Sampling", "startTime": "2026-01-01T00:01:00Z"})
    others = [pod("sample", k, phase="Running") for k in (1, 2)]
    passes = [  # shard 0's pods, and its Job's failed count as the Job controller keeps it
        ([pod("sample", 0, phase="Failed"), pod("sample", 0, phase="Running", attempt=1)], 1),  # retried
        ([pod("sample", 0, phase="Running", attempt=1)], 1),  # its failed pod deleted
        ([pod("sample", 0, phase="Failed", attempt=1), pod("sample", 0, phase="Running", attempt=2)], 2),
        ([pod("sample", 0, phase="Running", attempt=2)], 2),  # deleted again
    ]
    exported = []
    for shard_0, failed in passes:
        jobs = {"partition": job("partition", "Complete", succeeded=1), "sample": job("sample", active=3, failed=failed)}
        pods = shard_0 + others
        result = plan(fit, jobs, pods, NOW, Config())
        metrics.record("default", "fvc", result, jobs, pods)
        exported.append(metrics.registry.get_sample_value("consensusfit_shard_retries_total", FIT))
        fit = {**fit, "status": result.state}  # what the next pass reads back
    assert exported == [1, 1, 2, 2]


def test_operator_health_series():
    metrics = Metrics()
    with metrics.full_pass(3):
        metrics.api_request("patch", "consensusfits/status", 200, 0.01)
        metrics.api_request("patch", "consensusfits/status", 500, 0.02)
        metrics.api_request("list", "events", None, 5.0)
    sample = metrics.registry.get_sample_value
    assert sample("consensusfit_operator_queue_depth") == 3
    assert 0 <= sample("consensusfit_operator_pass_duration_seconds") < 60
    errors = "consensusfit_operator_api_errors_total"
    assert sample(errors, {"verb": "patch", "resource": "consensusfits/status", "code": "500"}) == 1
    assert sample(errors, {"verb": "list", "resource": "events", "code": NO_ANSWER}) == 1
    assert sample(errors, {"verb": "patch", "resource": "consensusfits/status", "code": "200"}) is None
    latency = "consensusfit_operator_api_request_duration_seconds"
    assert sample(f"{latency}_count", {"verb": "patch", "resource": "consensusfits/status"}) == 2
    assert sample(f"{latency}_bucket", {"verb": "list", "resource": "events", "le": "2.5"}) == 0


def test_request_info_names_verbs_and_resources_as_the_api_server_does():
    fits = "/apis/consensusfit.dev/v1alpha1/namespaces/ml/consensusfits"
    assert request_info("POST", "/apis/batch/v1/namespaces/ml/jobs") == ("create", "jobs")
    assert request_info("PATCH", "/apis/batch/v1/namespaces/ml/jobs/fvc-shards") == ("patch", "jobs")
    assert request_info("PATCH", f"{fits}/fvc/status") == ("patch", "consensusfits/status")
    assert request_info("DELETE", f"{fits}/fvc") == ("delete", "consensusfits")
    assert request_info("GET", f"{fits}/fvc") == ("get", "consensusfits")
    assert request_info("POST", "/api/v1/namespaces/ml/events") == ("create", "events")
    assert request_info("GET", "/api/v1/namespaces/ml/events?fieldSelector=reason%3DFailedCreate") == (
        "list", "events")
    assert request_info("GET", "/api/v1/namespaces/ml") == ("get", "namespaces")
    assert request_info("GET", "/apis/consensusfit.dev/v1alpha1/consensusfits") == ("list", "consensusfits")


@pytest.mark.asyncio
@pytest.mark.timeout(600)
async def test_api_errors_and_failed_passes_are_counted_against_the_api(kmock):
    """The API server refuses to list events (403, as for a role without it): once the partition Job
    exists without a pod, every pass of the fit raises where it looks for the Job controller's
    FailedCreate events. The real client's requests are counted by verb, resource and code; the
    failed passes by the loop."""
    kmock["get", kmocklib.resource("v1/events")] << 403 << {"kind": "Status", "code": 403, "reason": "Forbidden"}
    metrics = Metrics()
    sample = metrics.registry.get_sample_value
    async with fit_posted(kmock, make_fit()) as (url, cluster):
        async with operator(url, metrics):
            await cluster.job("fvc-partition")

            async def failed_twice():
                return (sample("consensusfit_operator_reconcile_errors_total") or 0) >= 2
            await cluster.wait(failed_twice)
    errors = "consensusfit_operator_api_errors_total"
    assert sample(errors, {"verb": "list", "resource": "events", "code": "403"}) >= 2
    # The writes went through (a create from a pass that ran before the watch showed the Job: 409).
    codes = {s.labels["code"] for f in metrics.registry.collect() for s in f.samples if s.name == errors}
    assert codes - {"409"} == {"403"}
    latency = "consensusfit_operator_api_request_duration_seconds_count"
    assert sample(latency, {"verb": "create", "resource": "jobs"}) >= 1
    assert sample(latency, {"verb": "patch", "resource": "consensusfits/status"}) >= 1
    assert sample(latency, {"verb": "list", "resource": "events"}) >= 2
    assert sample("consensusfit_operator_queue_depth") == 1
    assert sample("consensusfit_operator_resync_seconds") == 0.2
    assert sample("consensusfit_operator_reconcile_duration_seconds_count") >= 3
    health = [line for line in generate_latest(metrics.registry).decode().splitlines()
              if line.startswith("consensusfit_operator_")]
    assert health and not [line for line in health if "fit=" in line or "namespace=" in line]


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
