"""Every decision of the operator: from (fit, observed Jobs and pods, time) to what to change.

`plan` is a pure function. It derives the fit's state from what it observes and what the fit's
status keeps, never from memory of earlier passes, so an operator restarted at any moment, or one
that sees a stale view, makes the same decisions: children have deterministic names (a repeated
create is a harmless conflict), and the status it writes is recomputed from the Jobs and pods each
time, except what must outlive them: the diagnostics and the retries are folded into what status
already counts, and a finished fit's status stays as it concluded, so that deleting its Jobs and
pods (spec.cleanupPolicy, the garbage collector) loses nothing.

Phases: Pending -> Partitioning -> Sampling -> Combining -> Succeeded, or Failed with a reason.
Combining spans three Jobs (children.py): globals, resample (one pod per shard) and combine.
Conditions: Partitioned, Sampled, GlobalsCombined, GroupsResampled (only for fits that re-sample
their group-level parameters), Succeeded, Failed, Suspended, Queued (a queue such as Kueue holds a
Job suspended: its wait, kept in status.queuedSeconds, does not count towards the deadline),
Blocked.

An EP fit's Sampling spans the pilot and its rounds (a round Job, then its update), with the
conditions Piloted, Sampled and Updated (their messages name the latest round), `status.rounds`
and, once an update says `final`, Converged (False with reason MaxRoundsReached when EP stopped at
maxRounds without converging). The next round is created only once the update's termination
message says `final: false`; the round in progress is read from the Jobs that exist.

A pass applies named policies in order, as JobSet's reconcile does, each a small pure function of
what is observed: `_suspension` (spec.suspend on the Jobs and the Suspended condition), `_queued`
(the Queued condition), `_deadline` (activeDeadlineSeconds), `_rejected` (a Job the API server
refused as invalid), `_advance` (walk the steps, which are data: `sequence`), `_blocked` (pods that
cannot start: the Blocked condition, failing after a grace period), `_admission` (what the admin's
policy forbids a Job to be), `_conclude` (the phase and its events), `_stop` (a failed fit's
leftover Jobs), `_retention` (spec.cleanupPolicy: a finished fit's Jobs to delete) and `_ttl`
(ttlSecondsAfterFinished). `children_of` first sets apart the Jobs labelled with the fit's name
that another fit (another uid) owns: they are reported, never read.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from typing import Any

from . import children, labels
from .conditions import find, is_true, set_condition, timestamp
from .config import Config
from .observe import FAILED_CREATE, UNSCHEDULABLE, JobView, PodView, indexes, parse_time, ranges

RUNNING_PHASES = ("Pending", "Partitioning", "Sampling", "Combining")
TERMINAL_PHASES = ("Succeeded", "Failed")


@dataclass(frozen=True)
class Step:
    """One step of a fit as the planner walks it: its Job, and what the Job's end means for the fit."""

    name: str  # the step (children.steps): its Job's label, how `jobs` is keyed
    phase: str  # the fit's phase while the step runs
    condition: str  # set True when its Job completes, with `reason`
    reason: str
    failure: str  # the reason of the Failed condition when its Job fails
    # The condition's message, formatted with its pod's report, spec.shards and the round; None: the
    # result's URI.
    message: str | None = None
    round: int | None = None  # the EP round the step belongs to
    # Its report says whether the rounds end here (`final`): then the walk skips the remaining
    # rounds' steps and sets Converged; without a readable report, it waits.
    gate: bool = False


CONVERGED = "Converged"
BLOCKED = "Blocked"
QUEUED = "Queued"
# spec.cleanupPolicy's key for each way a fit ends, and the value that deletes its Jobs.
CLEANUP_ON = {"Succeeded": "onSuccess", "Failed": "onFailure"}
DELETE = "Delete"
# The runner container's waiting reasons that waiting alone does not end (ContainerCreating does).
BLOCKING_WAITS = ("CreateContainerConfigError", "CreateContainerError", "ErrImagePull", "ImagePullBackOff",
                  "InvalidImageName", "ErrImageNeverPull")
# The API server's answers to a Job create that no retry changes: the Job itself is invalid. (Others,
# such as 403 for a quota, may pass later: they block.)
INVALID_JOB_CODES = (400, 422)
NAME_TAKEN = "JobNameTaken"

_STEPS = {step.name: step for step in (
    Step(children.PARTITION, "Partitioning", "Partitioned", "PartitionSucceeded", "PartitionFailed",
         "partitioned {rows} rows in {groups} groups"),
    Step(children.SAMPLE, "Sampling", "Sampled", "ShardsSucceeded", "ShardFailed", "{shards} shards sampled"),
    Step(children.PILOT, "Sampling", "Piloted", "PilotSucceeded", "PilotFailed",
         "pilot sampled (R-hat {rhatMax:.3f}): every site starts from its draws"),
    Step(children.ROUND, "Sampling", "Sampled", "RoundSampled", "ShardFailed",
         "round {round}: {shards} shards sampled"),
    Step(children.UPDATE, "Sampling", "Updated", "RoundUpdated", "UpdateFailed",
         "round {round}: the means moved {meanChange:.3g} SD and the SDs {sdChange:.3g} (damping {damping:.3g})",
         gate=True),
    Step(children.GLOBALS, "Combining", "GlobalsCombined", "GlobalsSucceeded", "CombineFailed",
         "{draws} combined draws of the global parameters ({warnings} warnings)"),
    Step(children.RESAMPLE, "Combining", "GroupsResampled", "ResampleSucceeded", "ResampleFailed",
         "{shards} shards' group-level parameters re-sampled given the combined draws"),
    Step(children.COMBINE, "Combining", "Succeeded", "CombineSucceeded", "CombineFailed"),
)}


