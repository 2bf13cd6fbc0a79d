"""Every termination message and summary a step reports (docs/contract.md, "Termination message").

Kubernetes keeps at most 4 KiB of a termination message (`contract.TERMINATION_LIMIT`):
`within_limit` is the one way a message is cut to fit. The operator reads the messages' camelCase
keys (`rhatMax`, `essBulkMin`, `acceptProb`); files use snake_case (`rhat_max`, `ess_bulk_min`).
`worst` is the one "worst over shards" (largest R-hat, smallest bulk ESS), for a shard's
parameters, for a pod's shards and for the summary's shard table alike.

Pure: nothing here reads or writes a file.
"""

from __future__ import annotations

import json
import math
from typing import Iterable

from ..contract import TERMINATION_LIMIT, finite, strict_json

TRUNCATED = ', "truncated": true'
SUMMARY_KEYS = ("mean", "sd", "q05", "q50", "q95")


def _size(message: dict) -> int:
    # Measured as json.dumps writes it by default (spaces, ASCII escapes): the message as written
    # (compact) is never longer, in characters or in UTF-8 bytes.
    return len(json.dumps(message))


def within_limit(message: dict, limit: int = TERMINATION_LIMIT) -> dict:
    """`message` as it is if it fits in `limit` bytes; else with as many of its `parameters`, in
    order, as fit, and `"truncated": true`; a `message` text too long is cut. Non-numbers are null
    (`contract.finite`)."""
    message = finite(message)
    if _size(message) <= limit:
        return message
    if "parameters" in message:
        trimmed = {**message, "parameters": {}}
        for name, summary in message["parameters"].items():
            candidate = {**trimmed, "parameters": {**trimmed["parameters"], name: summary}}
            if _size(candidate) + len(TRUNCATED) > limit:
                break
            trimmed = candidate
        message = {**trimmed, "truncated": True}
    if _size(message) > limit and isinstance(message.get("message"), str):
        excess = _size(message) - limit
        message = {**message, "message": message["message"][: max(0, len(message["message"]) - excess - 1)] + "…"}
    return message


def encode(message: dict) -> str:
    """The termination message as written: compact JSON, within the limit."""
    return strict_json(within_limit(message), separators=(",", ":"))


def failure(reason: str, line: str) -> dict:
    return {"ok": False, "reason": reason, "message": line}


# ---------------------------------------------------------------- worst over shards


def _numbers(values: Iterable) -> list[float]:
    # NaN (a component constant by construction, e.g. a Cholesky factor's fixed entries) and null
    # say nothing about convergence; leaving them out makes the worst case independent of order
    return [v for v in values if v is not None and not math.isnan(v)]


def worst(parameters: Iterable[dict], empty=None) -> tuple[float | None, float | None]:
    """(largest `rhat`, smallest `ess_bulk`) of parameter diagnostics, over the ones that are
    numbers; `empty` where none is."""
    parameters = list(parameters)
    rhats, esses = _numbers(p["rhat"] for p in parameters), _numbers(p["ess_bulk"] for p in parameters)
    return (max(rhats) if rhats else empty), (min(esses) if esses else empty)


def worst_of(reports: Iterable[dict]) -> tuple[float, float]:
    """(largest `rhatMax`, smallest `essBulkMin`) of several shards' messages."""
    reports = list(reports)
    return worst({"rhat": r["rhatMax"], "ess_bulk": r["essBulkMin"]} for r in reports)


# ---------------------------------------------------------------- sample


def sample_message(diagnostics: dict) -> dict:
    """One shard's `sample` message, from its diagnostics.json."""
    rhat_max, ess_bulk_min = worst(diagnostics["parameters"].values())
    return {
        "ok": True,
        "shard": diagnostics["shard"],
        "rhatMax": rhat_max,
        "essBulkMin": ess_bulk_min,
        "divergences": diagnostics["divergences"],
        "seconds": round(sum(diagnostics["seconds"].values()), 3),
    }


