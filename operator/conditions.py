"""Status conditions in the Kubernetes convention (type, status, reason, message, lastTransitionTime)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime


def timestamp(moment: datetime) -> str:
    """RFC 3339 in UTC with a Z, to the second, as Kubernetes writes times."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def find(conditions: Sequence[dict], kind: str) -> dict | None:
    return next((c for c in conditions if c.get("type") == kind), None)


def is_true(conditions: Sequence[dict], kind: str) -> bool:
    condition = find(conditions, kind)
    return condition is not None and condition.get("status") == "True"


def set_condition(
    conditions: Sequence[dict], kind: str, true: bool | None, reason: str, message: str, now: datetime
) -> list[dict]:
    """A new list with the condition set (None: Unknown); lastTransitionTime moves only when the status flips."""
    status = "Unknown" if true is None else "True" if true else "False"
    old = find(conditions, kind)
    moved = old is None or old.get("status") != status
    condition = {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": timestamp(now) if moved else old["lastTransitionTime"],
    }
    if old is None:
        return [*conditions, condition]
    # In place, so that an unchanged condition leaves the list (and the status) unchanged.
    return [condition if c is old else c for c in conditions]
