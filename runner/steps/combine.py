"""The `combine` step: read every shard's draws, combine the global parameters, write the result.

It runs in three stages, so that re-sampling the group-level parameters (one NUTS adaptation per
shard) runs on every shard at once, as sampling does, instead of one shard after the other in the
combine pod, which at thousands of shards would make it the fit's bottleneck:

    globals   `combine --stage globals`: the combined draws of the global sites (constrained and
              `u:`) in combined/draws.parquet, how far each shard sits from them in
              combined/agreement.json (runner/agreement.py), then combined/globals/_SUCCESS.json
    resample  `resample --shard k`, per shard, only with groupParameters: resample: shard k's
              group-level draws given the combined global draws (runner/resample.py) in
              combined/groups/<k>/draws.parquet, then that folder's own _SUCCESS.json
    finish    `combine --stage finish`: per parameter mean, sd, q05, q50, q95 (+ ESS for globals)
              in combined/summary.json, then combined/_SUCCESS.json, last: the combination is
              complete

Plain `combine` (stage `all`) runs the three in one process, re-sampling whichever shards are not
done yet, so one Job still does the whole step. Every way of running them uses the same stage
functions, and every stage reads its inputs from the store, so the files are the same whichever
way the stages ran. A stage refuses (one line) to run before the stage it needs, and a stage
completed for this fit returns at once, never redone or overwritten.

Global sites are combined in the unconstrained space NUTS sampled in (the `u:` columns), where the
tempered shard densities are exact factors of the full posterior (DESIGN.md), and mapped back to
their support with the bijection NumPyro itself uses for the site (`biject_to(support)`), found by
tracing the model on one shard's data. Combined values are therefore always inside the support.

Refusals (BadInput, exit 3), each one line naming the shard: a shard with no `_SUCCESS.json`
(missing, or still running/crashed), a shard completed for another spec (fingerprint), draws with
NaN or infinities, shards whose global sites differ; a stage before the one it needs; finishing
while shards are not re-sampled. Output completed with other combine settings is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from .agreement import agreement
from .combine import combine
from .contract import TERMINATION_LIMIT
from .completion import SUCCESS, check_fingerprint, completed, mark_complete
from .data import model_and_data, shard_data_uri, whole_data_stats
from .diagnostics import ess_bulk, ess_tail
from .draws import Draws, Site, component_names, from_parquet_bytes, to_parquet_bytes
from .errors import BadInput
from .spec import FitSpec
from .storage import NotFound, Store, open_store

WARN_RHAT = 1.01


# ---------------------------------------------------------------- reading and checking shards


def _describe(shards: list[int], total: int) -> str:
    shown = ", ".join(map(str, shards[:10])) + (", …" if len(shards) > 10 else "")
    return f"shard {shown}" if len(shards) == 1 else f"shards {shown} ({len(shards)} of {total})"


def check_shards_complete(root: Store, spec: FitSpec) -> None:
    """Every shard has `_SUCCESS.json` with this fit's fingerprint; else one line naming them."""
    fingerprint = spec.fingerprint()
    missing, incomplete = [], []
    for k in range(spec.shards):
        shard = root.child(f"shards/{k}")
        try:
            success = json.loads(shard.read_bytes(SUCCESS))
        except NotFound:
            (incomplete if shard.exists("draws.parquet") else missing).append(k)
            continue
        check_fingerprint(success, fingerprint, f"shard {k} ({shard.root})")
    if missing or incomplete:
        parts = []
        if missing:
            parts.append(f"{_describe(missing, spec.shards)} missing")
        if incomplete:
            parts.append(f"{_describe(incomplete, spec.shards)} incomplete (draws but no {SUCCESS})")
        raise BadInput(f"cannot combine: {'; '.join(parts)} under {root.uri('shards/')}")


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


def read_shard(root: Store, spec: FitSpec, k: int) -> Draws:
    """Shard k's draws, checked: fingerprint, shard count, finite values."""
    where = f"shard {k}"
    try:
        draws = from_parquet_bytes(root.read_bytes(f"shards/{k}/draws.parquet"))
    except NotFound:
        raise BadInput(f"{where}: {root.uri(f'shards/{k}/draws.parquet')} is missing") from None
    except (KeyError, ValueError, OSError) as error:
        raise BadInput(f"{where}: draws.parquet is not a consensusfit draws table: {error}") from None
    if draws.metadata.get("fingerprint") != spec.fingerprint():
        raise BadInput(
            f"{where} was fitted with a different spec (draws fingerprint "
            f"{draws.metadata.get('fingerprint')}, this fit {spec.fingerprint()})"
        )
    if draws.metadata.get("shards") != spec.shards:
        raise BadInput(f"{where} was fitted as one of {draws.metadata.get('shards')} shards, this fit has {spec.shards}")
    _check_finite(draws, where)
    return draws


