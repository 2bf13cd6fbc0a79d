"""The partition step: a user's Parquet data set -> K shards, plus whole-data statistics.

Layout under the fit's root (docs/contract.md):
    partition/shard=<k>/part-<I>.parquet   rows of shard k from worker I's input files
    partition/workers/<I>.json             worker I is done: its statistics and the global plan
    partition/manifest.json                written last, by the worker that finds all M done

How it runs, for worker I of M (M = 1 locally):
1. Every worker lists all input files and reads their footers (schemas, row counts): refuses
   missing columns and non-numeric numeric columns before reading any data.
2. Every worker reads the group column of *all* files (Parquet column projection: one column, the
   cheapest read there is) and counts rows per group. From the counts it computes the assignment
   (runner/data/balance.py), which is a pure function of (counts, seed, K): all M workers compute the
   same assignment without talking to each other, no barrier, no shared state. Without a group
   column only the footers' row counts are needed (rows are numbered across files in key order).
3. Worker I streams the rows of its own files (file i belongs to worker i mod M) in record batches,
   accumulates whole-data statistics and refusal counts (missing, NaN, infinite values), and
   writes one Parquet file per shard. Memory is bounded: rows are buffered per shard only for a
   range of shards whose rows fit `CONSENSUSFIT_PARTITION_MEMORY_MB` (default 512); a worker
   whose rows do not fit reads its files again for the next range of shards. Nothing is written
   before the first read has checked every row.
4. Worker I writes `partition/workers/<I>.json`, then lists `partition/workers/`: if all M workers
   of this fingerprint are done it merges their statistics and writes the manifest. Every worker
   writes its file before listing, so the last one to finish always sees all M.

Only the columns the model reads (and the group column) are written to the shards.
A manifest with the same fingerprint means the step is complete and is not redone (a retried pod
returns at once); a worker file with the same fingerprint means that worker is done. Files with a
different fingerprint are refused (exit 3). Nothing outside `<ROOT>/partition/` is ever written.

Already-sharded input (every file under a `shard=<k>/` folder) keeps its shards: the shard numbers
must be exactly 0..K-1, no group may appear in two shards, and the rows are copied (projected to
the model's columns) into the same layout with the same statistics and manifest.
"""

from __future__ import annotations

import io
import json
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..data import balance
from ..contract import PARTITION_MEMORY_MB
from ..layout import FitLayout
from ..store.completion import completed, now, read_json
from ..data.colstats import ColumnStats, final, is_numeric_type, merge_partial
from ..errors import BadInput, TransientError
from ..data.groupcount import ExactCounter, HashCollision, HashCounter
from ..store.sources import InputFile, list_inputs, open_parquet
from ..store.storage import Store
from .messages import partition_message

DEFAULT_MEMORY_MB = 512
BATCH_ROWS = 1 << 17  # rows read at a time: larger batches cost memory in the Parquet reader
MAX_BATCH_ROWS = 1 << 20
HASH_COUNT = True  # count groups by hash (False: by key, as after a collision; for tests)


def _no_log(message: str) -> None:
    pass


@dataclass
class Assignment:
    """What every worker knows about the whole input before writing anything."""

    layout: str  # "groups" | "rows" | "sharded"
    rows: int
    groups: int
    per_shard_rows: np.ndarray
    per_shard_groups: np.ndarray
    keys: pa.Array | None = None  # group keys (layout "groups"), for lookups by key
    key_shards: np.ndarray | None = None  # shard of every key
    sorted_hashes: np.ndarray | None = None  # the keys' seeded hashes, sorted, when all distinct
    sorted_shards: np.ndarray | None = None  # the shard of each of those
    mine_per_shard_rows: np.ndarray | None = None  # this worker's rows per shard (estimate ok)


@dataclass
class Inputs:
    uri: str
    files: list[InputFile]
    rows: list[int]  # per file
    schema: pa.Schema  # the needed columns, unified over files (dictionaries decoded)
    offsets: list[int] = field(default_factory=list)  # global index of every file's first row


# ---------------------------------------------------------------------------------------------
# public entry points


@dataclass(frozen=True)
class PartitionOptions:
    worker: int = 0  # this worker's index
    workers: int = 1  # how many workers partition the data


