"""The `pilot` step: where EP starts (round 0).

Without a good start EP converges slowly: a cavity built from a vague prior conflicts with each
shard's data. The pilot samples the union of the first m = max(1, pilotShare·K) shards (a
seeded-hash share of the groups) with the global sites tempered by m/K: exactly the product of
those m sites, so q₀, the Gaussian of its draws, is centred where the posterior is, and wider than
it by about K/m, no prior overweighted. q₀ takes the median and interquartile range of each
component (`ep.robust_moments`): a hierarchical scale's long left tail on so few groups would
otherwise make the start far too wide. Every site starts as q₀^(1/K) (runner/combine/ep.py).

Measured (benchmarks/accuracy.py, radon at K = 10): the robust moments narrowed the county
scale's start from log σ = −5.8 ± 5.2 to −4.3 ± 4.3; the answer after 8 rounds barely moved
(0.34 → 0.31 SD off): that scale's slow convergence is EP's, not the start's (benchmarks/README.md).

Writes `rounds/0/draws.parquet`, `rounds/0/diagnostics.json`, `rounds/0/state.json`, then the
round's marker; a completed pilot returns at once.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import pyarrow as pa

from ..combine import ep
from ..combine.rounds import global_vector, state_document, write_state
from ..contract import strict_json
from ..data.read import read_table, shard_data
from ..errors import BadInput
from ..inference.nuts import CompiledNuts, SamplerSettings
from ..inference.tempering import resolve_global_sites, temper
from ..layout import DIAGNOSTICS, DRAWS, STATE, FitLayout
from ..models.from_spec import model_from_spec
from ..spec import FitSpec
from ..store.completion import completed, mark_complete
from ..store.draws import component_names, to_parquet_bytes
from .inputs import whole_data_stats
from .messages import pilot_message
from .sample import check_moved, sampling_diagnostics, shard_draws
from .timing import Stopwatch, timed_nuts
from .update import require_rounds


@dataclass(frozen=True)
class PilotOptions:
    data: str | None = None  # the shards' data URI ({shard} replaced); default the partition's
    stats: str | None = None  # whole-data statistics; default the partition manifest's


def run(spec: FitSpec, layout: FitLayout, options: PilotOptions = PilotOptions()) -> dict:
    """The pilot: NUTS on the pilot shards, its draws and EP's starting state; its message."""
    require_rounds(spec)
    folder, store, fingerprint = layout.round(0), layout.store, spec.fingerprint()
    if completed(store, folder.marker, fingerprint):
        return pilot_message(json.loads(store.read_bytes(folder.diagnostics)))
    started = time.perf_counter()
    model = model_from_spec(spec, whole_data_stats(layout, options.stats))
    shards = spec.pilot_shards
    table = pa.concat_tables(
        [read_table(layout.shard_data(k, options.data)) for k in shards], promote_options="default"
    )
    data = shard_data(table, model.columns, model.numeric, spec.group_column, f"pilot (shards {shards[0]}..{shards[-1]})")
    arguments = model.prepare(data)
    global_sites = resolve_global_sites(model.fn, arguments, model.prepare(data.doubled()), spec.global_sites)
    sites = global_sites.latent
    if not sites:
        raise BadInput("the model has no global latent sites: nothing for EP to combine")
    settings = SamplerSettings.from_spec(spec.sampler)
    tempered = temper(model.fn, frozenset(sites), len(shards) / spec.shards)
    clock = Stopwatch(load=time.perf_counter() - started)
    with clock.phase("compile"):
        sampler = CompiledNuts(tempered, arguments, settings, 1, model.data_as_arguments)
    (samples,) = timed_nuts(sampler, clock, [sampler.example], [spec.seeds.pilot])
    check_moved(samples, sites, f"the pilot (shards {shards[0]}..{shards[-1]})")

    u = global_vector(samples.unconstrained, sites)
    flat = u.reshape(-1, u.shape[-1])
    start = ep.from_pilot(ep.robust_moments(flat), spec.shards)
    components = [
        c for name in sites for c in component_names(name, samples.unconstrained[name].shape[2:])
    ]
    metadata = {
        "fingerprint": fingerprint, "shard": None, "shards": spec.shards, "pilot_shards": shards,
        "groups": [str(label) for label in data.group_labels],
    }
    draws_bytes = to_parquet_bytes(shard_draws(samples, global_sites, metadata))
    diagnostics = {
        "pilot_shards": shards, "shards": spec.shards, "fingerprint": fingerprint, "rows": data.rows,
        "groups": data.groups, "global_sites": sites,
        **sampling_diagnostics(samples, global_sites, settings),
    }
    diagnostics["seconds"] = clock.rounded()
    diagnostics_bytes = strict_json(diagnostics, indent=1).encode()
    store.write_bytes(folder.draws, draws_bytes)
    store.write_bytes(folder.diagnostics, diagnostics_bytes)
    state = state_document(fingerprint, 0, sites, components, start, None, 0.0, None, False, False, False, {})
    size = write_state(store, folder.state, state)
    mark_complete(
        store, folder.marker, fingerprint,
        {DRAWS: len(draws_bytes), DIAGNOSTICS: len(diagnostics_bytes), STATE: size},
    )
    return pilot_message(diagnostics)