def sequence(fit: Mapping[str, Any]) -> tuple[Step, ...]:
    """The fit's steps in the order `_advance` walks them, derived from its spec alone.

    The walk knows nothing of particular steps, so a step that repeats (one per round) is more
    entries here, each with a Job name of its own: every round up to maxRounds, the walk stopping
    at the gate (the update) that says `final`.
    """
    return tuple(_step(name) for name in children.steps(fit))


def _step(name: str) -> Step:
    kind, number = children.parse_step(name)
    return _STEPS[name] if number is None else dataclasses.replace(_STEPS[kind], name=name, round=number)


# The status fields this operator owns; anything else there (another tool's) is left alone.
STATUS_FIELDS = (
    "observedGeneration", "phase", "conditions", "shards", "resample", "rounds", "startTime", "completionTime",
    "queuedSeconds", "diagnostics", "retries", "result",
)


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass(frozen=True)
class Plan:
    create: tuple[dict, ...] = ()  # Job manifests
    patch_jobs: tuple[tuple[str, dict], ...] = ()  # (Job name, merge patch)
    delete_jobs: tuple[str, ...] = ()  # Job names (spec.cleanupPolicy); their pods follow
    delete_fit: bool = False  # ttlSecondsAfterFinished has passed
    status: dict = field(default_factory=dict)  # merge patch of .status; empty: nothing changed
    state: dict = field(default_factory=dict)  # the whole status after the patch
    events: tuple[Event, ...] = ()
    exited: tuple[tuple[str, float], ...] = ()  # phases left in this pass, with seconds spent
    started: tuple[PodView, ...] = ()  # pods not seen running before (for queue wait)
    finished: tuple[PodView, ...] = ()  # pods not seen done before (for shard durations)
    seen: Ledger | None = None  # what to pass as `seen` next time


@dataclass(frozen=True)
class Ledger:
    """Pod uids already reported as started and as done, and foreign Jobs already reported, so each
    is reported once per process.

    It only suppresses repeated events and metric observations; no decision depends on it.
    """

    started: frozenset[str] = frozenset()
    done: frozenset[str] = frozenset()
    foreign: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Children:
    """A fit's own Jobs (by step) and their pods, and the Jobs labelled with its name that are not its own."""

    jobs: dict[str, JobView]
    pods: tuple[PodView, ...]
    foreign: tuple[JobView, ...]


def children_of(fit: Mapping[str, Any], jobs: Sequence[JobView], pods: Sequence[PodView]) -> Children:
    """Children by owner uid, not by name: a fit deleted with --cascade=orphan, or one the garbage
    collector has not caught up with yet, leaves Jobs labelled with the same name whose results are
    not a new fit's."""
    uid = fit["metadata"]["uid"]
    ours = {job.step: job for job in jobs if job.owner == uid}
    owners = {job.uid for job in ours.values() if job.uid}
    return Children(ours, tuple(p for p in pods if p.owner in owners), tuple(j for j in jobs if j.owner != uid))


def podless(jobs: Mapping[str, JobView], pods: Sequence[PodView]) -> tuple[JobView, ...]:
    """The running Jobs without a pod: the Job controller says why it cannot create them (missing
    ServiceAccount, PriorityClass, a Pod Security violation, ...) only in FailedCreate events."""
    stepped = {pod.step for pod in pods}
    return tuple(job for job in jobs.values()
                 if job.uid and job.outcome is None and not job.suspended and not job.active and job.step not in stepped)


@dataclass(frozen=True)
class Refusal:
    code: int  # the API server's HTTP status for a Job create
    message: str


@dataclass(frozen=True)
class Obstacles:
    """What may keep a fit from starting its pods, beyond its own Jobs and pods (the handlers gather it)."""

    foreign: tuple[JobView, ...] = ()  # Children.foreign
    failed_creates: Mapping[str, str] = field(default_factory=dict)  # Job name -> FailedCreate message
    refused: Mapping[str, Refusal] = field(default_factory=dict)  # step -> the answer to creating its Job


