"""The `combine` step: read every shard's draws, combine the global parameters, write the result.

It runs in three stages, so that re-sampling the group-level parameters (one NUTS adaptation per
shard) runs on every shard at once, as sampling does, instead of one shard after the other in the
combine pod, which at thousands of shards would make it the fit's bottleneck:

    globals   `combine --stage globals`: the combined draws of the global sites (constrained and
              `u:`) in combined/draws.parquet, how far each shard sits from them in
              combined/agreement.json (runner/combine/agreement.py), then combined/globals/_SUCCESS.json
    resample  `resample --shard k`, per shard, only with groupParameters: resample: shard k's
              group-level draws given the combined global draws (runner/inference/conditional.py)
              in combined/groups/<k>/draws.parquet, then that folder's own _SUCCESS.json
              (runner/steps/resample.py)
    finish    `combine --stage finish`: per parameter mean, sd, q05, q50, q95 (+ ESS for globals)
              in combined/summary.json, then combined/_SUCCESS.json, last: the combination is
              complete

Plain `combine` (stage `all`) runs the three in one process, re-sampling whichever shards are not
done yet, so one Job still does the whole step. Every way of running them uses the same stage
functions, and every stage reads its inputs from the store, so the files are the same whichever
way the stages ran. A stage refuses (one line) to run before the stage it needs, and a stage
completed for this fit returns at once, never redone or overwritten.

Global sites are combined in the unconstrained space NUTS sampled in (the `u:` columns), where the
tempered shard densities are exact factors of the full posterior, and mapped back to their support
(runner/combine/supports.py).

Refusals (BadInput, exit 3), each one line naming the shard: a shard with no `_SUCCESS.json`
(missing, or still running/crashed), a shard completed for another spec (fingerprint), draws with
NaN or infinities, shards whose global sites differ; a stage before the one it needs; finishing
while shards are not re-sampled. Output completed with other combine settings is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..combine.agreement import agreement
from ..combine.rounds import (
    RoundState, answer, convergence_report, convergence_warnings, gaussian_draws, read_moments, tilted_agreement,
)
from ..combine.methods import combine
from ..contract import strict_json
from ..combine.packing import global_layout, pack, unconstrained_names, unpack
from ..combine.summaries import global_summary, group_summary
from ..combine.supports import bijections, constrain
from ..contract import ALL_STAGES, FINISH_STAGE, GLOBALS_STAGE
from ..errors import BadInput
from ..layout import AGREEMENT, DRAWS, SUMMARY, FitLayout, ShardFolder
from ..spec import FitSpec
from ..store.completion import check_fingerprint, completed, mark_complete, read_json, write_output
from ..store.draws import Draws, Site, component_names, from_parquet_bytes, to_parquet_bytes
from ..store.storage import NotFound
from .inputs import shard_model
from .messages import combine_message, describe_shards, globals_message, shard_row, shard_warnings
from .resample import ResampleOptions, require_globals
from .resample import run as resample_shard
from .update import round_states

WARN_RHAT = 1.01


@dataclass(frozen=True)
class CombineOptions:
    stage: str = ALL_STAGES  # globals | finish | all
    data: str | None = None  # shard 0's data (for the supports) and the re-sampled shards' data
    stats: str | None = None  # whole-data statistics; default the partition manifest's


def run(spec: FitSpec, layout: FitLayout, options: CombineOptions = CombineOptions()) -> dict:
    """The `combine` command (module docstring); returns the stage's termination message.

    `globals` and `finish` are the operator's two combine Jobs, with the per-shard `resample` Job
    between them; `finish` refuses while a shard's group-level draws are missing. `all` is the
    three stages in this one process (re-sampling the shards one after the other), so a single
    Job or call still does the whole step.
    """
    if options.stage == GLOBALS_STAGE:
        return combine_globals(spec, layout, options)
    store, combined = layout.store, layout.combined
    fingerprint = spec.fingerprint()
    # The fingerprint covers spec.combine, so a finished combination is this method's.
    if completed(store, combined.marker, fingerprint):
        summary = json.loads(store.read_bytes(combined.summary))
        return combine_message(layout.uri(combined.prefix), {k: summary["parameters"][k] for k in summary["globals"]})
    if options.stage == ALL_STAGES:
        combine_globals(spec, layout, options)
    globals_done = require_globals(layout, fingerprint, "cannot finish the combination")
    if spec.combine["groupParameters"] == "resample":
        missing = unresampled_shards(layout, spec)
        if missing and options.stage == FINISH_STAGE:
            raise BadInput(
                f"cannot finish the combination: {describe_shards(missing, spec.shards)} not re-sampled "
                f"(no {combined.group(0).name(combined.group(0).marker)} under "
                f"{layout.uri(combined.groups.prefix)}<k>/); run `consensusfit-runner resample --shard <k>` for each"
            )
        for k in missing:
            resample_shard(spec, layout, ResampleOptions(k, options.data, options.stats))
    return _finish(spec, layout, globals_done)


def combine_fit(spec: FitSpec, out_uri: str, stage: str = ALL_STAGES, data_uri: str | None = None,
                stats_uri: str | None = None) -> dict:
    """`run` with a root URI and the stage's options as arguments."""
    return run(spec, FitLayout(out_uri), CombineOptions(stage, data_uri, stats_uri))


