"""Which shard each group (or row) goes to: deterministic, seeded, balanced by row count.

Pure functions of their arguments, so every partition worker that computes them from the same
group counts gets the same answer (docs/contract.md, partition step).

Groups: every group key is hashed with the fit's seed (64 bits, `key_hashes`). Groups are then
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

import heapq

import numpy as np
import pyarrow as pa


FNV_PRIME = np.uint64(0x100000001B3)


def _as_strings(keys) -> pa.Array:
    """Group keys as one Arrow string array (numbers and other types by their text)."""
    if isinstance(keys, pa.ChunkedArray):
        keys = keys.combine_chunks()
    if not isinstance(keys, pa.Array):
        keys = pa.array(keys)
    if pa.types.is_dictionary(keys.type):
        keys = keys.dictionary_decode()
    if pa.types.is_large_string(keys.type) or pa.types.is_string_view(keys.type):
        keys = keys.cast(pa.string())
    if pa.types.is_binary(keys.type) or pa.types.is_large_binary(keys.type):
        keys = keys.cast(pa.binary())
    elif not pa.types.is_string(keys.type):
        keys = keys.cast(pa.string())
    return keys


def key_hashes(keys, seed: int) -> np.ndarray:
    """A seeded 64-bit hash of every key (an Arrow array or a list), vectorised in NumPy.

    FNV-1a over the key's UTF-8 bytes, started from a seed-dependent basis and finished with
    SplitMix64's mixer: the same key and seed give the same hash on every machine and version.
    Work is proportional to the total length of the keys.
    """
    keys = _as_strings(keys)
    count = len(keys)
    if keys.null_count:
        raise ValueError("group keys must not be missing")
    buffers = keys.buffers()
    offsets = np.frombuffer(buffers[1], dtype=np.int32)[keys.offset : keys.offset + count + 1].astype(np.int64)
    data = np.frombuffer(buffers[2], dtype=np.uint8) if buffers[2] is not None else np.zeros(0, np.uint8)
    starts, lengths = offsets[:-1], np.diff(offsets)
    with np.errstate(over="ignore"):
        basis = _mix64(np.array([int(seed) & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64) ^ np.uint64(0xCBF29CE484222325))
        hashes = np.full(count, basis[0], dtype=np.uint64)
        active = np.flatnonzero(lengths > 0)
        position = 0
        while len(active):
            byte = data[starts[active] + position].astype(np.uint64)
            hashes[active] = (hashes[active] ^ byte) * FNV_PRIME
            position += 1
            active = active[lengths[active] > position]
        return _mix64(hashes ^ lengths.astype(np.uint64))


group_hashes = key_hashes


def assign_groups(counts: np.ndarray, hashes: np.ndarray, shards: int) -> np.ndarray:
    """The shard of every group: largest first (ties by hash), into the least-loaded shard."""
    counts = np.asarray(counts, dtype=np.int64)
    hashes = np.asarray(hashes, dtype=np.uint64)
    if counts.shape != hashes.shape:
        raise ValueError("counts and hashes must have the same length")
    order = np.lexsort((hashes, -counts))  # last key is primary: largest count, then hash
    loads = [(0, shard) for shard in range(shards)]  # already a heap
    placed = np.empty(len(counts), dtype=np.int32)
    chunk = 1 << 16  # Python integers for a chunk at a time: bounded memory for millions of groups
    for begin in range(0, len(order), chunk):
        chosen = []
        for size in counts[order[begin : begin + chunk]].tolist():
            load, shard = loads[0]
            chosen.append(shard)
            heapq.heapreplace(loads, (load + size, shard))
        placed[begin : begin + len(chosen)] = chosen
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