def merge_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) turning `old` into `new`; None values mean absent."""
    patch: dict[str, Any] = {}
    for key in set(old) | set(new):
        before, after = old.get(key), new.get(key)
        if isinstance(before, Mapping) and isinstance(after, Mapping):
            inner = merge_patch(before, after)
            if inner:
                patch[key] = inner
        elif before != after:
            patch[key] = after
    return patch


def shard_counts(total: int, job: JobView | None, per_pod: int = 1) -> dict[str, int]:
    """Shards running, done and failed, from an Indexed Job's status (authoritative and cheap).

    Pod i of a Job with `per_pod` shards per pod holds shards i·per_pod .. (i+1)·per_pod − 1.
    """
    if job is None:
        return {"total": total, "active": 0, "succeeded": 0, "failed": 0}

    def shards_of(pods: Sequence[int]) -> int:
        return sum(max(0, min(per_pod, total - pod * per_pod)) for pod in pods)

    succeeded, failed = shards_of(job.completed_indexes), shards_of(job.failed_indexes)
    return {
        "total": total,
        "active": min(job.active * per_pod, total - succeeded - failed),
        "succeeded": succeeded,
        "failed": failed,
    }


_DIAGNOSTIC_KEYS = ("rhatMax", "essBulkMin", "divergences", "seconds")
_LONG_AGO = datetime.min.replace(tzinfo=UTC)  # sorts pods that have not finished first


def _finish_time(pod: PodView) -> datetime:
    return pod.finished or _LONG_AGO


def diagnostics(
    steps: Sequence[Step], jobs: Mapping[str, JobView], pods: Sequence[PodView], old: Mapping[str, Any] | None
) -> dict[str, Any] | None:
    """Worst-case convergence over the shards of the sampling Job latest in the walk (the one
    status.shards counts: sample, or the EP round in progress), from its pods' termination messages.

    What status already counts stays counted, so the values outlive the pods they came from (the
    pod garbage collector, spec.cleanupPolicy): each pod's report is folded in once, and `indexes`
    (the completion indexes counted, in the interval notation of a Job's completedIndexes: a few
    characters at any number of shards) keeps divergences, a sum, from counting a pod twice. A new
    round starts its own count once one of its pods reported; until then the round before stays.
    """
    sampling = [s.name for s in steps if children.samples_shards(s.name) and s.name in jobs]
    if not sampling:
        return dict(old) if old else None
    step = sampling[-1]
    kept = old if old and old.get("step") == step else {}
    counted = set(indexes(kept.get("indexes")))
    reports: dict[int, dict] = {}
    for pod in pods:
        report = pod.report or {}
        if (pod.step == step and pod.index is not None and pod.index not in counted and report.get("ok")
                and all(k in report for k in _DIAGNOSTIC_KEYS)):
            reports[pod.index] = report
    if not reports:
        return dict(old) if old else None
    values = list(reports.values())
    summary = {
        "step": step,
        "rhatMax": _extreme(max, [kept.get("rhatMax"), *(r["rhatMax"] for r in values)]),
        "essBulkMin": _extreme(min, [kept.get("essBulkMin"), *(r["essBulkMin"] for r in values)]),
        "divergences": kept.get("divergences", 0) + sum(int(r["divergences"] or 0) for r in values),
        "slowestShardSeconds": _extreme(max, [kept.get("slowestShardSeconds"), *(r["seconds"] for r in values)]),
        "indexes": ranges(counted | set(reports)),
    }
    return {key: value for key, value in summary.items() if value is not None}


def retries(jobs: Mapping[str, JobView], pods: Sequence[PodView], old: Mapping[str, Any] | None) -> dict[str, Any]:
    """status.retries: per per-shard step, its pods started again after a failure or a disruption,
    and their total. A counter: a step's count is the largest of what status has, its pods beyond
    one per index, and its Job's failed pods beyond the indexes failed for good, so it never
    decreases when pods or Jobs are deleted."""
    counts = dict((old or {}).get("steps") or {})
    by_step: dict[str, list[PodView]] = {}
    for pod in pods:
        if children.is_per_shard(pod.step):
            by_step.setdefault(pod.step, []).append(pod)
    for step in {*by_step, *(s for s in jobs if children.is_per_shard(s))}:
        mine, job = by_step.get(step, []), jobs.get(step)
        counts[step] = max(counts.get(step, 0), len(mine) - len({p.index for p in mine}),
                           job.failed - len(job.failed_indexes) if job else 0)
    counts = {step: count for step, count in sorted(counts.items()) if count > 0}
    return {"total": sum(counts.values()), "steps": counts}


def _extreme(pick, values) -> float | None:
    """max or min over the numbers among `values`: a shard's null (no number: its parameters are
    constant by construction) is left out, so the result does not depend on the shards' order."""
    numbers = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return pick(numbers) if numbers else None


def _describe_pod(pod: PodView) -> str:
    kind, number = children.parse_step(pod.step)
    where = f"shard {pod.index}" if pod.index is not None else kind
    if number is not None:
        where = f"round {number}: {where}"
    report = pod.report or {}
    why = f"{report.get('reason', 'Error')}: {report.get('message', 'no message')}"
    return f"{where} (pod {pod.name}): {why} (exit {pod.exit_code})"


def _failure_message(job: JobView, pods: Sequence[PodView]) -> str:
    """Why a step's Job failed: the runner's own reason from its latest failed pod, if any."""
    failed = [p for p in pods if p.step == job.step and p.phase == "Failed" and not p.disrupted]
    latest = max(failed, key=_finish_time, default=None)
    job_reason = f"Job {job.name} failed ({job.reason or 'unknown reason'})"
    if latest:
        return f"{_describe_pod(latest)}; {job_reason}"
    number = children.parse_step(job.step)[1]
    return f"{'' if number is None else f'round {number}: '}{job_reason}: {job.message}"


def _report_of(step: str, pods: Sequence[PodView]) -> dict:
    """The success report of a step's pod (partition and combine have one pod that succeeds)."""
    return next((p.report for p in pods if p.step == step and p.report and p.report.get("ok")), {})


def _done_message(step: Step, fit: Mapping[str, Any], pods: Sequence[PodView]) -> str:
    report = _report_of(step.name, pods)
    if step.message is not None:
        try:
            return step.message.format_map({**report, "shards": fit["spec"]["shards"], "round": step.round})
        except (KeyError, TypeError, ValueError):  # its pod is gone (deleted, or the operator was
            return f"{step.name} Job complete"  # down), or a value is null: no report to quote
    truncated = " (summary truncated)" if report.get("truncated") else ""
    return f"combined into {_result(fit, pods)['uri']}{truncated}"


def _result(fit: Mapping[str, Any], pods: Sequence[PodView]) -> dict[str, Any]:
    """The combined result as the combine pod reported it; the URI alone if its report is gone."""
    report = _report_of(children.COMBINE, pods)
    return {
        "uri": report.get("uri") or children.result_root(fit) + "combined/",
        "parameters": report.get("parameters") or {},
    }