# ---------------------------------------------------------------- reading and checking shards


def shard_folders(layout: FitLayout, states: list[RoundState]) -> Callable[[int], ShardFolder]:
    """Where each shard's draws to combine are: `shards/<k>/`, or with EP (`states`, from
    `round_states`) the final round's `rounds/<R>/shards/<k>/`."""
    return layout.round(states[-1].round).shard if states else layout.shard


def check_shards_complete(layout: FitLayout, spec: FitSpec, folder: Callable[[int], ShardFolder]) -> None:
    """Every shard has `_SUCCESS.json` with this fit's fingerprint; else one line naming them."""
    store, fingerprint = layout.store, spec.fingerprint()
    missing, incomplete = [], []
    for k in range(spec.shards):
        shard = folder(k)
        success = read_json(store, shard.marker)
        if success is None:
            (incomplete if store.exists(shard.draws) else missing).append(k)
            continue
        check_fingerprint(success, fingerprint, f"shard {k} ({layout.uri(shard.path)})")
    if missing or incomplete:
        parts = []
        if missing:
            parts.append(f"{describe_shards(missing, spec.shards)} missing")
        if incomplete:
            marker = folder(incomplete[0])
            parts.append(f"{describe_shards(incomplete, spec.shards)} incomplete (draws but no {marker.name(marker.marker)})")
        where = layout.uri(folder(0).path.rsplit("/", 1)[0] + "/")
        raise BadInput(f"cannot combine: {'; '.join(parts)} under {where}")


def _check_finite(draws: Draws, where: str) -> None:
    for space, arrays in (("", draws.constrained), ("u:", draws.unconstrained)):
        for name, values in arrays.items():
            values = np.asarray(values, dtype=float)
            bad = ~np.isfinite(values)
            if bad.any():
                flat = bad.reshape(bad.shape[:2] + (-1,))
                component = component_names(space + name, values.shape[2:])[int(np.argmax(flat.any(axis=(0, 1))))]
                raise BadInput(
                    f"{where}: {int(bad.sum())} NaN or infinite draw value(s) in {space}{name} "
                    f"(first in column {component})"
                )


def read_shard(layout: FitLayout, spec: FitSpec, k: int, folder: Callable[[int], ShardFolder]) -> Draws:
    """Shard k's draws (in `folder(k)`, see `shard_folders`), checked: fingerprint, shard count,
    finite values."""
    where, key = f"shard {k}", folder(k).draws
    try:
        draws = from_parquet_bytes(layout.store.read_bytes(key))
    except NotFound:
        raise BadInput(f"{where}: {layout.uri(key)} is missing") from None
    except (KeyError, ValueError, OSError) as error:
        raise BadInput(f"{where}: {DRAWS} is not a consensusfit draws table: {error}") from None
    if draws.metadata.get("fingerprint") != spec.fingerprint():
        raise BadInput(
            f"{where} was fitted with a different spec (draws fingerprint "
            f"{draws.metadata.get('fingerprint')}, this fit {spec.fingerprint()})"
        )
    if draws.metadata.get("shards") != spec.shards:
        raise BadInput(f"{where} was fitted as one of {draws.metadata.get('shards')} shards, this fit has {spec.shards}")
    _check_finite(draws, where)
    return draws


# ---------------------------------------------------------------- the stages


def combined_globals(shards: list[Draws], spec: FitSpec, transforms_of, states: list[RoundState] = ()) -> tuple:
    """(layout, combined unconstrained (C, S, D), constrained sites, unconstrained sites,
    per-shard packed draws). With EP (`states`: every round's) the draws are q's."""
    layout = global_layout(shards)
    packed = [pack(d, layout) for d in shards]
    if states:
        values = gaussian_draws(answer(states), states[-1].components, layout, packed[0].shape[:2], spec.seeds.combine())
    else:
        try:
            values, _ = combine(spec.combine["method"], packed, spec.seeds.combine())
        except (ValueError, np.linalg.LinAlgError) as error:
            raise BadInput(f"cannot combine the shards' global draws: {error}") from None
    unconstrained = unpack(values, layout)
    return layout, values, constrain(unconstrained, transforms_of(layout)), unconstrained, packed


