"""EP rounds in the operator, without Kubernetes: the pilot, a round Job and an update per round
until an update says `final`, then combining; restarts, failures and maxRounds, as pure calls."""

from __future__ import annotations

import dataclasses
from datetime import timedelta

import pytest
import yaml
from cfit_support import (
    COMBINE_REPORT,
    CRD_PATH,
    GLOBALS_REPORT,
    PILOT_REPORT,
    T0,
    ep_fit,
    job,
    make_fit,
    pod,
    resample_report,
    round_report,
    update_report,
)

from consensusfit.operator import children, labels
from consensusfit.operator.config import Config
from consensusfit.operator.planner import Ledger, plan

CONFIG = Config(runner_image="runner:test")
NOW = T0 + timedelta(minutes=10)
SHARDS = 3


def command(manifest: dict) -> list[str]:
    return manifest["spec"]["template"]["spec"]["containers"][0]["command"]


def condition(state: dict, kind: str) -> dict | None:
    return next((c for c in state.get("conditions", []) if c["type"] == kind), None)


def done_pods(step: str, updates: dict[int, dict]) -> list:
    """The pods a completed step leaves, with the messages the runner writes."""
    kind, number = children.parse_step(step)
    if kind == children.PARTITION:
        return [pod(step, report={"ok": True, "rows": 1549, "groups": 176})]
    if kind == children.PILOT:
        return [pod(step, report=PILOT_REPORT)]
    if kind == children.ROUND:
        return [pod(step, k, report=round_report(number, k, rhat=1.0 + number / 100)) for k in range(SHARDS)]
    if kind == children.UPDATE:
        return [pod(step, report=updates[number])]
    if kind == children.GLOBALS:
        return [pod(step, report=GLOBALS_REPORT)]
    if kind == children.RESAMPLE:
        return [pod(step, k, report=resample_report(k)) for k in range(SHARDS)]
    return [pod(step, report=COMBINE_REPORT)]


@dataclasses.dataclass
class Walk:
    """Every pass of a fit run to the end, the Job controller playing along: each created Job
    completes before the next pass."""

    fit: dict
    passes: list = dataclasses.field(default_factory=list)  # (jobs, pods, fit before, plan)

    def run(self, updates: dict[int, dict], stop_before: str | None = None) -> Walk:
        jobs, pods = {}, []
        for _ in range(60):
            result = plan(self.fit, jobs, pods, NOW, CONFIG)
            self.passes.append((dict(jobs), list(pods), self.fit, result))
            self.fit = {**self.fit, "status": result.state}
            if not result.create or result.create[0]["metadata"]["labels"][labels.STEP] == stop_before:
                return self
            for manifest in result.create:
                step = manifest["metadata"]["labels"][labels.STEP]
                jobs[step] = job(step, "Complete", succeeded=manifest["spec"]["completions"])
                pods += done_pods(step, updates)
        raise AssertionError("the walk did not end")

    @property
    def created(self) -> list[str]:
        return [m["metadata"]["name"] for *_, result in self.passes for m in result.create]

    @property
    def events(self) -> list[tuple[str, str, str]]:
        return [(e.type, e.reason, e.message) for *_, result in self.passes for e in result.events]


THREE_ROUNDS = {1: update_report(1, False, mean=0.8, sd=0.3), 2: update_report(2, False, mean=0.2, sd=0.05),
                3: update_report(3, True, mean=0.01, sd=0.004)}


# -- the Jobs ----------------------------------------------------------------------------------------------

def test_an_ep_fit_runs_the_pilot_and_every_round_it_may_need_instead_of_sample():
    assert children.steps(ep_fit(max_rounds=2)) == (
        "partition", "pilot", "round-1", "update-1", "round-2", "update-2", "globals", "resample", "combine")
    assert children.steps(make_fit(combine={"method": "swiss"}))[1] == "sample"
    assert children.steps(ep_fit(shards=1))[1] == "sample"  # one shard: its posterior is the answer
    default = make_fit(combine={})  # the CRD's default method is ep
    assert children.uses_rounds(default) and children.max_rounds(default) == 8