def global_layout(shards: list[Draws]) -> dict[str, Site]:
    """The global latent sites, the same in every shard (else a refusal naming the shard)."""
    first = {name: shards[0].sites[name] for name in shards[0].global_names()}
    if not first:
        raise BadInput("shard 0 has no global latent sites: nothing to combine")
    for k, draws in enumerate(shards[1:], start=1):
        other = {name: draws.sites[name] for name in draws.global_names()}
        if other != first:
            raise BadInput(
                f"shard {k} has global sites {sorted(other)} with other shapes or names than shard 0's "
                f"{sorted(first)}"
            )
    return first


def pack(draws: Draws, layout: dict[str, Site]) -> np.ndarray:
    """The unconstrained global components of one shard, shaped (chains, draws, D)."""
    parts = [
        np.asarray(draws.unconstrained[name], dtype=float).reshape(draws.chains, draws.draws, -1)
        for name in layout
    ]
    return np.concatenate(parts, axis=-1)


def unpack(values: np.ndarray, layout: dict[str, Site]) -> dict[str, np.ndarray]:
    out, start = {}, 0
    for name, site in layout.items():
        size = int(np.prod(site.unconstrained_shape, dtype=int))
        out[name] = values[..., start : start + size].reshape(values.shape[:2] + site.unconstrained_shape)
        start += size
    return out


def unconstrained_names(layout: dict[str, Site]) -> list[str]:
    """Component names in the packed order: the site's own names where the shapes agree."""
    names = []
    for name, site in layout.items():
        prefix = "" if site.unconstrained_shape == site.shape else "u:"
        names += component_names(prefix + name, site.unconstrained_shape)
    return names


# ---------------------------------------------------------------- the model, for supports and resampling


@dataclass(frozen=True)
class ShardModel:
    fn: object
    arguments: dict
    groups: list[str]


def shard_model(
    spec: FitSpec, out_uri: str, shard: int, data_uri: str | None, stats_uri: str | None
) -> ShardModel:
    """The model and its arguments for one shard's data, prepared as the sample step did."""
    stats = whole_data_stats(out_uri, stats_uri)
    uri = shard_data_uri(out_uri, shard, data_uri)
    model, data = model_and_data(spec, stats, uri, f"shard {shard} ({uri})")
    return ShardModel(model.fn, model.prepare(data), [str(label) for label in data.group_labels])


def bijections(model: ShardModel, layout: dict[str, Site]) -> dict:
    """NumPyro's unconstrained→support transform of every global site, from one trace."""
    import jax
    from numpyro.distributions.transforms import biject_to

    from .tempering import trace_model

    with jax.ensure_compile_time_eval():
        trace = trace_model(model.fn, model.arguments)
    transforms = {}
    for name in layout:
        site = trace.get(name)
        if site is None or site["type"] != "sample":
            raise BadInput(f"the model does not sample global site {name!r} that the shards recorded")
        transforms[name] = biject_to(site["fn"].support)
    return transforms


def constrain(unconstrained: dict[str, np.ndarray], transforms: dict) -> dict[str, np.ndarray]:
    return {name: np.asarray(transforms[name](values)) for name, values in unconstrained.items()}


# ---------------------------------------------------------------- summaries


def _summaries(flat: np.ndarray, names: list[str]) -> dict[str, dict]:
    """mean, sd, q05, q50, q95 of every column of flat draws (N, P)."""
    if flat.shape[1] == 0:
        return {}
    q05, q50, q95 = np.quantile(flat, [0.05, 0.5, 0.95], axis=0)
    mean, sd = flat.mean(axis=0), flat.std(axis=0, ddof=1)
    return {
        name: {"mean": float(mean[i]), "sd": float(sd[i]), "q05": float(q05[i]), "q50": float(q50[i]), "q95": float(q95[i])}
        for i, name in enumerate(names)
    }


