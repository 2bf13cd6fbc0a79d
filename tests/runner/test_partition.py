"""The partition step: balance, determinism, group integrity, refusals, workers, layouts, S3."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from consensusfit.runner.data import balance
from consensusfit.runner.errors import BadInput
from consensusfit.runner.steps.partition import finalize_partition, partition, partition_fit
from consensusfit.runner.spec import parse
from consensusfit.runner.store.storage import open_store

REPO = Path(__file__).resolve().parents[2]
COLUMNS = ("Patient", "Weeks", "FVC")
NUMERIC = ("Weeks", "FVC")


def make_spec(uri, shards=5, seed=0, group="Patient"):
    data = {"uri": str(uri)}
    if group:
        data["groupColumn"] = group
    return parse({
        "data": data,
        "shards": shards,
        "model": {"python": {"uri": str(REPO / "examples" / "fvc_model.py"), "function": "model"}},
        "sampler": {"seed": seed},
    })


def seed_like(patients=300, seed=1, skew=False) -> pa.Table:
    """Patients with a few to many visits (`skew`: sizes spread over two orders of magnitude)."""
    rng = np.random.default_rng(seed)
    if skew:
        sizes = np.minimum(np.ceil(rng.lognormal(2.0, 1.0, patients)), 150).astype(int)
    else:
        sizes = rng.integers(4, 12, patients)
    names = np.repeat([f"ID{i:05d}" for i in range(patients)], sizes)
    rows = len(names)
    order = rng.permutation(rows)  # a patient's rows are spread over the files
    return pa.table({
        "Patient": names[order],
        "Weeks": rng.integers(-12, 134, rows)[order],
        "FVC": rng.normal(2700, 800, rows)[order],
        "Sex": rng.choice(["Male", "Female"], rows)[order],
        "Smoker": rng.random(rows)[order] < 0.2,
    })


def write_files(table: pa.Table, folder: Path, files=4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, table.num_rows, files + 1).astype(int)
    for index in range(files):
        pq.write_table(table.slice(bounds[index], bounds[index + 1] - bounds[index]),
                       folder / f"part-{index:03d}.parquet", row_group_size=97)
    return folder


def shards_of(root, shards) -> list[pa.Table]:
    store = open_store(str(root))
    tables = []
    for shard in range(shards):
        keys = [key for key in store.list(f"partition/shard={shard}/") if key.endswith(".parquet")]
        pieces = [pq.read_table(pa.BufferReader(store.read_bytes(key))) for key in keys]
        tables.append(pa.concat_tables(pieces).replace_schema_metadata(None))
    return tables


def manifest_of(root) -> dict:
    return json.loads(open_store(str(root)).read_bytes("partition/manifest.json"))


def sorted_rows(table: pa.Table) -> list:
    table = table.select(list(COLUMNS))
    return sorted(zip(*(table.column(name).to_pylist() for name in COLUMNS)))


@pytest.fixture
def data(tmp_path):
    table = seed_like()
    return table, write_files(table, tmp_path / "data")


# ---------------------------------------------------------------------------------------------
# balance and determinism


def test_assignment_balances_skewed_groups():
    rng = np.random.default_rng(3)
    counts = np.minimum(np.ceil(rng.lognormal(2.5, 1.2, 20_000)), 1000).astype(np.int64)
    hashes = balance.group_hashes([f"g{i}" for i in range(len(counts))], seed=0)
    assignment = balance.assign_groups(counts, hashes, 40)
    rows, groups = balance.shard_totals(assignment, counts, 40)
    assert rows.sum() == counts.sum() and groups.sum() == len(counts)
    assert rows.max() - rows.min() <= counts.max()
    assert rows.max() / rows.mean() < 1.01


def test_partition_balances_skewed_groups_and_keeps_groups_whole(tmp_path):
    table = seed_like(patients=400, skew=True)
    folder = write_files(table, tmp_path / "data")
    spec = make_spec(folder, shards=6)
    message = partition(spec, str(tmp_path / "fit"), COLUMNS, NUMERIC)
    assert message == {"ok": True, "rows": table.num_rows, "groups": 400}
    shards = shards_of(tmp_path / "fit", 6)
    sizes = np.array([shard.num_rows for shard in shards])
    assert sizes.max() / sizes.mean() < 1.03, sizes
    seen: dict[str, int] = {}
    for index, shard in enumerate(shards):
        for patient in pc.unique(shard.column("Patient")).to_pylist():
            assert patient not in seen, f"{patient} in shards {seen[patient]} and {index}"
            seen[patient] = index
    assert len(seen) == 400
    assert sorted_rows(pa.concat_tables(shards)) == sorted_rows(table)
    manifest = manifest_of(tmp_path / "fit")
    assert [entry["rows"] for entry in manifest["per_shard"]] == sizes.tolist()
    assert [entry["groups"] for entry in manifest["per_shard"]] == [
        len(pc.unique(shard.column("Patient"))) for shard in shards
    ]
    assert manifest["rows"] == table.num_rows and manifest["groups"] == 400


def groups_by_shard(root, shards):
    return [frozenset(pc.unique(shard.column("Patient")).to_pylist()) for shard in shards_of(root, shards)]


def test_same_seed_same_assignment_other_seed_another(data, tmp_path):
    _, folder = data
    first = tmp_path / "a"
    partition(make_spec(folder, seed=7), str(first), COLUMNS, NUMERIC)
    again = tmp_path / "b"
    partition(make_spec(folder, seed=7), str(again), COLUMNS, NUMERIC)
    other = tmp_path / "c"
    partition(make_spec(folder, seed=8), str(other), COLUMNS, NUMERIC)
    assert groups_by_shard(first, 5) == groups_by_shard(again, 5)
    assert set(groups_by_shard(first, 5)) != set(groups_by_shard(other, 5))
    # and the files themselves are byte for byte the same
    store_a, store_b = open_store(str(first)), open_store(str(again))
    for key in store_a.list("partition/shard=0/"):
        assert store_a.read_bytes(key) == store_b.read_bytes(key)


def test_rows_without_groups_split_evenly_and_deterministically(data, tmp_path):
    table, folder = data
    spec = make_spec(folder, shards=7, group=None)
    message = partition(spec, str(tmp_path / "a"), ("Weeks", "FVC"), ("Weeks", "FVC"))
    assert message == {"ok": True, "rows": table.num_rows, "groups": 0}
    sizes = [shard.num_rows for shard in shards_of(tmp_path / "a", 7)]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == table.num_rows
    assert [entry["rows"] for entry in manifest_of(tmp_path / "a")["per_shard"]] == sizes
    partition(spec, str(tmp_path / "b"), ("Weeks", "FVC"), ("Weeks", "FVC"))
    for left, right in zip(shards_of(tmp_path / "a", 7), shards_of(tmp_path / "b", 7)):
        assert left.equals(right)


# ---------------------------------------------------------------------------------------------
# statistics


def test_manifest_statistics_are_whole_data(data, tmp_path):
    table, folder = data
    spec = make_spec(folder)
    partition(spec, str(tmp_path / "fit"), ("Patient", "Weeks", "FVC", "Sex", "Smoker"), NUMERIC)
    manifest = manifest_of(tmp_path / "fit")
    assert manifest["fingerprint"] == spec.fingerprint()
    assert manifest["shards"] == 5 and manifest["group_column"] == "Patient"
    stats = manifest["stats"]
    fvc = table.column("FVC").to_numpy()
    assert stats["FVC"]["mean"] == pytest.approx(fvc.mean(), rel=1e-12)
    assert stats["FVC"]["sd"] == pytest.approx(fvc.std(), rel=1e-10)
    assert stats["FVC"]["min"] == fvc.min() and stats["FVC"]["max"] == fvc.max()
    weeks = table.column("Weeks").to_numpy()
    assert (stats["Weeks"]["min"], stats["Weeks"]["max"]) == (int(weeks.min()), int(weeks.max()))
    assert isinstance(stats["Weeks"]["min"], int)
    assert stats["Sex"] == {"levels": ["Female", "Male"]}
    assert stats["Smoker"] == {"levels": [False, True]}
    assert stats["Patient"] == {"groups": 300}


def test_python_model_spec_reads_the_models_columns(data, tmp_path):
    table, folder = data
    spec = make_spec(folder)
    message = partition_fit(spec, str(tmp_path / "fit"))
    assert message == {"ok": True, "rows": table.num_rows, "groups": 300}
    manifest = manifest_of(tmp_path / "fit")
    assert set(manifest["stats"]) == {"Patient", "Weeks", "FVC"}
    assert shards_of(tmp_path / "fit", 5)[0].column_names == ["Patient", "Weeks", "FVC"]


# ---------------------------------------------------------------------------------------------
# refusals: one line naming the column and the count


def refused(spec, tmp_path, columns=COLUMNS, numeric=NUMERIC) -> str:
    with pytest.raises(BadInput) as caught:
        partition(spec, str(tmp_path / "fit"), columns, numeric)
    message = str(caught.value)
    assert "\n" not in message
    assert not open_store(str(tmp_path / "fit")).exists("partition/manifest.json")
    return message


def test_refuses_missing_column(data, tmp_path):
    _, folder = data
    message = refused(make_spec(folder), tmp_path, COLUMNS + ("Age",))
    assert "missing column(s) Age" in message and "4 of 4 files" in message


def test_refuses_missing_group_column(data, tmp_path):
    _, folder = data
    message = refused(make_spec(folder, group="Subject"), tmp_path)
    assert "missing column(s) Subject" in message


def test_refuses_non_numeric_column(data, tmp_path):
    _, folder = data
    message = refused(make_spec(folder), tmp_path, COLUMNS + ("Sex",), NUMERIC + ("Sex",))
    assert "column Sex must be numeric, it is string" in message


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_refuses_nan_and_infinite_values(tmp_path, bad):
    table = seed_like()
    fvc = table.column("FVC").to_numpy().copy()
    fvc[[3, 50, 400]] = bad
    table = table.set_column(2, "FVC", pa.array(fvc))
    message = refused(make_spec(write_files(table, tmp_path / "data")), tmp_path)
    assert f"column FVC has 3 NaN or infinite value(s) of {table.num_rows} rows" in message
    assert not open_store(str(tmp_path / "fit")).list("partition/")  # nothing written


def test_refuses_missing_values(tmp_path):
    table = seed_like()
    weeks = table.column("Weeks").to_pylist()
    weeks[10] = weeks[20] = None
    table = table.set_column(1, "Weeks", pa.array(weeks, pa.int64()))
    message = refused(make_spec(write_files(table, tmp_path / "data")), tmp_path)
    assert "column Weeks has 2 missing value(s)" in message


def test_refuses_missing_group_keys(tmp_path):
    table = seed_like()
    names = table.column("Patient").to_pylist()
    names[5] = None
    table = table.set_column(0, "Patient", pa.array(names, pa.string()))
    message = refused(make_spec(write_files(table, tmp_path / "data")), tmp_path)
    assert "column Patient has 1 missing value(s)" in message


def test_refuses_fewer_groups_than_shards(tmp_path):
    table = seed_like(patients=4)
    message = refused(make_spec(write_files(table, tmp_path / "data"), shards=5), tmp_path)
    assert "column Patient has 4 group(s), fewer than spec.shards = 5" in message


def test_refuses_fewer_rows_than_shards_without_groups(tmp_path):
    table = seed_like(patients=1).slice(0, 3)
    message = refused(make_spec(write_files(table, tmp_path / "data", files=1), group=None), tmp_path,
                      ("Weeks",), ("Weeks",))
    assert "3 rows, fewer than spec.shards = 5" in message


def test_refuses_a_folder_without_parquet(tmp_path):
    (tmp_path / "empty").mkdir()
    assert "no Parquet files" in refused(make_spec(tmp_path / "empty"), tmp_path)


# ---------------------------------------------------------------------------------------------
# completion, retries, other fits


def test_complete_partition_is_not_redone_and_another_spec_is_refused(data, tmp_path):
    table, folder = data
    root = tmp_path / "fit"
    spec = make_spec(folder)
    partition(spec, str(root), COLUMNS, NUMERIC)
    manifest = root / "partition/manifest.json"
    before = manifest.stat().st_mtime_ns
    (folder / "part-000.parquet").unlink()  # would fail if it read the data again
    assert partition(spec, str(root), COLUMNS, NUMERIC) == {"ok": True, "rows": table.num_rows, "groups": 300}
    assert manifest.stat().st_mtime_ns == before
    with pytest.raises(BadInput, match="another spec"):
        partition(make_spec(folder, seed=1), str(root), COLUMNS, NUMERIC)


def test_two_fits_never_touch_each_other(data, tmp_path):
    _, folder = data
    partition(make_spec(folder, seed=1), str(tmp_path / "fits/a"), COLUMNS, NUMERIC)
    snapshot = {p: p.read_bytes() for p in (tmp_path / "fits/a").rglob("*") if p.is_file()}
    partition(make_spec(folder, seed=2), str(tmp_path / "fits/b"), COLUMNS, NUMERIC)
    assert {p: p.read_bytes() for p in (tmp_path / "fits/a").rglob("*") if p.is_file()} == snapshot
    assert all(str(p).startswith(str(tmp_path / "fits/b/partition")) for p in (tmp_path / "fits/b").rglob("*") if p.is_file())


def test_a_small_memory_budget_reads_again_and_writes_the_same(data, tmp_path):
    _, folder = data
    spec = make_spec(folder, shards=6)
    messages = []
    partition(spec, str(tmp_path / "big"), COLUMNS, NUMERIC)
    partition(spec, str(tmp_path / "small"), COLUMNS, NUMERIC, memory_bytes=20_000, log=messages.append)
    assert any("reads of the input" in message for message in messages)
    for left, right in zip(shards_of(tmp_path / "big", 6), shards_of(tmp_path / "small", 6)):
        assert left.equals(right)
    big, small = manifest_of(tmp_path / "big"), manifest_of(tmp_path / "small")
    assert big["stats"] == small["stats"] and big["per_shard"] == small["per_shard"]


# ---------------------------------------------------------------------------------------------
# several workers


def test_workers_over_disjoint_files_equal_one_worker(tmp_path):
    table = seed_like(patients=500, skew=True)
    folder = write_files(table, tmp_path / "data", files=7)
    spec = make_spec(folder, shards=4)
    single = tmp_path / "single"
    partition(spec, str(single), COLUMNS, NUMERIC)
    multi = tmp_path / "multi"
    for worker in (2, 0, 1):
        assert not (multi / "partition/manifest.json").exists()
        message = partition(spec, str(multi), COLUMNS, NUMERIC, worker=worker, workers=3)
        assert message == {"ok": True, "rows": table.num_rows, "groups": 500}
    assert sorted(p.name for p in (multi / "partition/workers").iterdir()) == ["0.json", "1.json", "2.json"]
    assert sorted(p.name for p in (multi / "partition/shard=0").iterdir()) == [
        "part-0.parquet", "part-1.parquet", "part-2.parquet"
    ]
    for left, right in zip(shards_of(single, 4), shards_of(multi, 4)):
        assert sorted_rows(left) == sorted_rows(right)
    one, many = manifest_of(single), manifest_of(multi)
    assert one["per_shard"] == many["per_shard"] and (one["rows"], one["groups"]) == (many["rows"], many["groups"])
    for name in ("Weeks", "FVC"):
        for key in ("count", "mean", "sd", "min", "max"):
            assert many["stats"][name][key] == pytest.approx(one["stats"][name][key], rel=1e-12)
    assert many["workers"] == 3


def test_more_workers_than_files_and_explicit_finalize(data, tmp_path):
    table, folder = data  # 4 files
    spec = make_spec(folder, shards=3)
    root = tmp_path / "fit"
    for worker in range(6):
        partition(spec, str(root), COLUMNS, NUMERIC, worker=worker, workers=6)
    assert manifest_of(root)["rows"] == table.num_rows
    assert finalize_partition(spec, str(root), 6)["rows"] == table.num_rows


def test_a_retried_worker_reuses_its_work(data, tmp_path):
    _, folder = data
    spec = make_spec(folder)
    root = tmp_path / "fit"
    partition(spec, str(root), COLUMNS, NUMERIC, worker=0, workers=2)
    part = root / "partition/shard=0/part-0.parquet"
    before = part.stat().st_mtime_ns
    partition(spec, str(root), COLUMNS, NUMERIC, worker=0, workers=2)  # retried pod
    assert part.stat().st_mtime_ns == before
    assert finalize_partition(spec, str(root), 2) is None
    partition(spec, str(root), COLUMNS, NUMERIC, worker=1, workers=2)
    assert manifest_of(root)["workers"] == 2


def test_refuses_bad_worker_index(data, tmp_path):
    _, folder = data
    with pytest.raises(BadInput):
        partition(make_spec(folder), str(tmp_path / "fit"), COLUMNS, NUMERIC, worker=2, workers=2)


# ---------------------------------------------------------------------------------------------
# already-sharded input


def write_sharded(table: pa.Table, folder: Path, shards: int, seed=0) -> Path:
    keys = pc.unique(table.column("Patient"))
    shard_of = balance.assign_groups(
        np.ones(len(keys), dtype=np.int64), balance.group_hashes(keys.to_pylist(), seed), shards
    )
    row_shard = shard_of[pc.index_in(table.column("Patient"), value_set=keys).to_numpy()]
    for shard in range(shards):
        target = folder / f"shard={shard}"
        target.mkdir(parents=True)
        rows = table.filter(pa.array(row_shard == shard))
        pq.write_table(rows.slice(0, rows.num_rows // 2), target / "a.parquet")
        pq.write_table(rows.slice(rows.num_rows // 2), target / "b.parquet")
    return folder


def test_already_sharded_input_is_kept(data, tmp_path):
    table, _ = data
    folder = write_sharded(table, tmp_path / "sharded", 4)
    spec = make_spec(folder, shards=4)
    message = partition(spec, str(tmp_path / "fit"), COLUMNS, NUMERIC)
    assert message == {"ok": True, "rows": table.num_rows, "groups": 300}
    manifest = manifest_of(tmp_path / "fit")
    assert manifest["layout"] == "sharded"
    for shard, written in enumerate(shards_of(tmp_path / "fit", 4)):
        original = pq.read_table(folder / f"shard={shard}")
        assert sorted_rows(written) == sorted_rows(original)
        assert manifest["per_shard"][shard] == {
            "rows": original.num_rows, "groups": len(pc.unique(original.column("Patient")))
        }
    assert manifest["stats"]["FVC"]["mean"] == pytest.approx(table.column("FVC").to_numpy().mean())


def test_already_sharded_input_with_another_count_is_refused(data, tmp_path):
    table, _ = data
    folder = write_sharded(table, tmp_path / "sharded", 4)
    message = refused(make_spec(folder, shards=5), tmp_path)
    assert "already sharded into 4 shard(s) (shard=0..3), but spec.shards is 5" in message


def test_already_sharded_input_with_a_split_group_is_refused(data, tmp_path):
    table, _ = data
    folder = write_sharded(table, tmp_path / "sharded", 3)
    stray = pq.read_table(folder / "shard=0/a.parquet").slice(0, 1)
    pq.write_table(stray, folder / "shard=1/stray.parquet")
    message = refused(make_spec(folder, shards=3), tmp_path)
    assert "1 group(s) of column Patient appear in more than one shard" in message


# ---------------------------------------------------------------------------------------------
# S3, against a real endpoint on loopback


def test_partition_from_and_to_s3_equals_local(data, tmp_path, s3_bucket):
    table, folder = data
    store = open_store(f"{s3_bucket}/osic")
    for path in sorted(folder.iterdir()):
        store.write_bytes(path.name, path.read_bytes())
    store.write_bytes("_SUCCESS", b"")
    remote_spec = make_spec(f"{s3_bucket}/osic/", shards=4)
    root = f"{s3_bucket}/fits/default/fvc/uid-1"
    for worker in range(2):
        message = partition(remote_spec, root, COLUMNS, NUMERIC, worker=worker, workers=2)
    assert message == {"ok": True, "rows": table.num_rows, "groups": 300}
    local_spec = make_spec(folder, shards=4)
    partition(local_spec, str(tmp_path / "local"), COLUMNS, NUMERIC)
    for left, right in zip(shards_of(root, 4), shards_of(tmp_path / "local", 4)):
        assert sorted_rows(left) == sorted_rows(right)
    remote, local = manifest_of(root), manifest_of(tmp_path / "local")
    assert remote["per_shard"] == local["per_shard"]
    assert remote["stats"]["Patient"] == local["stats"]["Patient"]
    assert open_store(s3_bucket).list("fits/")[0].startswith("fits/default/fvc/uid-1/partition/")
    # a single file on S3 works too
    single = make_spec(f"{s3_bucket}/osic/part-000.parquet", shards=2)
    message = partition(single, f"{s3_bucket}/fits/default/one/uid-2", COLUMNS, NUMERIC)
    assert message["rows"] == pq.read_metadata(folder / "part-000.parquet").num_rows


# ---------------------------------------------------------------------------------------------
# counting groups by hash, and the exact fallback after a collision


def test_a_hash_collision_is_detected_and_counting_falls_back_to_keys(data, tmp_path, monkeypatch):
    from consensusfit.runner.data import groupcount

    _, folder = data
    spec = make_spec(folder, shards=4)
    partition(spec, str(tmp_path / "by-hash"), COLUMNS, NUMERIC)
    counter = groupcount.HashCounter(0, pa.string())
    monkeypatch.setattr(groupcount, "key_hashes", lambda keys, seed: np.zeros(len(keys), np.uint64))
    with pytest.raises(groupcount.HashCollision):
        counter.add(pa.array(["a", "b"]))
    partition(spec, str(tmp_path / "by-key"), COLUMNS, NUMERIC)  # every key collides: falls back
    for left, right in zip(shards_of(tmp_path / "by-hash", 4), shards_of(tmp_path / "by-key", 4)):
        assert left.equals(right)
    assert manifest_of(tmp_path / "by-hash")["per_shard"] == manifest_of(tmp_path / "by-key")["per_shard"]


def test_integer_group_keys(tmp_path):
    table = seed_like(patients=50)
    codes = pc.cast(pc.utf8_slice_codeunits(table.column("Patient"), 2), pa.int64())
    table = table.set_column(0, "Patient", codes)
    spec = make_spec(write_files(table, tmp_path / "data"), shards=3)
    assert partition(spec, str(tmp_path / "fit"), COLUMNS, NUMERIC)["groups"] == 50
    seen = [set(shard.column("Patient").to_pylist()) for shard in shards_of(tmp_path / "fit", 3)]
    assert sum(len(groups) for groups in seen) == 50 and not (seen[0] & seen[1] or seen[1] & seen[2])


def test_key_hashes_are_seeded_stable_and_slice_safe():
    keys = pa.array(["ID1", "ID2", "", "ID1"])
    hashes = balance.key_hashes(keys, 0)
    assert hashes[0] == hashes[3] and len(set(hashes.tolist())) == 3
    assert (balance.key_hashes(keys.slice(1), 0) == hashes[1:]).all()
    assert (balance.key_hashes(keys, 1) != hashes).all()
    assert (balance.key_hashes([7, 8], 0) == balance.key_hashes(["7", "8"], 0)).all()
    # the assignment of a fixed key set never changes between versions without notice
    assert int(balance.key_hashes(["ID00000001"], 0)[0]) == EXPECTED_HASH


EXPECTED_HASH = 5562312148637245620


def test_empty_files_and_dictionary_columns_are_read(tmp_path):
    table = seed_like(patients=60)
    folder = write_files(table, tmp_path / "data", files=2)
    pq.write_table(table.slice(0, 0), folder / "part-000-empty.parquet")
    dictionary = table.set_column(0, "Patient", table.column("Patient").dictionary_encode())
    pq.write_table(dictionary.slice(0, 10), folder / "part-999.parquet")  # same rows again, categorical
    spec = make_spec(folder, shards=3)
    message = partition(spec, str(tmp_path / "fit"), COLUMNS + ("Sex",), NUMERIC)
    assert message == {"ok": True, "rows": table.num_rows + 10, "groups": 60}
    assert manifest_of(tmp_path / "fit")["stats"]["Sex"] == {"levels": ["Female", "Male"]}
