"""Seconds per phase of a step, measured by the step around the pure calls it makes.

The math (runner/inference/, runner/combine/) returns results, never timings; a step wraps each
call in a `Stopwatch` phase and writes the phases into its diagnostics (`seconds`).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator


class Stopwatch:
    """Wall-clock seconds per named phase; a phase entered twice adds up."""

    def __init__(self, **seconds: float):
        self.seconds: dict[str, float] = dict(seconds)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started

    def rounded(self) -> dict[str, float]:
        """The phases to the millisecond, as diagnostics files hold them."""
        return {name: round(value, 3) for name, value in self.seconds.items()}


def timed_nuts(sampler, clock: Stopwatch, arguments, seeds, cavities=None, starts=None) -> list:
    """`CompiledNuts.run` (runner/inference/nuts.py), its phases timed: init, warmup, sampling."""
    with clock.phase("init"):
        batch = sampler.start(arguments, seeds, cavities, starts)
    with clock.phase("warmup"):
        batch = sampler.warm_up(batch)
    with clock.phase("sampling"):
        return sampler.draw(batch)
