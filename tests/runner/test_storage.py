"""Storage over a local folder and a real S3 endpoint on loopback, with injected network faults."""

import pytest

from consensusfit.runner.errors import BadInput, TransientError
from consensusfit.runner.store.storage import (
    LocalStore,
    NotFound,
    RetryBudget,
    open_store,
    split_uri,
    with_retries,
)

FAST = {"CONSENSUSFIT_S3_MAX_ATTEMPTS": "6", "CONSENSUSFIT_S3_RETRY_SECONDS": "20"}


def exercise(store):
    store.write_bytes("a/b.json", b"{}")
    store.write_bytes("a/c/d.bin", b"\x00\x01")
    store.write_bytes("e.txt", b"hello")
    assert store.read_bytes("a/c/d.bin") == b"\x00\x01"
    assert store.exists("e.txt") and not store.exists("nope")
    assert store.list("a/") == ["a/b.json", "a/c/d.bin"]
    assert store.list() == ["a/b.json", "a/c/d.bin", "e.txt"]
    assert store.child("a").read_bytes("b.json") == b"{}"
    with pytest.raises(NotFound):
        store.read_bytes("missing")


def test_local_store(tmp_path):
    exercise(open_store(str(tmp_path / "root")))


def test_local_writes_never_leave_a_partial_file_visible(tmp_path):
    store = LocalStore(str(tmp_path))
    store.write_bytes("x", b"1" * 1000)
    assert [p.name for p in tmp_path.iterdir()] == ["x"]


def test_s3_store_against_a_real_endpoint(s3_bucket):
    exercise(open_store(f"{s3_bucket}/prefix"))
    store, key = split_uri(f"{s3_bucket}/prefix/e.txt")
    assert store.read_bytes(key) == b"hello"


def test_s3_missing_bucket_is_bad_input(s3_endpoint):
    with pytest.raises(BadInput, match="NoSuchBucket"):
        open_store("s3://no-such-bucket/x").write_bytes("k", b"v")


def test_transient_faults_are_retried_until_success(s3_bucket, fault_proxy, monkeypatch):
    for name, value in FAST.items():
        monkeypatch.setenv(name, value)
    proxy = fault_proxy(faults=["503", "drop", "503"])
    store = open_store(f"{s3_bucket}/retry")
    store.write_bytes("k", b"value")
    assert proxy.seen == 4  # three injected faults, then the request that got through
    proxy.faults = ["drop", "503"]
    assert store.read_bytes("k") == b"value"


def test_a_permanent_outage_is_reported_after_the_budget(s3_bucket, fault_proxy, monkeypatch):
    monkeypatch.setenv("CONSENSUSFIT_S3_MAX_ATTEMPTS", "4")
    proxy = fault_proxy(then="503")
    store = open_store(f"{s3_bucket}/down")
    with pytest.raises(TransientError, match=r"down/k: still failing after 4 attempts.*SlowDown"):
        store.write_bytes("k", b"value")
    assert proxy.seen == 4


def test_retry_budget_in_seconds_is_respected():
    calls = []

    def failing():
        calls.append(1)
        raise ConnectionError("boom")

    budget = RetryBudget(attempts=100, seconds=0.05, base_delay=0.02, max_delay=0.02)
    with pytest.raises(TransientError, match="still failing"):
        with_retries(failing, lambda e: True, budget, "thing")
    assert 1 < len(calls) < 100


def test_permanent_errors_are_not_retried():
    calls = []

    def failing():
        calls.append(1)
        raise ValueError("bad")

    with pytest.raises(ValueError):
        with_retries(failing, lambda e: isinstance(e, ConnectionError), RetryBudget(), "thing")
    assert len(calls) == 1


def test_unknown_scheme_is_refused():
    with pytest.raises(BadInput, match="only local paths"):
        open_store("gs://bucket/x")