def test_round_jobs_are_shaped_as_the_sample_job_and_name_their_round():
    fit = ep_fit(shards=10, runner={"shardsPerPod": 4, "compilationCache": {"emptyDir": {}}})
    sample = children.job_manifest(fit, "sample", {}, "runner:1")
    round_2 = children.job_manifest(fit, "round-2", {}, "runner:1")
    assert round_2["metadata"]["name"] == "fvc-round-2"
    assert round_2["metadata"]["labels"][labels.STEP] == "round-2"
    for key in ("completionMode", "completions", "parallelism", "backoffLimitPerIndex", "maxFailedIndexes",
                "podFailurePolicy"):
        assert round_2["spec"][key] == sample["spec"][key], key
    assert round_2["spec"]["completions"] == 3  # 4 + 4 + 2 shards
    assert command(round_2)[1] == "sample" and command(round_2)[-4:] == ["--round", "2", "--shards-per-pod", "4"]
    assert round_2["spec"]["template"]["spec"]["volumes"] == sample["spec"]["template"]["spec"]["volumes"]
    update = children.job_manifest(fit, "update-2", {}, "runner:1")
    assert update["metadata"]["name"] == "fvc-update-2"
    assert command(update)[1] == "update" and command(update)[-2:] == ["--round", "2"]
    assert update["spec"]["completions"] == 1 and update["spec"]["podFailurePolicy"]["rules"][0]["action"] == "FailJob"
    pilot = children.job_manifest(fit, "pilot", {}, "runner:1")
    assert pilot["metadata"]["name"] == "fvc-pilot" and command(pilot)[1] == "pilot"
    assert "completionMode" not in pilot["spec"] and "--round" not in command(pilot)


def test_job_names_fit_63_characters_at_the_crds_longest_name_and_most_rounds():
    combine = yaml.safe_load(CRD_PATH.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"][
        "properties"]["spec"]["properties"]["combine"]["properties"]
    most = combine["maxRounds"]["maximum"]
    fit = ep_fit(max_rounds=most)
    assert max(len(children.job_name("f" * 53, step)) for step in children.steps(fit)) <= 63


def test_parse_step_reads_the_round_only_of_round_steps():
    assert children.parse_step("round-12") == ("round", 12)
    assert children.parse_step("update-3") == ("update", 3)
    assert children.parse_step("sample") == ("sample", None)
    assert children.parse_step("round-x") == ("round-x", None)
    assert children.samples_shards("round-1") and children.samples_shards("sample")
    assert not children.samples_shards("update-1") and not children.is_per_shard("pilot")


# -- the walk through the rounds ---------------------------------------------------------------------------

def test_a_fit_walks_pilot_and_three_rounds_then_combines_and_succeeds():
    walk = Walk(ep_fit()).run(THREE_ROUNDS)
    assert walk.created == [f"fvc-{s}" for s in (
        "partition", "pilot", "round-1", "update-1", "round-2", "update-2", "round-3", "update-3",
        "globals", "resample", "combine")]
    phases = [result.state["phase"] for *_, result in walk.passes]
    assert phases == ["Partitioning", *["Sampling"] * 7, "Combining", "Combining", "Combining", "Succeeded"]
    # Each round's Job was created only after the update before it said final false.
    for jobs, pods, _, result in walk.passes:
        names = [m["metadata"]["labels"][labels.STEP] for m in result.create]
        if names and names[0].startswith("round-") and names[0] != "round-1":
            number = children.parse_step(names[0])[1]
            update = next(p.report for p in pods if p.step == f"update-{number - 1}")
            assert update["final"] is False
    state = walk.fit["status"]
    assert state["rounds"] == {"current": 3, "completed": 3, "max": 8, "converged": True,
                               "meanChange": 0.01, "sdChange": 0.004}
    converged = condition(state, "Converged")
    assert (converged["status"], converged["reason"]) == ("True", "Converged")
    assert converged["message"].startswith("EP converged in 3 rounds: in round 3 the means moved 0.01 SD")
    assert condition(state, "Sampled")["message"] == "round 3: 3 shards sampled"
    assert condition(state, "Updated")["message"] == (
        "round 3: the means moved 0.01 SD and the SDs 0.004 (damping 0.5)")
    assert condition(state, "Piloted")["reason"] == "PilotSucceeded"
    assert state["shards"] == {"total": 3, "active": 0, "succeeded": 3, "failed": 0}  # the last round's
    assert state["diagnostics"]["rhatMax"] == pytest.approx(1.03)  # the last round's shards
    started = [message for _, reason, message in walk.events if reason == "RoundStarted"]
    assert started == [f"round {r} of at most 8: Job fvc-round-{r}" for r in (1, 2, 3)]
    assert [reason for _, reason, _ in walk.events if reason in ("Converged", "MaxRoundsReached")] == ["Converged"]
    assert [(c["type"], c["status"]) for c in state["conditions"]] == [
        ("Partitioned", "True"), ("Piloted", "True"), ("Sampled", "True"), ("Updated", "True"),
        ("Converged", "True"), ("GlobalsCombined", "True"), ("GroupsResampled", "True"), ("Succeeded", "True")]


