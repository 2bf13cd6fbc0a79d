"""Posterior summaries of combined draws: mean, sd, q05, q50, q95 (+ bulk and tail ESS for globals).

The keys are those of `combined/summary.json` (docs/contract.md); group-level components are
named by group label, `name[<label>]`, `name[<label>,j]`.
"""

from __future__ import annotations

import numpy as np

from ..inference.diagnostics import ess_bulk, ess_tail
from ..store.draws import component_names


def _summaries(flat: np.ndarray, names: list[str]) -> dict[str, dict]:
    """mean, sd, q05, q50, q95 of every column of flat draws (N, P)."""
    if flat.shape[1] == 0:
        return {}
    q05, q50, q95 = np.quantile(flat, [0.05, 0.5, 0.95], axis=0)
    mean, sd = flat.mean(axis=0), flat.std(axis=0, ddof=1)
    return {
        name: {"mean": float(mean[i]), "sd": float(sd[i]), "q05": float(q05[i]), "q50": float(q50[i]), "q95": float(q95[i])}
        for i, name in enumerate(names)
    }


def global_summary(constrained: dict[str, np.ndarray]) -> dict[str, dict]:
    result = {}
    for name, values in constrained.items():
        chains, draws = values.shape[:2]
        per_chain = values.reshape(chains, draws, -1)
        names = component_names(name, values.shape[2:])
        stats = _summaries(per_chain.reshape(chains * draws, -1), names)
        for i, component in enumerate(names):
            stats[component]["ess_bulk"] = ess_bulk(per_chain[:, :, i])
            stats[component]["ess_tail"] = ess_tail(per_chain[:, :, i])
        result.update(stats)
    return result


def group_component_names(name: str, shape: tuple[int, ...], labels: list[str], shard: int) -> list[str]:
    """`name[label]` / `name[label,j]` when the site's first axis is the shard's groups."""
    if shape and labels and shape[0] == len(labels):
        rest = component_names("", shape[1:])
        return [f"{name}[{label}{',' + r[1:-1] if r else ''}]" for label in labels for r in rest]
    return [f"{name}@shard{shard}{c[len(name):] or ''}" for c in component_names(name, shape)]


def group_summary(arrays: dict[str, np.ndarray], labels: list[str], shard: int) -> dict[str, dict]:
    result = {}
    for name, values in arrays.items():
        flat = np.asarray(values, dtype=float).reshape(values.shape[0] * values.shape[1], -1)
        result.update(_summaries(flat, group_component_names(name, values.shape[2:], labels, shard)))
    return result
