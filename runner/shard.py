"""The `sample` step: tempered NUTS on one shard, draws and diagnostics to the store.

Files land under `<root>/shards/<k>/` in the order draws, diagnostics, `_SUCCESS.json`: a reader
trusts a shard only when `_SUCCESS.json` is there with the fit's fingerprint, so a crash at any
point leaves nothing that looks complete. A shard already completed for this fingerprint is not
sampled again (a retried pod returns at once); one completed for another fingerprint is refused,
never overwritten.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace

import numpy as np

from .completion import completed, mark_complete
from .data import model_and_data
from .diagnostics import summarize
from .draws import Draws, Site, scalar_components, to_parquet_bytes
from .errors import BadInput
from .sampling import SamplerSettings, Samples, run_nuts, tree_depth
from .spec import FitSpec
from .storage import open_store
from .tempering import GlobalSites, resolve_global_sites, temper

def shard_seed(seed: int, shard: int) -> int:
    """Independent, reproducible random streams per shard from one fit seed."""
    return int(np.random.SeedSequence([seed, shard]).generate_state(1)[0])


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


def parameter_diagnostics(samples: Samples, names: list[str]) -> dict[str, dict]:
    """Summary and convergence diagnostics of every scalar component of the named sites."""
    components = scalar_components({name: samples.constrained[name] for name in names})
    return {component: summarize(values) for component, values in components.items()}


def termination_summary(diagnostics: dict) -> dict:
    parameters = diagnostics["parameters"].values()
    return {
        "ok": True,
        "shard": diagnostics["shard"],
        "rhatMax": max((p["rhat"] for p in parameters), default=float("nan")),
        "essBulkMin": min((p["ess_bulk"] for p in parameters), default=float("nan")),
        "divergences": diagnostics["divergences"],
        "seconds": round(sum(diagnostics["seconds"].values()), 3),
    }


def sample_shard(
    spec: FitSpec, shard: int, data_uri: str, stats: dict | None, out_uri: str
) -> dict:
    """Sample shard `shard` of `spec` from `data_uri`; write under `out_uri`; return a summary."""
    if not 0 <= shard < spec.shards:
        raise BadInput(f"shard {shard} is out of range: the fit has {spec.shards} shards (0..{spec.shards - 1})")
    store = open_store(out_uri).child(f"shards/{shard}")
    fingerprint = spec.fingerprint()
    if completed(store, fingerprint):
        return termination_summary(json.loads(store.read_bytes("diagnostics.json")))

    started = time.perf_counter()
    model, data = model_and_data(spec, stats, data_uri, f"shard {shard} ({data_uri})")
    arguments = model.prepare(data)
    global_sites = resolve_global_sites(
        model.fn, arguments, model.prepare(data.doubled()), spec.global_sites
    )
    settings = SamplerSettings.from_spec(spec.sampler)
    settings = replace(settings, seed=shard_seed(settings.seed, shard))
    tempered = temper(model.fn, frozenset(global_sites.latent), 1.0 / spec.shards)
    loaded = time.perf_counter()

    samples = run_nuts(tempered, arguments, settings, model.data_as_arguments)
    written_started = time.perf_counter()
    metadata = {
        "fingerprint": fingerprint,
        "shard": shard,
        "shards": spec.shards,
        "groups": [str(label) for label in data.group_labels],
    }
    draws_bytes = to_parquet_bytes(shard_draws(samples, global_sites, metadata))
    diagnostics = {
        "shard": shard,
        "shards": spec.shards,
        "fingerprint": fingerprint,
        "rows": data.rows,
        "groups": data.groups,
        "global_sites": global_sites.latent,
        "parameters": parameter_diagnostics(samples, global_sites.latent),
        "divergences": int(samples.diverging.sum()),
        "mean_tree_depth": float(tree_depth(samples.num_steps).mean()),
        "max_tree_depth_hits": int((tree_depth(samples.num_steps) >= settings.max_tree_depth).sum()),
        "step_size": [float(s) for s in samples.step_size],
        "seconds": {"load": loaded - started, **samples.seconds},
    }
    store.write_bytes("draws.parquet", draws_bytes)
    # Write time covers serialising and storing the draws, the bulk of the output.
    diagnostics["seconds"]["write"] = time.perf_counter() - written_started
    diagnostics["seconds"] = {k: round(v, 3) for k, v in diagnostics["seconds"].items()}
    diagnostics_bytes = json.dumps(diagnostics, indent=1).encode()
    store.write_bytes("diagnostics.json", diagnostics_bytes)
    mark_complete(
        store, fingerprint, {"draws.parquet": len(draws_bytes), "diagnostics.json": len(diagnostics_bytes)}
    )
    return termination_summary(diagnostics)
