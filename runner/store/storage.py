"""One small interface over a local folder and S3.

A `Store` is rooted at a URI (`/some/folder`, `file:///some/folder` or `s3://bucket/prefix`) and
reads and writes objects by key relative to that root. S3 settings come from the environment the
way AWS tools read them (`AWS_ENDPOINT_URL[_S3]`, `AWS_REGION`/`AWS_DEFAULT_REGION`, credentials,
profiles). Transient S3 failures (5xx, throttling, dropped connections, timeouts) are retried with
exponential backoff and full jitter, within a bounded budget of attempts and seconds
(`CONSENSUSFIT_S3_MAX_ATTEMPTS`, default 8; `CONSENSUSFIT_S3_RETRY_SECONDS`, default 60); when the
budget runs out the failure is raised as `TransientError` naming the object.

Local writes go to a temporary file renamed into place, so a reader never sees half an object.
S3 PUTs are atomic by nature. A local write that fails for a reason only the user can fix (a
full disk or quota, the file size limit, no permission) removes its temporary file and is
refused as bad input naming the file: no retry would help.
"""

from __future__ import annotations

import errno
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

from ..errors import BadInput, TransientError

T = TypeVar("T")

# Error codes S3 and S3-compatible servers use for "try again later".
RETRYABLE_CODES = {
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "RequestLimitExceeded",
}
NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}
# Local write errors that only the user can fix: full disk or quota, the file size limit
# (`ulimit -f`), no permission, a read-only file system.
USER_FIXES_WRITE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS}


@dataclass(frozen=True)
class RetryBudget:
    """How long to keep trying a transient failure."""

    attempts: int = 8
    seconds: float = 60.0
    base_delay: float = 0.1
    max_delay: float = 5.0

    @classmethod
    def from_environment(cls) -> "RetryBudget":
        return cls(
            attempts=int(os.environ.get("CONSENSUSFIT_S3_MAX_ATTEMPTS", cls.attempts)),
            seconds=float(os.environ.get("CONSENSUSFIT_S3_RETRY_SECONDS", cls.seconds)),
        )

    def delay(self, attempt: int) -> float:
        """Full-jitter exponential backoff: uniform on [0, min(max, base * 2^attempt)]."""
        return random.uniform(0, min(self.max_delay, self.base_delay * 2**attempt))


