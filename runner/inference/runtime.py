"""How JAX runs in a runner process: float precision and the persistent compilation cache.

Every step that samples or traces a model calls `configure_jax` once, before its first JAX
computation. `CONSENSUSFIT_PRECISION` and `CONSENSUSFIT_COMPILATION_CACHE` are the contract's
(runner/contract.py); the program store in the same folder is runner/inference/programs.py.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..contract import COMPILATION_CACHE, PRECISION, PRECISIONS
from ..errors import BadInput

def configure_jax() -> None:
    """float64 on CPU (cheap there, and exact tests need it); float32 on accelerators, where
    float64 runs at a fraction of the speed. `CONSENSUSFIT_PRECISION=float32|float64` overrides.
    And the persistent compilation cache of $CONSENSUSFIT_COMPILATION_CACHE.
    """
    import jax  # here, not at the top: the CLI imports this module and must start without JAX

    use_compilation_cache()

    choice = os.environ.get(PRECISION, "auto")
    if choice not in PRECISIONS:
        raise BadInput(f"{PRECISION} must be auto, float32 or float64, not {choice!r}")
    if choice == "auto":
        choice = "float64" if jax.default_backend() == "cpu" else "float32"
    jax.config.update("jax_enable_x64", choice == "float64")


def local_default() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "consensusfit" / "jax")


def use_compilation_cache(folder: str | None = None) -> str | None:
    """Cache every compiled program in `folder` (default: the environment variable); the folder
    in use, or None."""
    import jax  # here, not at the top: see configure_jax

    folder = folder if folder is not None else os.environ.get(COMPILATION_CACHE)
    if not folder:
        return None
    Path(folder).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", folder)
    # Cache every program, however small or quick to build: a fit runs the same ones many times.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder
