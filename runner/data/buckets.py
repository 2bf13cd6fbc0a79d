"""Shape buckets: a few sizes every shard is padded up to, so a fit compiles its sampler once.

XLA compiles one program per set of array shapes, and every shard has its own number of rows and
groups. Rounding both up to a bucket makes shards of one fit share one program: in the same
process (several shards per pod) it is compiled once, and across pods the persistent compilation
cache (runner/inference/programs.py) turns every later compile into a read.

Buckets are m·2^e with m in [8, 16): eight sizes per doubling, so padding costs at most 1/8 of
the work (`bucket_size`). When the partition manifest is there, a shard is padded to the bucket
of the *largest* shard of the fit (`fit_bucket`), so all shards land in the same one.
"""

from __future__ import annotations

from dataclasses import dataclass

STEPS_PER_DOUBLING = 8


def bucket_size(n: int) -> int:
    """The smallest m·2^e >= n with m in [8, 16); n itself below 8."""
    if n <= STEPS_PER_DOUBLING:
        return max(n, 0)
    exponent = (n - 1).bit_length() - STEPS_PER_DOUBLING.bit_length()  # so that 8 <= m <= 16
    step = 1 << exponent
    return -(-n // step) * step


@dataclass(frozen=True)
class Bucket:
    rows: int
    groups: int


def fit_bucket(per_shard: list[dict] | None, rows: int, groups: int) -> Bucket:
    """The bucket a shard of `rows` rows and `groups` groups is padded to.

    `per_shard` (the partition manifest's `[{"rows", "groups"}, ...]`) makes it the bucket of the
    fit's largest shard, the same for every shard; without it, the shard's own bucket.
    """
    if per_shard:
        rows = max(rows, max(int(s["rows"]) for s in per_shard))
        groups = max(groups, max(int(s.get("groups") or 0) for s in per_shard))
    return Bucket(bucket_size(rows), bucket_size(groups))