def run(spec, layout: FitLayout, options: PartitionOptions = PartitionOptions()) -> dict:
    """The partition step: the fit's data into shards under `layout`; its termination message."""
    return partition_fit(spec, layout.root, options.worker, options.workers)


def partition_fit(
    spec, out_uri: str, worker: int = 0, workers: int = 1, *, log=None
) -> dict:
    """Partition the fit's data under `out_uri` with the columns its model reads.

    The model is checked twice, so that a bad one fails here, once, and not in every shard: what
    needs no data before any data is read (required_columns), and the rest (which parameters
    there are, so which prior fits which) with the whole-data statistics, before the manifest.
    """
    # here, not at the top: a formula model imports JAX, which partitioning never needs
    from ..models.from_spec import model_from_spec, required_columns

    columns, numeric = required_columns(spec)
    return partition(
        spec, out_uri, columns, numeric, worker=worker, workers=workers, log=log,
        check_model=lambda stats: model_from_spec(spec, stats),
    )


def partition(
    spec,
    out_uri: str,
    columns: tuple[str, ...],
    numeric: tuple[str, ...],
    worker: int = 0,
    workers: int = 1,
    *,
    memory_bytes: int | None = None,
    log: Callable[[str], None] | None = None,
    check_model: Callable[[dict], object] | None = None,
) -> dict:
    """Partition with an explicit column list (what `partition_fit` derives from the model);
    `check_model(stats)` refuses a model that does not fit the whole-data statistics."""
    log = log or _no_log
    if workers < 1 or not 0 <= worker < workers:
        raise BadInput(f"partition worker {worker} of {workers}: need 0 <= worker < workers")
    layout = FitLayout(out_uri)
    out, files = layout.store, layout.partition
    fingerprint = spec.fingerprint()
    if done := completed(out, files.manifest, fingerprint):
        log("partition: already complete")
        return partition_message(int(done["rows"]), int(done["groups"]))

    started = time.monotonic()
    group = spec.group_column
    needed = tuple(dict.fromkeys(tuple(columns) + ((group,) if group else ())))
    numeric = tuple(name for name in numeric if name != group)
    inputs = _inspect_inputs(spec.data["uri"], needed, numeric)
    log(f"partition: {len(inputs.files)} file(s), {sum(inputs.rows)} rows")
    plan = _plan(spec, inputs, worker, workers)
    pa.default_memory_pool().release_unused()  # the counting's memory, before buffering rows
    log(f"partition: plan ({plan.layout}) ready after {time.monotonic() - started:.1f}s")

    marker = files.worker(worker)
    previous = completed(out, marker, fingerprint)
    if previous is None or previous.get("workers") != workers:
        budget = memory_bytes or int(
            float(os.environ.get(PARTITION_MEMORY_MB, DEFAULT_MEMORY_MB)) * 2**20
        )
        own = [index for index in range(len(inputs.files)) if index % workers == worker]
        stats, own_rows = _write_shards(spec, out, inputs, plan, own, worker, workers, budget, log)
        _write_json(out, marker, {
            "fingerprint": fingerprint,
            "worker": worker,
            "workers": workers,
            "files": [inputs.files[index].key for index in own],
            "rows": int(own_rows.sum()),
            "per_shard_rows": own_rows.tolist(),
            "stats": stats,
            "plan": _plan_summary(spec, inputs, plan),
            "finished": now(),
        })
        log(f"partition: worker {worker} wrote its shards after {time.monotonic() - started:.1f}s")
    finalize_partition(spec, out_uri, workers, check_model)
    return partition_message(int(plan.rows), int(plan.groups))


