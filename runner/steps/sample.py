"""The `sample` step: tempered NUTS on one shard or several, draws and diagnostics to the store.

Files land under `<root>/shards/<k>/` in the order draws, diagnostics, `_SUCCESS.json`: a reader
trusts a shard only when `_SUCCESS.json` is there with the fit's fingerprint, so a crash at any
point leaves nothing that looks complete. A shard already completed for this fingerprint is not
sampled again (a retried pod returns at once); one completed for another fingerprint is refused,
never overwritten.

Several shards in one process (`spec.runner.shardsPerPod`): a model that takes its data as
arguments (formula models) pads every shard to the fit's shape bucket (runner/data/buckets.py), and one
program, compiled once, samples them: all at once, vectorised, on an accelerator; one per core at
a time, in threads, on a CPU (runner/inference/cores.py). The padding is trimmed off the draws. Other models
compile per shard. Either way shards are read in background threads while the first compiles, and
each shard is written in the background while the next one samples.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable

import jax
import numpy as np

from ..combine import ep
from ..combine.rounds import RoundState, arrays_bytes, global_vector, moments_document, read_arrays
from ..contract import strict_json
from ..data.buckets import Bucket, fit_bucket
from ..data.read import model_rows
from ..data.shard import ShardData
from ..errors import BadInput
from ..inference.cores import cpu_lanes
from ..inference.diagnostics import ess_bulk, parameter_diagnostics, unmoved_chains
from ..inference.nuts import Adaptation, CompiledNuts, SamplerSettings, Samples, tree_depth
from ..inference.tempering import GlobalSites, resolve_global_sites, temper, with_cavity
from ..layout import ADAPTATION, DIAGNOSTICS, DRAWS, MOMENTS, FitLayout, ShardFolder, TiltedFolder
from ..models.base import Model
from ..models.from_spec import model_from_spec
from ..spec import FitSpec
from ..store.completion import completed, mark_complete, write_output
from ..store.draws import Draws, Site, to_parquet_bytes
from ..store.storage import Store
from .inputs import partition_manifest, pod_shard_list, whole_data_stats
from .messages import pod_message, sample_message
from .timing import Stopwatch, timed_nuts
from .update import check_round, previous_state

IO_THREADS = 4


@dataclass(frozen=True)
class SampleOptions:
    shards: list[int] | None = None  # None: those of $JOB_COMPLETION_INDEX
    shards_per_pod: int = 1
    vectorize: int | None = None  # shards per call of the compiled sampler
    data: str | None = None  # the shards' data URI ({shard} replaced); default the partition's
    stats: str | None = None  # whole-data statistics; default the partition manifest's
    expect_shards: int | None = None  # a check: the shard count the spec must declare
    round: int | None = None  # EP round r ≥ 1: sample each shard's tilted distribution


@dataclass(frozen=True)
class Tilting:
    """EP round `round`: every shard's cavity from the state after the round before
    (runner/combine/ep.py), and in rounds after the first the chains' warm starts."""

    round: int
    state: RoundState

    def folder(self, layout: FitLayout, shard: int) -> TiltedFolder:
        return layout.round(self.round).shard(shard)

    @property
    def warm(self) -> bool:
        return self.round > 1

    def start(self, layout: FitLayout, shard: int) -> Adaptation | None:
        """Where shard `shard`'s chains ended in the round before (rounds after the first)."""
        if not self.warm:
            return None
        return Adaptation(**read_arrays(layout.store.read_bytes(layout.round(self.round - 1).shard(shard).adaptation)))


def run(spec: FitSpec, layout: FitLayout, options: SampleOptions = SampleOptions()) -> dict:
    """The sample step: the pod's shards, sampled and written; the pod's termination message."""
    if options.expect_shards is not None and spec.shards != options.expect_shards:
        raise BadInput(f"--shards {options.expect_shards} but the spec declares {spec.shards} shards")
    shards = pod_shard_list(spec, options.shards, options.shards_per_pod)
    tilting = None
    if options.round is not None:
        check_round(spec, options.round)
        tilting = Tilting(options.round, previous_state(spec, layout, options.round))
    stats = whole_data_stats(layout, options.stats)
    # Shard sizes for the shape bucket describe the partition's output, not other data.
    sizes = None if options.data else (partition_manifest(layout) or {}).get("per_shard")
    return sample_shards(
        spec, shards, lambda k: layout.shard_data(k, options.data), stats, layout.root, sizes,
        vectorize=options.vectorize, tilting=tilting,
    )


