"""Reading one shard's rows and refusing data that cannot be fitted.

Every refusal names the column, the shard and how many rows are affected, so a user with a
100-million-row table knows where to look.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import BadInput
from .models import Model, ShardData, model_from_spec
from .storage import NotFound, Store, open_store, split_uri


def parquet_keys(store: Store) -> list[str]:
    return [key for key in store.list("") if key.endswith(".parquet")]


def read_table(uri: str) -> pa.Table:
    """A Parquet file, or every Parquet file under a prefix, as one table."""
    if uri.rstrip("/").endswith(".parquet"):
        store, key = split_uri(uri)
        keys = [key] if store.exists(key) else []
    else:
        store = open_store(uri)
        keys = parquet_keys(store)
    if not keys:
        raise BadInput(f"{uri}: no Parquet files")
    tables = [pq.read_table(io.BytesIO(store.read_bytes(key))) for key in keys]
    return pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]


def _is_numeric(column: pa.ChunkedArray) -> bool:
    kind = column.type
    return pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)


def check_columns(table: pa.Table, columns: tuple[str, ...], numeric: tuple[str, ...], where: str) -> None:
    """Refuse missing columns, non-numeric numeric columns, and nulls, NaN or infinities."""
    missing = [name for name in columns if name not in table.column_names]
    if missing:
        raise BadInput(
            f"{where}: missing column(s) {', '.join(missing)}; "
            f"the data has {', '.join(table.column_names)}"
        )
    for name in columns:
        column = table.column(name)
        nulls = column.null_count
        if nulls:
            raise BadInput(f"{where}: column {name} has {nulls} missing value(s) of {len(column)} rows")
        if name not in numeric:
            continue
        if not _is_numeric(column):
            raise BadInput(f"{where}: column {name} must be numeric, it is {column.type}")
        values = column.to_numpy()
        bad = int(np.count_nonzero(~np.isfinite(values.astype(float))))
        if bad:
            raise BadInput(f"{where}: column {name} has {bad} NaN or infinite value(s) of {len(values)} rows")


def shard_data(
    table: pa.Table,
    columns: tuple[str, ...],
    numeric: tuple[str, ...],
    group_column: str | None,
    where: str,
) -> ShardData:
    """Check a shard's table and turn it into NumPy columns with a dense group index."""
    needed = tuple(dict.fromkeys(columns + ((group_column,) if group_column else ())))
    check_columns(table, needed, numeric, where)
    if table.num_rows == 0:
        raise BadInput(f"{where}: the shard is empty (0 rows)")
    arrays = {name: table.column(name).to_numpy() for name in needed}
    if group_column is None:
        return ShardData(arrays)
    labels, index = np.unique(arrays[group_column], return_inverse=True)
    return ShardData(arrays, group_column, labels, index.astype(np.int32))


def model_rows(model: Model, spec, uri: str, where: str) -> ShardData:
    """The checked rows at `uri` (a shard, or all the data) that `model` will be fed."""
    return shard_data(read_table(uri), model.columns, model.numeric, spec.group_column, where)


def model_and_data(spec, stats: dict | None, uri: str, where: str) -> tuple[Model, ShardData]:
    """The spec's model and the checked rows at `uri` it will be fed."""
    model = model_from_spec(spec, stats)
    return model, model_rows(model, spec, uri, where)


def shard_data_uri(root: str, shard: int, data_uri: str | None = None) -> str:
    """Where shard `shard`'s rows are: `data_uri` with {shard} filled in, else the partition's."""
    return (data_uri or f"{root.rstrip('/')}/partition/shard={{shard}}/").replace("{shard}", str(shard))


def partition_manifest(root: str) -> dict | None:
    """The partition step's manifest under `root`, if the data were partitioned there."""
    try:
        return json.loads(open_store(root).read_bytes("partition/manifest.json"))
    except NotFound:
        return None


def whole_data_stats(root: str, stats_uri: str | None = None) -> dict | None:
    """Whole-data statistics for priors: from `stats_uri` if given (it must exist), else from the
    partition manifest under `root` if there is one."""
    if stats_uri is None:
        return (partition_manifest(root) or {}).get("stats")
    store, key = split_uri(stats_uri)
    try:
        return json.loads(store.read_bytes(key)).get("stats")
    except NotFound:
        raise BadInput(f"{stats_uri} does not exist") from None
