"""Whole-data column statistics, accumulated batch by batch and merged across workers.

Numeric columns keep (count, mean, M2, min, max): the moments merge exactly with Chan et al.'s
pairwise update, so M partition workers over disjoint files combine into the statistics of the
whole data set. String, categorical (dictionary) and boolean columns keep their set of levels.
Along the way every column counts its missing values, and floating columns their NaN or infinite
values, so that partitioning can refuse them with a count.

`partial()` is JSON (what a worker writes to `partition/workers/<I>.json`); `merge_partials` adds
partials; `final` turns one into the manifest's `stats` entry (docs/contract.md):
`{"count", "mean", "sd", "min", "max"}` (sd with divisor n) or `{"levels": [sorted]}`.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def is_numeric_type(kind: pa.DataType) -> bool:
    return pa.types.is_integer(kind) or pa.types.is_floating(kind)


def is_level_type(kind: pa.DataType) -> bool:
    return (
        pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
        or pa.types.is_string_view(kind)
        or pa.types.is_boolean(kind)
        or pa.types.is_dictionary(kind)
    )


def empty_partial(kind: pa.DataType) -> dict:
    if is_numeric_type(kind):
        return {"kind": "numeric", "count": 0, "mean": 0.0, "m2": 0.0, "min": None, "max": None,
                "nulls": 0, "nonfinite": 0, "integer": pa.types.is_integer(kind)}
    if is_level_type(kind):
        return {"kind": "levels", "levels": [], "nulls": 0}
    return {"kind": "other", "nulls": 0}


def _merge_moments(a: dict, b: dict) -> dict:
    """Chan et al.: merge (count, mean, M2) of two disjoint samples; min and max too."""
    n = a["count"] + b["count"]
    if b["count"] == 0:
        return dict(a)
    if a["count"] == 0:
        merged = dict(b)
    else:
        delta = b["mean"] - a["mean"]
        merged = dict(a)
        merged["mean"] = a["mean"] + delta * b["count"] / n
        merged["m2"] = a["m2"] + b["m2"] + delta * delta * a["count"] * b["count"] / n
        merged["min"] = min(a["min"], b["min"])
        merged["max"] = max(a["max"], b["max"])
    merged["count"] = n
    return merged


def merge_partial(a: dict, b: dict) -> dict:
    """Two partials of the same column (from disjoint rows) as one."""
    if a["kind"] != b["kind"]:
        raise ValueError(f"cannot merge statistics of kinds {a['kind']} and {b['kind']}")
    nulls = a["nulls"] + b["nulls"]
    if a["kind"] == "numeric":
        merged = _merge_moments(
            {key: a[key] for key in ("count", "mean", "m2", "min", "max")},
            {key: b[key] for key in ("count", "mean", "m2", "min", "max")},
        )
        return {**a, **merged, "nulls": nulls, "nonfinite": a["nonfinite"] + b["nonfinite"]}
    if a["kind"] == "levels":
        return {**a, "levels": _sorted_levels(set(a["levels"]) | set(b["levels"])), "nulls": nulls}
    return {**a, "nulls": nulls}


def _sorted_levels(levels) -> list:
    return sorted(levels, key=lambda level: (str(type(level)), level))


class ColumnStats:
    """Accumulates one column's partial statistics over record batches."""

    def __init__(self, kind: pa.DataType):
        self.partial = empty_partial(kind)
        self._levels: set = set()

    def update(self, column: pa.Array | pa.ChunkedArray) -> None:
        partial = self.partial
        partial["nulls"] += column.null_count
        if partial["kind"] == "numeric":
            values = column.drop_null() if column.null_count else column
            array = np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float64)
            finite = np.isfinite(array)
            bad = int(array.size - np.count_nonzero(finite))
            if bad:
                partial["nonfinite"] += bad
                array = array[finite]
            if array.size == 0:
                return
            mean = float(array.mean())
            batch = {
                "count": int(array.size),
                "mean": mean,
                "m2": float(np.square(array - mean).sum()),
                "min": float(array.min()),
                "max": float(array.max()),
            }
            self.partial.update(_merge_moments(
                {key: partial[key] for key in ("count", "mean", "m2", "min", "max")}, batch
            ))
        elif partial["kind"] == "levels":
            if pa.types.is_dictionary(column.type):
                column = column.cast(column.type.value_type)
            self._levels.update(pc.unique(column.drop_null()).to_pylist())

    def to_partial(self) -> dict:
        if self.partial["kind"] == "levels":
            self.partial["levels"] = _sorted_levels(set(self.partial["levels"]) | self._levels)
            self._levels = set()
        return dict(self.partial)


def final(partial: dict) -> dict | None:
    """The manifest's entry for a column; None for a column without statistics."""
    if partial["kind"] == "numeric":
        count = partial["count"]
        if count == 0:
            return {"count": 0, "mean": None, "sd": None, "min": None, "max": None}
        low, high = partial["min"], partial["max"]
        if partial.get("integer"):
            low, high = int(low), int(high)
        return {
            "count": count,
            "mean": partial["mean"],
            "sd": math.sqrt(max(partial["m2"], 0.0) / count),
            "min": low,
            "max": high,
        }
    if partial["kind"] == "levels":
        return {"levels": list(partial["levels"])}
    return None