def combine_globals(spec: FitSpec, layout: FitLayout, options: CombineOptions = CombineOptions()) -> dict:
    """Stage `globals`: combine the shards' global draws; write them and the shards' agreement.

    The agreement is written here rather than when finishing because it needs every shard's global
    draws, and this is the one stage that reads them all: finishing a re-sampled fit then reads no
    shard draws. Completed for this fingerprint: returns at once, never rewrites the draws.
    """
    store, combined = layout.store, layout.combined
    fingerprint = spec.fingerprint()
    if done := completed(store, combined.globals.marker, fingerprint):
        return globals_message(layout.uri(combined.draws), done)
    states = round_states(spec, layout)
    folder = shard_folders(layout, states)
    check_shards_complete(layout, spec, folder)
    shards = [read_shard(layout, spec, k, folder) for k in range(spec.shards)]

    def transforms_of(sites):
        model = shard_model(spec, layout, 0, options.data, options.stats)
        return bijections(model.fn, model.arguments, sites)

    sites_layout, values, constrained, unconstrained, packed = combined_globals(shards, spec, transforms_of, states)
    metadata = {
        "fingerprint": fingerprint,
        "shards": spec.shards,
        "method": spec.combine["method"],
        "groupParameters": spec.combine["groupParameters"],
        "groups": [],
    }
    sites = {name: Site(site.shape, site.unconstrained_shape, True, "latent") for name, site in sites_layout.items()}
    if states:
        moments = [read_moments(json.loads(store.read_bytes(folder(k).moments))) for k in range(spec.shards)]
        report = tilted_agreement(moments, answer(states), states[-1].components, list(range(spec.shards)))
    else:
        report = agreement(packed, values, unconstrained_names(sites_layout), list(range(spec.shards)))
    files = {  # names relative to combined/, as in the final marker that lists them again
        DRAWS: write_output(store, combined.draws, to_parquet_bytes(Draws(constrained, unconstrained, sites, metadata))),
        AGREEMENT: write_output(store, combined.agreement, strict_json(report, indent=1).encode()),
    }
    chains, draws = values.shape[:2]
    done = mark_complete(
        store, combined.globals.marker, fingerprint, files, draws=chains * draws, warnings=len(report["warnings"])
    )
    return globals_message(layout.uri(combined.draws), done)


def unresampled_shards(layout: FitLayout, spec: FitSpec) -> list[int]:
    """The shards whose group-level draws given the combined draws are not complete yet."""
    fingerprint = spec.fingerprint()
    return [
        k for k in range(spec.shards) if not completed(layout.store, layout.combined.group(k).marker, fingerprint)
    ]


def _group_draws(layout: FitLayout, spec: FitSpec, k: int, folder: Callable[[int], ShardFolder]) -> tuple[dict, list[str]]:
    """Shard k's group-level draws: re-sampled ones, or (keep) the shard's own."""
    if spec.combine["groupParameters"] == "resample":
        try:
            draws = from_parquet_bytes(layout.store.read_bytes(layout.combined.group(k).draws))
        except NotFound:  # a model without group-level sites: nothing was re-sampled
            return {}, []
        return draws.constrained, draws.metadata.get("groups", [])
    shard = read_shard(layout, spec, k, folder)  # with EP, the final round's tilted draws
    local = {name: v for name, v in shard.constrained.items() if not shard.sites[name].is_global}
    return local, shard.metadata.get("groups", [])


def _finish(spec: FitSpec, layout: FitLayout, globals_done: dict) -> dict:
    """Stage `finish`, its checks done: the summary, then `combined/_SUCCESS.json`."""
    store, combined_files = layout.store, layout.combined
    combined = from_parquet_bytes(store.read_bytes(combined_files.draws))
    parameters = global_summary({name: combined.constrained[name] for name in combined.global_names()})
    globals_ = list(parameters)
    states = round_states(spec, layout)
    folder = shard_folders(layout, states)
    for k in range(spec.shards):
        arrays, labels = _group_draws(layout, spec, k, folder)
        parameters.update(group_summary(arrays, labels, k))
    rows = [shard_row(k, read_json(store, folder(k).diagnostics)) for k in range(spec.shards)]
    convergence = convergence_report(states) if states else None
    agreement_report = json.loads(store.read_bytes(combined_files.agreement))
    summary = {
        "method": spec.combine["method"],
        "group_parameters": spec.combine["groupParameters"],
        "shards": spec.shards,
        "chains": combined.chains,
        "draws": combined.chains * combined.draws,
        "globals": globals_,
        "parameters": parameters,
        # the agreement's warnings, then each shard's own convergence trouble
        "warnings": list(agreement_report["warnings"]) + shard_warnings(rows, WARN_RHAT)
        + (convergence_warnings(convergence, spec.combine["maxRounds"]) if convergence else []),
        "shard_diagnostics": rows,
        **({"ep": convergence} if convergence else {}),
    }
    summary_bytes = strict_json(summary, indent=1).encode()
    files = {**globals_done["files"], SUMMARY: write_output(store, combined_files.summary, summary_bytes)}
    mark_complete(store, combined_files.marker, spec.fingerprint(), files, combine=spec.combine)
    return combine_message(layout.uri(combined_files.prefix), {k: parameters[k] for k in globals_})