def finalize_partition(
    spec, out_uri: str, workers: int, check_model: Callable[[dict], object] | None = None
) -> dict | None:
    """Write the manifest if all `workers` workers are done (and the model, if `check_model` is
    given, fits the whole-data statistics); the manifest, or None if not yet."""
    layout = FitLayout(out_uri)
    out, files = layout.store, layout.partition
    fingerprint = spec.fingerprint()
    if existing := completed(out, files.manifest, fingerprint):
        return existing
    reports: dict[int, dict] = {}
    for key in out.list(files.workers):
        report = read_json(out, key)
        if (
            report is not None
            and report.get("fingerprint") == fingerprint
            and report.get("workers") == workers
        ):
            reports[report["worker"]] = report
    if set(reports) != set(range(workers)):
        return None
    plan = reports[0]["plan"]
    shards = spec.shards
    written = np.zeros(shards, dtype=np.int64)
    for report in reports.values():
        written += np.asarray(report["per_shard_rows"], dtype=np.int64)
    if written.tolist() != plan["per_shard_rows"]:
        raise TransientError(
            f"{out.uri(files.prefix)}: the workers wrote {written.tolist()} rows per shard, "
            f"the plan has {plan['per_shard_rows']}"
        )
    stale = sorted(
        key for key in out.list(files.prefix)
        if (match := files.PART.match(key)) and (int(match.group(1)) >= shards or int(match.group(2)) >= workers)
    )
    if stale:
        raise BadInput(
            f"{out.uri(files.prefix)} holds {len(stale)} shard file(s) of another partitioning "
            f"(e.g. {stale[0]}); remove {files.prefix} and run again"
        )
    merged: dict[str, dict] = {}
    for index in range(workers):
        for name, partial in reports[index]["stats"].items():
            merged[name] = merge_partial(merged[name], partial) if name in merged else partial
    stats = {name: entry for name, partial in merged.items() if (entry := final(partial)) is not None}
    group = spec.group_column
    if group:
        stats[group] = {"groups": plan["groups"]}
    if check_model is not None:
        check_model(stats)
    rows = np.asarray(plan["per_shard_rows"], dtype=np.float64)
    manifest = {
        "fingerprint": fingerprint,
        "shards": shards,
        "group_column": group,
        "rows": plan["rows"],
        "groups": plan["groups"],
        "per_shard": [
            {"rows": r, "groups": g} for r, g in zip(plan["per_shard_rows"], plan["per_shard_groups"])
        ],
        "stats": stats,
        "layout": plan["layout"],
        "balance": {
            "min_rows": int(rows.min()),
            "max_rows": int(rows.max()),
            "max_over_mean": float(rows.max() / rows.mean()) if rows.mean() else None,
        },
        "data": spec.data["uri"],
        "columns": plan["columns"],
        "workers": workers,
        "finished": now(),
    }
    _write_json(out, files.manifest, manifest)
    return manifest


# ---------------------------------------------------------------------------------------------
# inputs and plan


def _inspect_inputs(uri: str, needed: tuple[str, ...], numeric: tuple[str, ...]) -> Inputs:
    files = list_inputs(uri)
    schemas, rows = [], []
    for file in files:
        parquet = open_parquet(file.uri)
        schemas.append(parquet.schema_arrow)
        rows.append(parquet.metadata.num_rows)
    missing = {name: sum(name not in schema.names for schema in schemas) for name in needed}
    missing = {name: count for name, count in missing.items() if count}
    if missing:
        where = "" if len(files) == 1 else " (in " + ", ".join(
            f"{name}: {count} of {len(files)} files" for name, count in missing.items()
        ) + ")"
        first = next(schema for schema in schemas if any(name not in schema.names for name in missing))
        raise BadInput(
            f"{uri}: missing column(s) {', '.join(missing)}{where}; the data has {', '.join(first.names)}"
        )
    fields = []
    for name in needed:
        kinds = []
        for schema in schemas:
            kind = schema.field(name).type
            kinds.append(kind.value_type if pa.types.is_dictionary(kind) else kind)
        try:
            unified = pa.unify_schemas(
                [pa.schema([pa.field(name, kind)]) for kind in kinds], promote_options="permissive"
            )
        except (pa.ArrowTypeError, pa.ArrowInvalid):
            distinct = sorted({str(kind) for kind in kinds})
            raise BadInput(f"{uri}: column {name} has incompatible types across files: {', '.join(distinct)}") from None
        fields.append(unified.field(name))
    schema = pa.schema(fields)
    for name in numeric:
        kind = schema.field(name).type
        if not (is_numeric_type(kind) or pa.types.is_boolean(kind)):
            raise BadInput(f"{uri}: column {name} must be numeric, it is {kind}")
    offsets = np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(np.int64).tolist()
    return Inputs(uri, files, rows, schema, offsets)


