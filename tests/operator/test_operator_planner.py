"""The planner without Kubernetes: every phase transition, retries, suspension, deadline, TTL,
deletion and restart, as pure function calls on observed Jobs and pods."""

from __future__ import annotations

import copy
import dataclasses
import json
from datetime import timedelta

import pytest
from cfit_support import COMBINE_REPORT, GLOBALS_REPORT, T0, job, make_fit, pod, resample_report, shard_report

from consensusfit.operator import children, planner
from consensusfit.operator.config import Config, Policy
from consensusfit.operator.labels import SUSPENDED_BY_FIT
from consensusfit.operator.planner import Ledger, merge_patch, plan

CONFIG = Config(runner_image="runner:test")
NOW = T0 + timedelta(minutes=10)


def state_after(fit: dict, result: planner.Plan) -> dict:
    """The fit as the API server holds it once the plan's status patch is applied."""
    return {**fit, "status": result.state}


def reasons(result: planner.Plan) -> list[str]:
    return [event.reason for event in result.events]


def condition(result: planner.Plan, kind: str) -> dict:
    return next(c for c in result.state["conditions"] if c["type"] == kind)


def complete(*steps: str) -> dict:
    """These steps' Jobs, finished."""
    return {step: job(step, "Complete", succeeded=1) for step in steps}


def created(result: planner.Plan) -> list[str]:
    return [m["metadata"]["name"] for m in result.create]


def assert_indexed_one_pod_per_shard(manifest: dict, shards: int = 3) -> None:
    """What the runner contract asks of a per-shard Job: a shard's bad input fails it at once."""
    spec = manifest["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == shards
    assert spec["backoffLimitPerIndex"] == 3 and spec["maxFailedIndexes"] == 0
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0]["action"] == "FailIndex" and rules[0]["onExitCodes"]["values"] == [2, 3]
    assert rules[1] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}


COMBINING = {"phase": "Combining", "startTime": "2026-01-01T00:01:00Z"}
NO_RETRIES = {"total": 0, "steps": {}}


# -- Pending -> Partitioning -> Sampling -> Combining (globals, resample, combine) -> Succeeded ------

def test_new_fit_creates_the_partition_job_and_starts():
    result = plan(make_fit(), {}, [], NOW, CONFIG)
    assert [m["metadata"]["name"] for m in result.create] == ["fvc-partition"]
    assert result.status["phase"] == "Partitioning"
    assert result.status["startTime"] == "2026-01-01T00:10:00Z"
    assert result.status["observedGeneration"] == 1
    assert result.status["shards"] == {"total": 3, "active": 0, "succeeded": 0, "failed": 0}
    assert reasons(result) == ["Partitioning"]
    assert result.exited == (("Pending", 600.0),)


def test_partition_job_running_changes_nothing():
    fit = state_after(make_fit(), plan(make_fit(), {}, [], NOW, CONFIG))
    result = plan(fit, {"partition": job("partition", active=1)}, [pod("partition", phase="Running")], NOW, CONFIG)
    assert result.create == () and result.status == {} and result.events == ()


def test_partition_done_creates_the_indexed_shard_job():
    fit = make_fit(status={"phase": "Partitioning", "startTime": "2026-01-01T00:01:00Z"})
    partition_pod = pod("partition", report={"ok": True, "rows": 1549, "groups": 176})
    result = plan(fit, {"partition": job("partition", "Complete")}, [partition_pod], NOW, CONFIG)
    (shards,) = result.create
    assert shards["metadata"]["name"] == "fvc-shards"
    assert_indexed_one_pod_per_shard(shards)
    assert result.status["phase"] == "Sampling"
    partitioned = condition(result, "Partitioned")
    assert partitioned["status"] == "True" and "1549 rows in 176 groups" in partitioned["message"]
    assert reasons(result) == ["Sampling"]
    assert result.exited == (("Partitioning", 540.0),)


def test_sampling_reports_counts_and_worst_case_diagnostics():
    fit = make_fit(status={"phase": "Sampling", "startTime": "2026-01-01T00:01:00Z"})
    jobs = {"partition": job("partition", "Complete"), "sample": job("sample", active=1, succeeded=2)}
    pods = [
        pod("sample", 0, report=shard_report(0, rhat=1.002, ess=800, divergences=1, seconds=40)),
        pod("sample", 1, report=shard_report(1, rhat=1.010, ess=500, divergences=2, seconds=70)),
        pod("sample", 2, phase="Running"),
    ]
    result = plan(fit, jobs, pods, NOW, CONFIG)
    assert result.create == ()
    assert result.state["phase"] == "Sampling"
    assert result.state["shards"] == {"total": 3, "active": 1, "succeeded": 2, "failed": 0}
    assert result.state["diagnostics"] == {
        "rhatMax": 1.010, "essBulkMin": 500, "divergences": 3, "slowestShardSeconds": 70,
        "step": "sample", "indexes": "0-1"}


@pytest.mark.parametrize("first_done", [0, 1])
def test_worst_case_diagnostics_leave_out_nulls_whatever_the_order_of_finishing(first_done):
    """A shard whose R-hat is not a number (null, or NaN from an older runner's message, which
    parse_report turns into null) does not hide the other's, and the status is strict JSON."""
    from consensusfit.operator.observe import parse_report

    fit = make_fit(status={"phase": "Sampling", "startTime": "2026-01-01T00:01:00Z"})
    jobs = {"partition": job("partition", "Complete"), "sample": job("sample", active=1, succeeded=2)}
    nan_report = parse_report('{"ok": true, "shard": 0, "rhatMax": NaN, "essBulkMin": NaN, '
                              '"divergences": 0, "seconds": 30}')
    assert nan_report["rhatMax"] is None
    reports = [nan_report, shard_report(1, rhat=1.02, ess=450, seconds=50)]
    pods = [pod("sample", k, report=reports[k], seconds=10 if k == first_done else 20) for k in (0, 1)]
    pods.append(pod("sample", 2, phase="Running"))
    result = plan(fit, jobs, pods, NOW, CONFIG)
    assert result.state["diagnostics"] == {
        "rhatMax": 1.02, "essBulkMin": 450, "divergences": 0, "slowestShardSeconds": 50,
        "step": "sample", "indexes": "0-1"}
    json.dumps(result.state, allow_nan=False)


def test_shards_done_creates_the_globals_job_and_starts_combining():
    fit = make_fit(status={"phase": "Sampling", "startTime": "2026-01-01T00:01:00Z"})
    jobs = {"partition": job("partition", "Complete"), "sample": job("sample", "Complete", succeeded=3)}
    result = plan(fit, jobs, [], NOW, CONFIG)
    (globals_job,) = result.create
    assert globals_job["metadata"]["name"] == "fvc-globals"
    assert globals_job["spec"]["completions"] == 1 and "completionMode" not in globals_job["spec"]
    assert globals_job["spec"]["template"]["spec"]["containers"][0]["command"][-2:] == ["--stage", "globals"]
    assert result.status["phase"] == "Combining"
    assert condition(result, "Sampled")["status"] == "True"
    assert [(e.reason, e.message) for e in result.events] == [("Combining", "Combining: Job fvc-globals")]
    assert result.state["resample"] == {"total": 3, "active": 0, "succeeded": 0, "failed": 0}


