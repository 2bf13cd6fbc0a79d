"""Every decision of the operator: from (fit, observed Jobs and pods, time) to what to change.

`plan` is a pure function. It derives the fit's state from what it observes, never from memory
of earlier passes, so an operator restarted at any moment, or one that sees a stale view, makes
the same decisions: children have deterministic names (a repeated create is a harmless conflict),
and the status it writes is recomputed from the Jobs and pods each time.

Phases: Pending -> Partitioning -> Sampling -> Combining -> Succeeded, or Failed with a reason.
Combining spans three Jobs (children.py): globals, resample (one pod per shard) and combine.
Conditions: Partitioned, Sampled, GlobalsCombined, GroupsResampled (only for fits that re-sample
their group-level parameters), Succeeded, Failed, Suspended.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from . import children, labels
from .conditions import find, is_true, set_condition, timestamp
from .config import Config
from .observe import JobView, PodView, parse_time

STEP_PHASE = {"partition": "Partitioning", "sample": "Sampling", "globals": "Combining",
              "resample": "Combining", "combine": "Combining"}
RUNNING_PHASES = ("Pending", "Partitioning", "Sampling", "Combining")
TERMINAL_PHASES = ("Succeeded", "Failed")
_DONE_CONDITION = {"partition": "Partitioned", "sample": "Sampled", "globals": "GlobalsCombined",
                   "resample": "GroupsResampled", "combine": "Succeeded"}
_DONE_REASON = {"partition": "PartitionSucceeded", "sample": "ShardsSucceeded", "globals": "GlobalsSucceeded",
                "resample": "ResampleSucceeded", "combine": "CombineSucceeded"}
_FAIL_REASON = {"partition": "PartitionFailed", "sample": "ShardFailed", "globals": "CombineFailed",
                "resample": "ResampleFailed", "combine": "CombineFailed"}
# The status fields this operator owns; anything else there (another tool's) is left alone.
STATUS_FIELDS = (
    "observedGeneration", "phase", "conditions", "shards", "resample", "startTime", "completionTime",
    "diagnostics", "result",
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
    """Pod uids already reported as started and as done, so each pod is reported once per process.

    It only suppresses repeated events and metric observations; no decision depends on it.
    """

    started: frozenset[str] = frozenset()
    done: frozenset[str] = frozenset()


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


def diagnostics(pods: Sequence[PodView]) -> dict[str, Any] | None:
    """Worst-case convergence over the shards, from the shard pods' termination messages."""
    reports: dict[int, dict] = {}
    for pod in sorted(pods, key=_finish_time):  # a later report of a shard wins
        report = pod.report or {}
        if pod.step == "sample" and report.get("ok") and all(k in report for k in _DIAGNOSTIC_KEYS):
            reports[pod.index if pod.index is not None else report.get("shard")] = report
    if not reports:
        return None
    values = list(reports.values())
    return {
        "rhatMax": max(r["rhatMax"] for r in values),
        "essBulkMin": min(r["essBulkMin"] for r in values),
        "divergences": sum(int(r["divergences"]) for r in values),
        "slowestShardSeconds": max(r["seconds"] for r in values),
    }


def _describe_pod(pod: PodView) -> str:
    where = f"shard {pod.index}" if pod.index is not None else pod.step
    report = pod.report or {}
    why = f"{report.get('reason', 'Error')}: {report.get('message', 'no message')}"
    return f"{where} (pod {pod.name}): {why} (exit {pod.exit_code})"


def _failure_message(job: JobView, pods: Sequence[PodView]) -> str:
    """Why a step's Job failed: the runner's own reason from its latest failed pod, if any."""
    failed = [p for p in pods if p.step == job.step and p.phase == "Failed" and not p.disrupted]
    latest = max(failed, key=_finish_time, default=None)
    job_reason = f"Job {job.name} failed ({job.reason or 'unknown reason'})"
    return f"{_describe_pod(latest)}; {job_reason}" if latest else f"{job_reason}: {job.message}"


