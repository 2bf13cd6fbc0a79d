"""The `resample` step: one shard's group-level sites given the combined global draws.

Needs the globals stage of the combine step (refused before it); writes
`combined/groups/<k>/draws.parquet`, then its `_SUCCESS.json`, and returns the termination
message. Already done for this fingerprint: returns at once. Shards need nothing from each other,
so all can run at once (the operator's Indexed resample Job). The math is
runner/inference/conditional.py.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import BadInput
from ..inference.conditional import adapt_at_centre, draw_given
from ..inference.nuts import SamplerSettings
from ..layout import DRAWS, FitLayout
from ..spec import FitSpec
from ..store.completion import completed, mark_complete
from ..store.draws import Draws, Site, from_parquet_bytes, to_parquet_bytes
from .inputs import pod_shard_list, shard_model
from .messages import resample_message
from .timing import Stopwatch


@dataclass(frozen=True)
class ResampleOptions:
    shard: int | None = None  # None: $JOB_COMPLETION_INDEX
    data: str | None = None  # the shard's data URI ({shard} replaced); default the partition's
    stats: str | None = None  # whole-data statistics; default the partition manifest's


def require_globals(layout: FitLayout, fingerprint: str, what: str) -> dict:
    """The globals stage's marker; the later stages refuse (one line) to run before it."""
    marker = layout.combined.globals.marker
    if done := completed(layout.store, marker, fingerprint):
        return done
    raise BadInput(
        f"{what}: the globals stage is not complete (no {layout.uri(marker)}); "
        "run `consensusfit-runner combine --stage globals` first"
    )


def resample_settings(spec: FitSpec, shard: int) -> SamplerSettings:
    """The sampler settings of the shard's adaptation run: the spec's, with the shard's own seed."""
    return replace(SamplerSettings.from_spec(spec.sampler), seed=spec.seeds.resample(shard))


def run(spec: FitSpec, layout: FitLayout, options: ResampleOptions = ResampleOptions()) -> dict:
    """Stage `resample` for one shard (module docstring); its termination message."""
    (shard,) = pod_shard_list(spec, None if options.shard is None else [options.shard])
    folder, store = layout.combined.group(shard), layout.store
    fingerprint = spec.fingerprint()
    spec.check_shard(shard)
    if done := completed(store, folder.marker, fingerprint):
        return resample_message(shard, done)
    require_globals(layout, fingerprint, f"cannot re-sample shard {shard}")
    combined = from_parquet_bytes(store.read_bytes(layout.combined.draws))
    model = shard_model(spec, layout, shard, options.data, options.stats)
    theta = {name: combined.constrained[name] for name in combined.global_names()}
    settings, clock = resample_settings(spec, shard), Stopwatch()
    with clock.phase("adapt"):
        adaptation = adapt_at_centre(model.fn, model.arguments, theta, settings)
    with clock.phase("resample"):
        result = draw_given(
            model.fn, model.arguments, theta, adaptation, settings,
            transition_seed=spec.seeds.resample_transitions(shard),
        )
    arrays = {**result.latent, **result.deterministic}
    if not arrays:
        done = mark_complete(store, folder.marker, fingerprint, {}, note="no group-level sites")
        return resample_message(shard, done)
    sites = {
        name: Site(values.shape[2:], None, False, "latent" if name in result.latent else "deterministic")
        for name, values in arrays.items()
    }
    metadata = {"fingerprint": fingerprint, "shard": shard, "shards": spec.shards, "groups": model.groups}
    draws_bytes = to_parquet_bytes(Draws(arrays, {}, sites, metadata))
    store.write_bytes(folder.draws, draws_bytes)
    done = mark_complete(
        store,
        folder.marker,
        fingerprint,
        {DRAWS: len(draws_bytes)},
        accept_prob=result.accept_prob,
        seconds=clock.rounded(),
    )
    return resample_message(shard, done)


def resample_shard(spec: FitSpec, out_uri: str, shard: int = 0, data_uri: str | None = None,
                   stats_uri: str | None = None) -> dict:
    """`run` with a root URI and the options as arguments."""
    return run(spec, FitLayout(out_uri), ResampleOptions(shard, data_uri, stats_uri))