def test_globals_done_creates_the_indexed_resample_job():
    fit = make_fit(status=COMBINING)
    result = plan(fit, complete("partition", "sample", "globals"), [pod("globals", report=GLOBALS_REPORT)], NOW, CONFIG)
    (resample,) = result.create
    assert resample["metadata"]["name"] == "fvc-resample"
    assert resample["metadata"]["labels"]["consensusfit.dev/step"] == "resample"
    assert_indexed_one_pod_per_shard(resample)
    assert resample["spec"]["template"]["spec"]["containers"][0]["command"][1] == "resample"
    assert result.state["phase"] == "Combining" and reasons(result) == []  # still the same phase
    assert condition(result, "GlobalsCombined")["message"] == (
        "4000 combined draws of the global parameters (1 warnings)")


def test_resampling_reports_its_progress_in_the_status():
    fit = make_fit(status=COMBINING)
    jobs = {**complete("partition", "sample", "globals"), "resample": job("resample", active=1, succeeded=2)}
    pods = [pod("resample", 0, report=resample_report(0)), pod("resample", 1, report=resample_report(1)),
            pod("resample", 2, phase="Running")]
    result = plan(fit, jobs, pods, NOW, CONFIG)
    assert result.create == () and result.state["phase"] == "Combining"
    assert result.state["resample"] == {"total": 3, "active": 1, "succeeded": 2, "failed": 0}


def test_resampling_done_creates_the_finishing_combine_job():
    fit = make_fit(status=COMBINING)
    jobs = {**complete("partition", "sample", "globals"), "resample": job("resample", "Complete", succeeded=3)}
    result = plan(fit, jobs, [], NOW, CONFIG)
    (combine,) = result.create
    assert combine["metadata"]["name"] == "fvc-combine"
    assert combine["spec"]["template"]["spec"]["containers"][0]["command"][-2:] == ["--stage", "finish"]
    assert condition(result, "GroupsResampled")["reason"] == "ResampleSucceeded"
    assert result.state["resample"]["succeeded"] == 3


def test_a_fit_that_keeps_its_group_draws_skips_the_resample_job():
    fit = make_fit(status=COMBINING, combine={"method": "consensus", "groupParameters": "keep"})
    result = plan(fit, complete("partition", "sample", "globals"), [], NOW, CONFIG)
    assert created(result) == ["fvc-combine"]
    assert "resample" not in result.state
    assert not [c for c in result.state["conditions"] if c["type"] == "GroupsResampled"]
    done = plan(state_after(fit, result), complete("partition", "sample", "globals", "combine"),
                [pod("combine", report=COMBINE_REPORT)], NOW, CONFIG)
    assert done.state["phase"] == "Succeeded" and done.create == ()


def test_combine_done_succeeds_with_the_result():
    fit = make_fit(status=COMBINING)
    jobs = complete(*children.STEPS)
    result = plan(fit, jobs, [pod("combine", report=COMBINE_REPORT)], NOW, CONFIG)
    assert result.create == ()
    assert result.status["phase"] == "Succeeded"
    assert result.status["completionTime"] == "2026-01-01T00:10:00Z"
    assert result.status["result"] == {"uri": COMBINE_REPORT["uri"], "parameters": COMBINE_REPORT["parameters"]}
    assert condition(result, "Succeeded")["reason"] == "CombineSucceeded"
    assert reasons(result) == ["Succeeded"]
    assert [phase for phase, _ in result.exited] == ["Combining"]


DONE_PODS = {
    "partition": [pod("partition", report={"ok": True, "rows": 10, "groups": 2})],
    "sample": [pod("sample", k, report=shard_report(k)) for k in range(3)],
    "globals": [pod("globals", report=GLOBALS_REPORT)],
    "resample": [pod("resample", k, report=resample_report(k)) for k in range(3)],
    "combine": [pod("combine", report=COMBINE_REPORT)],
}


@pytest.mark.parametrize("group_parameters, steps", [
    ("resample", ["partition", "sample", "globals", "resample", "combine"]),
    ("keep", ["partition", "sample", "globals", "combine"]),
])
def test_whole_fit_walked_pass_by_pass_reaches_succeeded_once(group_parameters, steps):
    fit, jobs, pods = make_fit(combine={"method": "consensus", "groupParameters": group_parameters}), {}, []
    seen_phases = []
    for step in steps:
        result = plan(fit, jobs, pods, NOW, CONFIG)
        fit = state_after(fit, result)
        seen_phases.append(fit["status"]["phase"])
        assert [m["metadata"]["labels"]["consensusfit.dev/step"] for m in result.create] == [step]
        assert created(result) == [children.job_name("fvc", step)]
        jobs = {**jobs, step: job(step, "Complete", succeeded=len(DONE_PODS[step]))}
        pods = [*pods, *DONE_PODS[step]]
    result = plan(fit, jobs, pods, NOW, CONFIG)
    fit = state_after(fit, result)
    combining = ["Combining"] * (len(steps) - 2)
    assert seen_phases + [fit["status"]["phase"]] == ["Partitioning", "Sampling", *combining, "Succeeded"]
    assert [c["type"] for c in fit["status"]["conditions"]] == [
        {"partition": "Partitioned", "sample": "Sampled", "globals": "GlobalsCombined",
         "resample": "GroupsResampled", "combine": "Succeeded"}[step] for step in steps]
    assert ("resample" in fit["status"]) == (group_parameters == "resample")
    again = plan(fit, jobs, pods, NOW + timedelta(hours=1), CONFIG, result.seen)
    assert again.status == {} and again.create == () and not again.delete_fit
    # The next pass deletes the Jobs (spec.cleanupPolicy.onSuccess defaults to Delete), nothing else.
    assert again.delete_jobs == tuple(sorted(children.job_name("fvc", step) for step in steps))
    assert reasons(again) == ["JobsDeleted"]


# -- failures and retries ----------------------------------------------------------------------------

def test_partition_failure_fails_the_fit_with_the_runner_reason():
    fit = make_fit(status={"phase": "Partitioning", "startTime": "2026-01-01T00:01:00Z"})
    bad = pod("partition", phase="Failed", exit_code=3,
              report={"ok": False, "reason": "BadInput", "message": "column Patient is missing"})
    result = plan(fit, {"partition": job("partition", "Failed", reason="PodFailurePolicy")}, [bad], NOW, CONFIG)
    assert result.status["phase"] == "Failed"
    failed = condition(result, "Failed")
    assert failed["reason"] == "PartitionFailed"
    assert "BadInput: column Patient is missing (exit 3)" in failed["message"]
    assert "PodFailurePolicy" in failed["message"]
    assert result.status["completionTime"] == "2026-01-01T00:10:00Z"
    assert "PartitionFailed" in reasons(result)


def test_bad_input_on_one_shard_fails_the_fit_naming_the_shard():
    fit = make_fit(status={"phase": "Sampling", "startTime": "2026-01-01T00:01:00Z"})
    jobs = {"partition": job("partition", "Complete"),
            "sample": job("sample", "Failed", succeeded=2, failed_indexes=1, reason="FailedIndexes")}
    bad = pod("sample", 2, phase="Failed", exit_code=3,
              report={"ok": False, "reason": "BadInput", "message": "empty shard"})
    result = plan(fit, jobs, [pod("sample", 0, report=shard_report(0)), bad], NOW, CONFIG)
    assert result.status["phase"] == "Failed"
    assert condition(result, "Failed")["reason"] == "ShardFailed"
    assert condition(result, "Failed")["message"].startswith("shard 2 (pod ")
    assert result.state["shards"]["failed"] == 1
    assert result.create == ()


@pytest.mark.parametrize("step", ["globals", "combine"])
def test_combine_failure_fails_the_fit(step):
    fit = make_fit(status=COMBINING)
    done = children.STEPS[: children.STEPS.index(step)]
    jobs = {**complete(*done), step: job(step, "Failed", reason="BackoffLimitExceeded")}
    result = plan(fit, jobs, [], NOW, CONFIG)
    assert condition(result, "Failed")["reason"] == "CombineFailed"
    assert f"Job fvc-{step} failed (BackoffLimitExceeded)" in condition(result, "Failed")["message"]
    assert result.create == ()


def test_bad_input_on_one_resample_index_fails_the_fit_naming_the_shard():
    fit = make_fit(status=COMBINING)
    jobs = {**complete("partition", "sample", "globals"),
            "resample": job("resample", "Failed", succeeded=1, failed_indexes=1, reason="FailedIndexes")}
    bad = pod("resample", 1, phase="Failed", exit_code=3,
              report={"ok": False, "reason": "BadInput", "message": "shard 1 (s3://x/): column g is missing"})
    result = plan(fit, jobs, [pod("resample", 0, report=resample_report(0)), bad], NOW, CONFIG)
    assert result.state["phase"] == "Failed"
    failed = condition(result, "Failed")
    assert failed["reason"] == "ResampleFailed"
    assert failed["message"].startswith("shard 1 (pod fvc-resample-1-0): BadInput: shard 1 (s3://x/): column g")
    assert "Job fvc-resample failed (FailedIndexes)" in failed["message"]
    assert result.state["resample"]["failed"] == 1 and result.create == () and result.patch_jobs == ()


def test_a_failed_shard_pod_is_reported_once_and_the_fit_keeps_sampling():
    fit = make_fit(status={"phase": "Sampling", "startTime": "2026-01-01T00:01:00Z"})
    jobs = {"partition": job("partition", "Complete"), "sample": job("sample", active=3)}
    crashed = pod("sample", 1, phase="Failed", exit_code=1,
                  report={"ok": False, "reason": "Error", "message": "storage unreachable"})
    pods = [crashed, pod("sample", 1, phase="Running", attempt=1)]
    first = plan(fit, jobs, pods, NOW, CONFIG)
    assert first.state["phase"] == "Sampling" and first.create == ()
    assert reasons(first) == ["PodFailed"]
    assert "shard 1" in first.events[0].message and "storage unreachable" in first.events[0].message
    assert first.finished == (crashed,)
    second = plan(state_after(fit, first), jobs, pods, NOW, CONFIG, first.seen)
    assert second.events == () and second.finished == () and second.status == {}


def test_a_disrupted_pod_is_reported_as_disruption_not_failure():
    fit = make_fit(status={"phase": "Sampling", "startTime": "2026-01-01T00:01:00Z"})
    jobs = {"partition": job("partition", "Complete"), "sample": job("sample", active=3)}
    evicted = pod("sample", 0, phase="Failed", exit_code=137, disrupted=True)
    result = plan(fit, jobs, [evicted], NOW, CONFIG)
    assert reasons(result) == ["PodDisrupted"]


def test_log_tail_instead_of_report_still_explains_the_failure():
    from consensusfit.operator.observe import parse_report
    assert parse_report("Traceback...\nMemoryError: out of memory\n") == {
        "ok": False, "reason": "Error", "message": "MemoryError: out of memory"}
    assert parse_report(json.dumps(shard_report(4)))["shard"] == 4
    assert parse_report("") is None


# -- suspension -----------------------------------------------------------------------------------------

def test_a_fit_suspended_from_the_start_creates_nothing():
    result = plan(make_fit(suspend=True), {}, [], NOW, CONFIG)
    assert result.create == ()
    assert result.state["phase"] == "Pending"
    assert condition(result, "Suspended")["status"] == "True"
    assert "startTime" not in result.state
    assert reasons(result) == ["Suspended"]


def test_suspending_a_running_fit_suspends_its_unfinished_jobs():
    fit = make_fit(suspend=True, status={"phase": "Sampling", "startTime": "2026-01-01T00:01:00Z"})
    jobs = {"partition": job("partition", "Complete"), "sample": job("sample", active=3)}
    result = plan(fit, jobs, [], NOW, CONFIG)
    assert result.patch_jobs == (
        ("fvc-shards", {"metadata": {"annotations": {SUSPENDED_BY_FIT: "true"}}, "spec": {"suspend": True}}),)
    assert result.state["phase"] == "Sampling"
    # Once the Job is suspended, nothing more to do.
    jobs["sample"] = job("sample", suspended=True, by_fit=True)
    again = plan(state_after(fit, result), jobs, [], NOW, CONFIG)
    assert again.patch_jobs == () and again.status == {"shards": {"active": 0}}  # its pods are gone


def test_resuming_lifts_only_our_suspension_and_restarts_the_deadline_clock():
    status = {"phase": "Sampling", "startTime": "2026-01-01T00:01:00Z",
              "conditions": [{"type": "Suspended", "status": "True", "reason": "Suspended", "message": "",
                              "lastTransitionTime": "2026-01-01T00:02:00Z"}]}
    fit = make_fit(status=status, activeDeadlineSeconds=300)
    ours = job("sample", suspended=True, by_fit=True)
    result = plan(fit, {"partition": job("partition", "Complete"), "sample": ours}, [], NOW, CONFIG)
    assert result.patch_jobs == (
        ("fvc-shards", {"metadata": {"annotations": {SUSPENDED_BY_FIT: None}}, "spec": {"suspend": False}}),)
    assert condition(result, "Suspended")["status"] == "False"
    assert result.state["startTime"] == "2026-01-01T00:10:00Z"  # not failed by the deadline
    assert result.state["phase"] == "Sampling"
    kueues = job("sample", suspended=True, by_fit=False)  # held by a queue: not ours to release
    result = plan(fit, {"partition": job("partition", "Complete"), "sample": kueues}, [], NOW, CONFIG)
    assert result.patch_jobs == ()


def test_a_suspended_fit_does_not_start_its_next_step():
    fit = make_fit(suspend=True, status={"phase": "Partitioning", "startTime": "2026-01-01T00:01:00Z"})
    result = plan(fit, {"partition": job("partition", "Complete")}, [], NOW, CONFIG)
    assert result.create == ()
    assert result.state["phase"] == "Sampling"


# -- deadline, TTL, deletion -------------------------------------------------------------------------------

def test_deadline_fails_the_fit_and_stops_its_running_job():
    partitioned = {"type": "Partitioned", "status": "True", "reason": "PartitionSucceeded", "message": "",
                   "lastTransitionTime": "2026-01-01T00:02:00Z"}
    fit = make_fit(activeDeadlineSeconds=60, status={"phase": "Sampling", "startTime": "2026-01-01T00:01:00Z",
                                                     "conditions": [partitioned]})
    jobs = {"partition": job("partition", "Complete"), "sample": job("sample", active=3)}
    result = plan(fit, jobs, [], NOW, CONFIG)
    assert result.state["phase"] == "Failed"
    assert condition(result, "Failed")["reason"] == "DeadlineExceeded"
    assert result.patch_jobs == (
        ("fvc-shards", {"metadata": {"annotations": {SUSPENDED_BY_FIT: "true"}}, "spec": {"suspend": True}}),)
    assert result.exited == (("Sampling", 480.0),)


def test_deadline_does_not_run_while_suspended():
    fit = make_fit(activeDeadlineSeconds=60, suspend=True,
                   status={"phase": "Sampling", "startTime": "2026-01-01T00:01:00Z"})
    result = plan(fit, {"partition": job("partition", "Complete"), "sample": job("sample", suspended=True)},
                  [], NOW, CONFIG)
    assert result.state["phase"] == "Sampling"


@pytest.mark.parametrize("phase", ["Succeeded", "Failed"])
def test_ttl_deletes_the_fit_only_after_it_passed(phase):
    status = {"phase": phase, "completionTime": "2026-01-01T00:05:00Z"}
    fit = make_fit(ttlSecondsAfterFinished=600, status=status)
    assert not plan(fit, {}, [], T0 + timedelta(minutes=14), CONFIG).delete_fit
    assert plan(fit, {}, [], T0 + timedelta(minutes=15), CONFIG).delete_fit
    assert not plan(make_fit(status=status), {}, [], T0 + timedelta(days=300), CONFIG).delete_fit


def test_jobs_are_owned_by_the_fit_so_deleting_it_deletes_them_and_nothing_else():
    (manifest,) = plan(make_fit(), {}, [], NOW, CONFIG).create
    assert manifest["metadata"]["ownerReferences"] == [{
        "apiVersion": "consensusfit.dev/v1alpha1", "kind": "ConsensusFit", "name": "fvc", "uid": "uid-fvc",
        "controller": True, "blockOwnerDeletion": True}]
    # The planner never deletes a Job or anything in the object store; only an expired fit itself.
    assert set(planner.Plan.__dataclass_fields__) >= {"create", "patch_jobs", "delete_fit"}


def test_a_failed_fit_suspends_leftover_jobs_and_otherwise_stays_put():
    fit = make_fit(status={"phase": "Failed", "completionTime": "2026-01-01T00:05:00Z"})
    result = plan(fit, {"partition": job("partition", "Complete"), "sample": job("sample", active=2)}, [], NOW, CONFIG)
    assert [name for name, _ in result.patch_jobs] == ["fvc-shards"]
    assert result.create == () and result.events == () and "phase" not in result.status


# -- restart safety and idempotence ---------------------------------------------------------------------

def test_restart_mid_sampling_continues_without_creating_anything():
    fit = make_fit(status={"phase": "Sampling", "startTime": "2026-01-01T00:01:00Z",
                           "observedGeneration": 1,
                           "shards": {"total": 3, "active": 3, "succeeded": 0, "failed": 0},
                           "resample": {"total": 3, "active": 0, "succeeded": 0, "failed": 0},
                           "retries": NO_RETRIES})
    jobs = {"partition": job("partition", "Complete"), "sample": job("sample", active=3)}
    result = plan(fit, jobs, [], NOW, CONFIG, Ledger())
    assert result.create == () and result.patch_jobs == ()
    assert [e.reason for e in result.events] == []
    assert result.status.keys() <= {"conditions"}  # only the Partitioned condition is filled in


def test_restart_mid_resampling_continues_without_creating_anything():
    fit = make_fit(status={**COMBINING, "observedGeneration": 1,
                           "shards": {"total": 3, "active": 0, "succeeded": 3, "failed": 0},
                           "resample": {"total": 3, "active": 3, "succeeded": 0, "failed": 0},
                           "retries": NO_RETRIES})
    jobs = {**complete("partition", "globals"), "sample": job("sample", "Complete", succeeded=3),
            "resample": job("resample", active=3)}
    result = plan(fit, jobs, [pod("resample", k, phase="Running") for k in range(3)], NOW, CONFIG, Ledger())
    assert result.create == () and result.patch_jobs == () and result.events == ()
    assert result.state["phase"] == "Combining"
    assert result.status.keys() <= {"conditions"}  # only the finished steps' conditions are filled in


def test_restart_after_everything_finished_while_down_goes_straight_to_succeeded():
    fit = make_fit(status={"phase": "Partitioning", "startTime": "2026-01-01T00:01:00Z"})
    jobs = complete(*children.STEPS)
    result = plan(fit, jobs, [pod("combine", report=COMBINE_REPORT)], NOW, CONFIG)
    assert result.create == ()
    assert result.state["phase"] == "Succeeded"
    assert [phase for phase, _ in result.exited] == ["Partitioning", "Sampling", "Combining"]


def test_a_stale_view_repeats_the_same_create_with_the_same_name():
    fit = make_fit()
    first = plan(fit, {}, [], NOW, CONFIG)
    stale = plan(state_after(fit, first), {}, [], NOW + timedelta(seconds=5), CONFIG)
    assert first.create == stale.create  # the second create is a 409 for the applier
    assert stale.events == () and "startTime" not in stale.status


def test_a_job_deleted_by_hand_is_recreated_without_rewinding_the_phase():
    fit = make_fit(status={"phase": "Combining", "startTime": "2026-01-01T00:01:00Z"})
    result = plan(fit, {"partition": job("partition", "Complete")}, [], NOW, CONFIG)
    assert [m["metadata"]["name"] for m in result.create] == ["fvc-shards"]
    assert result.state["phase"] == "Combining"


def test_spec_generation_is_observed():
    fit = make_fit(status={"phase": "Sampling", "observedGeneration": 1, "startTime": "2026-01-01T00:01:00Z"})
    fit["metadata"]["generation"] = 2
    result = plan(fit, {"partition": job("partition", "Complete"), "sample": job("sample", active=1)}, [], NOW, CONFIG)
    assert result.status["observedGeneration"] == 2


def test_merge_patch_sets_changes_and_nulls_removals():
    assert merge_patch({"a": 1, "b": {"c": 1, "d": 2}}, {"a": 1, "b": {"c": 2}}) == {"b": {"c": 2, "d": None}}
    assert merge_patch({"a": [1]}, {"a": [1]}) == {}


def test_shard_counts_are_in_shards_when_pods_take_several():
    """10 shards, 4 per pod: pods 0 and 2 done (4 + 2 shards), pod 1 running (4 shards)."""
    fit = make_fit(shards=10, runner={"shardsPerPod": 4},
                   status={"phase": "Sampling", "startTime": "2026-01-01T00:01:00Z"})
    sample = planner.JobView(**{**job("sample", active=1).__dict__, "completed_indexes": (0, 2)})
    result = plan(fit, {**complete("partition"), "sample": sample}, [], NOW, CONFIG)
    assert result.state["shards"] == {"total": 10, "active": 4, "succeeded": 6, "failed": 0}
    failed = planner.JobView(**{**sample.__dict__, "active": 0, "failed_indexes": (1,)})
    assert planner.shard_counts(10, failed, 4) == {"total": 10, "active": 0, "succeeded": 6, "failed": 4}


# -- each policy alone ------------------------------------------------------------------------------------

SUSPENDED = {"type": "Suspended", "status": "True", "reason": "Suspended", "message": "",
             "lastTransitionTime": "2026-01-01T00:02:00Z"}
SUSPEND, RESUME = planner._suspend_patch(True), planner._suspend_patch(False)


def test_suspension_suspends_only_running_jobs_and_says_so_once():
    running, held = job("sample", active=3), job("resample", suspended=True)
    first = planner._suspension({"suspend": True}, [running, held], [], NOW)
    assert first.patches == (("fvc-shards", SUSPEND),)
    assert [c["type"] for c in first.conditions] == ["Suspended"] and not first.resumed
    assert [e.reason for e in first.events] == ["Suspended"]
    again = planner._suspension({"suspend": True}, [running], first.conditions, NOW)
    assert again.patches == (("fvc-shards", SUSPEND),) and again.events == ()
    assert again.conditions is first.conditions


def test_suspension_resumes_only_what_the_fit_suspended():
    ours, kueues = job("sample", suspended=True, by_fit=True), job("resample", suspended=True, by_fit=False)
    result = planner._suspension({"suspend": False}, [ours, kueues], [SUSPENDED], NOW)
    assert result.patches == (("fvc-shards", RESUME),)
    assert result.resumed and [e.reason for e in result.events] == ["Resumed"]
    assert result.conditions[0]["status"] == "False" and result.conditions[0]["reason"] == "Resumed"


