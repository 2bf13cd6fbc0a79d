"""JAX's persistent compilation cache: a shard compiles its sampler only if no shard did before.

Shards padded to one shape bucket (runner/buckets.py) lower to the same XLA program, so with a
cache folder every shard of a fit after the first reads the compiled program instead of building
it (tens of seconds on a GPU). The folder is `$CONSENSUSFIT_COMPILATION_CACHE`: in a cluster a
volume the runner pods share (`spec.runner.compilationCache`); in local mode `consensusfit run`
uses `~/.cache/consensusfit/jax` unless the variable says otherwise. Empty or unset: no cache.
"""

from __future__ import annotations

import os
from pathlib import Path

ENVIRONMENT = "CONSENSUSFIT_COMPILATION_CACHE"


def local_default() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "consensusfit" / "jax")


def use_compilation_cache(folder: str | None = None) -> str | None:
    """Cache every compiled program in `folder` (default: the environment variable); the folder
    in use, or None."""
    import jax

    folder = folder if folder is not None else os.environ.get(ENVIRONMENT)
    if not folder:
        return None
    Path(folder).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", folder)
    # Cache every program, however small or quick to build: a fit runs the same ones many times.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder
