"""`consensusfit run` on what a new or a hostile user hands it (issue 16): bad priors, noisy
shards, manifests that escape the output folder or bomb the YAML loader, unknown fields, a full disk.

Each refusal is one line, exit 3 (never retried), before anything is written that should not be.
"""

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from consensusfit.runner.cli import main
from consensusfit.runner.errors import BadInput
from consensusfit.runner.spec import loads
from consensusfit.runner.store.storage import LocalStore

from test_pipeline import MODEL, small_fit


def error_line(stderr: str) -> str:
    (line,) = [line for line in stderr.splitlines() if line.startswith("consensusfit: error:")]
    return line


def formula_fit(tmp_path, priors: dict) -> str:
    """A formula fit on small_fit's data, with `priors`."""
    path = small_fit(tmp_path, shards=2, samples=50)
    fit = yaml.safe_load(path.read_text())
    fit["spec"]["model"] = {"formula": "y ~ 1 + (1 | g)", "priors": priors}
    path.write_text(yaml.safe_dump(fit))
    return str(path)


# ------------------------------------------------------------------------- item 6: bad priors


@pytest.mark.parametrize("prior, fragment", [
    ("Normal(1e400, 1)", "loc = inf is not a finite float32 number"),
    ("Uniform(-1e400, 1e400)", "low = -inf is not a finite float32 number"),
    ("Normal(0, 1e-320)", "scale must be positive (at least 1.18e-38), got 9.99989e-321"),
    ("Uniform(-3e38, 3e38)", "upper - lower overflows float32"),
])
def test_a_prior_no_sampler_can_use_is_refused_before_partitioning(tmp_path, capsys, prior, fragment):
    path = formula_fit(tmp_path, {"Intercept": prior})
    assert main(["run", path]) == 3
    line = error_line(capsys.readouterr().err)
    assert f"spec.model.priors['Intercept']: prior {prior!r}" in line and fragment in line
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("partition"))


@pytest.mark.parametrize("priors, fragment", [
    ({"Intercep": "Normal(0, 1)"}, "spec.model.priors: no parameter 'Intercep' in this model"),
    ({"1|g_sigma": "Normal(0, 1)"}, "spec.model.priors['1|g_sigma']: prior 'Normal(0, 1)' is on the real line"),
])
def test_a_prior_that_fits_no_parameter_fails_the_partition_before_any_shard(tmp_path, capsys, priors, fragment):
    path = formula_fit(tmp_path, priors)
    assert main(["run", path]) == 3
    assert fragment in error_line(capsys.readouterr().err)
    (root,) = (tmp_path / "runs" / "default" / "small").iterdir()
    assert sorted(p.name for p in root.iterdir()) == ["partition"]  # no shards, no rounds
    assert not (root / "partition" / "manifest.json").exists()


def test_priors_on_a_python_model_are_refused_not_ignored(tmp_path, capsys):
    path = small_fit(tmp_path)
    fit = yaml.safe_load(path.read_text())
    fit["spec"]["model"]["priors"] = {"mu": "Normal(0, 1)"}
    path.write_text(yaml.safe_dump(fit))
    assert main(["run", str(path)]) == 3
    assert "a Python model sets its own" in error_line(capsys.readouterr().err)


# ------------------------------------------------------------------------- item 9: noisy shards

def noisy_fit(tmp_path, fail_in_shards=False) -> str:
    """small_fit with a model that writes 200 KiB to stderr in every process that loads it (and
    with `fail_in_shards`, fails when a shard process calls it)."""
    path = small_fit(tmp_path, shards=2, samples=50)
    noise = "import sys\nfor _ in range(2000):\n    print('noise ' * 17, file=sys.stderr)\n"
    failure = (
        "\n_model = model\n\ndef model(g, y=None):\n"
        "    if 'sample' in sys.argv:\n        raise RuntimeError('the shard gave up')\n"
        "    return _model(g, y)\n"
    )
    (tmp_path / "model.py").write_text(noise + MODEL + (failure if fail_in_shards else ""))
    return str(path)


def run_cli(path: str, timeout: float, file_size_limit_kib: int | None = None) -> subprocess.CompletedProcess:
    """`consensusfit run` as a process, never longer than `timeout` seconds, with its temporary
    files in `tmp/` beside the manifest, optionally under `ulimit -f` (set by a shell: a
    preexec_fn would fork this process, JAX's threads and all)."""
    command = [sys.executable, "-m", "consensusfit.runner.cli", "run", path, "--workers", "2"]
    if file_size_limit_kib is not None:
        command = ["bash", "-c", f'ulimit -f {file_size_limit_kib} && exec "$@"', "bash", *command]
    temporary = Path(path).parent / "tmp"
    temporary.mkdir(exist_ok=True)
    environment = {**os.environ, "TMPDIR": str(temporary)}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environment)


def test_shards_that_write_more_than_a_pipe_holds_to_stderr_do_not_hang_the_run(tmp_path):
    result = run_cli(noisy_fit(tmp_path), timeout=300)  # today's main hangs here for ever
    assert result.returncode == 0, result.stderr[-2000:]
    assert not list((tmp_path / "tmp").glob("consensusfit-*.log"))  # kept only when a shard fails