def test_suspension_of_a_fit_never_suspended_is_nothing():
    result = planner._suspension({"suspend": False}, [job("sample", active=1)], [], NOW)
    assert result == planner.Suspension(patches=(), conditions=[])


@pytest.mark.parametrize("spec, start, failed", [
    ({}, T0, False),  # no deadline
    ({"activeDeadlineSeconds": 60}, None, False),  # not started
    ({"activeDeadlineSeconds": 600}, T0, False),  # exactly at the deadline: not past it
    ({"activeDeadlineSeconds": 599}, T0, True),
    ({"activeDeadlineSeconds": 60, "suspend": True}, T0, False),  # the clock stops while suspended
])
def test_deadline_counts_from_the_start_and_not_while_suspended(spec, start, failed):
    failure = planner._deadline(spec, start, 0.0, NOW)
    assert (failure is not None) == failed
    if failed:
        assert failure == planner.Failure("DeadlineExceeded", "the fit ran longer than activeDeadlineSeconds=599")


# Two made-up steps that repeat (as EP rounds would): the walk knows nothing of particular steps.
ROUND_STEPS = tuple(
    planner.Step(f"round-{r}", "Combining", "RoundDone", "RoundSucceeded", "RoundFailed", f"round {r}: {{shards}}")
    for r in range(2))


def round_job(r: int, *args, **kwargs) -> planner.JobView:
    """A Job of a made-up round step (children names only the real steps' Jobs)."""
    return dataclasses.replace(job("sample", *args, **kwargs), name=f"fvc-round-{r}", step=f"round-{r}")


def test_advance_walks_any_sequence_of_steps_and_stops_at_the_running_one():
    fit = make_fit()
    jobs = {"round-0": round_job(0, "Complete"), "round-1": round_job(1, active=1)}
    progress = planner._advance(fit, ROUND_STEPS, jobs, [], "Sampling", [], NOW)
    assert progress.at == ROUND_STEPS[1] and not progress.create and not progress.done
    assert progress.reached == "Combining" and progress.failure is None
    assert [(c["type"], c["message"]) for c in progress.conditions] == [("RoundDone", "round 0: 3")]


def test_advance_asks_for_the_first_missing_job_unless_suspended():
    progress = planner._advance(make_fit(), ROUND_STEPS, {"round-0": round_job(0, "Complete")}, [],
                                "Sampling", [], NOW)
    assert progress.at == ROUND_STEPS[1] and progress.create
    suspended = planner._advance(make_fit(suspend=True), ROUND_STEPS, {}, [], "Pending", [], NOW)
    assert suspended.at == ROUND_STEPS[0] and not suspended.create
    assert suspended.reached == "Pending"  # nothing started: a suspended fit is still Pending


def test_advance_reports_a_failed_job_with_its_steps_reason():
    jobs = {"round-0": round_job(0, "Failed", reason="BackoffLimitExceeded")}
    progress = planner._advance(make_fit(), ROUND_STEPS, jobs, [], "Combining", [], NOW)
    assert progress.at == ROUND_STEPS[0] and progress.failure.reason == "RoundFailed"
    assert "BackoffLimitExceeded" in progress.failure.message and progress.conditions == []


def test_advance_is_done_when_every_job_completed_and_never_goes_back():
    jobs = {f"round-{r}": round_job(r, "Complete") for r in range(2)}
    progress = planner._advance(make_fit(), ROUND_STEPS, jobs, [], "Combining", [], NOW)
    assert progress.done and progress.at is None and progress.reached == "Combining"
    rewound = planner._advance(make_fit(), planner.sequence(make_fit()), {}, [], "Combining", [], NOW)
    assert rewound.at.name == "partition" and rewound.create and rewound.reached == "Combining"


def test_conclude_fails_succeeds_or_moves_to_the_phase_reached():
    step = planner.sequence(make_fit())[1]
    failed = planner._conclude("fvc", "Sampling", planner.Progress(
        "Sampling", [], step, failure=planner.Failure("ShardFailed", "shard 1 failed")), NOW)
    assert failed.phase == "Failed" and [c["reason"] for c in failed.conditions] == ["ShardFailed"]
    assert failed.events == (planner.Event("Warning", "ShardFailed", "shard 1 failed"),)
    succeeded_condition = {"type": "Succeeded", "status": "True", "message": "combined into s3://x/"}
    done = planner._conclude("fvc", "Combining", planner.Progress("Combining", [succeeded_condition], done=True), NOW)
    assert done.phase == "Succeeded" and done.events == (planner.Event("Normal", "Succeeded", "combined into s3://x/"),)
    moved = planner._conclude("fvc", "Partitioning", planner.Progress("Sampling", [], step, create=True), NOW)
    assert moved.phase == "Sampling" and moved.events == (planner.Event("Normal", "Sampling", "Sampling: Job fvc-shards"),)
    stayed = planner._conclude("fvc", "Sampling", planner.Progress("Sampling", [], step), NOW)
    assert stayed == planner.Conclusion("Sampling", [])


@pytest.mark.parametrize("spec, status, expired", [
    ({"ttlSecondsAfterFinished": 300}, {"completionTime": "2026-01-01T00:05:00Z"}, True),  # exactly due
    ({"ttlSecondsAfterFinished": 301}, {"completionTime": "2026-01-01T00:05:00Z"}, False),
    ({}, {"completionTime": "2026-01-01T00:05:00Z"}, False),  # no TTL: kept forever
    ({"ttlSecondsAfterFinished": 0}, {}, False),  # not finished
])
def test_ttl_expires_a_finished_fit_once_due(spec, status, expired):
    assert planner._ttl(spec, status, NOW) is expired


def test_stop_suspends_only_what_still_runs():
    assert planner._stop([job("sample", active=2), job("resample", suspended=True)]) == (("fvc-shards", SUSPEND),)


def test_observed_status_is_recomputed_from_the_jobs_and_pods():
    fit = make_fit(combine={"method": "consensus", "groupParameters": "keep"})
    old = {"diagnostics": {"rhatMax": 1.1}}
    observed = planner._observed(fit, planner.sequence(fit), {"sample": job("sample", active=3)}, [], old)
    assert observed == {"observedGeneration": 1, "shards": {"total": 3, "active": 3, "succeeded": 0, "failed": 0},
                        "resample": None, "rounds": None, "diagnostics": {"rhatMax": 1.1}, "retries": NO_RETRIES}


@pytest.mark.parametrize("group_parameters, names", [
    ("resample", list(children.STEPS)),
    ("keep", ["partition", "sample", "globals", "combine"]),
])
def test_sequence_is_the_fits_steps_as_data_in_phase_order(group_parameters, names):
    steps = planner.sequence(make_fit(combine={"method": "consensus", "groupParameters": group_parameters}))
    assert [step.name for step in steps] == names
    order = [planner.RUNNING_PHASES.index(step.phase) for step in steps]
    assert order == sorted(order) and steps[-1].condition == "Succeeded"


# -- whose children, what blocks them, what the admin allows ----------------------------------------

def test_children_are_matched_by_owner_uid_not_by_name():
    """Jobs of an old fit of the same name (orphaned, or owned by its uid while the garbage collector
    lags) and their pods are set apart, never read as this fit's."""
    ours, old, orphan = job("partition", "Complete"), job("sample", "Complete", owner="uid-old"), job("globals", owner=None)
    mine, theirs = pod("partition", report={"ok": True, "rows": 1, "groups": 1}), pod("sample", 0, report=shard_report(0))
    found = planner.children_of(make_fit(), [ours, old, orphan], [mine, theirs])
    assert found == planner.Children({"partition": ours}, (mine,), (old, orphan))


def test_a_foreign_job_holding_the_next_jobs_name_blocks_the_fit_and_is_reported_once():
    fit = make_fit(status={"phase": "Partitioning", "startTime": "2026-01-01T00:01:00Z"})
    old = job("sample", "Complete", owner="uid-old")
    first = plan(fit, complete("partition"), [], NOW, CONFIG, obstacles=planner.Obstacles(foreign=(old,)))
    assert first.create == ()  # its create would only conflict
    blocked = condition(first, "Blocked")
    assert (blocked["status"], blocked["reason"]) == ("True", "JobNameTaken")
    assert "Job fvc-shards is owned by another ConsensusFit (uid uid-old)" in blocked["message"]
    assert reasons(first) == ["ForeignJob", "JobNameTaken", "Sampling"]
    again = plan(state_after(fit, first), complete("partition"), [], NOW, CONFIG, first.seen,
                 planner.Obstacles(foreign=(old,)))
    assert again.events == () and again.status == {}


def test_a_foreign_job_of_another_name_is_only_reported():
    fit = make_fit(status={"phase": "Sampling", "startTime": "2026-01-01T00:01:00Z"})
    stray = dataclasses.replace(job("sample", owner=None), name="fvc-shards-old")
    result = plan(fit, {**complete("partition"), "sample": job("sample", active=3)}, [], NOW, CONFIG,
                  obstacles=planner.Obstacles(foreign=(stray,)))
    assert reasons(result) == ["ForeignJob"] and "orphaned" in result.events[0].message
    assert "Blocked" not in {c["type"] for c in result.state["conditions"]}


BLOCKING = [
    ([pod("sample", 0, phase="Pending", waiting=("CreateContainerConfigError", 'secret "s3-credentials" not found'))],
     {}, "CreateContainerConfigError", 'pod fvc-sample-0-0: secret "s3-credentials" not found'),
    ([pod("sample", 0, phase="Pending", waiting=("ImagePullBackOff", 'Back-off pulling image "nope"'))],
     {}, "ImagePullBackOff", 'Back-off pulling image "nope"'),
    ([pod("sample", 1, phase="Pending", unschedulable="0/4 nodes are available: 4 Insufficient nvidia.com/gpu.")],
     {}, "Unschedulable", "pod fvc-sample-1-0 cannot be scheduled: 0/4 nodes are available"),
    ([], {"fvc-shards": 'Error creating: pods "fvc-shards-0-x" is forbidden: error looking up service account default/nope'},
     "FailedCreate", "Job fvc-shards cannot create its pods: Error creating"),
]


@pytest.mark.parametrize("pods, failed_creates, reason, message", BLOCKING, ids=[b[2] for b in BLOCKING])
def test_pods_that_cannot_start_block_the_fit_then_fail_it_after_the_grace_period(pods, failed_creates, reason, message):
    fit = make_fit(status={"phase": "Sampling", "startTime": "2026-01-01T00:01:00Z"})
    jobs = {**complete("partition"), "sample": job("sample", active=len(pods))}
    obstacles = planner.Obstacles(failed_creates=failed_creates)
    first = plan(fit, jobs, pods, NOW, CONFIG, obstacles=obstacles)
    blocked = condition(first, "Blocked")
    assert (blocked["status"], blocked["reason"]) == ("True", reason) and message in blocked["message"]
    assert first.state["phase"] == "Sampling" and reasons(first) == [reason]
    grace = timedelta(seconds=CONFIG.blocked_grace_seconds)
    waited = plan(state_after(fit, first), jobs, pods, NOW + grace, CONFIG, obstacles=obstacles)
    assert waited.state["phase"] == "Sampling" and waited.events == ()  # not past the grace period yet
    failed = plan(state_after(fit, first), jobs, pods, NOW + grace + timedelta(seconds=1), CONFIG, obstacles=obstacles)
    assert failed.state["phase"] == "Failed" and condition(failed, "Failed")["reason"] == reason
    assert condition(failed, "Failed")["message"].startswith("blocked for more than 600 s: ")
    assert failed.patch_jobs == (("fvc-shards", SUSPEND),)


def test_blocked_ends_when_the_pods_start_and_normal_waits_never_block():
    fit = make_fit(status={"phase": "Sampling", "startTime": "2026-01-01T00:01:00Z"})
    jobs = {**complete("partition"), "sample": job("sample", active=1)}
    stuck = pod("sample", 0, phase="Pending", waiting=("ErrImagePull", "not found"))
    first = plan(fit, jobs, [stuck], NOW, CONFIG)
    creating = pod("sample", 0, phase="Pending", waiting=("ContainerCreating", ""))
    later = plan(state_after(fit, first), jobs, [creating], NOW, CONFIG)
    unblocked = condition(later, "Blocked")
    assert (unblocked["status"], unblocked["reason"]) == ("False", "Unblocked") and later.events == ()
    assert planner.blocks(fit, jobs, [creating], planner.Obstacles(), None) == []


def test_blocks_ignore_pods_of_finished_jobs_and_count_the_rest():
    jobs = {"partition": job("partition", "Complete"), "sample": job("sample", active=2)}
    old = pod("partition", phase="Pending", unschedulable="gone")
    stuck = [pod("sample", k, phase="Pending", unschedulable="no GPU") for k in range(2)]
    found = planner.blocks(make_fit(), jobs, [old, *stuck], planner.Obstacles(), None)
    assert [b.message for b in found] == ["pod fvc-sample-0-0 cannot be scheduled: no GPU",
                                          "pod fvc-sample-1-0 cannot be scheduled: no GPU"]
    result = planner._blocked(found, [], NOW, 600)
    assert result.conditions[0]["message"].endswith("(and 1 more)")


def test_only_running_jobs_without_pods_are_looked_up_for_failed_creates():
    jobs = {"partition": job("partition", "Complete"), "sample": job("sample"), "resample": job("resample", active=1),
            "combine": job("combine", suspended=True), "globals": job("globals")}
    assert [j.name for j in planner.podless(jobs, [pod("globals", phase="Pending")])] == ["fvc-shards"]


def test_a_job_the_api_server_refuses_fails_the_fit_with_its_message_or_blocks_it():
    fit = make_fit(status={"phase": "Partitioning", "startTime": "2026-01-01T00:01:00Z"})
    invalid = planner.Refusal(422, 'Job.batch "fvc-partition" is invalid: spec.template.spec.containers[0].resources')
    result = plan(fit, {}, [], NOW, CONFIG, obstacles=planner.Obstacles(refused={"partition": invalid}))
    assert result.state["phase"] == "Failed" and result.create == ()
    failed = condition(result, "Failed")
    assert failed["reason"] == "JobRejected"
    assert failed["message"] == f"the API server refused Job fvc-partition: {invalid.message}"
    quota = planner.Refusal(403, 'jobs.batch "fvc-partition" is forbidden: exceeded quota: jobs')
    blocked = plan(fit, {}, [], NOW, CONFIG, obstacles=planner.Obstacles(refused={"partition": quota}))
    assert condition(blocked, "Blocked")["reason"] == "JobForbidden" and blocked.state["phase"] == "Partitioning"
    assert [m["metadata"]["name"] for m in blocked.create] == ["fvc-partition"]  # tried again: a quota frees up


POLICY = Config(runner_image="runner:test", runner_defaults={"serviceAccountName": "consensusfit-runner"},
                policy=Policy(images=("registry.local/team/*",), service_accounts=("team-a",)))
