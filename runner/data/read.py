"""Reading one shard's rows and refusing data that cannot be fitted.

Every refusal names the column, the shard and how many rows are affected, so a user with a
100-million-row table knows where to look.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import BadInput
from ..store.storage import Store, open_store, split_uri
from .shard import ShardData


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


def model_rows(model, spec, uri: str, where: str) -> ShardData:
    """The checked rows at `uri` (a shard, or all the data) that `model` will be fed."""
    return shard_data(read_table(uri), model.columns, model.numeric, spec.group_column, where)