def global_summary(constrained: dict[str, np.ndarray]) -> dict[str, dict]:
    result = {}
    for name, values in constrained.items():
        chains, draws = values.shape[:2]
        per_chain = values.reshape(chains, draws, -1)
        names = component_names(name, values.shape[2:])
        stats = _summaries(per_chain.reshape(chains * draws, -1), names)
        for i, component in enumerate(names):
            stats[component]["ess"] = ess_bulk(per_chain[:, :, i])
            stats[component]["ess_tail"] = ess_tail(per_chain[:, :, i])
        result.update(stats)
    return result


def group_component_names(name: str, shape: tuple[int, ...], labels: list[str], shard: int) -> list[str]:
    """`name[label]` / `name[label,j]` when the site's first axis is the shard's groups."""
    if shape and labels and shape[0] == len(labels):
        rest = component_names("", shape[1:])
        return [f"{name}[{label}{',' + r[1:-1] if r else ''}]" for label in labels for r in rest]
    return [f"{name}@shard{shard}{c[len(name):] or ''}" for c in component_names(name, shape)]


def group_summary(arrays: dict[str, np.ndarray], labels: list[str], shard: int) -> dict[str, dict]:
    result = {}
    for name, values in arrays.items():
        flat = np.asarray(values, dtype=float).reshape(values.shape[0] * values.shape[1], -1)
        result.update(_summaries(flat, group_component_names(name, values.shape[2:], labels, shard)))
    return result


def shard_report(root: Store, k: int) -> dict:
    try:
        diagnostics = json.loads(root.read_bytes(f"shards/{k}/diagnostics.json"))
    except NotFound:
        return {"shard": k}
    parameters = diagnostics.get("parameters", {}).values()
    return {
        "shard": k,
        "rows": diagnostics.get("rows"),
        "groups": diagnostics.get("groups"),
        "rhatMax": max((p["rhat"] for p in parameters), default=None),
        "essBulkMin": min((p["ess_bulk"] for p in parameters), default=None),
        "divergences": diagnostics.get("divergences"),
    }


def termination_message(uri: str, parameters: dict[str, dict]) -> dict:
    """The contract's success message, trimmed to 4 KiB (then `"truncated": true`)."""
    keep = ("mean", "sd", "q05", "q50", "q95")
    message = {"ok": True, "uri": uri, "parameters": {}}
    for name, stats in parameters.items():
        trial = dict(message["parameters"])
        trial[name] = {key: float(f"{stats[key]:.6g}") for key in keep}
        candidate = {**message, "parameters": trial}
        if len(json.dumps(candidate)) + len(', "truncated": true') > TERMINATION_LIMIT:
            message["truncated"] = True
            break
        message = candidate
    return message


# ---------------------------------------------------------------- the stages

GLOBALS = "combined/globals"  # the folder of the globals stage's marker


def combined_globals(shards: list[Draws], spec: FitSpec, transforms_of) -> tuple:
    """(layout, combined unconstrained (C, S, D), constrained sites, per-shard packed draws)."""
    layout = global_layout(shards)
    packed = [pack(d, layout) for d in shards]
    rng = np.random.default_rng(np.random.SeedSequence([spec.sampler["seed"], 0xC0B1]))
    try:
        values, _ = combine(spec.combine["method"], packed, rng)
    except (ValueError, np.linalg.LinAlgError) as error:
        raise BadInput(f"cannot combine the shards' global draws: {error}") from None
    unconstrained = unpack(values, layout)
    return layout, values, constrain(unconstrained, transforms_of(layout)), unconstrained, packed


def _write(root: Store, key: str, data: bytes) -> int:
    """Write one output file; its size, for the marker that vouches for it."""
    root.write_bytes(key, data)
    return len(data)


def _require_globals(root: Store, fingerprint: str, what: str) -> dict:
    """The globals stage's marker; the later stages refuse (one line) to run before it."""
    if done := completed(root.child(GLOBALS), fingerprint):
        return done
    raise BadInput(
        f"{what}: the globals stage is not complete (no {root.uri(f'{GLOBALS}/{SUCCESS}')}); "
        "run `consensusfit-runner combine --stage globals` first"
    )


def globals_message(root: Store, done: dict) -> dict:
    """The globals stage's termination message, built from its marker so a retry reports the same."""
    return {
        "ok": True,
        "stage": "globals",
        "uri": root.uri("combined/draws.parquet"),
        "draws": done["draws"],
        "warnings": done["warnings"],
    }


