"""Which shard each group (or row) goes to: deterministic, seeded, balanced by row count.

Pure functions of their arguments, so every partition worker that computes them from the same
group counts gets the same answer (docs/contract.md, partition step).

Groups: every group key is hashed with the fit's seed (keyed BLAKE2b, 64 bits). Groups are then
placed largest first, ties in hash order, each into the shard with the fewest rows so far (ties:
lowest shard index): greedy longest-processing-time. Which groups share a shard is decided by the
seeded hash; the greedy placement bounds the spread of shard row counts by the size of the largest
group (max − min ≤ largest group), so with groups much smaller than a shard the shards are equal to
within a fraction of a percent. Every shard gets at least one group when there are at least as many
groups as shards.

Rows without groups: the rows, numbered in the order of the input files (sorted by name) and of the
rows within each file, are cut into consecutive blocks of K; within block b row j goes to shard
(j + r_b) mod K, with r_b a seeded hash of b. Every block visits every shard once, so shard sizes
differ by at most one row, and neighbouring rows of a sorted input are spread over all shards.
"""

from __future__ import annotations

import hashlib
import heapq
from typing import Iterable

import numpy as np


def _key_bytes(key) -> bytes:
    if isinstance(key, bytes):
        return key
    if isinstance(key, bool):
        return b"true" if key else b"false"
    return str(key).encode()


def group_hashes(keys: Iterable, seed: int) -> np.ndarray:
    """A seeded 64-bit hash of every group key (strings, integers or anything with a str())."""
    salt = f"consensusfit:{int(seed)}".encode()
    return np.fromiter(
        (
            int.from_bytes(hashlib.blake2b(_key_bytes(key), digest_size=8, key=salt).digest(), "little")
            for key in keys
        ),
        dtype=np.uint64,
    )


def assign_groups(counts: np.ndarray, hashes: np.ndarray, shards: int) -> np.ndarray:
    """The shard of every group: largest first (ties by hash), into the least-loaded shard."""
    counts = np.asarray(counts, dtype=np.int64)
    hashes = np.asarray(hashes, dtype=np.uint64)
    if counts.shape != hashes.shape:
        raise ValueError("counts and hashes must have the same length")
    order = np.lexsort((hashes, -counts))  # last key is primary: largest count, then hash
    loads = [(0, shard) for shard in range(shards)]  # already a heap
    sorted_counts = counts[order].tolist()
    placed = np.empty(len(counts), dtype=np.int32)
    for position, size in enumerate(sorted_counts):
        load, shard = loads[0]
        placed[position] = shard
        heapq.heapreplace(loads, (load + size, shard))
    assignment = np.empty(len(counts), dtype=np.int32)
    assignment[order] = placed
    return assignment


def shard_totals(assignment: np.ndarray, counts: np.ndarray, shards: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, groups) per shard for a group assignment."""
    rows = np.bincount(assignment, weights=np.asarray(counts, dtype=np.float64), minlength=shards)
    groups = np.bincount(assignment, minlength=shards)
    return rows.astype(np.int64), groups.astype(np.int64)


def _mix64(values: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a cheap, well-mixed 64-bit hash of each value."""
    z = values.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def row_shards(start: int, count: int, shards: int, seed: int) -> np.ndarray:
    """The shard of global rows start .. start+count-1 when there is no group column."""
    index = np.arange(start, start + count, dtype=np.int64)
    block, within = np.divmod(index, shards)
    with np.errstate(over="ignore"):
        rotation = _mix64(block.astype(np.uint64) ^ _mix64(np.array([seed], dtype=np.uint64)))
    return ((within + (rotation % np.uint64(shards)).astype(np.int64)) % shards).astype(np.int32)


def row_totals(rows: int, shards: int, seed: int) -> np.ndarray:
    """Rows per shard for `rows` ungrouped rows, exactly (the last partial block included)."""
    totals = np.full(shards, rows // shards, dtype=np.int64)
    tail = rows % shards
    if tail:
        totals += np.bincount(row_shards(rows - tail, tail, shards, seed), minlength=shards)
    return totals