def _report_of(step: str, pods: Sequence[PodView]) -> dict:
    """The success report of a step's pod (partition and combine have one pod that succeeds)."""
    return next((p.report for p in pods if p.step == step and p.report and p.report.get("ok")), {})


# A finished step's condition message, from its pod's report and the fit's shard count.
_DONE_MESSAGE = {
    "partition": "partitioned {rows} rows in {groups} groups",
    "sample": "{shards} shards sampled",
    "globals": "{draws} combined draws of the global parameters ({warnings} warnings)",
    "resample": "{shards} shards' group-level parameters re-sampled given the combined draws",
}


def _done_message(step: str, fit: Mapping[str, Any], pods: Sequence[PodView]) -> str:
    report = _report_of(step, pods)
    if step in _DONE_MESSAGE:
        try:
            return _DONE_MESSAGE[step].format_map({**report, "shards": fit["spec"]["shards"]})
        except KeyError:  # its pod is gone (deleted, or the operator was down): no report to quote
            return f"{step} Job complete"
    truncated = " (summary truncated)" if report.get("truncated") else ""
    return f"combined into {_result(fit, pods)['uri']}{truncated}"


def _result(fit: Mapping[str, Any], pods: Sequence[PodView]) -> dict[str, Any]:
    """The combined result as the combine pod reported it; the URI alone if its report is gone."""
    report = _report_of("combine", pods)
    return {
        "uri": report.get("uri") or children.result_root(fit) + "combined/",
        "parameters": report.get("parameters") or {},
    }


def _suspend_patch(suspend: bool) -> dict:
    marker = "true" if suspend else None  # None deletes the annotation (merge patch)
    return {"metadata": {"annotations": {labels.SUSPENDED_BY_FIT: marker}}, "spec": {"suspend": suspend}}


def _phase_starts(fit: Mapping[str, Any], status: Mapping[str, Any]) -> dict[str, datetime | None]:
    """When each running phase began, from timestamps the status already keeps."""
    conditions = status.get("conditions", [])

    def since(kind: str) -> datetime | None:
        condition = find(conditions, kind)
        return parse_time(condition["lastTransitionTime"]) if condition else None

    return {
        "Pending": parse_time(fit["metadata"].get("creationTimestamp")),
        "Partitioning": parse_time(status.get("startTime")),
        "Sampling": since("Partitioned"),
        "Combining": since("Sampled"),
    }


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