def pod_message(messages: list[dict]) -> dict:
    """One shard's message as it is; several shards' as their worst case (the pod's report)."""
    if len(messages) == 1:
        return messages[0]
    rhat_max, ess_bulk_min = worst_of(messages)
    return {
        "ok": True,
        "shards": [m["shard"] for m in messages],
        "rhatMax": rhat_max,
        "essBulkMin": ess_bulk_min,
        "divergences": sum(m["divergences"] for m in messages),
        "seconds": max(m["seconds"] for m in messages),
    }


# ---------------------------------------------------------------- combine and resample


def describe_shards(shards: list[int], total: int) -> str:
    """`shard 3` or `shards 3, 7 (2 of 50)`: at most ten named."""
    shown = ", ".join(map(str, shards[:10])) + (", …" if len(shards) > 10 else "")
    return f"shard {shown}" if len(shards) == 1 else f"shards {shown} ({len(shards)} of {total})"


def globals_message(uri: str, done: dict) -> dict:
    """The globals stage's message, built from its marker so a retry reports the same."""
    return {"ok": True, "stage": "globals", "uri": uri, "draws": done["draws"], "warnings": done["warnings"]}


def resample_message(shard: int, done: dict) -> dict:
    """The `resample` message, from the shard's marker (the same on a retry)."""
    seconds = sum(done.get("seconds", {}).values())
    return {"ok": True, "shard": shard, "seconds": round(seconds, 3), "acceptProb": done.get("accept_prob")}


def combine_message(uri: str, parameters: dict[str, dict]) -> dict:
    """The combination's message: the global parameters' summaries, trimmed to 4 KiB (then
    `"truncated": true`)."""
    summaries = {name: {key: float(f"{stats[key]:.6g}") for key in SUMMARY_KEYS} for name, stats in parameters.items()}
    return within_limit({"ok": True, "uri": uri, "parameters": summaries})


def partition_message(rows: int, groups: int) -> dict:
    return {"ok": True, "rows": rows, "groups": groups}


# ---------------------------------------------------------------- summary.json


def shard_row(shard: int, diagnostics: dict | None) -> dict:
    """A shard's row of the summary's `shard_diagnostics` (only `shard` without diagnostics)."""
    if diagnostics is None:
        return {"shard": shard}
    rhat_max, ess_bulk_min = worst(diagnostics.get("parameters", {}).values())
    return {
        "shard": shard,
        "rows": diagnostics.get("rows"),
        "groups": diagnostics.get("groups"),
        "rhat_max": rhat_max,
        "ess_bulk_min": ess_bulk_min,
        "divergences": diagnostics.get("divergences"),
    }


def shard_warnings(rows: list[dict], rhat_limit: float) -> list[str]:
    """Each shard's own convergence trouble, from its `shard_row`."""
    warnings = []
    for r in rows:
        if r.get("rhat_max") is not None and r["rhat_max"] > rhat_limit:
            warnings.append(f"shard {r['shard']}: R-hat {r['rhat_max']:.3f} > {rhat_limit}")
        if r.get("divergences"):
            warnings.append(f"shard {r['shard']}: {r['divergences']} divergent transitions")
    return warnings


# ---------------------------------------------------------------- EP rounds


def update_message(state) -> dict:
    """An EP update's message (from its state file, so a retry reports the same): what the
    operator decides the next round by."""
    change = state.change or {}
    return {
        "ok": True,
        "round": state.round,
        "converged": state.converged,
        "final": state.final,
        "meanChange": change.get("mean"),
        "sdChange": change.get("sd"),
        "damping": state.damping,
    }


def pilot_message(diagnostics: dict) -> dict:
    """The pilot's message: its convergence, like a shard's, and the shards it sampled."""
    rhat_max, ess_bulk_min = worst(diagnostics["parameters"].values())
    return {
        "ok": True,
        "round": 0,
        "shards": diagnostics["pilot_shards"],
        "rhatMax": rhat_max,
        "essBulkMin": ess_bulk_min,
        "divergences": diagnostics["divergences"],
        "seconds": round(sum(diagnostics["seconds"].values()), 3),
    }
