"""One shard's rows as the models receive them: NumPy columns with a dense group index.

`doubled` (how global sites are found, runner/inference/tempering.py) and `padded` (shape
buckets, runner/data/buckets.py) are the two ways a shard is reshaped before sampling.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class ShardData:
    """One shard's rows as NumPy columns, with its groups indexed densely."""

    columns: dict[str, np.ndarray]
    group_column: str | None = None
    group_labels: np.ndarray = field(default_factory=lambda: np.array([]))
    group_index: np.ndarray = field(default_factory=lambda: np.array([], dtype=np.int32))
    row_mask: np.ndarray | None = None  # set on a padded shard: True for real rows

    @property
    def rows(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0

    @property
    def groups(self) -> int:
        return len(self.group_labels)

    def doubled(self) -> "ShardData":
        """The shard stacked on a copy of itself whose groups are new ones.

        Used to find global sites: a site whose shape is the same for a shard and for its doubled
        version does not depend on the shard's data.
        """
        columns = {name: np.concatenate([values, values]) for name, values in self.columns.items()}
        labels = np.concatenate(
            [self.group_labels, np.array([f"{label}#copy" for label in self.group_labels])]
        )
        index = np.concatenate([self.group_index, self.group_index + self.groups])
        return ShardData(columns, self.group_column, labels, index)

    def padded(self, rows: int, groups: int) -> "ShardData":
        """The shard padded to `rows` rows and `groups` groups (shape buckets, runner/data/buckets.py).

        Padding rows repeat row 0 (valid values of every column, so every log density stays
        finite) and belong to group 0; `row_mask` marks them, and a model that honours it drops
        their likelihood. Padding groups have no rows, so their parameters are drawn from their
        prior, which integrates to one: the posterior of the real parameters is exactly the
        shard's own.
        """
        if rows < self.rows or groups < self.groups:
            raise ValueError(f"cannot pad {self.rows} rows / {self.groups} groups down to {rows} / {groups}")
        extra = rows - self.rows
        columns = {name: np.concatenate([values, np.repeat(values[:1], extra)]) for name, values in self.columns.items()}
        mask = np.arange(rows) < self.rows
        if self.group_column is None:
            return ShardData(columns, row_mask=mask)
        labels = np.concatenate(
            [self.group_labels.astype(object), np.array([f"<padding {i}>" for i in range(groups - self.groups)], dtype=object)]
        )
        index = np.concatenate([self.group_index, np.zeros(extra, dtype=self.group_index.dtype)])
        return ShardData(columns, self.group_column, labels, index, mask)
