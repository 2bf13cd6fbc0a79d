"""`consensusfit run FIT.yaml`: partition, every shard, combine, on this machine.

The same steps the operator runs as Jobs, here as local processes over a local folder (or S3):
partition in-process; shards as parallel `consensusfit-runner sample` processes (one per shard, up
to `workers` at once, exactly the pods' command), or with EP (the default method) the pilot
in-process, then round after round every shard's `sample --round R` as processes and the round's
`update` in-process, until a state is final; the combine stages `globals` in-process, with
`groupParameters: resample` every shard's `consensusfit-runner resample` as parallel processes in
the same way, and `finish` in-process.

Results land in `<output>/<namespace>/<name>/local-<fingerprint>/`: the same spec always maps to
the same folder, so a re-run after a crash or Ctrl-C reuses every step that completed, and a
changed spec gets a new folder instead of overwriting the old one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable

import numpy as np

from ..contract import (
    COMPILATION_CACHE, CPU_LANES, EXIT_BAD_INPUT, FINISH_STAGE, GLOBALS_STAGE, RESAMPLE, SAMPLE,
)
from ..errors import BadInput, TransientError
from ..inference import cores
from ..inference.runtime import configure_jax, local_default
from ..layout import FitLayout
from ..spec import FitSpec, pod_shards
from ..combine.rounds import RoundState, constrained_history
from ..combine.supports import bijections
from ..steps import combine, partition, pilot, update
from ..steps.inputs import shard_model
from ..steps import reference as full_data
from ..store.draws import from_parquet_bytes, scalar_components
from .plots import convergence_figure, posterior_figure
from .report import fit_report

DEFAULT_OUTPUT = "./consensusfit-runs"

def fit_root(spec: FitSpec) -> str:
    output = spec.output_uri or DEFAULT_OUTPUT
    if "://" not in output:
        output = str(Path(output).resolve())
    return f"{output.rstrip('/')}/{spec.namespace}/{spec.name}/local-{spec.fingerprint()}"

def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"

@dataclass
class Progress:
    """Status lines on stderr: phase, shards done, elapsed and remaining time."""

    total: int
    started: float = field(default_factory=time.monotonic)
    write: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)

    def elapsed(self) -> str:
        return format_duration(time.monotonic() - self.started)

    def phase(self, name: str) -> None:
        self.write(f"[{self.elapsed()}] {name}")

    def shards(self, activity: str, done: int, running: int, phase_started: float) -> None:
        line = f"[{self.elapsed()}] {activity}: {done}/{self.total} shards done, {running} running"
        if done:
            per_shard = (time.monotonic() - phase_started) / done
            line += f", about {format_duration(per_shard * (self.total - done))} left"
        self.write(line)

# The per-shard steps, each with what the progress lines call it.
SHARD_STEPS = {SAMPLE: "sampling", RESAMPLE: "re-sampling"}

def shard_command(
    spec: FitSpec, root: str, shards: list[int], step: str = SAMPLE, round_: int | None = None
) -> list[str]:
    """The command a pod of the step's Indexed Job runs for `shards`, as a local process."""
    manifest = {"metadata": {"name": spec.name, "namespace": spec.namespace}, "spec": spec.raw}
    selected = str(shards[0]) if len(shards) == 1 else f"{shards[0]}-{shards[-1]}"
    return [
        sys.executable, "-m", "consensusfit.runner.cli", "--termination-log", os.devnull,
        step, "--spec", json.dumps(manifest), "--out", root, "--shard", selected,
        *(["--round", str(round_)] if round_ is not None else []),
    ]

