"""What a person reads after a fit: the combined global parameters, convergence, the reference."""

from __future__ import annotations

import math

from ..steps.messages import worst

def _number(value: float) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    magnitude = abs(value)
    if magnitude >= 1000 or (magnitude and magnitude < 0.01):
        return f"{value:.4g}"
    return f"{value:.3f}" if magnitude < 10 else f"{value:.2f}" if magnitude < 100 else f"{value:.1f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    line = lambda cells: "  ".join(  # noqa: E731
        cell.ljust(width) if i == 0 else cell.rjust(width) for i, (cell, width) in enumerate(zip(cells, widths))
    )
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(row) for row in rows])


def fit_report(summary: dict, diagnostics: list[dict], reference: dict | None) -> str:
    """The combined global parameters, with worst shard diagnostics, and the reference if given."""
    names = list(diagnostics[0]["parameters"])
    header = ["parameter", "mean", "sd", "q05", "q95", "R-hat max", "ESS min"]
    if reference:
        header += ["reference mean", "reference sd", "error (ref sd)", "sd ratio"]
    rows = []
    for name in names:
        combined = summary["parameters"][name]
        per_shard = [shard["parameters"][name] for shard in diagnostics]
        row = [name] + [_number(combined[key]) for key in ("mean", "sd", "q05", "q95")]
        row += [_number(value) for value in worst(per_shard)]
        if reference:
            truth = reference[name]
            # a constant component (a Cholesky factor's fixed entries) has no SD to measure in
            measurable = truth["sd"] > 0
            row += [
                _number(truth["mean"]),
                _number(truth["sd"]),
                f"{(combined['mean'] - truth['mean']) / truth['sd']:+.2f}" if measurable else "-",
                f"{combined['sd'] / truth['sd']:.2f}" if measurable else "-",
            ]
        rows.append(row)
    text = _table(header, rows)
    # The combiner's warnings: shards that did not converge and shards that disagree.
    warnings = summary.get("warnings", [])
    if warnings:
        text += "\n\nwarnings:\n" + "\n".join(f"  - {w}" for w in warnings)
    return text
