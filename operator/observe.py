"""What the operator keeps of the Jobs and pods it watches: small, immutable summaries.

Kubernetes objects are large; the operator keeps thousands of shard pods in memory, so each is
reduced at once to the few fields the planner decides on. Everything here is pure.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from consensusfit.runner.contract import RUNNER_CONTAINER, finite

from . import labels

# Set by the Job controller on the pods of an Indexed Job.
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
# The pod condition of a pod preempted, evicted or on a node gone (retried without counting).
DISRUPTION_TARGET = "DisruptionTarget"
# The scheduler's reason on PodScheduled=False when no node fits the pod (not SchedulingGated: a queue's).
UNSCHEDULABLE = "Unschedulable"
# The Job controller's event reason when it cannot create a pod (only its events say why).
FAILED_CREATE = "FailedCreate"


def parse_time(value: str | None) -> datetime | None:
    """An RFC 3339 timestamp as Kubernetes writes it ("...Z"), or None."""
    return datetime.fromisoformat(value) if value else None


def indexes(ranges: str | None) -> tuple[int, ...]:
    """The indexes a Job's interval string names ("1,3-5" is 1, 3, 4, 5)."""
    named: list[int] = []
    for part in filter(None, (ranges or "").split(",")):
        first, _, last = part.partition("-")
        named.extend(range(int(first), int(last or first) + 1))
    return tuple(named)


def ranges(named: Iterable[int]) -> str:
    """The interval string of these indexes, as a Job's status writes it (1, 3, 4, 5 is "1,3-5")."""
    runs: list[list[int]] = []
    for index in sorted(set(named)):
        if runs and index == runs[-1][1] + 1:
            runs[-1][1] = index
        else:
            runs.append([index, index])
    return ",".join(str(first) if first == last else f"{first}-{last}" for first, last in runs)


def controller_uid(metadata: Mapping[str, Any]) -> str | None:
    """The uid of the object's controller (ownerReferences[].controller), or None: an orphan."""
    return next((ref.get("uid") for ref in metadata.get("ownerReferences") or [] if ref.get("controller")), None)


def parse_report(message: str | None) -> dict | None:
    """The runner's termination message (docs/contract.md) as a dict.

    A message that is not the runner's JSON (a crash before it wrote one, so Kubernetes fell back
    to the log tail) becomes a failure report carrying the text.
    """
    if not message:
        return None
    try:
        report = json.loads(message)
    except ValueError:
        report = None
    if isinstance(report, dict) and "ok" in report:
        return finite(report)  # an older runner's NaN would make every status patch invalid JSON
    return {"ok": False, "reason": "Error", "message": message.strip().splitlines()[-1][:400]}


@dataclass(frozen=True)
class JobView:
    """A child Job: which step, whose it is, whether it is suspended, how far it got."""

    name: str
    step: str
    uid: str | None
    owner: str | None  # the controlling fit's uid: a Job labelled with a fit's name may be another's
    created: datetime | None
    suspended: bool
    suspended_by_fit: bool  # suspended by this operator (not by Kueue): ours to resume
    outcome: str | None  # "Complete", "Failed" or None while it runs
    reason: str  # of the Failed condition
    message: str
    active: int  # pods running
    succeeded: int  # pods succeeded
    completed_indexes: tuple[int, ...]  # of an Indexed Job: the pods (indexes) that succeeded
    failed_indexes: tuple[int, ...]  # and those failed for good
    failed: int = 0  # pods failed (the Job controller's counter: disruptions it ignores are not in it)
    queue: str | None = None  # the Kueue LocalQueue it is labelled with (labels.QUEUE_NAME)


def job_view(job: Mapping[str, Any]) -> JobView:
    metadata, spec, status = job["metadata"], job.get("spec") or {}, job.get("status") or {}
    outcome, reason, message = None, "", ""
    for condition in status.get("conditions") or []:
        if condition.get("type") in ("Complete", "Failed") and condition.get("status") == "True":
            outcome = condition["type"]
            reason, message = condition.get("reason", ""), condition.get("message", "")
    annotations, given = metadata.get("annotations") or {}, metadata.get("labels") or {}
    return JobView(
        name=metadata["name"],
        step=given.get(labels.STEP, ""),
        uid=metadata.get("uid"),
        owner=controller_uid(metadata),
        created=parse_time(metadata.get("creationTimestamp")),
        suspended=bool(spec.get("suspend")),
        suspended_by_fit=annotations.get(labels.SUSPENDED_BY_FIT) == "true",
        outcome=outcome,
        reason=reason,
        message=message,
        active=status.get("active") or 0,
        succeeded=status.get("succeeded") or 0,
        completed_indexes=indexes(status.get("completedIndexes")),
        failed_indexes=indexes(status.get("failedIndexes")),
        failed=status.get("failed") or 0,
        queue=given.get(labels.QUEUE_NAME),
    )


@dataclass(frozen=True)
class PodView:
    """A runner pod: its step and shard, whether it started, what keeps it from starting, how it ended."""

    uid: str
    name: str
    step: str
    owner: str | None  # its Job's uid
    index: int | None  # the shard, for pods of the Indexed shard Job
    phase: str
    created: datetime | None
    started: datetime | None
    finished: datetime | None
    exit_code: int | None
    disrupted: bool  # preempted, evicted, node gone: retried without counting as a failure
    report: dict | None  # the parsed termination message
    waiting: tuple[str, str] | None = None  # the runner container's waiting (reason, message)
    unschedulable: str | None = None  # the scheduler's message while PodScheduled is False: Unschedulable

    @property
    def done(self) -> bool:
        return self.phase in ("Succeeded", "Failed")


def pod_view(pod: Mapping[str, Any]) -> PodView:
    metadata, status = pod["metadata"], pod.get("status") or {}
    state: Mapping[str, Any] = {}
    for container in status.get("containerStatuses") or []:
        if container.get("name") == RUNNER_CONTAINER:
            state = container.get("state") or {}
    running, terminated = state.get("running") or {}, state.get("terminated") or {}
    waiting = state.get("waiting") or {}
    index = (metadata.get("annotations") or {}).get(COMPLETION_INDEX)
    conditions = status.get("conditions") or []
    unschedulable = next((c.get("message") or "" for c in conditions if c.get("type") == "PodScheduled"
                          and c.get("status") == "False" and c.get("reason") == UNSCHEDULABLE), None)
    return PodView(
        uid=metadata.get("uid") or metadata["name"],
        name=metadata["name"],
        step=(metadata.get("labels") or {}).get(labels.STEP, ""),
        owner=controller_uid(metadata),
        index=int(index) if index is not None else None,
        phase=status.get("phase", "Pending"),
        created=parse_time(metadata.get("creationTimestamp")),
        started=parse_time(running.get("startedAt") or terminated.get("startedAt")),
        finished=parse_time(terminated.get("finishedAt")),
        exit_code=terminated.get("exitCode"),
        disrupted=any(c.get("type") == DISRUPTION_TARGET and c.get("status") == "True" for c in conditions),
        report=parse_report(terminated.get("message")),
        waiting=(waiting["reason"], waiting.get("message") or "") if waiting.get("reason") else None,
        unschedulable=unschedulable,
    )
