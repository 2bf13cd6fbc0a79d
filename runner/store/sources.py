"""The input of partitioning: Parquet files under a URI, opened for streaming.

`data.uri` is one Parquet file or a prefix (folder) holding many, locally or on S3. Files are listed
through the runner's `Store` (sorted by key; names starting with `.` or `_`, such as Spark's
`_SUCCESS`, are skipped) and read with pyarrow, which streams record batches and, on S3, fetches
only the byte ranges of the columns it reads. S3 is configured from the same environment as
`storage.py`: `AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL`, `AWS_REGION` or `AWS_DEFAULT_REGION`,
credentials through the AWS SDK's default chain; `CONSENSUSFIT_S3_MAX_ATTEMPTS` bounds its retries.

A prefix whose files all sit under `shard=<k>/` folders is already sharded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import BadInput, TransientError
from ..layout import SHARD_FOLDER
from .storage import open_store, split_uri



@dataclass(frozen=True)
class InputFile:
    uri: str
    key: str  # relative to the data URI (the file name for a single-file URI)
    shard: int | None = None  # from a `shard=<k>/` folder


def _skipped(key: str) -> bool:
    return any(part.startswith((".", "_")) for part in key.split("/"))


def list_inputs(uri: str) -> list[InputFile]:
    """The Parquet files of `data.uri`, sorted by key, with their `shard=` folder if any."""
    if uri.rstrip("/").endswith(".parquet"):
        store, name = split_uri(uri)
        if not store.exists(name):
            raise BadInput(f"{uri}: no such Parquet file")
        return [InputFile(uri.rstrip("/"), name)]
    store = open_store(uri.rstrip("/"))
    keys = [key for key in store.list("") if key.endswith(".parquet") and not _skipped(key)]
    if not keys:
        raise BadInput(f"{uri}: no Parquet files")
    files = []
    for key in keys:
        shards = [int(match.group(1)) for part in key.split("/")[:-1] if (match := SHARD_FOLDER.match(part))]
        files.append(InputFile(store.uri(key), key, shards[-1] if shards else None))
    sharded = sum(file.shard is not None for file in files)
    if 0 < sharded < len(files):
        raise BadInput(
            f"{uri}: {sharded} of {len(files)} Parquet files are under shard=<k>/ folders; "
            "the data must be either all sharded or not sharded at all"
        )
    return files


@lru_cache(maxsize=8)
def _s3_filesystem(endpoint: str | None, region: str | None, attempts: int):
    from pyarrow import fs  # here: pyarrow's filesystems (and their S3 SDK) load only when read

    options: dict = {"retry_strategy": fs.AwsStandardS3RetryStrategy(max_attempts=attempts)}
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        options["endpoint_override"] = parsed.netloc + parsed.path.rstrip("/")
        options["scheme"] = parsed.scheme
    if region:
        options["region"] = region
    return fs.S3FileSystem(**options)


def arrow_filesystem(uri: str):
    """(pyarrow filesystem, path) for a local path, `file://` or `s3://` URI."""
    from pyarrow import fs  # here: see _s3_filesystem

    if uri.startswith("s3://"):
        environment = os.environ
        endpoint = environment.get("AWS_ENDPOINT_URL_S3") or environment.get("AWS_ENDPOINT_URL")
        region = environment.get("AWS_REGION") or environment.get("AWS_DEFAULT_REGION")
        attempts = int(environment.get("CONSENSUSFIT_S3_MAX_ATTEMPTS", 8))
        return _s3_filesystem(endpoint, region, attempts), uri.removeprefix("s3://")
    return fs.LocalFileSystem(), uri.removeprefix("file://")


def open_parquet(uri: str) -> pq.ParquetFile:
    """A Parquet file opened for streaming; unreadable storage is transient, a bad file bad input."""
    filesystem, path = arrow_filesystem(uri)
    try:
        handle = filesystem.open_input_file(path)
    except FileNotFoundError:
        raise BadInput(f"{uri}: no such file") from None
    except OSError as error:
        raise TransientError(f"{uri}: {error}".splitlines()[0]) from None
    try:
        return pq.ParquetFile(handle)
    except pa.ArrowInvalid as error:
        raise BadInput(f"{uri}: not a readable Parquet file: {error}".splitlines()[0]) from None
    except OSError as error:
        raise TransientError(f"{uri}: {error}".splitlines()[0]) from None