def _suspend_patch(suspend: bool) -> dict:
    marker = "true" if suspend else None  # None deletes the annotation (merge patch)
    return {"metadata": {"annotations": {labels.SUSPENDED_BY_FIT: marker}}, "spec": {"suspend": suspend}}


def _phase_starts(fit: Mapping[str, Any], status: Mapping[str, Any]) -> dict[str, datetime | None]:
    """When each running phase began, from timestamps the status already keeps: a phase after the
    first began when the last step of the phase before it set its condition."""
    conditions = status.get("conditions", [])
    starts = {
        "Pending": parse_time(fit["metadata"].get("creationTimestamp")),
        "Partitioning": parse_time(status.get("startTime")),
    }
    steps = sequence(fit)
    for before, step in zip(steps, steps[1:]):
        if step.phase != before.phase:
            # EP's rounds end with the gate that sets Converged (the Updated condition was set first
            # by the first round's update).
            condition = find(conditions, CONVERGED if before.gate else before.condition)
            starts[step.phase] = parse_time(condition["lastTransitionTime"]) if condition else None
    return starts


def _exited(
    fit: Mapping[str, Any], status: Mapping[str, Any], old: str, reached: str, terminal: bool, now: datetime
) -> tuple[tuple[str, float], ...]:
    """Phases left between `old` and `reached` (and `reached` too when the fit ended), timed."""
    if old in TERMINAL_PHASES:
        return ()
    first, last = RUNNING_PHASES.index(old), RUNNING_PHASES.index(reached)
    left = list(RUNNING_PHASES[first : last + 1 if terminal else last])
    starts = _phase_starts(fit, status)
    ends = [*(starts[p] for p in RUNNING_PHASES[first + 1 : last + 1]), now]
    return tuple(
        (phase, (end - starts[phase]).total_seconds())
        for phase, end in zip(left, ends)
        if starts[phase] is not None and end is not None and end >= starts[phase]
    )


def _pod_news(pods: Sequence[PodView], seen: Ledger) -> tuple[list[PodView], list[PodView], Ledger]:
    started = [p for p in pods if p.started and p.uid not in seen.started]
    finished = [p for p in pods if p.done and p.uid not in seen.done]
    # Only pods that still exist are remembered, so the ledger stays as small as the fit.
    ledger = Ledger(
        started=frozenset(p.uid for p in pods if p.started),
        done=frozenset(p.uid for p in pods if p.done),
    )
    return started, finished, ledger


def _foreign_events(foreign: Sequence[JobView], seen: Ledger) -> list[Event]:
    return [Event("Warning", "ForeignJob", f"Job {job.name} carries this fit's name but is {_owned_by(job)}: ignored")
            for job in foreign if job.uid not in seen.foreign]


def _owned_by(job: JobView) -> str:
    return f"owned by another ConsensusFit (uid {job.owner})" if job.owner else "owned by no one (orphaned)"


def _pod_events(finished: Sequence[PodView]) -> list[Event]:
    events = []
    for pod in finished:
        if pod.phase != "Failed":
            continue
        if pod.disrupted:
            message = f"{pod.step} pod {pod.name} was disrupted; it is replaced without counting a retry"
            events.append(Event("Warning", "PodDisrupted", message))
        else:
            events.append(Event("Warning", "PodFailed", _describe_pod(pod)))
    return events


# -- the policies: each a pure function of what is observed, in the order `plan` applies them ------


@dataclass(frozen=True)
class Failure:
    reason: str  # of the Failed condition and its Warning event
    message: str


@dataclass(frozen=True)
class Suspension:
    """What `spec.suspend` asks in this pass: Job patches, the Suspended condition, and whether the
    fit was just resumed (its deadline then counts again from now)."""

    patches: tuple[tuple[str, dict], ...]
    conditions: list[dict]
    events: tuple[Event, ...] = ()
    resumed: bool = False


def _suspension(
    spec: Mapping[str, Any], unfinished: Sequence[JobView], conditions: list[dict], now: datetime
) -> Suspension:
    """Ours to apply, and ours to lift only where we applied it (not Kueue's)."""
    suspend = bool(spec.get("suspend"))
    patches = tuple(
        (job.name, _suspend_patch(suspend))
        for job in unfinished
        if (not job.suspended if suspend else job.suspended and job.suspended_by_fit)  # resume only ours
    )
    if suspend == is_true(conditions, "Suspended"):
        return Suspension(patches, conditions)
    if suspend:
        conditions = set_condition(conditions, "Suspended", True, "Suspended",
                                   "spec.suspend is true: Jobs suspended, none created", now)
        return Suspension(patches, conditions, (Event("Normal", "Suspended", "fit suspended"),))
    if find(conditions, "Suspended") is None:  # never suspended: nothing to resume
        return Suspension(patches, conditions)
    conditions = set_condition(conditions, "Suspended", False, "Resumed", "spec.suspend is false", now)
    return Suspension(patches, conditions, (Event("Normal", "Resumed", "fit resumed"),), resumed=True)


@dataclass(frozen=True)
class Queueing:
    """The Queued condition in this pass, and how long queues held the fit's Jobs since startTime."""

    conditions: list[dict]
    recorded: int | None  # status.queuedSeconds: the holds that ended
    waited: float  # those and the hold in progress: what the deadline leaves out
    events: tuple[Event, ...] = ()


