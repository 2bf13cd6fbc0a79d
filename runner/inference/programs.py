"""The program store: a shard traces and compiles its sampler only if no shard did before.

Shards padded to one shape bucket (runner/data/buckets.py) lower to the same XLA program, so with a
cache folder every shard of a fit after the first reads the compiled program instead of building
it (tens of seconds on a GPU). The folder is `$CONSENSUSFIT_COMPILATION_CACHE`: in a cluster a
volume the runner pods share (`spec.runner.compilationCache`); in local mode `consensusfit run`
uses `~/.cache/consensusfit/jax` unless the variable says otherwise. Empty or unset: no cache
(runner/inference/runtime.py turns it on).

Two stores in the folder. JAX's persistent cache keeps XLA's compiled programs; it is keyed by
the program, so a process must still trace NUTS to find its entry (seconds on a CPU). The program
store (`programs/`) keeps the traced programs themselves (`jax.export`), keyed by what they
depend on: the model's identity (the fit's fingerprint, statistics and global sites), the
sampler settings and shapes, the JAX and NumPyro versions and the runner's own source. A process
that finds its programs skips tracing. Entries are written whole (a rename), so pods sharing the
folder never read half a program; an entry that cannot be read is ignored and rebuilt.
"""

from __future__ import annotations

import hashlib
import os
import struct
import tempfile
from pathlib import Path

import jax
import jaxlib
import numpyro
from jax import export

PROGRAMS = "programs"
RUNNER = Path(__file__).resolve().parents[1]  # the runner package, subpackages included


def _program_folder() -> Path | None:
    folder = jax.config.jax_compilation_cache_dir
    return Path(folder) / PROGRAMS if folder else None


def program_key(*parts: str) -> str:
    """A key for programs that depend on `parts` and on this runner, JAX and NumPyro."""
    digest = hashlib.sha256()
    for source in sorted(RUNNER.rglob("*.py")):
        digest.update(source.relative_to(RUNNER).as_posix().encode() + b"\0" + source.read_bytes())
    environment = (jax.__version__, jaxlib.__version__, numpyro.__version__, jax.default_backend(),
                   str(jax.config.jax_enable_x64))
    for part in environment + parts:
        digest.update(b"\0" + part.encode())
    return digest.hexdigest()


def store_programs(key: str, programs: list) -> None:
    """Keep exported programs under `key`, if a cache folder is in use."""
    folder = _program_folder()
    if folder is None:
        return
    folder.mkdir(parents=True, exist_ok=True)
    blobs = [bytes(program.serialize()) for program in programs]
    with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{key}.", delete=False) as file:
        file.write(struct.pack("<Q", len(blobs)))
        for blob in blobs:
            file.write(struct.pack("<Q", len(blob)) + blob)
    os.replace(file.name, folder / key)


def load_programs(key: str) -> list | None:
    """The exported programs stored under `key`, or None (no cache, no entry, unreadable)."""
    folder = _program_folder()
    path = folder / key if folder else None
    if path is None or not path.is_file():
        return None
    data, programs, offset = path.read_bytes(), [], 8
    try:
        (count,) = struct.unpack_from("<Q", data)
        for _ in range(count):
            (size,) = struct.unpack_from("<Q", data, offset)
            programs.append(export.deserialize(bytearray(data[offset + 8 : offset + 8 + size])))
            offset += 8 + size
    except Exception:  # a damaged entry costs a trace, never a wrong program: the key is exact
        return None
    return programs if offset == len(data) else None