def combine_globals(
    spec: FitSpec, out_uri: str, data_uri: str | None = None, stats_uri: str | None = None
) -> dict:
    """Stage `globals`: combine the shards' global draws; write them and the shards' agreement.

    The agreement is written here rather than when finishing because it needs every shard's global
    draws, and this is the one stage that reads them all: finishing a re-sampled fit then reads no
    shard draws. Completed for this fingerprint: returns at once, never rewrites the draws.
    """
    root = open_store(out_uri)
    fingerprint = spec.fingerprint()
    if done := completed(root.child(GLOBALS), fingerprint):
        return globals_message(root, done)
    check_shards_complete(root, spec)
    shards = [read_shard(root, spec, k) for k in range(spec.shards)]

    def transforms_of(layout):
        return bijections(shard_model(spec, out_uri, 0, data_uri, stats_uri), layout)

    layout, values, constrained, unconstrained, packed = combined_globals(shards, spec, transforms_of)
    metadata = {
        "fingerprint": fingerprint,
        "shards": spec.shards,
        "method": spec.combine["method"],
        "groupParameters": spec.combine["groupParameters"],
        "groups": [],
    }
    sites = {name: Site(site.shape, site.unconstrained_shape, True, "latent") for name, site in layout.items()}
    report = agreement(packed, values, unconstrained_names(layout), list(range(spec.shards)))
    files = {  # names relative to combined/, as in the final marker that lists them again
        "draws.parquet": _write(
            root, "combined/draws.parquet", to_parquet_bytes(Draws(constrained, unconstrained, sites, metadata))
        ),
        "agreement.json": _write(root, "combined/agreement.json", json.dumps(report, indent=1).encode()),
    }
    chains, draws = values.shape[:2]
    done = mark_complete(
        root.child(GLOBALS), fingerprint, files, draws=chains * draws, warnings=len(report["warnings"])
    )
    return globals_message(root, done)


def _resample_settings(spec: FitSpec, shard: int):
    from .sampling import SamplerSettings
    from .shard import shard_seed

    settings = SamplerSettings.from_spec(spec.sampler)
    return SamplerSettings(**{**settings.__dict__, "seed": shard_seed(settings.seed + 7919, shard)})


def resample_message(shard: int, done: dict) -> dict:
    """The `resample` termination message, from the shard's marker (the same on a retry)."""
    seconds = sum(done.get("seconds", {}).values())
    return {"ok": True, "shard": shard, "seconds": round(seconds, 3), "acceptProb": done.get("accept_prob")}


def resample_shard(
    spec: FitSpec,
    out_uri: str,
    shard: int = 0,
    data_uri: str | None = None,
    stats_uri: str | None = None,
) -> dict:
    """Stage `resample` for one shard: its group-level sites given the combined global draws.

    Needs the globals stage (refused before it); writes `combined/groups/<shard>/draws.parquet`,
    then its `_SUCCESS.json`, and returns the termination message. Already done for this
    fingerprint: returns at once. Shards need nothing from each other, so all can run at once.
    """
    from .resample import resample_groups

    root = open_store(out_uri)
    store = root.child(f"combined/groups/{shard}")
    fingerprint = spec.fingerprint()
    spec.check_shard(shard)
    if done := completed(store, fingerprint):
        return resample_message(shard, done)
    _require_globals(root, fingerprint, f"cannot re-sample shard {shard}")
    combined = from_parquet_bytes(root.read_bytes("combined/draws.parquet"))
    model = shard_model(spec, out_uri, shard, data_uri, stats_uri)
    theta = {name: combined.constrained[name] for name in combined.global_names()}
    result = resample_groups(model.fn, model.arguments, theta, _resample_settings(spec, shard))
    arrays = {**result.latent, **result.deterministic}
    if not arrays:
        return resample_message(shard, mark_complete(store, fingerprint, {}, note="no group-level sites"))
    sites = {
        name: Site(values.shape[2:], None, False, "latent" if name in result.latent else "deterministic")
        for name, values in arrays.items()
    }
    metadata = {"fingerprint": fingerprint, "shard": shard, "shards": spec.shards, "groups": model.groups}
    files = {"draws.parquet": _write(store, "draws.parquet", to_parquet_bytes(Draws(arrays, {}, sites, metadata)))}
    done = mark_complete(
        store,
        fingerprint,
        files,
        accept_prob=result.accept_prob,
        seconds={k: round(v, 3) for k, v in result.seconds.items()},
    )
    return resample_message(shard, done)


def unresampled_shards(root: Store, spec: FitSpec) -> list[int]:
    """The shards whose group-level draws given the combined draws are not complete yet."""
    fingerprint = spec.fingerprint()
    return [k for k in range(spec.shards) if not completed(root.child(f"combined/groups/{k}"), fingerprint)]