def _queued(
    unfinished: Sequence[JobView], conditions: list[dict], recorded: int | None, start: datetime | None,
    now: datetime,
) -> Queueing:
    """The Queued condition: True while one of the fit's running Jobs is suspended by someone else
    than the fit (Kueue suspends a Job labelled with a queue until it admits it), False with reason
    Admitted once none is, with a Normal event at each change. A hold that ends adds its seconds
    to `recorded`; derived from the status alone, so a restarted operator counts on where it was."""
    old = find(conditions, QUEUED)
    was_queued = old is not None and old["status"] == "True"
    held = [job for job in unfinished if job.suspended and not job.suspended_by_fit]
    if held:
        job = held[0]
        reason, where = (("QueuedByKueue", f"in Kueue's LocalQueue {job.queue}") if job.queue
                         else ("SuspendedExternally", "suspended by another controller"))
        message = f"Job {job.name} waits {where}: its pods start once it is admitted"
        message += f" (and {len(held) - 1} more)" if len(held) > 1 else ""
        conditions = set_condition(conditions, QUEUED, True, reason, message, now)
        waited = (recorded or 0) + _hold(find(conditions, QUEUED), start, now)
        return Queueing(conditions, recorded, waited, () if was_queued else (Event("Normal", reason, message),))
    if not was_queued:
        return Queueing(conditions, recorded, recorded or 0)
    ended = _hold(old, start, now)
    recorded = int((recorded or 0) + ended) or None
    message = f"admitted after {ended:g} s in the queue"
    return Queueing(set_condition(conditions, QUEUED, False, "Admitted", message, now), recorded, recorded or 0,
                    (Event("Normal", "Admitted", message),))


def _hold(queued: Mapping[str, Any] | None, start: datetime | None, now: datetime) -> float:
    """Seconds since `start` of the queue's hold that the Queued condition says is going on."""
    if queued is None or queued["status"] != "True" or start is None:
        return 0.0
    return max(0.0, (now - max(parse_time(queued["lastTransitionTime"]), start)).total_seconds())


def _deadline(spec: Mapping[str, Any], start: datetime | None, queued: float, now: datetime) -> Failure | None:
    """activeDeadlineSeconds, counted from startTime, and not while the fit is suspended nor for
    the `queued` seconds since then that a queue held its Jobs (a quota's wait is not running)."""
    deadline = spec.get("activeDeadlineSeconds")
    if deadline is None or start is None or spec.get("suspend") or (now - start).total_seconds() - queued <= deadline:
        return None
    return Failure("DeadlineExceeded", f"the fit ran longer than activeDeadlineSeconds={deadline}")


def _rejected(fit: Mapping[str, Any], refused: Mapping[str, Refusal]) -> Failure | None:
    """A Job the API server refuses as invalid fails the fit with the server's own message."""
    for step, refusal in refused.items():
        if refusal.code in INVALID_JOB_CODES:
            job = children.job_name(fit["metadata"]["name"], step)
            return Failure("JobRejected", f"the API server refused Job {job}: {refusal.message}")
    return None


@dataclass(frozen=True)
class Progress:
    """How far the fit's steps got in this pass."""

    reached: str  # the phase reached (never before the fit's phase)
    conditions: list[dict]  # with the completed steps' conditions set
    at: Step | None = None  # the step the walk stopped at: missing, running or failed
    create: bool = False  # `at`'s Job is missing and is to be created
    failure: Failure | None = None
    done: bool = False  # every step's Job completed
    events: tuple[Event, ...] = ()  # what the walk says: a round started, EP converged or stopped


def _advance(
    fit: Mapping[str, Any],
    steps: Sequence[Step],
    jobs: Mapping[str, JobView],
    pods: Sequence[PodView],
    phase: str,
    conditions: list[dict],
    now: datetime,
) -> Progress:
    """Walk `steps` in order: a completed step sets its condition; the walk stops at the first step
    whose Job is missing (to be created, unless the fit is suspended), running, or failed.

    A missing Job with a later step's Job present completed before (the later one was created only
    after it): it is not run again, so a completed round is never rewritten. A completed gate's
    report decides whether the rounds go on (`_final`); while that is not known, the walk waits.
    """
    suspended = bool(fit["spec"].get("suspend"))
    events: list[Event] = []

    def never_back(reached: str) -> str:
        """A Job deleted by hand is recreated without rewinding the phase."""
        return max(reached, phase, key=RUNNING_PHASES.index)

    def stop(reached: str, at: Step, **how: Any) -> Progress:
        return Progress(never_back(reached), conditions, at, events=tuple(events), **how)

    rounds_over = False
    for position, step in enumerate(steps):
        if rounds_over and step.round is not None:
            continue
        later = steps[position + 1 :]
        job = jobs.get(step.name)
        if job is None:
            if any(s.name in jobs for s in later):
                continue
            # A suspended fit that has not started yet is still Pending.
            reached = step.phase if (jobs or not suspended) else "Pending"
            if not suspended and step.round is not None and not step.gate:
                events.append(Event("Normal", "RoundStarted", f"round {step.round} of at most "
                                    f"{children.max_rounds(fit)}: Job {children.job_name(fit['metadata']['name'], step.name)}"))
            return stop(reached, step, create=not suspended)
        if job.outcome == "Failed":
            return stop(step.phase, step, failure=Failure(step.failure, _failure_message(job, pods)))
        if job.outcome is None:
            return stop(step.phase, step)
        conditions = set_condition(conditions, step.condition, True, step.reason,
                                   _done_message(step, fit, pods), now)
        if step.gate:
            final = _final(step, later, jobs, pods)
            if final is None:
                return stop(step.phase, step)  # waits for the update's report
            if final:
                rounds_over = True
                conditions, said = _converged(fit, step, _report_of(step.name, pods), conditions, now)
                events.extend(said)
    return Progress(never_back(steps[-1].phase), conditions, done=True, events=tuple(events))