def _plan(spec, inputs: Inputs, worker: int, workers: int) -> Assignment:
    shards, group, seed = spec.shards, spec.group_column, spec.seeds.partition
    total = sum(inputs.rows)
    mine = np.array([index % workers == worker for index in range(len(inputs.files))])
    own_rows = sum(rows for rows, own in zip(inputs.rows, mine) if own)
    if inputs.files[0].shard is not None:
        found = sorted({file.shard for file in inputs.files})
        if found != list(range(shards)):
            listed = f"shard={found[0]}..{found[-1]}" if len(found) > 1 else f"shard={found[0]}"
            raise BadInput(
                f"{inputs.uri}: the data is already sharded into {len(found)} shard(s) ({listed}), "
                f"but spec.shards is {shards}"
            )
        per_shard_rows = np.zeros(shards, dtype=np.int64)
        mine_rows = np.zeros(shards, dtype=np.int64)
        for file, rows, own in zip(inputs.files, inputs.rows, mine):
            per_shard_rows[file.shard] += rows
            mine_rows[file.shard] += rows if own else 0
        per_shard_groups = np.zeros(shards, dtype=np.int64)
        groups = 0
        if group:
            counted, _ = _count_groups(inputs, group, seed, sharded=True)
            if counted.split:
                raise BadInput(
                    f"{inputs.uri}: the data is already sharded, but {counted.split} group(s) of column "
                    f"{group} appear in more than one shard"
                )
            groups = len(counted.keys)
            per_shard_groups = np.bincount(counted.shards, minlength=shards)
        empty = np.flatnonzero(per_shard_rows == 0)
        if len(empty):
            raise BadInput(f"{inputs.uri}: {len(empty)} shard(s) of the already-sharded data are empty (shard={empty[0]})")
        return Assignment("sharded", total, groups, per_shard_rows, per_shard_groups, mine_per_shard_rows=mine_rows)
    if not group:
        if total < shards:
            raise BadInput(f"{inputs.uri}: {total} rows, fewer than spec.shards = {shards}")
        per_shard_rows = balance.row_totals(total, shards, seed)
        estimate = np.full(shards, -(-own_rows // shards), dtype=np.int64)
        return Assignment("rows", total, 0, per_shard_rows, np.zeros(shards, dtype=np.int64), mine_per_shard_rows=estimate)
    counted, own = _count_groups(inputs, group, seed, sharded=False, mine=mine)
    if len(counted.keys) < shards:
        raise BadInput(
            f"{inputs.uri}: column {group} has {len(counted.keys)} group(s), fewer than spec.shards = {shards}"
        )
    hashes = counted.hashes if counted.hashes is not None else balance.key_hashes(counted.keys, seed)
    key_shards = balance.assign_groups(counted.counts, hashes, shards)
    per_shard_rows, per_shard_groups = balance.shard_totals(key_shards, counted.counts, shards)
    plan = Assignment("groups", total, len(counted.keys), per_shard_rows, per_shard_groups)
    if counted.hashes is not None:
        # Sorted, distinct hashes: a row finds its shard by binary search on its key's hash.
        plan.sorted_hashes, plan.sorted_shards = counted.hashes, key_shards
    else:  # after a hash collision: look keys up by value
        plan.keys, plan.key_shards = counted.keys, key_shards
    own_shards = key_shards if own is counted else _lookup(plan, own.keys, seed)
    plan.mine_per_shard_rows = np.bincount(
        own_shards, weights=own.counts.astype(np.float64), minlength=shards
    ).astype(np.int64)
    return plan


def _lookup(plan: Assignment, keys: pa.Array, seed: int) -> np.ndarray:
    """The shard of every key (all of them keys of the plan)."""
    if plan.sorted_hashes is not None:
        return plan.sorted_shards[np.searchsorted(plan.sorted_hashes, balance.key_hashes(keys, seed))]
    return plan.key_shards[pc.index_in(keys, value_set=plan.keys).to_numpy(zero_copy_only=False)]


def _count_groups(inputs: Inputs, group: str, seed: int, sharded: bool, mine=None):
    """Rows per group over all files, and over this worker's files (`mine`; None: all files).

    Counts by hash (runner/data/groupcount.py); after a hash collision, counts again by key.
    """
    try:
        return _count_with(HashCounter if HASH_COUNT else ExactCounter, inputs, group, seed, sharded, mine)
    except HashCollision:
        return _count_with(ExactCounter, inputs, group, seed, sharded, mine)


def _count_with(counter, inputs: Inputs, group: str, seed: int, sharded: bool, mine):
    kind = inputs.schema.field(group).type
    everything = counter(seed, kind, sharded)
    separate = mine is not None and not all(mine)
    own = counter(seed, kind, sharded) if separate else everything
    nulls = 0
    for index, file in enumerate(inputs.files):
        parquet = open_parquet(file.uri)
        for batch in _read_batches(parquet, file, [group], pa.schema([pa.field(group, kind)]), BATCH_ROWS):
            column = batch.column(0)
            if column.null_count:
                nulls += column.null_count
                column = column.drop_null()
            everything.add(column, file.shard)
            if separate and mine[index]:
                own.add(column, file.shard)
    if nulls:
        raise BadInput(f"{inputs.uri}: column {group} has {nulls} missing value(s) of {sum(inputs.rows)} rows")
    counted = everything.result()
    return counted, (own.result() if separate else counted)


def _plan_summary(spec, inputs: Inputs, plan: Assignment) -> dict:
    return {
        "layout": plan.layout,
        "rows": int(plan.rows),
        "groups": int(plan.groups),
        "per_shard_rows": [int(value) for value in plan.per_shard_rows],
        "per_shard_groups": [int(value) for value in plan.per_shard_groups],
        "columns": inputs.schema.names,
    }


# ---------------------------------------------------------------------------------------------
# reading and writing rows


def _read_batches(
    parquet: pq.ParquetFile, file: InputFile, columns: list[str], schema: pa.Schema, batch_rows: int
) -> Iterator[pa.RecordBatch]:
    """Record batches of `columns`, cast to `schema`, in batches of about `batch_rows` rows."""
    pending: list[pa.RecordBatch] = []
    size = 0
    try:
        for batch in parquet.iter_batches(batch_size=batch_rows, columns=columns, use_threads=True):
            if batch.num_rows == 0:
                continue
            batch = batch.select(columns).cast(schema)
            pending.append(batch)
            size += batch.num_rows
            if size >= batch_rows:
                yield pa.Table.from_batches(pending, schema).combine_chunks().to_batches()[0] if len(pending) > 1 else pending[0]
                pending, size = [], 0
    except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
        raise BadInput(f"{file.uri}: {error}".splitlines()[0]) from None
    except OSError as error:
        raise TransientError(f"{file.uri}: {error}".splitlines()[0]) from None
    if pending:
        yield pa.Table.from_batches(pending, schema).combine_chunks().to_batches()[0] if len(pending) > 1 else pending[0]


def _shards_of(plan: Assignment, spec, file: InputFile, start: int, batch: pa.RecordBatch) -> np.ndarray:
    if plan.layout == "sharded":
        return np.full(batch.num_rows, file.shard, dtype=np.int32)
    if plan.layout == "rows":
        return balance.row_shards(start, batch.num_rows, spec.shards, spec.seeds.partition)
    return _lookup(plan, batch.column(spec.group_column), spec.seeds.partition)


def _shard_ranges(rows: np.ndarray, bytes_per_row: float, budget: int) -> list[tuple[int, int]]:
    """Consecutive shard ranges whose buffered rows fit the memory budget (one shard at least)."""
    ranges, start, used = [], 0, 0.0
    for shard, count in enumerate(rows.tolist()):
        size = count * bytes_per_row
        if shard > start and used + size > budget:
            ranges.append((start, shard))
            start, used = shard, 0.0
        used += size
    ranges.append((start, len(rows)))
    return ranges


def _write_shards(spec, out: Store, inputs: Inputs, plan: Assignment, own: list[int], worker: int,
                  workers: int, budget: int, log) -> tuple[dict, np.ndarray]:
    shards, group = spec.shards, spec.group_column
    columns = inputs.schema.names
    stats = {
        name: ColumnStats(inputs.schema.field(name).type) for name in columns if name != group
    }
    written = np.zeros(shards, dtype=np.int64)
    if not own:
        return {name: value.to_partial() for name, value in stats.items()}, written
    bytes_per_row = _bytes_per_row(inputs, own[0])
    # Enough rows per batch that every shard gets a slice of some size, no more than memory allows.
    batch_rows = int(min(MAX_BATCH_ROWS, max(BATCH_ROWS, 64 * shards), max(1 << 12, budget // (8 * bytes_per_row))))
    ranges = _shard_ranges(plan.mine_per_shard_rows, bytes_per_row, budget)
    if len(ranges) > 1:
        log(f"partition: {len(ranges)} reads of the input to stay within {budget / 2**20:.0f} MiB")
    metadata_base = {"fingerprint": spec.fingerprint(), "shards": shards, "worker": worker, "workers": workers}
    for pass_index, (low, high) in enumerate(ranges):
        first = pass_index == 0
        buffers: list[list[pa.RecordBatch]] = [[] for _ in range(high - low)]
        for index in own:
            file = inputs.files[index]
            start = inputs.offsets[index]
            parquet = open_parquet(file.uri)
            for batch in _read_batches(parquet, file, columns, inputs.schema, batch_rows):
                if first:
                    for name, accumulator in stats.items():
                        accumulator.update(batch.column(name))
                local = _shards_of(plan, spec, file, start, batch).astype(np.int64) - low
                start += batch.num_rows
                if low > 0 or high < shards:
                    inside = np.flatnonzero((local >= 0) & (local < high - low))
                    local = local[inside]
                else:
                    inside = None
                if len(local) == 0:
                    continue
                order = np.argsort(local, kind="stable")
                take = order if inside is None else inside[order]
                taken = batch.take(pa.array(take))
                counts = np.bincount(local, minlength=high - low)
                position = 0
                for shard in np.flatnonzero(counts).tolist():
                    buffers[shard].append(taken.slice(position, int(counts[shard])))
                    position += int(counts[shard])
        if first:
            _refuse_bad_values(inputs.uri, stats, sum(inputs.rows[index] for index in own), worker, workers)
        for offset, pieces in enumerate(buffers):
            if not pieces:
                continue
            shard = low + offset
            table = pa.Table.from_batches(pieces, inputs.schema)
            table = table.replace_schema_metadata(
                {"consensusfit": json.dumps({**metadata_base, "shard": shard})}
            )
            sink = io.BytesIO()
            pq.write_table(table, sink)
            out.write_bytes(FitLayout.partition.part(shard, worker), sink.getvalue())
            written[shard] += table.num_rows
            buffers[offset] = []
        log(f"partition: worker {worker} wrote shards {low}..{high - 1}")
    return {name: value.to_partial() for name, value in stats.items()}, written


def _bytes_per_row(inputs: Inputs, index: int) -> float:
    """Arrow bytes per row of the needed columns, measured on the first rows of one file."""
    file = inputs.files[index]
    for batch in _read_batches(open_parquet(file.uri), file, inputs.schema.names, inputs.schema, 1 << 16):
        if batch.num_rows:
            return max(1.0, 1.2 * batch.nbytes / batch.num_rows)
    return 64.0


def _refuse_bad_values(uri: str, stats: dict[str, ColumnStats], rows: int, worker: int, workers: int) -> None:
    where = "" if workers == 1 else f" (in the files of partition worker {worker} of {workers})"
    for name, accumulator in stats.items():
        partial = accumulator.partial
        if partial["nulls"]:
            raise BadInput(f"{uri}: column {name} has {partial['nulls']} missing value(s) of {rows} rows{where}")
        if partial.get("nonfinite"):
            raise BadInput(
                f"{uri}: column {name} has {partial['nonfinite']} NaN or infinite value(s) of {rows} rows{where}"
            )


# ---------------------------------------------------------------------------------------------
# small helpers


def _write_json(store: Store, key: str, document: dict) -> None:
    store.write_bytes(key, json.dumps(document, indent=1).encode())