def plan(
    fit: Mapping[str, Any],
    jobs: Mapping[str, JobView],
    pods: Sequence[PodView],
    now: datetime,
    config: Config,
    seen: Ledger = Ledger(),
) -> Plan:
    """Decide what to do for one fit. `jobs` maps a step to its Job; `pods` are the fit's pods."""
    metadata, spec = fit["metadata"], fit["spec"]
    old = {key: value for key, value in (fit.get("status") or {}).items() if key in STATUS_FIELDS}
    status: dict[str, Any] = copy.deepcopy(old)
    status["observedGeneration"] = metadata.get("generation")
    steps = children.steps(fit)
    status["shards"] = shard_counts(spec["shards"], jobs.get("sample"), children.shards_per_pod(fit))
    status["resample"] = shard_counts(spec["shards"], jobs.get("resample")) if "resample" in steps else None
    status["diagnostics"] = diagnostics(pods) or old.get("diagnostics")
    conditions = status.get("conditions", [])
    phase = old.get("phase", "Pending")
    started, finished, ledger = _pod_news(pods, seen)
    events = _pod_events(finished)
    create: list[dict] = []
    patches: list[tuple[str, dict]] = []
    unfinished = [job for job in jobs.values() if job.outcome is None]

    if phase in TERMINAL_PHASES:
        new_phase, reached = phase, phase
        ttl = spec.get("ttlSecondsAfterFinished")
        completed = parse_time(status.get("completionTime"))
        delete_fit = ttl is not None and completed is not None and (now - completed).total_seconds() >= ttl
    else:
        delete_fit = False
        suspended = bool(spec.get("suspend"))
        # Suspension: ours to apply, and ours to lift only where we applied it (not Kueue's).
        for job in unfinished:
            if suspended and not job.suspended:
                patches.append((job.name, _suspend_patch(True)))
            elif not suspended and job.suspended and job.suspended_by_fit:
                patches.append((job.name, _suspend_patch(False)))
        if suspended != is_true(conditions, "Suspended"):
            if suspended:
                conditions = set_condition(conditions, "Suspended", True, "Suspended",
                                           "spec.suspend is true: Jobs suspended, none created", now)
                events.append(Event("Normal", "Suspended", "fit suspended"))
            elif find(conditions, "Suspended"):
                conditions = set_condition(conditions, "Suspended", False, "Resumed",
                                           "spec.suspend is false", now)
                events.append(Event("Normal", "Resumed", "fit resumed"))
                # As a Job does: the active deadline counts again from the resumption.
                if status.get("startTime"):
                    status["startTime"] = timestamp(now)

        failure: tuple[str, str] | None = None
        deadline = spec.get("activeDeadlineSeconds")
        start = parse_time(status.get("startTime"))
        reached, succeeded, current = phase, False, None
        if deadline is not None and start is not None and not suspended and (now - start).total_seconds() > deadline:
            failure = ("DeadlineExceeded", f"the fit ran longer than activeDeadlineSeconds={deadline}")
        else:
            for step in steps:
                current = step
                job = jobs.get(step)
                if job is None:
                    if not suspended:
                        create.append(children.job_manifest(fit, step, config.runner_defaults, config.runner_image))
                        status.setdefault("startTime", timestamp(now))
                    # A suspended fit that has not started yet is still Pending.
                    reached = STEP_PHASE[step] if (jobs or not suspended) else "Pending"
                    break
                reached = STEP_PHASE[step]
                if job.outcome == "Failed":
                    failure = (_FAIL_REASON[step], _failure_message(job, pods))
                    break
                if job.outcome is None:
                    break
                conditions = set_condition(conditions, _DONE_CONDITION[step], True,
                                           _DONE_REASON[step], _done_message(step, fit, pods), now)
            else:
                succeeded = True
                status["result"] = _result(fit, pods)
            # Never back: a Job deleted by hand is recreated without rewinding the phase.
            reached = max(reached, phase, key=RUNNING_PHASES.index)

        if failure is not None:
            new_phase = "Failed"
            conditions = set_condition(conditions, "Failed", True, failure[0], failure[1], now)
            events.append(Event("Warning", failure[0], failure[1]))
        elif succeeded:
            new_phase = "Succeeded"
            events.append(Event("Normal", "Succeeded", find(conditions, "Succeeded")["message"]))
        else:
            new_phase = reached
            if new_phase != phase:
                job = children.job_name(metadata["name"], current)
                events.append(Event("Normal", new_phase, f"{new_phase}: Job {job}"))
        if new_phase in TERMINAL_PHASES:
            status["completionTime"] = timestamp(now)

    if new_phase == "Failed":
        # Stop what still runs (keeping the Jobs and their pods' messages for inspection).
        patches = [(job.name, _suspend_patch(True)) for job in unfinished if not job.suspended]
    status["phase"] = new_phase
    status["conditions"] = conditions
    status = {key: value for key, value in status.items() if value is not None}
    return Plan(
        create=tuple(create),
        patch_jobs=tuple(patches),
        delete_fit=delete_fit,
        status=merge_patch(old, status),
        state=status,
        events=tuple(events),
        exited=_exited(fit, status, phase, reached, new_phase in TERMINAL_PHASES, now) if new_phase != phase else (),
        started=tuple(started),
        finished=tuple(finished),
        seen=ledger,
    )