def _final(step: Step, later: Sequence[Step], jobs: Mapping[str, JobView], pods: Sequence[PodView]) -> bool | None:
    """Whether EP's rounds end at this completed gate: its report's `final`. Without a readable
    report, the Jobs that exist tell (a later Job was created only once the report was read), and
    the last round is final by definition; otherwise None: not known yet."""
    report = _report_of(step.name, pods)
    if "final" in report:
        return bool(report["final"])
    observed = next((s for s in later if s.name in jobs), None)
    if observed is not None:
        return observed.round is None
    return None if any(s.round is not None for s in later) else True


def _changes(report: Mapping[str, Any]) -> str:
    if report.get("meanChange") is None or report.get("sdChange") is None:
        return ""
    return f": in round {report['round']} the means moved {report['meanChange']:.3g} SD and the SDs {report['sdChange']:.3g}"


def _converged(
    fit: Mapping[str, Any], step: Step, report: Mapping[str, Any], conditions: list[dict], now: datetime
) -> tuple[list[dict], tuple[Event, ...]]:
    """The Converged condition once the rounds ended, and its event the first time: never silent
    when EP stopped at maxRounds without converging."""
    changes = _changes({"round": step.round, **report})
    if report.get("converged"):
        kind, true, reason = "Normal", True, "Converged"
        message = f"EP converged in {step.round} rounds{changes}"
    elif "converged" in report:
        kind, true, reason = "Warning", False, "MaxRoundsReached"
        message = (f"EP stopped at maxRounds ({children.max_rounds(fit)}) without converging{changes}; "
                   "the answer is the last round's approximation")
    else:
        kind, true, reason = "Warning", None, "ReportMissing"
        message = (f"EP's rounds ended at round {step.round}, but its update pod's report is gone: "
                   "combined/summary.json says whether it converged")
    first = find(conditions, CONVERGED) is None
    conditions = set_condition(conditions, CONVERGED, true, reason, message, now)
    return conditions, ((Event(kind, reason, message),) if first else ())


def rounds(
    fit: Mapping[str, Any], steps: Sequence[Step], jobs: Mapping[str, JobView], pods: Sequence[PodView],
    old: Mapping[str, Any] | None,
) -> dict[str, Any] | None:
    """status.rounds of an EP fit: the round in progress (0: the pilot), the rounds completed, and
    what the latest completed update reported (kept from before when its pod is gone)."""
    gates = [s for s in steps if s.gate]
    if not gates:
        return None
    completed = [s for s in gates if s.name in jobs and jobs[s.name].outcome == "Complete"]
    report = _report_of(completed[-1].name, pods) if completed else {}
    before = old or {}
    status = {
        "current": max((s.round for s in steps if s.round is not None and s.name in jobs), default=0),
        "completed": completed[-1].round if completed else 0,
        "max": children.max_rounds(fit),
        "converged": bool(report.get("converged", before.get("converged", False))),
    }
    for key in ("meanChange", "sdChange"):
        if (value := report.get(key, before.get(key))) is not None:
            status[key] = value
    return status


@dataclass(frozen=True)
class Block:
    reason: str  # the kubelet's, the scheduler's or the Job controller's reason, or ours
    message: str


def blocks(
    fit: Mapping[str, Any], jobs: Mapping[str, JobView], pods: Sequence[PodView], obstacles: Obstacles,
    wanted: str | None,
) -> list[Block]:
    """Why the fit's pods cannot start, most fundamental first: its next Job's name (`wanted`) held by
    another fit's Job, Job creates the API server forbids, Jobs that cannot create their pods, and
    pods of running Jobs that the kubelet cannot start or no node fits."""
    found = [Block(NAME_TAKEN, f"Job {job.name} is {_owned_by(job)}: delete it to let this fit go on")
             for job in obstacles.foreign if job.name == wanted]
    found += [Block("JobForbidden", f"creating Job {children.job_name(fit['metadata']['name'], step)}: {refusal.message}")
              for step, refusal in obstacles.refused.items() if refusal.code not in INVALID_JOB_CODES]
    found += [Block(FAILED_CREATE, f"Job {job} cannot create its pods: {message}")
              for job, message in sorted(obstacles.failed_creates.items())]
    # A suspended Job's pods are on their way out (a queue took its admission back): they block nothing.
    running = {job.step for job in jobs.values() if job.outcome is None and not job.suspended}
    for pod in sorted(pods, key=lambda p: p.name):
        if pod.done or pod.step not in running:
            continue
        if pod.waiting and pod.waiting[0] in BLOCKING_WAITS:
            found.append(Block(pod.waiting[0], f"pod {pod.name}: {pod.waiting[1] or pod.waiting[0]}"))
        elif pod.unschedulable is not None:
            found.append(Block(UNSCHEDULABLE, f"pod {pod.name} cannot be scheduled: {pod.unschedulable}"))
    return found


@dataclass(frozen=True)
class Blocking:
    conditions: list[dict]
    events: tuple[Event, ...] = ()
    failure: Failure | None = None


