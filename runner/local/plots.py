"""The picture of a fit: for each global parameter, every shard's posterior and the combined one.

Shard posteriors are tempered (each saw 1/K of the prior), so they are wider than the combined one
and centred where their own data point; the combined density should sit where they overlap, and on
the reference (dashed) when one was run.
"""

from __future__ import annotations

import io

import numpy as np


def _density(values: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Gaussian kernel density with Silverman's bandwidth."""
    values = np.asarray(values, dtype=float).ravel()
    bandwidth = 1.06 * values.std() * values.size ** (-1 / 5) or 1e-12
    z = (grid[:, None] - values[None, :]) / bandwidth
    return np.exp(-0.5 * z**2).sum(axis=1) / (values.size * bandwidth * np.sqrt(2 * np.pi))


def posterior_figure(
    shard_draws: list[dict[str, np.ndarray]],
    combined: dict[str, np.ndarray],
    names: list[str],
    reference: dict | None = None,
    title: str = "",
) -> bytes:
    """A PNG: one panel per parameter, shards thin, combined thick, reference mean ± sd dashed."""
    import matplotlib  # here: only the report plots, and the backend must be set before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(3, len(names))
    rows = -(-len(names) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    for axis, name in zip(axes.ravel(), names):
        everything = np.concatenate([d[name].ravel() for d in shard_draws] + [combined[name].ravel()])
        low, high = np.quantile(everything, [0.001, 0.999])
        grid = np.linspace(low, high, 300)
        for k, draws in enumerate(shard_draws):
            axis.plot(grid, _density(draws[name], grid), color="tab:blue", alpha=0.35, lw=1,
                      label="shards (tempered)" if k == 0 else None)
        axis.plot(grid, _density(combined[name], grid), color="black", lw=2.2, label="combined")
        if reference and name in reference:
            truth = reference[name]
            for x in (truth["mean"] - truth["sd"], truth["mean"], truth["mean"] + truth["sd"]):
                axis.axvline(x, color="tab:red", ls="--", lw=1.2 if x == truth["mean"] else 0.7,
                             label="reference mean ± sd" if x == truth["mean"] else None)
        axis.set_title(name)
        axis.set_yticks([])
    for axis in axes.ravel()[len(names):]:
        axis.set_visible(False)
    axes.ravel()[0].legend(fontsize=8, loc="upper left")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


def convergence_figure(history: dict[str, list[tuple[float, float]]], reference: dict | None = None) -> bytes:
    """A PNG: per global parameter, q's mean ± SD after the pilot (round 0) and every EP round,
    with the reference mean ± SD (dashed) when one was run."""
    import matplotlib  # here: only the report plots, and the backend must be set before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(history)
    columns = min(3, len(names))
    rows = -(-len(names) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows), squeeze=False)
    for axis, name in zip(axes.ravel(), names):
        rounds = np.arange(len(history[name]))
        mean, sd = np.array(history[name]).T
        axis.errorbar(rounds, mean, yerr=sd, color="black", marker="o", capsize=3, label="EP: mean ± sd")
        if reference and name in reference:
            truth = reference[name]
            axis.axhline(truth["mean"], color="tab:red", ls="--", lw=1.2, label="reference mean ± sd")
            axis.axhspan(truth["mean"] - truth["sd"], truth["mean"] + truth["sd"], color="tab:red", alpha=0.12)
        axis.set_title(name)
        axis.set_xticks(rounds)
        axis.set_xlabel("round (0: pilot)")
    for axis in axes.ravel()[len(names):]:
        axis.set_visible(False)
    axes.ravel()[0].legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()