def process_shards(spec: FitSpec, step: str) -> list[list[int]]:
    """The shards of each process, as of each pod: shardsPerPod consecutive ones for sampling."""
    per_pod = spec.shards_per_pod if step == SAMPLE else 1
    return [pod_shards(index, per_pod, spec.shards) for index in range(-(-spec.shards // per_pod))]

def shard_environment(processes: int) -> dict[str, str]:
    """The environment of `processes` processes side by side: local mode keeps a compilation
    cache unless told otherwise, and the cores are shared out, so that processes sampling several
    shards do not each start a thread per core."""
    return {
        **os.environ,
        COMPILATION_CACHE: os.environ.get(COMPILATION_CACHE, local_default()),
        CPU_LANES: str(max(1, cores.available_cores() // processes)),
    }

# The last bytes of a failed process's output that its error line is looked for in.
ERROR_TAIL_BYTES = 1 << 16


@dataclass
class ShardProcess:
    """One process of a per-shard step, its output (stderr) going to a log file: a pipe read only
    once the process has ended fills at 64 KiB, and the process then blocks for ever."""

    shards: list[int]
    process: subprocess.Popen
    log: IO[bytes]

    def last_line(self) -> str:
        self.log.seek(max(0, self.log.seek(0, os.SEEK_END) - ERROR_TAIL_BYTES))
        lines = self.log.read().decode(errors="replace").strip().splitlines()
        return lines[-1] if lines else "no output"

    def discard_log(self) -> None:
        self.log.close()
        os.unlink(self.log.name)


def start_shard_process(command: list[str], environment: dict[str, str], shards: list[int], step: str) -> ShardProcess:
    log = tempfile.NamedTemporaryFile(prefix=f"consensusfit-{step}-{shards[0]}-", suffix=".log", delete=False)
    process = subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=log)
    return ShardProcess(shards, process, log)


def _stop(running: list[ShardProcess]) -> None:
    for shard_process in running:
        shard_process.process.terminate()
    for shard_process in running:
        try:
            shard_process.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            shard_process.process.kill()
        shard_process.discard_log()

def run_shards(
    spec: FitSpec, root: str, workers: int, progress: Progress, step: str = SAMPLE, round_: int | None = None
) -> None:
    """Run `step` (SHARD_STEPS) for every shard as a process, at most `workers` at once; stop all
    on the first failure.

    Ctrl-C (or any failure) terminates the running shards; shards that completed keep their
    `_SUCCESS.json`, so the next run starts where this one stopped. A failed process's log is
    kept and named in the error; the others' are removed.
    """
    activity = SHARD_STEPS[step] + (f" (EP round {round_})" if round_ is not None else "")
    pending = process_shards(spec, step)
    running: list[ShardProcess] = []
    environment = shard_environment(min(workers, len(pending)))
    done = 0
    phase_started = time.monotonic()
    progress.shards(activity, done, 0, phase_started)
    try:
        while pending or running:
            while pending and len(running) < workers:
                shards = pending.pop(0)
                command = shard_command(spec, root, shards, step, round_)
                running.append(start_shard_process(command, environment, shards, step))
            time.sleep(0.1)
            for finished in [p for p in running if p.process.poll() is not None]:
                running.remove(finished)
                shards, code = finished.shards, finished.process.returncode
                if code != 0:
                    reason = finished.last_line()
                    finished.log.close()
                    failure = BadInput if code == EXIT_BAD_INPUT else TransientError
                    named = f"shard {shards[0]}" if len(shards) == 1 else f"shards {shards[0]}-{shards[-1]}"
                    raise failure(f"{activity} {named} failed (exit {code}): {reason} (its output: {finished.log.name})")
                finished.discard_log()
                done += len(shards)
                progress.shards(activity, done, sum(len(p.shards) for p in running), phase_started)
    finally:
        _stop(running)

@dataclass(frozen=True)
class FitResult:
    root: str
    summary: dict  # combined/summary.json
    diagnostics: list[dict]  # shards/<k>/diagnostics.json (EP: the final round's), in shard order
    reference: dict | None  # parameter -> summary of the full-data fit
    states: list[RoundState]  # EP: the state after every round, read once; one-shot: none

def run_fit(spec: FitSpec, workers: int, reference: bool, progress: Progress | None = None) -> FitResult:
    """Partition, sample every shard, combine (globals, re-sampling, finish), and optionally fit
    the full data for reference."""
    root = fit_root(spec)
    layout = FitLayout(root)
    progress = progress or Progress(spec.shards)
    progress.phase(f"results in {root}")
    progress.phase("partitioning")
    partition.run(spec, layout)
    configure_jax()
    if spec.uses_rounds:
        run_rounds(spec, layout, workers, progress)
    else:
        run_shards(spec, root, workers, progress, SAMPLE)
    progress.phase("combining the global parameters")
    combine.run(spec, layout, combine.CombineOptions(GLOBALS_STAGE))
    if spec.combine["groupParameters"] == "resample":
        run_shards(spec, root, workers, progress, RESAMPLE)
    progress.phase("summarising")
    combine.run(spec, layout, combine.CombineOptions(FINISH_STAGE))
    store = layout.store
    states = update.round_states(spec, layout)
    folder = combine.shard_folders(layout, states)
    diagnostics = [json.loads(store.read_bytes(folder(k).diagnostics)) for k in range(spec.shards)]
    summary = json.loads(store.read_bytes(layout.combined.summary))
    full = None
    if reference:
        progress.phase("reference: NUTS on the full data")
        full = full_data.run(spec, layout)
    progress.phase("done")
    return FitResult(root, summary, diagnostics, full, states)


def run_rounds(spec: FitSpec, layout: FitLayout, workers: int, progress: Progress) -> None:
    """EP: the pilot, then each round's shards (as processes) and its update, until a state is final."""
    shards = spec.pilot_shards
    progress.phase(f"EP pilot: NUTS on shards {shards[0]}..{shards[-1]} of {spec.shards}")
    pilot.run(spec, layout)
    for round_ in range(1, spec.combine["maxRounds"] + 1):
        run_shards(spec, layout.root, workers, progress, SAMPLE, round_)
        message = update.run(spec, layout, update.UpdateOptions(round_))
        outcome = "converged" if message["converged"] else "final: maxRounds reached" if message["final"] else "next round"
        progress.phase(
            f"EP round {round_}: means moved {message['meanChange']:.3f} SD, SDs {100 * message['sdChange']:.1f}%, "
            f"damping {message['damping']:.2f}; {outcome}"
        )
        if message["final"]:
            return


def convergence_plot(
    spec: FitSpec, layout: FitLayout, states: list[RoundState], reference: dict | None
) -> str | None:
    """EP (`states`: every round's): draw every global parameter's mean ± SD per round (pilot
    first); its URI."""
    if not states:
        return None
    store = layout.store
    states = [update.finished_state(spec, layout, 0)] + states
    combined = from_parquet_bytes(store.read_bytes(layout.combined.draws))
    sites = {name: combined.sites[name] for name in combined.global_names()}
    model = shard_model(spec, layout, 0, None, None)
    history = constrained_history(states, sites, bijections(model.fn, model.arguments, sites), np.random.default_rng(0))
    store.write_bytes(layout.report.convergence, convergence_figure(history, reference))
    return layout.uri(layout.report.convergence)


def present(result: FitResult, spec: FitSpec) -> dict:
    """Print the report, draw the posteriors (and EP's rounds), and return the termination-style summary."""
    layout = FitLayout(result.root)
    store = layout.store
    names = list(result.diagnostics[0]["parameters"])
    folder = combine.shard_folders(layout, result.states)
    shards = [
        scalar_components(from_parquet_bytes(store.read_bytes(folder(k).draws)).constrained)
        for k in range(len(result.diagnostics))
    ]
    combined = scalar_components(from_parquet_bytes(store.read_bytes(layout.combined.draws)).constrained)
    kind = "tilted, last EP round" if spec.uses_rounds else "tempered"
    store.write_bytes(
        layout.report.posteriors,
        posterior_figure(shards, combined, names, result.reference, f"{len(shards)} shards ({kind})"),
    )
    convergence = convergence_plot(spec, layout, result.states, result.reference)
    print(fit_report(result.summary, result.diagnostics, result.reference))
    print(f"\nresults: {result.root}\nposteriors: {layout.uri(layout.report.posteriors)}")
    if convergence:
        print(f"EP rounds: {convergence}")
    return {"ok": True, "uri": result.root}