REFUSED = [
    ({"runner": {"image": "evil/miner:latest"}}, "ImageNotAllowed", "spec.runner.image evil/miner:latest is not allowed"),
    ({"runner": {"serviceAccountName": "cluster-admin"}}, "ServiceAccountNotAllowed", "cluster-admin is not allowed"),
    ({"runner": {"compilationCache": {"hostPath": {"path": "/"}}}}, "VolumeNotAllowed", "may not be a hostPath volume"),
    ({"runner": {"compilationCache": {"nfs": {"server": "x", "path": "/"}}}}, "VolumeNotAllowed",
     "only persistentVolumeClaim, emptyDir, csi"),
]
ALLOWED = [
    {},
    {"runner": {"image": "runner:test"}},
    {"runner": {"image": "registry.local/team/runner:2", "serviceAccountName": "team-a"}},
    {"runner": {"serviceAccountName": "consensusfit-runner", "compilationCache": {"persistentVolumeClaim": {"claimName": "c"}}}},
]


@pytest.mark.parametrize("spec, reason, message", REFUSED, ids=[r[1] + str(i) for i, r in enumerate(REFUSED)])
def test_admission_refuses_a_fit_outside_the_admins_policy_before_any_job(spec, reason, message):
    result = plan(make_fit(**spec), {}, [], NOW, POLICY)
    assert result.create == () and result.state["phase"] == "Failed"
    failed = condition(result, "Failed")
    assert failed["reason"] == reason and message in failed["message"], failed


@pytest.mark.parametrize("spec", ALLOWED)
def test_admission_allows_the_operators_defaults_and_what_the_policy_lists(spec):
    assert planner._admission(make_fit(**spec), POLICY) is None


def test_admission_checks_every_step_before_the_first_job():
    """A step refused later (here combine's image) fails the fit before partition runs, let alone its shards."""
    fit = make_fit(runner={"steps": {"combine": {"image": "evil/miner:latest"}}})
    result = plan(fit, {}, [], NOW, POLICY)
    assert result.create == () and result.state["phase"] == "Failed"
    assert condition(result, "Failed")["message"].startswith("combine: spec.runner.image evil/miner:latest is not allowed")
    # What the operator's own defaults give a step passes, per step too.
    per_step = dataclasses.replace(POLICY, runner_defaults={"steps": {"combine": {"serviceAccountName": "big-memory"}}})
    assert planner._admission(make_fit(runner={"steps": {"combine": {"serviceAccountName": "big-memory"}}}), per_step) is None
    assert planner._admission(make_fit(runner={"serviceAccountName": "big-memory"}), per_step).reason == "ServiceAccountNotAllowed"


def test_admission_never_allows_host_path_and_can_refuse_python_models():
    anything = dataclasses.replace(POLICY, policy=dataclasses.replace(POLICY.policy, volume_types=("hostPath",)))
    assert planner._admission(make_fit(runner={"compilationCache": {"hostPath": {"path": "/"}}}), anything).reason == "VolumeNotAllowed"
    python = make_fit(model={"python": {"uri": "s3://b/m.py", "function": "model"}})
    assert planner._admission(python, POLICY) is None
    no_code = dataclasses.replace(POLICY, policy=dataclasses.replace(POLICY.policy, python_models=False))
    assert planner._admission(python, no_code).reason == "PythonModelsDisabled"
    assert "trusted code" in planner._admission(python, no_code).message