def test_status_rounds_follow_the_round_in_progress():
    walk = Walk(ep_fit()).run(THREE_ROUNDS, stop_before="round-3")
    jobs, pods, fit, _ = walk.passes[-1]
    rounds = walk.fit["status"]["rounds"]
    assert rounds == {"current": 2, "completed": 2, "max": 8, "converged": False, "meanChange": 0.2, "sdChange": 0.05}
    running = {**jobs, "round-3": job("round-3", active=2, succeeded=1)}
    result = plan(walk.fit, running, pods, NOW, CONFIG)
    assert result.create == () and result.state["phase"] == "Sampling"
    assert result.state["rounds"]["current"] == 3 and result.state["rounds"]["completed"] == 2
    # Fewer pods than shards at once (a queue admitted one): the round just goes on.
    assert result.state["shards"] == {"total": 3, "active": 2, "succeeded": 1, "failed": 0}


def test_a_pass_from_the_same_observed_state_makes_the_same_plan_and_never_a_second_round():
    """An operator restarted at any pass (a fresh ledger, and the status as it was) decides the
    same: the same Job, with the same name, or nothing."""
    walk = Walk(ep_fit()).run(THREE_ROUNDS)
    assert len(walk.created) == len(set(walk.created))
    for jobs, pods, fit, result in walk.passes:
        again = plan(fit, jobs, pods, NOW + timedelta(seconds=30), CONFIG, Ledger())
        assert again.create == result.create and again.state["phase"] == result.state["phase"]
        assert again.state.get("rounds") == result.state.get("rounds")
        # Once the Job it created exists (and runs), the next pass creates nothing.
        running = {**jobs, **{m["metadata"]["labels"][labels.STEP]: job(m["metadata"]["labels"][labels.STEP],
                                                                          active=1) for m in result.create}}
        settled = plan({**fit, "status": result.state}, running, pods, NOW, CONFIG, result.seen)
        assert settled.create == ()


def test_an_update_whose_report_is_unreadable_is_waited_for_unless_the_jobs_tell():
    walk = Walk(ep_fit()).run(THREE_ROUNDS, stop_before="round-2")
    jobs, pods, fit, _ = walk.passes[-1]
    fit = walk.fit
    without = [p for p in pods if p.step != "update-1"]  # its pod is gone (or its message unreadable)
    waiting = plan(fit, jobs, without, NOW, CONFIG)
    assert waiting.create == () and waiting.state["phase"] == "Sampling"
    assert condition(waiting.state, "Updated")["message"] == "update-1 Job complete"
    # The next round's Job exists: the update said final false when it was read.
    going_on = plan(fit, {**jobs, "round-2": job("round-2", active=3)}, without, NOW, CONFIG)
    assert going_on.create == () and condition(going_on.state, "Converged") is None
    # The last round is final by definition: combining starts; whether it converged is Unknown.
    last = ep_fit(max_rounds=1)
    jobs = {s: job(s, "Complete", succeeded=1) for s in ("partition", "pilot", "round-1", "update-1")}
    ended = plan(last, jobs, [], NOW, CONFIG)
    assert [m["metadata"]["name"] for m in ended.create] == ["fvc-globals"]
    unknown = condition(ended.state, "Converged")
    assert (unknown["status"], unknown["reason"]) == ("Unknown", "ReportMissing")


def test_a_completed_round_is_not_run_again_when_its_job_is_gone():
    jobs = {s: job(s, "Complete", succeeded=3) for s in ("partition", "pilot", "round-1", "update-1")}
    jobs["round-2"] = job("round-2", active=3)
    pods = [pod("update-1", report=update_report(1, False))]
    del jobs["round-1"]  # deleted by hand: round 2 exists, so round 1 completed before
    result = plan(ep_fit(status={"phase": "Sampling"}), jobs, pods, NOW, CONFIG)
    assert result.create == () and result.state["phase"] == "Sampling"


# -- failures and maxRounds -----------------------------------------------------------------------------

def test_a_failed_shard_in_a_round_fails_the_fit_naming_the_round_and_the_shard():
    jobs = {s: job(s, "Complete", succeeded=3) for s in ("partition", "pilot", "round-1", "update-1",
                                                          "round-2", "update-2")}
    jobs["round-3"] = job("round-3", "Failed", succeeded=2, failed_indexes=1, reason="FailedIndexes")
    pods = [pod("update-1", report=update_report(1, False)), pod("update-2", report=update_report(2, False)),
            pod("round-3", 2, phase="Failed", exit_code=3,
                report={"ok": False, "reason": "BadInput", "message": "shard 2: the cavity is not positive definite"})]
    result = plan(ep_fit(status={"phase": "Sampling"}), jobs, pods, NOW, CONFIG)
    assert result.state["phase"] == "Failed"
    failed = condition(result.state, "Failed")
    assert failed["reason"] == "ShardFailed"
    assert failed["message"].startswith("round 3: shard 2 (pod fvc-round-3-2-0): BadInput: shard 2: the cavity")
    assert "Job fvc-round-3 failed (FailedIndexes)" in failed["message"]
    assert result.state["shards"]["failed"] == 1 and result.state["rounds"]["current"] == 3
    assert ("Warning", "ShardFailed") in [(e.type, e.reason) for e in result.events]
    assert ("Warning", "PodFailed") in [(e.type, e.reason) for e in result.events]
    assert any(e.message.startswith("round 3: shard 2 (pod ") for e in result.events if e.reason == "PodFailed")


