"""Rows per group over a stream of record batches: exact, in memory proportional to the groups.

`HashCounter` counts by the groups' seeded 64-bit hashes (runner/data/balance.py `key_hashes`): numbers
sort and add up much more cheaply than strings, and the result comes with the sorted, distinct
hashes by which the partition step later finds each row's shard. It stays exact: every key is
compared with the first key seen under its hash, and two different keys with one hash raise
`HashCollision` (about one chance in 10^7 with a million groups), after which the caller counts
again with `ExactCounter` (Arrow's hash aggregation over the keys themselves).

For already-sharded input each row also carries its shard; a group seen in two shards is counted in
`split`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .balance import key_hashes

MERGE_ROWS = 1 << 20  # merge buffered partial counts once they hold this many entries (or the state)


class HashCollision(Exception):
    """Two different group keys have the same 64-bit hash."""


@dataclass
class GroupCounts:
    keys: pa.Array  # one key per group
    counts: np.ndarray  # rows per group
    hashes: np.ndarray | None  # sorted and distinct (HashCounter), aligned with keys; else None
    shards: np.ndarray | None  # the shard a group was found in (already-sharded input)
    split: int  # groups found in more than one shard


def _run_starts(sorted_hashes: np.ndarray) -> np.ndarray:
    if len(sorted_hashes) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(np.concatenate([[True], sorted_hashes[1:] != sorted_hashes[:-1]]))


class HashCounter:
    def __init__(self, seed: int, key_type: pa.DataType, sharded: bool = False):
        self.seed, self.key_type, self.sharded = seed, key_type, sharded
        self.state: tuple | None = None
        self.pending: list[tuple] = []
        self.pending_rows = 0

    def add(self, keys: pa.Array, shard: int | None = None) -> None:
        if isinstance(keys, pa.ChunkedArray):
            keys = keys.combine_chunks()
        if len(keys) == 0:
            return
        hashes = key_hashes(keys, self.seed)
        counts = np.ones(len(keys), dtype=np.int64)
        shards = np.full(len(keys), -1 if shard is None else shard, dtype=np.int64)
        split = np.zeros(len(keys), dtype=bool)
        part = self._reduce(hashes, counts, keys, shards, split)
        self.pending.append(part)
        self.pending_rows += len(part[0])
        if self.pending_rows >= max(MERGE_ROWS, len(self.state[0]) if self.state else 0):
            self._merge()

    def _merge(self) -> None:
        parts = ([self.state] if self.state else []) + self.pending
        self.pending, self.pending_rows = [], 0
        if len(parts) == 1:
            self.state = parts[0]
            return
        self.state = self._reduce(
            np.concatenate([part[0] for part in parts]),
            np.concatenate([part[1] for part in parts]),
            pa.concat_arrays([part[2] for part in parts]),
            np.concatenate([part[3] for part in parts]),
            np.concatenate([part[4] for part in parts]),
        )

    @staticmethod
    def _reduce(hashes, counts, keys, shards, split) -> tuple:
        """Sum duplicates of a hash; check their keys are equal; note groups in two shards."""
        order = np.argsort(hashes, kind="stable")
        hashes = hashes[order]
        starts = _run_starts(hashes)
        keys = keys.take(pa.array(order))
        if len(starts) == len(hashes):
            return hashes, counts[order], keys, shards[order], split[order]
        run = np.cumsum(np.concatenate([[True], hashes[1:] != hashes[:-1]])) - 1
        first = keys.take(pa.array(starts))
        if not pc.all(pc.equal(keys, first.take(pa.array(run)))).as_py():
            raise HashCollision("two group keys share a 64-bit hash")
        shards, split = shards[order], split[order]
        moved = shards != shards[starts][run]
        split = np.logical_or.reduceat(split | moved, starts)
        return hashes[starts], np.add.reduceat(counts[order], starts), first, shards[starts], split

    def result(self) -> GroupCounts:
        if self.pending:
            self._merge()
        if self.state is None:
            empty = pa.array([], self.key_type)
            return GroupCounts(empty, np.zeros(0, np.int64), np.zeros(0, np.uint64),
                               np.zeros(0, np.int64) if self.sharded else None, 0)
        hashes, counts, keys, shards, split = self.state
        return GroupCounts(keys, counts, hashes, shards if self.sharded else None, int(split.sum()))


class ExactCounter:
    """Counts by the keys themselves (Arrow hash aggregation): the fallback after a collision."""

    CONSOLIDATE = 16

    def __init__(self, seed: int, key_type: pa.DataType, sharded: bool = False):
        self.key_type, self.sharded = key_type, sharded
        self.by = ["key", "shard"] if sharded else ["key"]
        self.parts: list[pa.Table] = []

    def add(self, keys: pa.Array, shard: int | None = None) -> None:
        table = pa.table({"key": keys})
        if self.sharded:
            table = table.append_column("shard", pa.array(np.full(len(keys), shard, dtype=np.int64)))
        counted = table.group_by(self.by).aggregate([([], "count_all")])
        self.parts.append(self._tidy(counted, "count_all"))
        if len(self.parts) > self.CONSOLIDATE:
            self._consolidate()

    def _tidy(self, table: pa.Table, counted: str) -> pa.Table:
        return pa.table({**{name: table.column(name) for name in self.by}, "count": table.column(counted)})

    def _consolidate(self) -> None:
        if len(self.parts) > 1:
            merged = pa.concat_tables(self.parts).group_by(self.by).aggregate([("count", "sum")])
            self.parts = [self._tidy(merged, "count_sum")]

    def result(self) -> GroupCounts:
        self._consolidate()
        if not self.parts:
            empty = pa.array([], self.key_type)
            return GroupCounts(empty, np.zeros(0, np.int64), None,
                               np.zeros(0, np.int64) if self.sharded else None, 0)
        table = self.parts[0]
        if not self.sharded:
            return GroupCounts(table.column("key").combine_chunks(), table.column("count").to_numpy(), None, None, 0)
        by_key = table.group_by("key").aggregate(
            [("count", "sum"), ("shard", "min"), ("shard", "count_distinct")]
        )
        return GroupCounts(
            by_key.column("key").combine_chunks(),
            by_key.column("count_sum").to_numpy(),
            None,
            by_key.column("shard_min").to_numpy(),
            int(pc.sum(pc.greater(by_key.column("shard_count_distinct"), 1)).as_py() or 0),
        )