def test_runner_pods_get_no_service_account_token_unless_asked():
    (manifest,) = plan(make_fit(), {}, [], NOW, CONFIG).create
    assert manifest["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    (asked,) = plan(make_fit(runner={"automountServiceAccountToken": True}), {}, [], NOW, CONFIG).create
    assert asked["spec"]["template"]["spec"]["automountServiceAccountToken"] is True


# -- Kueue: the Queued condition, and a deadline that a queue's wait does not consume -----------------------

def queued_fit(**spec) -> dict:
    return make_fit(status={"phase": "Sampling", "startTime": "2026-01-01T00:00:00Z"}, **spec)


def test_a_job_held_by_kueue_is_queued_not_blocked_and_admitted_once_released():
    fit = queued_fit()
    held = job("sample", suspended=True, queue="gpus")  # suspended, and not by the fit
    # A pod left from an admission Kueue took back (preemption) is on its way out: it blocks nothing.
    leftover = pod("sample", 0, phase="Pending", unschedulable="0/4 nodes are available")
    result = plan(fit, {"partition": job("partition", "Complete"), "sample": held}, [leftover], NOW, CONFIG)
    queued = condition(result, "Queued")
    assert (queued["status"], queued["reason"]) == ("True", "QueuedByKueue")
    assert queued["message"] == "Job fvc-shards waits in Kueue's LocalQueue gpus: its pods start once it is admitted"
    assert "Blocked" not in {c["type"] for c in result.state["conditions"]}
    assert reasons(result) == ["QueuedByKueue"] and result.patch_jobs == ()  # never released behind Kueue's back

    fit = state_after(fit, result)
    later = NOW + timedelta(minutes=5)
    again = plan(fit, {"partition": job("partition", "Complete"), "sample": held}, [], later, CONFIG)
    assert again.status == {} and again.events == ()  # said once
    admitted = plan(fit, {"partition": job("partition", "Complete"), "sample": job("sample", active=3)}, [],
                    later, CONFIG)
    queued = condition(admitted, "Queued")
    assert (queued["status"], queued["reason"]) == ("False", "Admitted")
    assert reasons(admitted) == ["Admitted"]
    assert admitted.state["queuedSeconds"] == 300


def test_a_job_suspended_by_another_controller_without_a_queue_label_is_queued_too():
    result = plan(queued_fit(), {"sample": job("sample", suspended=True)}, [], NOW, CONFIG)
    assert condition(result, "Queued")["reason"] == "SuspendedExternally"
    # The fit's own suspension is not a queue's.
    ours = plan(queued_fit(suspend=True), {"sample": job("sample", suspended=True, by_fit=True)}, [], NOW, CONFIG)
    assert "Queued" not in {c["type"] for c in ours.state["conditions"]}


def queued_since(minute: int) -> dict:
    return {"type": "Queued", "status": "True", "reason": "QueuedByKueue", "message": "",
            "lastTransitionTime": f"2026-01-01T00:{minute:02d}:00Z"}


def test_the_deadline_does_not_count_the_time_a_queue_held_the_jobs():
    """Ten minutes of deadline; the shard Job waits in a queue from minute 2 to 15, then runs."""
    held = {"partition": job("partition", "Complete"), "sample": job("sample", suspended=True, queue="gpus")}
    running = {"partition": job("partition", "Complete"), "sample": job("sample", active=3)}
    fit = make_fit(activeDeadlineSeconds=600, status={"phase": "Sampling", "startTime": "2026-01-01T00:00:00Z",
                                                      "conditions": [queued_since(2)]})
    at = T0 + timedelta(minutes=14)  # 14 minutes since the start, 12 of them queued
    assert plan(fit, held, [], at, CONFIG).state["phase"] == "Sampling"
    admitted = plan(fit, running, [], T0 + timedelta(minutes=15), CONFIG)
    assert admitted.state["phase"] == "Sampling" and admitted.state["queuedSeconds"] == 780
    # A fresh pass from the status alone (an operator restart) goes on counting from it.
    fit = state_after(fit, admitted)
    assert plan(fit, running, [], T0 + timedelta(minutes=23), CONFIG).state["phase"] == "Sampling"
    late = plan(fit, running, [], T0 + timedelta(minutes=23, seconds=1), CONFIG)
    assert late.state["phase"] == "Failed" and condition(late, "Failed")["reason"] == "DeadlineExceeded"


@pytest.mark.parametrize("since, start, seconds", [
    (2, 0, 480.0),  # queued since minute 2: 8 minutes by minute 10
    (2, 5, 300.0),  # the fit was resumed at minute 5: its clock, and the wait, count from there
])
def test_a_hold_counts_from_the_later_of_its_start_and_the_fits(since, start, seconds):
    assert planner._hold(queued_since(since), T0 + timedelta(minutes=start), NOW) == seconds
    assert planner._hold({**queued_since(since), "status": "False"}, T0, NOW) == 0.0


def test_resuming_the_fit_restarts_the_deadline_clock_queued_time_included():
    status = {"phase": "Sampling", "startTime": "2026-01-01T00:01:00Z", "queuedSeconds": 120,
              "conditions": [{"type": "Suspended", "status": "True", "reason": "Suspended", "message": "",
                              "lastTransitionTime": "2026-01-01T00:02:00Z"}]}
    fit = make_fit(status=status, activeDeadlineSeconds=300)
    result = plan(fit, {"sample": job("sample", suspended=True, by_fit=True)}, [], NOW, CONFIG)
    assert result.state["startTime"] == "2026-01-01T00:10:00Z" and "queuedSeconds" not in result.state
    assert result.status["queuedSeconds"] is None  # removed by the merge patch


# -- cleanup without losing the result: spec.cleanupPolicy, diagnostics and retries that outlive pods --------

SUCCEEDED_PODS = [
    pod("sample", 0, "Failed", report={"ok": False, "reason": "Error", "message": "storage"}),
    pod("sample", 0, attempt=1, report=shard_report(0, rhat=1.02, ess=300, divergences=2, seconds=80)),
    *(pod("sample", k, report=shard_report(k, divergences=1)) for k in (1, 2)),
    *DONE_PODS["resample"], *DONE_PODS["combine"],
]


def succeeded_fit(**spec) -> tuple[dict, dict]:
    """A fit that concluded Succeeded (one shard retried), as stored, and its Jobs."""
    jobs = {**complete(*children.STEPS), "sample": job("sample", "Complete", succeeded=3, failed=1)}
    fit = make_fit(status=COMBINING, **spec)
    fit = state_after(fit, plan(fit, {**jobs, "combine": job("combine", active=1)}, SUCCEEDED_PODS, NOW, CONFIG))
    done = plan(fit, jobs, SUCCEEDED_PODS, NOW, CONFIG)
    assert done.state["phase"] == "Succeeded" and done.delete_jobs == ()  # not before the status is stored
    return state_after(fit, done), jobs


def test_a_succeeded_fit_deletes_its_jobs_and_its_status_outlives_them():
    fit, jobs = succeeded_fit()
    kept = copy.deepcopy(fit["status"])
    assert kept["diagnostics"] == {"rhatMax": 1.02, "essBulkMin": 300, "divergences": 4, "slowestShardSeconds": 80,
                                   "step": "sample", "indexes": "0-2"}
    assert kept["retries"] == {"total": 1, "steps": {"sample": 1}}
    result = plan(fit, jobs, SUCCEEDED_PODS, NOW, CONFIG)
    assert result.delete_jobs == ("fvc-combine", "fvc-globals", "fvc-partition", "fvc-resample", "fvc-shards")
    assert result.status == {}
    # The Jobs are gone, then their pods (the garbage collector): in any order, nothing is lost,
    # also for an operator restarted in between (each pass plans from the status alone).
    for left_jobs, left_pods in (({}, SUCCEEDED_PODS), ({}, []), ({"combine": jobs["combine"]}, [])):
        after = plan(fit, left_jobs, left_pods, NOW + timedelta(minutes=1), CONFIG)
        assert after.status == {} and after.state == kept
    assert plan(fit, {}, [], NOW, CONFIG).delete_jobs == ()


def test_a_failed_fit_keeps_its_jobs_by_default_and_deletes_them_if_asked():
    status = {"phase": "Failed", "completionTime": "2026-01-01T00:05:00Z", "shards": {"total": 3, "failed": 1}}
    jobs = {"partition": job("partition", "Complete"), "sample": job("sample", active=2)}
    kept = plan(make_fit(status=status), jobs, [], NOW, CONFIG)
    assert kept.delete_jobs == () and [name for name, _ in kept.patch_jobs] == ["fvc-shards"]
    asked = plan(make_fit(status=status, cleanupPolicy={"onFailure": "Delete"}), jobs, [], NOW, CONFIG)
    assert asked.delete_jobs == ("fvc-partition", "fvc-shards") and asked.patch_jobs == ()
    assert reasons(asked) == ["JobsDeleted"] and asked.state["shards"] == status["shards"]
    kept_on_success = make_fit(status={**status, "phase": "Succeeded"}, cleanupPolicy={"onSuccess": "Keep"})
    assert plan(kept_on_success, jobs, [], NOW, CONFIG).delete_jobs == ()


def test_diagnostics_outlive_their_pods_and_count_each_shard_once():
    fit = make_fit(status={"phase": "Sampling", "startTime": "2026-01-01T00:01:00Z"})
    jobs = {"partition": job("partition", "Complete"), "sample": job("sample", active=1, succeeded=2)}
    first = [pod("sample", k, report=shard_report(k, rhat=1.01 + k / 100, ess=500 - k, divergences=k + 1))
             for k in (0, 1)]
    fit = state_after(fit, plan(fit, jobs, first, NOW, CONFIG))
    assert fit["status"]["diagnostics"]["divergences"] == 3
    # Shards 0 and 1's pods are garbage-collected; shard 2 finishes.
    last = [pod("sample", 2, report=shard_report(2, rhat=1.001, ess=900, divergences=4, seconds=90))]
    result = plan(fit, {**jobs, "sample": job("sample", "Complete", succeeded=3)}, last, NOW, CONFIG)
    expected = {"rhatMax": 1.02, "essBulkMin": 499, "divergences": 7, "slowestShardSeconds": 90,
                "step": "sample", "indexes": "0-2"}
    assert result.state["diagnostics"] == expected
    # Seen again (every pod back, as after a relist), no shard counts twice.
    again = plan(state_after(fit, result), {**jobs, "sample": job("sample", "Complete", succeeded=3)},
                 [*first, *last], NOW, CONFIG)
    assert again.state["diagnostics"] == expected


def test_retries_are_a_counter_that_pods_disappearing_never_decreases():
    fit = make_fit(status={"phase": "Sampling", "startTime": "2026-01-01T00:01:00Z"})
    jobs = {"partition": job("partition", "Complete"), "sample": job("sample", active=2, succeeded=1)}
    pods = [pod("sample", 0),
            pod("sample", 1, "Failed", exit_code=1), pod("sample", 1, "Running", attempt=1),
            pod("sample", 2, "Failed", disrupted=True), pod("sample", 2, "Running", attempt=1),
            pod("partition", phase="Failed"), pod("partition", attempt=1)]  # not a shard's
    fit = state_after(fit, plan(fit, jobs, pods, NOW, CONFIG))
    assert fit["status"]["retries"] == {"total": 2, "steps": {"sample": 2}}
    # The failed pods are deleted (pod garbage collection): the count stays.
    survivors = [p for p in pods if p.phase != "Failed"]
    assert plan(fit, jobs, survivors, NOW, CONFIG).state["retries"] == {"total": 2, "steps": {"sample": 2}}
    # The Job's counter tells of failed pods no longer there (two beyond the one index failed for good).
    counted = {**jobs, "sample": job("sample", active=1, succeeded=1, failed_indexes=1, failed=4)}
    assert plan(fit, counted, survivors, NOW, CONFIG).state["retries"] == {"total": 3, "steps": {"sample": 3}}