def _group_draws(root: Store, spec: FitSpec, k: int) -> tuple[dict, list[str]]:
    """Shard k's group-level draws: re-sampled ones, or (keep) the shard's own."""
    if spec.combine["groupParameters"] == "resample":
        try:
            draws = from_parquet_bytes(root.read_bytes(f"combined/groups/{k}/draws.parquet"))
        except NotFound:  # a model without group-level sites: nothing was re-sampled
            return {}, []
        return draws.constrained, draws.metadata.get("groups", [])
    shard = read_shard(root, spec, k)
    local = {name: v for name, v in shard.constrained.items() if not shard.sites[name].is_global}
    return local, shard.metadata.get("groups", [])


def _warnings(agreement_report: dict, reports: list[dict]) -> list[str]:
    """The agreement's warnings, then each shard's own convergence trouble."""
    warnings = list(agreement_report["warnings"])
    for r in reports:
        if r.get("rhatMax") is not None and r["rhatMax"] > WARN_RHAT:
            warnings.append(f"shard {r['shard']}: R-hat {r['rhatMax']:.3f} > {WARN_RHAT}")
        if r.get("divergences"):
            warnings.append(f"shard {r['shard']}: {r['divergences']} divergent transitions")
    return warnings


def _finish(root: Store, spec: FitSpec, globals_done: dict) -> dict:
    """Stage `finish`, its checks done: the summary, then `combined/_SUCCESS.json`."""
    combined = from_parquet_bytes(root.read_bytes("combined/draws.parquet"))
    parameters = global_summary({name: combined.constrained[name] for name in combined.global_names()})
    globals_ = list(parameters)
    for k in range(spec.shards):
        arrays, labels = _group_draws(root, spec, k)
        parameters.update(group_summary(arrays, labels, k))
    reports = [shard_report(root, k) for k in range(spec.shards)]
    summary = {
        "method": spec.combine["method"],
        "groupParameters": spec.combine["groupParameters"],
        "shards": spec.shards,
        "chains": combined.chains,
        "draws": combined.chains * combined.draws,
        "globals": globals_,
        "parameters": parameters,
        "warnings": _warnings(json.loads(root.read_bytes("combined/agreement.json")), reports),
        "shard_diagnostics": reports,
    }
    summary_bytes = json.dumps(summary, indent=1, allow_nan=True).encode()
    files = {**globals_done["files"], "summary.json": _write(root, "combined/summary.json", summary_bytes)}
    mark_complete(root.child("combined"), spec.fingerprint(), files, combine=spec.combine)
    return termination_message(root.uri("combined/"), {k: parameters[k] for k in globals_})


def combine_fit(
    spec: FitSpec,
    out_uri: str,
    stage: str = "all",
    data_uri: str | None = None,
    stats_uri: str | None = None,
) -> dict:
    """The `combine` command (module docstring); returns the stage's termination message.

    `globals` and `finish` are the operator's two combine Jobs, with the per-shard `resample` Job
    between them; `finish` refuses while a shard's group-level draws are missing. `all` is the
    three stages in this one process (re-sampling the shards one after the other), so a single
    Job or call still does the whole step.
    """
    if stage == "globals":
        return combine_globals(spec, out_uri, data_uri, stats_uri)
    root = open_store(out_uri)
    fingerprint = spec.fingerprint()
    # The fingerprint covers spec.combine, so a finished combination is this method's.
    if completed(root.child("combined"), fingerprint):
        summary = json.loads(root.read_bytes("combined/summary.json"))
        return termination_message(root.uri("combined/"), {k: summary["parameters"][k] for k in summary["globals"]})
    if stage == "all":
        combine_globals(spec, out_uri, data_uri, stats_uri)
    globals_done = _require_globals(root, fingerprint, "cannot finish the combination")
    if spec.combine["groupParameters"] == "resample":
        missing = unresampled_shards(root, spec)
        if missing and stage == "finish":
            raise BadInput(
                f"cannot finish the combination: {_describe(missing, spec.shards)} not re-sampled "
                f"(no {SUCCESS} under {root.uri('combined/groups/')}<k>/); run `consensusfit-runner "
                "resample --shard <k>` for each"
            )
        for k in missing:
            resample_shard(spec, out_uri, k, data_uri, stats_uri)
    return _finish(root, spec, globals_done)