def _blocked(found: Sequence[Block], conditions: list[dict], now: datetime, grace: float) -> Blocking:
    """The Blocked condition: True while something keeps the fit's pods from starting (the first
    block's reason and message), False once nothing does. A Warning event when a reason first shows;
    Blocked for longer than `grace` seconds, the fit fails with that reason."""
    old = find(conditions, BLOCKED)
    was_blocked = old is not None and old["status"] == "True"
    if not found:
        if not was_blocked:
            return Blocking(conditions)
        return Blocking(set_condition(conditions, BLOCKED, False, "Unblocked", "nothing keeps the pods from starting", now))
    first = found[0]
    message = first.message + (f" (and {len(found) - 1} more)" if len(found) > 1 else "")
    conditions = set_condition(conditions, BLOCKED, True, first.reason, message, now)
    events = () if was_blocked and old["reason"] == first.reason else (Event("Warning", first.reason, message),)
    since = parse_time(find(conditions, BLOCKED)["lastTransitionTime"])
    if (now - since).total_seconds() <= grace:
        return Blocking(conditions, events)
    return Blocking(conditions, events, Failure(first.reason, f"blocked for more than {grace:g} s: {message}"))


def _admission(fit: Mapping[str, Any], config: Config) -> Failure | None:
    """What the cluster admin's policy (config.Policy) forbids the fit's Jobs: checked at every create,
    since spec.runner may change mid-fit, and for every step the fit has, so that a step refused
    later (a combine image) fails the fit before its shards spend GPU hours."""
    if "python" in fit["spec"]["model"] and not config.policy.python_models:
        return Failure("PythonModelsDisabled", "Python model files are trusted code, and this operator runs "
                       "none (runner.policy.pythonModels is false): write the model as spec.model.formula")
    for step in dict.fromkeys(children.settings_step(step) for step in children.steps(fit)):
        if failure := step_admission(fit, config, step):
            return failure
    return None


def step_admission(fit: Mapping[str, Any], config: Config, step: str) -> Failure | None:
    """What the admin's policy forbids the pods of one step. What the operator's own runner defaults
    give the step (its image, its ServiceAccount) always passes."""
    policy = config.policy
    runner = children.runner_settings(fit, config.runner_defaults, step)
    own = children.runner_settings({"spec": {}}, config.runner_defaults, step)
    image, own_image = runner.get("image") or config.runner_image, own.get("image") or config.runner_image
    if image != own_image and not any(fnmatchcase(image, pattern) for pattern in policy.images):
        return Failure("ImageNotAllowed", f"{step}: spec.runner.image {image} is not allowed: only {own_image}"
                       f"{''.join(f', {p}' for p in policy.images)} (runner.policy.images)")
    account = runner.get("serviceAccountName")
    if account and account != own.get("serviceAccountName") and account not in policy.service_accounts:
        return Failure("ServiceAccountNotAllowed", f"{step}: spec.runner.serviceAccountName {account} is not "
                       f"allowed: only {list(policy.service_accounts)} (runner.policy.serviceAccounts)")
    if refusal := children.volume_refusal(runner, policy.allowed_volumes):
        return Failure("VolumeNotAllowed", f"{step}: {refusal}")
    return None


@dataclass(frozen=True)
class Conclusion:
    phase: str  # the phase after this pass
    conditions: list[dict]
    events: tuple[Event, ...] = ()


def _conclude(fit_name: str, phase: str, progress: Progress, now: datetime) -> Conclusion:
    """Failed on a failure, Succeeded once every step completed, else the phase reached."""
    if progress.failure is not None:
        reason, message = progress.failure.reason, progress.failure.message
        conditions = set_condition(progress.conditions, "Failed", True, reason, message, now)
        return Conclusion("Failed", conditions, (Event("Warning", reason, message),))
    if progress.done:
        succeeded = find(progress.conditions, "Succeeded")["message"]
        return Conclusion("Succeeded", progress.conditions, (Event("Normal", "Succeeded", succeeded),))
    if progress.reached == phase:
        return Conclusion(phase, progress.conditions)
    job = children.job_name(fit_name, progress.at.name)
    return Conclusion(progress.reached, progress.conditions,
                      (Event("Normal", progress.reached, f"{progress.reached}: Job {job}"),))


def _ttl(spec: Mapping[str, Any], status: Mapping[str, Any], now: datetime) -> bool:
    """Whether a finished fit is past its ttlSecondsAfterFinished, and so to be deleted."""
    ttl = spec.get("ttlSecondsAfterFinished")
    completed = parse_time(status.get("completionTime"))
    return ttl is not None and completed is not None and (now - completed).total_seconds() >= ttl


def _retention(spec: Mapping[str, Any], phase: str, jobs: Mapping[str, JobView]) -> tuple[str, ...]:
    """spec.cleanupPolicy: a finished fit's Jobs to delete (the garbage collector takes their pods)
    where the policy for how it ended says Delete. Called only for a fit already finished when the
    pass began, so the status that concluded it (result, diagnostics, counts) is stored first."""
    policy = (spec.get("cleanupPolicy") or {}).get(CLEANUP_ON[phase])
    return tuple(sorted(job.name for job in jobs.values())) if policy == DELETE else ()


def _stop(unfinished: Sequence[JobView]) -> tuple[tuple[str, dict], ...]:
    """A failed fit stops what still runs (keeping the Jobs and their pods' messages for inspection)."""
    return tuple((job.name, _suspend_patch(True)) for job in unfinished if not job.suspended)