def with_retries(
    operation: Callable[[], T],
    is_transient: Callable[[Exception], bool],
    budget: RetryBudget,
    what: str,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run `operation`, retrying transient failures until the budget is spent."""
    started = time.monotonic()
    for attempt in range(budget.attempts):
        try:
            return operation()
        except Exception as error:  # classified below; anything else propagates unchanged
            if not is_transient(error):
                raise
            last = error
            pause = budget.delay(attempt)
            out_of_time = time.monotonic() - started + pause > budget.seconds
            if attempt == budget.attempts - 1 or out_of_time:
                break
            sleep(pause)
    raise TransientError(
        f"{what}: still failing after {attempt + 1} attempts in "
        f"{time.monotonic() - started:.1f}s: {type(last).__name__}: {last}"
    )


class NotFound(Exception):
    """The object does not exist."""


class Store:
    """Objects under a root URI. Subclasses implement the four primitives."""

    root: str

    def uri(self, key: str) -> str:
        return f"{self.root.rstrip('/')}/{key}"

    def read_bytes(self, key: str) -> bytes:
        raise NotImplementedError

    def write_bytes(self, key: str, data: bytes) -> None:
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def list(self, prefix: str = "") -> list[str]:
        """Keys under `prefix` (relative to the root), sorted."""
        raise NotImplementedError

    def child(self, prefix: str) -> "Store":
        """A store rooted at `prefix` under this one."""
        return open_store(self.uri(prefix.strip("/")))


class LocalStore(Store):
    def __init__(self, root: str):
        self.root = root
        self.path = Path(root.removeprefix("file://"))

    def read_bytes(self, key: str) -> bytes:
        try:
            return (self.path / key).read_bytes()
        except FileNotFoundError:
            raise NotFound(self.uri(key)) from None

    def write_bytes(self, key: str, data: bytes) -> None:
        target = self.path / key
        temporary = target.with_name(f".{target.name}.{os.getpid()}.partial")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            temporary.write_bytes(data)
            temporary.replace(target)
        except OSError as error:
            temporary.unlink(missing_ok=True)
            if error.errno not in USER_FIXES_WRITE:
                raise
            raise BadInput(f"cannot write {target} ({len(data)} bytes): {os.strerror(error.errno)}") from None

    def exists(self, key: str) -> bool:
        return (self.path / key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        base = self.path / prefix
        if base.is_file():
            return [prefix]
        if not base.is_dir():
            return []
        return sorted(
            str(path.relative_to(self.path))
            for path in base.rglob("*")
            if path.is_file() and not path.name.endswith(".partial")
        )


def _s3_client():
    # boto3 and botocore here, not at the top: they take about a second to import, and a local
    # run (or the CLI's --help) never needs them
    import boto3
    from botocore.config import Config

    # Our own retry loop owns the budget; botocore's would multiply it.
    config = Config(
        retries={"total_max_attempts": 1, "mode": "standard"}, connect_timeout=10, read_timeout=60
    )
    return boto3.session.Session().client("s3", config=config)


def _is_transient_s3(error: Exception) -> bool:
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError, ReadTimeoutError

    if isinstance(error, (ConnectionError, HTTPClientError, ReadTimeoutError)):
        return True
    if isinstance(error, ClientError):
        code = error.response.get("Error", {}).get("Code", "")
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return code in RETRYABLE_CODES or status >= 500
    return False


class S3Store(Store):
    def __init__(self, root: str, budget: RetryBudget | None = None):
        self.root = root.rstrip("/")
        bucket_and_prefix = self.root.removeprefix("s3://")
        self.bucket, _, self.prefix = bucket_and_prefix.partition("/")
        if not self.bucket:
            raise BadInput(f"{root}: an S3 URI needs a bucket")
        self.budget = budget or RetryBudget.from_environment()
        self.client = _s3_client()

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, what: str, operation: Callable[[], T]) -> T:
        from botocore.exceptions import ClientError, NoCredentialsError

        try:
            return with_retries(operation, _is_transient_s3, self.budget, what)
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code", "")
            if code in NOT_FOUND_CODES:
                raise NotFound(what) from None
            raise BadInput(f"{what}: {code}: {error.response['Error'].get('Message', '')}") from None
        except NoCredentialsError:
            raise BadInput(f"{what}: no S3 credentials in the environment") from None

    def read_bytes(self, key: str) -> bytes:
        def get() -> bytes:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()

        return self._call(self.uri(key), get)

    def write_bytes(self, key: str, data: bytes) -> None:
        self._call(
            self.uri(key),
            lambda: self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data),
        )

    def exists(self, key: str) -> bool:
        try:
            self._call(
                self.uri(key),
                lambda: self.client.head_object(Bucket=self.bucket, Key=self._key(key)),
            )
        except NotFound:
            return False
        return True

    def list(self, prefix: str = "") -> list[str]:
        full = self._key(prefix)

        def list_all() -> list[str]:
            keys: list[str] = []
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
                keys.extend(item["Key"] for item in page.get("Contents", []))
            return keys

        keys = self._call(self.uri(prefix), list_all)
        strip = len(self.prefix) + 1 if self.prefix else 0
        return sorted(key[strip:] for key in keys)


def open_store(uri: str) -> Store:
    """A store for a local path, `file://` URI or `s3://` URI."""
    if uri.startswith("s3://"):
        return S3Store(uri)
    if "://" in uri and not uri.startswith("file://"):
        raise BadInput(f"{uri}: only local paths, file:// and s3:// URIs are supported")
    return LocalStore(uri)


def split_uri(uri: str) -> tuple[Store, str]:
    """The store of a URI's parent folder and the URI's last part, e.g. for one named file."""
    parent, _, name = uri.rstrip("/").rpartition("/")
    if not name or parent in ("", "s3:/"):
        raise BadInput(f"{uri}: not a file URI")
    return open_store(parent), name