def shard_draws(
    samples: Samples, global_sites: GlobalSites, metadata: dict
) -> Draws:
    sites = {}
    for name, values in samples.constrained.items():
        is_latent = name in samples.unconstrained
        is_global = name in (global_sites.latent if is_latent else global_sites.deterministic)
        keeps_unconstrained = is_latent and is_global
        sites[name] = Site(
            shape=values.shape[2:],
            unconstrained_shape=samples.unconstrained[name].shape[2:] if keeps_unconstrained else None,
            is_global=is_global,
            kind="latent" if is_latent else "deterministic",
        )
    unconstrained = {name: samples.unconstrained[name] for name in global_sites.latent}
    return Draws(samples.constrained, unconstrained, sites, metadata)


def trimmed(samples: Samples, shapes: dict[str, tuple[int, ...]]) -> Samples:
    """The draws of a padded shard cut back to the shard's own site shapes."""

    def cut(values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {
            name: value[(slice(None), slice(None)) + tuple(slice(0, n) for n in shapes[name])]
            if name in shapes else value
            for name, value in values.items()
        }

    return replace(samples, unconstrained=cut(samples.unconstrained), constrained=cut(samples.constrained))


@dataclass
class LoadedShard:
    """One shard's rows, read and checked (in a background thread)."""

    shard: int
    folder: ShardFolder
    data: ShardData
    seconds: float
    start: Adaptation | None = None  # EP rounds after the first: the warm start


def _load(
    model: Model, spec: FitSpec, shard: int, uri: str, folder: ShardFolder, layout: FitLayout, tilting
) -> LoadedShard:
    started = time.perf_counter()
    data = model_rows(model, spec, uri, f"shard {shard} ({uri})")
    start = tilting.start(layout, shard) if tilting else None
    return LoadedShard(shard, folder, data, time.perf_counter() - started, start)


@dataclass
class PreparedShard:
    """A loaded shard as the sampler gets it: its global sites, its (padded) arguments, its seed."""

    loaded: LoadedShard
    global_sites: GlobalSites
    arguments: dict[str, Any]
    seed: int
    seconds: float


def _prepare(
    model: Model, spec: FitSpec, loaded: LoadedShard, bucket: Bucket | None, tilting: Tilting | None
) -> PreparedShard:
    # Tracing runs on the main thread: NumPyro's handler stack is global.
    started = time.perf_counter()
    data = loaded.data
    unpadded = model.prepare(data)
    global_sites = resolve_global_sites(model.fn, unpadded, model.prepare(data.doubled()), spec.global_sites)
    arguments = model.prepare(data.padded(bucket.rows, bucket.groups)) if bucket else unpadded
    seed = spec.seeds.tilted(tilting.round, loaded.shard) if tilting else spec.seeds.sample(loaded.shard)
    if tilting and global_sites.latent != tilting.state.sites:
        raise BadInput(
            f"shard {loaded.shard} has global sites {global_sites.latent}, the pilot had {tilting.state.sites}: "
            "declare spec.model.globalSites"
        )
    return PreparedShard(loaded, global_sites, arguments, seed, loaded.seconds + time.perf_counter() - started)


def check_moved(samples: Samples, sites: list[str], where: str) -> None:
    """Refuse draws in which no chain moved (`unmoved_chains`): a posterior of zero spread would pass
    every later check and break the combination. Not a transient failure: a retry draws the same
    seeded transitions. Some chains unmoved is a warning (diagnostics `unmoved_chains`; their
    R-hat shows it)."""
    chains = samples.diverging.shape[0]
    for site, unmoved in unmoved_chains(samples.unconstrained, sites).items():
        if len(unmoved) == chains:
            diverged, transitions = int(samples.diverging.sum()), samples.diverging.size
            raise BadInput(
                f"{where}: NUTS never moved any of the {chains} chain(s) in site {site} ({diverged} of "
                f"{transitions} transitions divergent): its log density or gradient is not finite where the "
                "chains start, or the step size found in warmup is far too large; check the model, its "
                "priors and this shard's data, or give spec.sampler more warmup"
            )


def sampling_diagnostics(samples: Samples, global_sites: GlobalSites, settings: SamplerSettings) -> dict:
    """What NUTS saw: the global parameters' convergence, divergences, trees and step sizes."""
    depth = tree_depth(samples.num_steps)
    return {
        "parameters": parameter_diagnostics(samples, global_sites.latent),
        "divergences": int(samples.diverging.sum()),
        "mean_tree_depth": float(depth.mean()),
        "max_tree_depth_hits": int((depth >= settings.max_tree_depth).sum()),
        "gradient_evaluations": int(samples.num_steps.sum()),
        "step_size": [float(s) for s in samples.step_size],
        "unmoved_chains": unmoved_chains(samples.unconstrained, global_sites.latent),  # see check_moved
        "programs": samples.programs,
    }


def tilted_moments(samples: Samples, tilting: Tilting) -> dict:
    """A shard's tilted mean and precision (runner/combine/ep.py), as moments.json."""
    u = global_vector(samples.unconstrained, tilting.state.sites)
    ess = min(ess_bulk(u[..., j]) for j in range(u.shape[-1]))
    moments = ep.tilted_moments(u, samples.global_gradient, ess)
    return moments_document(moments, ess)


def _write(
    spec: FitSpec, store: Store, prepared: PreparedShard, samples: Samples, settings: SamplerSettings, bucket,
    tilting: Tilting | None, clock: Stopwatch,
) -> dict:
    """Draws, diagnostics and the marker of one sampled shard (with EP, its tilted moments and
    warm start too); its termination summary. `clock`: the batch's compile and sampling phases."""
    started = time.perf_counter()
    loaded, global_sites = prepared.loaded, prepared.global_sites
    files = {}
    if tilting:
        folder = loaded.folder
        files[MOMENTS] = write_output(store, folder.moments, strict_json(tilted_moments(samples, tilting)).encode())
        files[ADAPTATION] = write_output(store, folder.adaptation, arrays_bytes(asdict(samples.adaptation)))
    samples = trimmed(samples, global_sites.local_shapes)
    fingerprint = spec.fingerprint()
    metadata = {
        "fingerprint": fingerprint,
        "shard": loaded.shard,
        "shards": spec.shards,
        "groups": [str(label) for label in loaded.data.group_labels],
    }
    if tilting:
        metadata["round"] = tilting.round
    draws_bytes = to_parquet_bytes(shard_draws(samples, global_sites, metadata))
    diagnostics = {
        "shard": loaded.shard,
        "shards": spec.shards,
        **({"round": tilting.round} if tilting else {}),
        "fingerprint": fingerprint,
        "rows": loaded.data.rows,
        "groups": loaded.data.groups,
        "padded": {"rows": bucket.rows, "groups": bucket.groups} if bucket else None,
        "global_sites": global_sites.latent,
        **sampling_diagnostics(samples, global_sites, settings),
        "seconds": {"load": prepared.seconds, **clock.seconds},
    }
    folder = loaded.folder
    store.write_bytes(folder.draws, draws_bytes)
    # Write time covers serialising and storing the draws, the bulk of the output.
    diagnostics["seconds"]["write"] = time.perf_counter() - started
    diagnostics["seconds"] = {k: round(v, 3) for k, v in diagnostics["seconds"].items()}
    diagnostics_bytes = strict_json(diagnostics, indent=1).encode()
    store.write_bytes(folder.diagnostics, diagnostics_bytes)
    mark_complete(
        store, folder.marker, fingerprint, {**files, DRAWS: len(draws_bytes), DIAGNOSTICS: len(diagnostics_bytes)}
    )
    return sample_message(diagnostics)


def _same_global_sites(prepared: list[PreparedShard]) -> None:
    first = prepared[0]
    for other in prepared[1:]:
        if other.global_sites.latent != first.global_sites.latent:
            raise BadInput(
                f"shard {other.loaded.shard} has global sites {other.global_sites.latent}, shard "
                f"{first.loaded.shard} {first.global_sites.latent}: declare spec.model.globalSites"
            )


def sample_shards(
    spec: FitSpec,
    shards: list[int],
    data_uri: Callable[[int], str],
    stats: dict | None,
    out_uri: str,
    shard_sizes: list[dict] | None = None,
    pad: bool = True,
    vectorize: int | None = None,
    lanes: int | None = None,
    tilting: Tilting | None = None,
) -> dict:
    """Sample `shards` of `spec` (rows of shard k at `data_uri(k)`), write under `out_uri`.

    `shard_sizes` (the partition manifest's per-shard rows and groups) sets the fit's shape
    bucket; `pad=False` samples every shard at its own shapes, with its own program (for
    comparison). `vectorize`: shards per call of the compiled program; default all of them on an
    accelerator, one on a CPU (whose cores a vectorised NUTS step does not fill better than one
    shard's). `lanes`: calls running at once, in threads; default one on an accelerator, one per
    core on a CPU (`cores.cpu_lanes`). `tilting`: an EP round (its shards' folders, cavities and
    warm starts). Returns the pod's termination message (`pod_message`).
    """
    layout = FitLayout(out_uri)
    store = layout.store
    fingerprint = spec.fingerprint()
    summaries: dict[int, dict] = {}
    todo = []
    for k in shards:
        spec.check_shard(k)
        folder = tilting.folder(layout, k) if tilting else layout.shard(k)
        if completed(store, folder.marker, fingerprint):
            summaries[k] = sample_message(json.loads(store.read_bytes(folder.diagnostics)))
        else:
            todo.append((k, folder))
    if todo:
        model = model_from_spec(spec, stats)
        settings = SamplerSettings.from_spec(spec.round_settings if tilting and tilting.warm else spec.sampler)
        on_cpu = jax.default_backend() == "cpu"
        width = min(vectorize or (1 if on_cpu else len(todo)), len(todo))
        lanes = lanes or (cpu_lanes() if on_cpu else 1)
        with ThreadPoolExecutor(IO_THREADS) as io:
            loads = [io.submit(_load, model, spec, k, data_uri(k), folder, layout, tilting) for k, folder in todo]
            if model.data_as_arguments and pad:
                written = _sample_padded(
                    spec, store, model, stats, settings, loads, shard_sizes, width, lanes, io, tilting
                )
            else:
                written = _sample_one_by_one(spec, store, model, settings, loads, io, tilting)
            summaries.update({summary["shard"]: summary for summary in (f.result() for f in written)})
    message = pod_message([summaries[k] for k in shards])
    return {**message, "round": tilting.round} if tilting else message


def _sampler(
    spec: FitSpec, model: Model, settings, first: PreparedShard, batch: int, identity: str | None,
    tilting: Tilting | None,
) -> CompiledNuts:
    """The compiled sampler of `batch` shards shaped like `first`; `identity`: see CompiledNuts.
    In an EP round the tempered model times its cavity (the cavity an argument of the programs)."""
    tempered = temper(model.fn, frozenset(first.global_sites.latent), 1.0 / spec.shards)
    if tilting is None:
        return CompiledNuts(tempered, first.arguments, settings, batch, model.data_as_arguments, identity)
    sites = tilting.state.sites
    start = first.loaded.start
    return CompiledNuts(
        with_cavity(tempered, sites), first.arguments, settings, batch, model.data_as_arguments, identity,
        global_names=sites, cavity_dims=len(tilting.state.components),
        warm=start.position.shape[-1] if start is not None else 0,
    )


def _run(sampler: CompiledNuts, batch: list[PreparedShard], tilting: Tilting | None, clock: Stopwatch) -> list[Samples]:
    """Sample a batch of prepared shards (in an EP round: each with its cavity and warm start)."""
    arguments, seeds = [p.arguments for p in batch], [p.seed for p in batch]
    if tilting is None:
        return timed_nuts(sampler, clock, arguments, seeds)
    cavities = [tilting.state.cavity(p.loaded.shard) for p in batch]
    starts = [p.loaded.start for p in batch] if tilting.warm else None
    return timed_nuts(sampler, clock, arguments, seeds, [(c.mean, c.precision) for c in cavities], starts)


def _sample_padded(
    spec: FitSpec, store: Store, model: Model, stats, settings: SamplerSettings, loads: list[Future], shard_sizes,
    width: int, lanes: int, io, tilting: Tilting | None,
) -> list[Future]:
    """Every shard padded to one bucket; one program, compiled once, samples `width` shards a
    call, `lanes` calls at once.

    With the manifest's shard sizes the bucket is known from the first shard, so the program
    compiles while the others load. Batches are prepared here (tracing a model must stay on one
    thread) while earlier ones sample, and each is written in the background.
    """
    first = loads[0].result()
    if shard_sizes:
        bucket = fit_bucket(shard_sizes, first.data.rows, first.data.groups)
    else:  # no manifest: the bucket of the largest shard here
        loaded = [f.result() for f in loads]
        bucket = fit_bucket(None, max(s.data.rows for s in loaded), max(s.data.groups for s in loaded))
    head = _prepare(model, spec, first, bucket, tilting)
    # What the model is, for the program store: the fit's spec, the statistics it was built
    # from, and the global (tempered) sites.
    identity = json.dumps([spec.fingerprint(), stats, head.global_sites.latent], sort_keys=True, default=str)
    compiling = Stopwatch()
    with compiling.phase("compile"):
        sampler = _sampler(spec, model, settings, head, width, identity, tilting)

    def sample(batch: list[PreparedShard], clock: Stopwatch) -> list[Future]:
        results = _run(sampler, batch, tilting, clock)
        for p, samples in zip(batch, results):
            check_moved(samples, p.global_sites.latent, f"shard {p.loaded.shard}")
        return [
            io.submit(_write, spec, store, p, samples, settings, bucket, tilting, clock)
            for p, samples in zip(batch, results)
        ]

    with ThreadPoolExecutor(lanes) as running:
        sampled = []
        try:
            for start in range(0, len(loads), width):
                batch = [head if i == 0 else _prepare(model, spec, loads[i].result(), bucket, tilting)
                         for i in range(start, min(start + width, len(loads)))]
                _same_global_sites([head] + batch)
                # the first batch is charged the compile time; later ones reuse the programs
                clock = Stopwatch(**compiling.seconds) if start == 0 else Stopwatch(compile=0.0)
                sampled.append(running.submit(sample, batch, clock))
            return [written for batch in sampled for written in batch.result()]
        except BaseException:
            running.shutdown(cancel_futures=True)  # a failed shard fails the pod now, not after the rest
            raise


def _sample_one_by_one(
    spec: FitSpec, store: Store, model: Model, settings, loads: list[Future], io, tilting: Tilting | None
) -> list[Future]:
    """Models with their data as constants: one program per shard; the next shard loads meanwhile."""
    written = []
    for future in loads:
        prepared = _prepare(model, spec, future.result(), None, tilting)
        clock = Stopwatch()
        with clock.phase("compile"):
            sampler = _sampler(spec, model, settings, prepared, 1, None, tilting)
        samples = _run(sampler, [prepared], tilting, clock)[0]
        check_moved(samples, prepared.global_sites.latent, f"shard {prepared.loaded.shard}")
        written.append(io.submit(_write, spec, store, prepared, samples, settings, None, tilting, clock))
    return written


def sample_shard(spec: FitSpec, shard: int, data_uri: str, stats: dict | None, out_uri: str) -> dict:
    """Sample one shard of `spec` from `data_uri`; write under `out_uri`; return its summary."""
    return sample_shards(spec, [shard], lambda _: data_uri, stats, out_uri)