def _observed(
    fit: Mapping[str, Any], steps: Sequence[Step], jobs: Mapping[str, JobView], pods: Sequence[PodView],
    old: Mapping[str, Any],
) -> dict[str, Any]:
    """The status fields read from the Jobs and pods. A running fit's are recomputed in every pass;
    a finished fit's stay as the pass that concluded it left them, so that deleting its Jobs and
    pods (spec.cleanupPolicy, the garbage collector) loses nothing; only the retry counter may grow."""
    counters = {"observedGeneration": fit["metadata"].get("generation"),
                "retries": retries(jobs, pods, old.get("retries"))}
    if old.get("phase") in TERMINAL_PHASES:
        return counters
    spec = fit["spec"]
    resampled = any(step.name == children.RESAMPLE for step in steps)
    # The shards of the sampling Job latest in the walk: sample, or the EP round in progress.
    sampling = [jobs[s.name] for s in steps if children.samples_shards(s.name) and s.name in jobs]
    return {
        **counters,
        "shards": shard_counts(spec["shards"], sampling[-1] if sampling else None, children.shards_per_pod(fit)),
        "resample": shard_counts(spec["shards"], jobs.get(children.RESAMPLE)) if resampled else None,
        "rounds": rounds(fit, steps, jobs, pods, old.get("rounds")),
        "diagnostics": diagnostics(steps, jobs, pods, old.get("diagnostics")),
    }


def plan(
    fit: Mapping[str, Any],
    jobs: Mapping[str, JobView],
    pods: Sequence[PodView],
    now: datetime,
    config: Config,
    seen: Ledger = Ledger(),
    obstacles: Obstacles = Obstacles(),
) -> Plan:
    """Decide what to do for one fit. `jobs` maps a step to its Job; `pods` are its Jobs' pods
    (`children_of`); `obstacles` what else keeps its pods from starting.

    As JobSet's reconcile does, a pass applies named policies in order: a finished fit deletes its
    Jobs as spec.cleanupPolicy says (`_retention`) and expires (`_ttl`); a running one applies
    spec.suspend (`_suspension`), tells whether a queue holds its Jobs (`_queued`), checks its
    deadline (`_deadline`) and refused Jobs (`_rejected`), walks its steps (`_advance`), looks for
    what blocks its pods (`_blocked`), checks the Job to create against the admin's policy
    (`_admission`) and settles its phase (`_conclude`); a failed fit stops what still runs (`_stop`).
    """
    spec = fit["spec"]
    old = {key: value for key, value in (fit.get("status") or {}).items() if key in STATUS_FIELDS}
    phase = old.get("phase", "Pending")
    steps = sequence(fit)
    status = {**copy.deepcopy(old), **_observed(fit, steps, jobs, pods, old)}
    unfinished = [job for job in jobs.values() if job.outcome is None]
    started, finished, ledger = _pod_news(pods, seen)
    ledger = dataclasses.replace(ledger, foreign=frozenset(job.uid for job in obstacles.foreign if job.uid))
    events, create, patches = [*_foreign_events(obstacles.foreign, seen), *_pod_events(finished)], [], ()
    deleted: tuple[str, ...] = ()

    if phase in TERMINAL_PHASES:
        outcome, reached = Conclusion(phase, status.get("conditions", [])), phase
        deleted = _retention(spec, phase, jobs)
        if deleted:
            events.append(Event("Normal", "JobsDeleted", f"spec.cleanupPolicy.{CLEANUP_ON[phase]} is {DELETE}: "
                                f"deleting Jobs {', '.join(deleted)} and their pods; the status keeps the result"))
    else:
        suspension = _suspension(spec, unfinished, status.get("conditions", []), now)
        events += suspension.events
        patches = suspension.patches
        if suspension.resumed and status.get("startTime"):
            # As a Job does: the deadline counts from the resumption, queued time included.
            status["startTime"], status["queuedSeconds"] = timestamp(now), None
        start = parse_time(status.get("startTime"))
        queueing = _queued(unfinished, suspension.conditions, status.get("queuedSeconds"), start, now)
        events += queueing.events
        status["queuedSeconds"] = queueing.recorded
        failure = _deadline(spec, start, queueing.waited, now) or _rejected(fit, obstacles.refused)
        progress = (Progress(phase, queueing.conditions, failure=failure) if failure
                    else _advance(fit, steps, jobs, pods, phase, queueing.conditions, now))
        wanted = children.job_name(fit["metadata"]["name"], progress.at.name) if progress.create else None
        found = blocks(fit, jobs, pods, obstacles, wanted)
        blocking = _blocked(found, progress.conditions, now, config.blocked_grace_seconds)
        events += blocking.events
        failure = progress.failure or blocking.failure or (_admission(fit, config) if progress.create else None)
        progress = dataclasses.replace(progress, conditions=blocking.conditions, failure=failure,
                                       create=progress.create and not failure)
        if progress.create and not any(block.reason == NAME_TAKEN for block in found):
            create.append(children.job_manifest(fit, progress.at.name, config.runner_defaults, config.runner_image))
            status.setdefault("startTime", timestamp(now))
        outcome, reached = _conclude(fit["metadata"]["name"], phase, progress, now), progress.reached
        events += outcome.events + progress.events
        if outcome.phase == "Succeeded":
            status["result"] = _result(fit, pods)
        if outcome.phase in TERMINAL_PHASES:
            status["completionTime"] = timestamp(now)

    if outcome.phase == "Failed":
        patches = _stop([job for job in unfinished if job.name not in deleted])
    status["phase"] = outcome.phase
    status["conditions"] = outcome.conditions
    status = {key: value for key, value in status.items() if value is not None}
    moved = outcome.phase != phase
    return Plan(
        create=tuple(create),
        patch_jobs=patches,
        delete_jobs=deleted,
        delete_fit=phase in TERMINAL_PHASES and _ttl(spec, status, now),
        status=merge_patch(old, status),
        state=status,
        events=tuple(events),
        exited=_exited(fit, status, phase, reached, outcome.phase in TERMINAL_PHASES, now) if moved else (),
        started=tuple(started),
        finished=tuple(finished),
        seen=ledger,
    )
