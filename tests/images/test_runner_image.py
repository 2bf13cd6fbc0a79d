"""The runner image, run the way a runner pod runs it (`make images` builds it).

The operator's pods run as uid 65532 on a read-only root filesystem with all capabilities dropped;
the only writable place is the scratch emptyDir at /tmp. Here a whole fit runs in the CPU image
that way (`consensusfit-runner run`: partition, NUTS on each shard with JAX's compilation cache,
the combination and the report's matplotlib figures), with HOME pointing where nothing can be
written and nothing in the environment but what the image and the test set. The fit's folder is
mounted in, as a pod would reach its bucket.

Where podman or the images are missing (a machine without root and apt-get), these tests are
skipped with the reason.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from e2e_support import load_script  # noqa: E402

UID = 65532  # the Dockerfile's USER and the operator's runAsUser
UNWRITABLE_HOME = "/nonexistent"  # on the read-only root: nothing can be created there
images = load_script("images.py")


@pytest.fixture(scope="module")
def runner_image() -> str:
    why = images.unavailable()
    if why:
        pytest.skip(f"runner image tests skipped: {why}")
    return images.runner_cpu_reference()


def writable_folder(path: Path) -> Path:
    """A host folder uid 65532 can write, as an emptyDir is for the pod's user."""
    path.mkdir(parents=True)
    path.chmod(0o777)
    return path


def tiny_fit(folder: Path) -> None:
    """A random-intercept formula model on 24 groups in 2 shards, reading and writing /fit."""
    rng = np.random.default_rng(0)
    g = np.repeat(np.arange(24), 5)
    y = rng.normal(rng.normal(1.0, 0.7, 24)[g], 1.0)
    pq.write_table(pa.table({"g": [f"grp{i:02d}" for i in g], "y": y}), folder / "data.parquet")
    fit = {
        "apiVersion": "consensusfit.dev/v1alpha1", "kind": "ConsensusFit", "metadata": {"name": "tiny"},
        "spec": {
            "data": {"uri": "/fit/data.parquet", "groupColumn": "g"},
            "shards": 2,
            "model": {"formula": "y ~ 1 + (1 | g)"},
            "sampler": {"warmup": 100, "samples": 100, "chains": 1, "seed": 1},
            "combine": {"method": "consensus"},
            "output": {"uri": "/fit/runs"},
        },
    }
    (folder / "fit.yaml").write_text(yaml.safe_dump(fit))


def pod_like(image: str, scratch: Path, fit: Path, *command: str, read_only: bool = True,
             name: str | None = None) -> list[str]:
    """`podman run` with a restricted pod's settings: the image's user, no capabilities, no
    privilege escalation, no network, /tmp the scratch volume, HOME unwritable; and, as under a
    kubelet, no /etc/passwd entry added for the user (podman's own habit)."""
    return ["podman", "run", *(["--rm"] if name is None else ["--name", name]), "--passwd=false",
            *(["--read-only", "--read-only-tmpfs=false"] if read_only else []),
            f"--user={UID}:{UID}", "--cap-drop=ALL", "--security-opt=no-new-privileges", "--network=none",
            "-v", f"{scratch}:/tmp", "-v", f"{fit}:/fit", "-e", f"HOME={UNWRITABLE_HOME}",
            image, *command]


def podman(args: list[str], check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=images.podman_env(), capture_output=True, text=True, check=check)


def test_a_whole_fit_runs_as_a_restricted_pod_and_writes_only_its_mounts(runner_image, tmp_path):
    """The fit succeeds on a read-only root; JAX's compilation cache and matplotlib's font cache
    land under /tmp (the scratch mount), and nothing complains of an unwritable folder."""
    scratch, fit = writable_folder(tmp_path / "scratch"), writable_folder(tmp_path / "fit")
    tiny_fit(fit)
    result = podman(pod_like(runner_image, scratch, fit, "run", "/fit/fit.yaml", "--workers", "2"), check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    [folder] = (fit / "runs" / "default" / "tiny").iterdir()
    assert all((folder / "shards" / str(k) / "_SUCCESS.json").exists() for k in range(2))
    assert "Intercept" in json.loads((folder / "combined" / "summary.json").read_text())["parameters"]
    assert (folder / "report" / "posteriors.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any((scratch / ".cache" / "consensusfit" / "jax").iterdir()), "no compiled program was cached"
    assert list((scratch / ".cache" / "matplotlib").glob("fontlist-*.json")), "matplotlib cached no fonts"
    assert "not a writable directory" not in result.stderr and "Read-only file system" not in result.stderr


def test_nothing_is_written_outside_the_mounts_even_on_a_writable_root(runner_image, tmp_path):
    """With the root filesystem left writable, the container's own layer is still untouched
    after the whole fit (podman diff lists no change besides the mount points): no cache fell
    back to a folder of its own choosing."""
    scratch, fit = writable_folder(tmp_path / "scratch"), writable_folder(tmp_path / "fit")
    tiny_fit(fit)
    name = f"consensusfit-image-test-{tmp_path.name}"
    try:
        result = podman(pod_like(runner_image, scratch, fit, "run", "/fit/fit.yaml", "--workers", "2",
                                 read_only=False, name=name), check=False)
        assert result.returncode == 0, result.stderr[-4000:]
        changes = podman(["podman", "diff", "--format", "json", name]).stdout
    finally:
        podman(["podman", "rm", "--force", name], check=False)
    changed = {path for paths in json.loads(changes or "{}").values() for path in paths or []}
    # The mount points, and /etc itself, where podman binds /etc/hosts, /etc/hostname and
    # /etc/resolv.conf (a file written under /etc would be listed by its own path).
    assert changed <= {"/fit", "/tmp", "/etc"}, sorted(changed)
    assert any((fit / "runs" / "default" / "tiny").iterdir())


def test_the_cpu_image_has_no_pip_no_compiler_and_no_test_dependencies(runner_image):
    """Small, and nothing that could write a pip cache: pip, setuptools, a C compiler and the
    test extras are absent, while the runner's own dependencies import."""
    probe = ("import importlib.util as u, shutil; "
             "print([m for m in ('pip', 'setuptools', 'pytest', 'moto', 'kopf') if u.find_spec(m)], "
             "[c for c in ('cc', 'gcc', 'pip', 'pip3') if shutil.which(c)], "
             "[m for m in ('jax', 'numpyro', 'pyarrow', 'boto3', 'matplotlib') if not u.find_spec(m)])")
    result = podman(["podman", "run", "--rm", "--read-only", "--entrypoint", "python3", runner_image, "-c", probe])
    assert result.stdout.strip() == "[] [] []", result.stdout