def test_a_noisy_failing_shard_names_its_last_line_and_keeps_its_log(tmp_path, capsys):
    assert main(["run", noisy_fit(tmp_path, fail_in_shards=True)]) == 1
    line = error_line(capsys.readouterr().err)
    assert "sampling shard" in line and "the shard gave up" in line
    log = line.rsplit("(its output: ", 1)[1].rstrip(")")
    with open(log) as handle:
        text = handle.read()
    assert len(text) > 1 << 16 and "RuntimeError: the shard gave up" in text


# ------------------------------------------------------------------------- item 10: hostile manifests


def with_metadata(tmp_path, **metadata) -> str:
    path = small_fit(tmp_path)
    fit = yaml.safe_load(path.read_text())
    fit["metadata"].update(metadata)
    path.write_text(yaml.safe_dump(fit))
    return str(path)


@pytest.mark.parametrize("metadata, field", [
    ({"name": "../../escaped"}, "metadata.name '../../escaped'"),
    ({"namespace": ".."}, "metadata.namespace '..'"),
    ({"name": "Upper_Case"}, "metadata.name 'Upper_Case'"),
    ({"name": "x" * 64}, "metadata.name 'xxxx"),
])
def test_names_that_are_not_dns_labels_are_refused_and_nothing_is_written(tmp_path, capsys, metadata, field):
    assert main(["run", with_metadata(tmp_path, **metadata)]) == 3
    line = error_line(capsys.readouterr().err)
    assert field in line and "is not a DNS-1123 label" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.parquet", "fit.yaml", "model.py"]


def test_yaml_aliases_are_refused_naming_the_alias(tmp_path, capsys):
    path = small_fit(tmp_path)
    text = path.read_text().replace("  sampler:\n", "  sampler: &settings\n", 1)
    path.write_text(text + "status: *settings\n")
    assert main(["run", str(path)]) == 3
    assert "the YAML alias *settings (line" in error_line(capsys.readouterr().err)


def test_a_yaml_alias_bomb_is_refused_at_once():
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    bomb = "\n".join(lines) + "\nspec: {data: {uri: d}, model: {formula: 'y ~ 1'}, runner: {labels: *a9}}\n"
    started = time.monotonic()
    with pytest.raises(BadInput, match=r"YAML alias \*a0"):
        loads(bomb)
    assert time.monotonic() - started < 1


@pytest.mark.parametrize("section, key, named", [
    ("sampler", "warmpu", "spec.sampler.warmpu: unknown field (spec.sampler has warmup, samples"),
    ("combine", "tolerance", None),  # a known one, then an unknown one inside it
])
def test_unknown_spec_fields_are_refused_naming_the_field(tmp_path, capsys, section, key, named):
    path = small_fit(tmp_path)
    fit = yaml.safe_load(path.read_text())
    if named is None:
        fit["spec"][section][key] = {"mean": 0.1, "sdd": 0.1}
        named = "spec.combine.tolerance.sdd: unknown field (spec.combine.tolerance has mean, sd)"
    else:
        fit["spec"][section][key] = 500
    path.write_text(yaml.safe_dump(fit))
    assert main(["run", str(path)]) == 3
    assert named in error_line(capsys.readouterr().err)


def test_fields_the_crd_leaves_open_are_accepted():
    fit = loads(
        "metadata: {name: ok, labels: {team: a}, annotations: {note: b}}\n"
        "spec: {data: {uri: d}, model: {formula: 'y ~ 1', priors: {Intercept: 'Normal(0, 1)'}},"
        " runner: {compilationCache: {persistentVolumeClaim: {claimName: c}}, labels: {q: l}}}\n"
    )
    assert fit.name == "ok"


# ------------------------------------------------------------------------- item 11: a full disk


def test_a_write_that_finds_the_disk_full_names_the_file_and_leaves_no_partial(tmp_path, monkeypatch):
    store = LocalStore(str(tmp_path))
    original = type(tmp_path).write_bytes

    def fill_the_disk(self, data):
        original(self, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(type(tmp_path), "write_bytes", fill_the_disk)
    with pytest.raises(BadInput) as refused:
        store.write_bytes("shards/0/draws.parquet", b"x" * 1000)
    assert str(refused.value) == (
        f"cannot write {tmp_path}/shards/0/draws.parquet (1000 bytes): No space left on device"
    )
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == []


def test_other_write_errors_still_propagate(tmp_path, monkeypatch):
    def broken(self, data):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(type(tmp_path), "write_bytes", broken)
    with pytest.raises(OSError):
        LocalStore(str(tmp_path)).write_bytes("a", b"x")


def test_a_run_past_the_file_size_limit_names_the_file_and_exits_3_without_partials(tmp_path):
    path = small_fit(tmp_path, shards=2, samples=50)
    rng = np.random.default_rng(0)
    rows = 40_000  # each shard's rows (about 320 KB of floats) exceed the limit
    pq.write_table(pa.table({"g": [f"grp{i % 24:02d}" for i in range(rows)], "y": rng.normal(size=rows)}),
                   tmp_path / "data.parquet")
    # `ulimit -f` (RLIMIT_FSIZE) is a real limit: the kernel refuses the write with EFBIG (Python
    # ignores SIGXFSZ), as a full disk refuses it with ENOSPC
    result = run_cli(str(path), timeout=300, file_size_limit_kib=64)
    assert result.returncode == 3, result.stderr[-2000:]
    line = error_line(result.stderr)
    assert "cannot write " in line and "/partition/shard=" in line and "File too large" in line
    assert not list((tmp_path / "runs").rglob("*.partial"))