def test_a_failed_update_fails_the_fit_naming_its_round():
    jobs = {s: job(s, "Complete", succeeded=3) for s in ("partition", "pilot", "round-1")}
    jobs["update-1"] = job("update-1", "Failed", reason="BackoffLimitExceeded")
    result = plan(ep_fit(status={"phase": "Sampling"}), jobs, [], NOW, CONFIG)
    failed = condition(result.state, "Failed")
    assert failed["reason"] == "UpdateFailed"
    assert failed["message"].startswith("round 1: Job fvc-update-1 failed (BackoffLimitExceeded)")


def test_max_rounds_without_convergence_says_so_in_a_condition_and_one_warning():
    updates = {1: update_report(1, False), 2: update_report(2, False),
               3: update_report(3, True, converged=False, mean=0.4, sd=0.2)}
    walk = Walk(ep_fit(max_rounds=3)).run(updates)
    state = walk.fit["status"]
    assert state["phase"] == "Succeeded"  # the answer is there; the fit says how far to trust it
    converged = condition(state, "Converged")
    assert (converged["status"], converged["reason"]) == ("False", "MaxRoundsReached")
    assert converged["message"] == (
        "EP stopped at maxRounds (3) without converging: in round 3 the means moved 0.4 SD and the SDs 0.2; "
        "the answer is the last round's approximation")
    warnings = [(reason, message) for kind, reason, message in walk.events if kind == "Warning"]
    assert warnings == [("MaxRoundsReached", converged["message"])]
    assert state["rounds"]["converged"] is False and state["rounds"]["completed"] == 3


def test_the_sampling_phase_ends_when_the_rounds_end():
    """Phase durations: Combining begins when Converged was set, not when the first round's
    update set Updated."""
    walk = Walk(ep_fit()).run(THREE_ROUNDS, stop_before="globals")
    jobs, pods, fit, _ = walk.passes[-1]  # the pass that creates the globals Job
    fit = {**fit, "status": {**fit["status"], "startTime": "2026-01-01T00:01:00Z"}}
    for c in fit["status"]["conditions"]:
        c["lastTransitionTime"] = {"Partitioned": "2026-01-01T00:02:00Z"}.get(c["type"], "2026-01-01T00:03:00Z")
    crossed = plan(fit, jobs, pods, NOW, CONFIG)
    assert crossed.state["phase"] == "Combining"
    assert crossed.exited == (("Sampling", 480.0),)


def test_a_one_shard_ep_fit_is_one_shot():
    fit = ep_fit(shards=1, status={"phase": "Partitioning"})
    result = plan(fit, {"partition": job("partition", "Complete")}, [], NOW, CONFIG)
    assert [m["metadata"]["name"] for m in result.create] == ["fvc-shards"]
    assert "rounds" not in result.state


def test_diagnostics_follow_the_round_in_progress_once_it_reports_and_outlive_its_pods():
    """A round's diagnostics replace the round before's with its first report (none is mixed in);
    the round before's pods being gone changes nothing, and a round counts each shard once."""
    walk = Walk(ep_fit()).run(THREE_ROUNDS, stop_before="round-2")
    jobs, pods, _, _ = walk.passes[-1]
    fit = walk.fit
    round_1 = fit["status"]["diagnostics"]
    assert (round_1["step"], round_1["indexes"], round_1["rhatMax"]) == ("round-1", "0-2", pytest.approx(1.01))
    jobs = {**jobs, "round-2": job("round-2", active=3)}
    gone = [p for p in pods if p.step != "round-1"]  # the garbage collector took round 1's pods
    started = plan(fit, jobs, gone, NOW, CONFIG)
    assert started.state["diagnostics"] == round_1
    first = [pod("round-2", 1, report=round_report(2, 1, rhat=1.05, divergences=2))]
    fit = {**fit, "status": plan(fit, jobs, [*gone, *first], NOW, CONFIG).state}
    assert fit["status"]["diagnostics"] == {"step": "round-2", "indexes": "1", "rhatMax": 1.05, "essBulkMin": 900.0,
                                            "divergences": 2, "slowestShardSeconds": 30.0}
    rest = [pod("round-2", k, report=round_report(2, k, divergences=1)) for k in (0, 2)]
    done = plan(fit, {**jobs, "round-2": job("round-2", "Complete", succeeded=3)}, [*gone, *first, *rest], NOW, CONFIG)
    assert done.state["diagnostics"]["divergences"] == 4 and done.state["diagnostics"]["indexes"] == "0-2"
