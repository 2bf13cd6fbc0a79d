"""EP's files: a round's state (`rounds/<r>/state.json`) and a shard's tilted moments
(`rounds/<r>/shards/<k>/moments.json`, its warm start `adaptation.npz`).

The state after round r holds every site's natural parameters, so the next round's cavities and
the final approximation come from this one file; round 0's is the pilot's start. Arrays are
nested JSON lists: a state of K sites over d unconstrained global components is K·d·(d+1) numbers.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass

import numpy as np

from ..contract import strict_json
from ..errors import BadInput
from ..store.draws import Site, component_names, scalar_components
from ..store.storage import NotFound, Store
from . import ep
from .packing import unpack
from .supports import constrain


@dataclass(frozen=True)
class RoundState:
    """The EP approximation after a round (round 0: the pilot's start)."""

    fingerprint: str
    round: int
    sites: list[str]  # the global latent sites, in the order their components are raveled
    components: list[str]  # u's components: `name` or `name[i]`, the draws' `u:` columns without the prefix
    precision: list  # (K, d, d): every site's λ_k
    shift: list  # (K, d): every site's η_k
    mean: list  # (d,): q's mean
    sd: list  # (d,): q's SDs
    change: dict  # {"mean": max |Δmean| / sd, "sd": max |Δsd| / sd} against the round before (None for 0)
    damping: float  # the δ used (shrunk from spec.combine.damping when Λ or a cavity was not positive definite)
    noise: dict | None  # {"mean", "sd"}: how far Monte Carlo noise alone moves q in a round (runner/steps/update.py)
    settled: bool  # q moved within the tolerance plus twice the noise
    converged: bool  # two settled rounds in a row
    final: bool  # no round follows: converged, or spec.combine.maxRounds reached
    estimators: dict  # {"control variate": n, "sample": n}: how the tilted means were estimated

    @property
    def ep_sites(self) -> ep.Sites:
        return ep.Sites(np.asarray(self.precision, dtype=float), np.asarray(self.shift, dtype=float))

    @property
    def approximation(self) -> ep.Gaussian:
        return ep.approximation(self.ep_sites)

    def cavity(self, shard: int) -> ep.Gaussian:
        return ep.cavity(self.ep_sites, shard)


def state_document(
    fingerprint: str, round_: int, sites_names: list[str], components: list[str], sites: ep.Sites,
    change: ep.Change | None, damping: float, noise: dict | None, settled: bool, converged: bool, final: bool,
    estimators: dict,
) -> RoundState:
    q = ep.approximation(sites)
    return RoundState(
        fingerprint, round_, list(sites_names), list(components), sites.precision.tolist(), sites.shift.tolist(),
        q.mean.tolist(), q.sd.tolist(), change._asdict() if change else None, float(damping), noise,
        bool(settled), bool(converged), bool(final), estimators,
    )


def write_state(store: Store, key: str, state: RoundState) -> int:
    data = strict_json(asdict(state)).encode()
    store.write_bytes(key, data)
    return len(data)


def read_state(store: Store, key: str, fingerprint: str) -> RoundState | None:
    try:
        document = json.loads(store.read_bytes(key))
    except NotFound:
        return None
    if document.get("fingerprint") != fingerprint:
        raise BadInput(
            f"{store.uri(key)} belongs to another spec (fingerprint {document.get('fingerprint')}, "
            f"this fit {fingerprint})"
        )
    return RoundState(**document)


def moments_document(moments: ep.Moments, ess: float) -> dict:
    return {
        "mean": moments.mean.tolist(), "precision": moments.precision.tolist(),
        "estimator": moments.estimator, "ess": float(ess),
    }


def read_moments(document: dict) -> ep.Moments:
    return ep.Moments(np.asarray(document["mean"]), np.asarray(document["precision"]), document["estimator"])


def arrays_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """Named arrays as one .npz file (a shard's warm start)."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def read_arrays(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data)) as arrays:
        return {name: arrays[name] for name in arrays.files}


def global_vector(unconstrained: dict[str, np.ndarray], sites: list[str]) -> np.ndarray:
    """The unconstrained global sites of draws (chains, draws, ...) raveled in the order of
    `sites`: u, shaped (chains, draws, d), in the state's component order."""
    first = unconstrained[sites[0]]
    return np.concatenate(
        [np.asarray(unconstrained[n], dtype=float).reshape(first.shape[:2] + (-1,)) for n in sites], axis=-1
    )


# How far (in q's SDs) a shard's tilted mean may sit from q's before the fit warns: at EP's fixed
# point they coincide; what is left is Monte Carlo noise (about 1/√ESS) and an unfinished round.
TILTED_LIMIT = 0.5


def tilted_agreement(moments: list[ep.Moments], q: ep.Gaussian, components: list[str], shards: list[int]) -> dict:
    """Per shard and component: z = (tilted mean − q mean) / q's SD and the tilted SD over q's.

    The EP analogue of runner/combine/agreement.py: a shard whose tilted distribution q does not
    match (|z| > TILTED_LIMIT) is named in `warnings`.
    """
    sd = q.sd
    report, warnings = [], []
    for k, m in zip(shards, moments):
        z = (m.mean - q.mean) / sd
        ratio = np.sqrt(np.diag(np.linalg.inv(m.precision))) / sd
        report.append(
            {"shard": k, "components": {c: {"z": float(zj), "sd_ratio": float(rj)} for c, zj, rj in zip(components, z, ratio)}}
        )
        worst = int(np.argmax(np.abs(z)))
        if abs(z[worst]) > TILTED_LIMIT:
            warnings.append(
                f"shard {k}: its tilted mean of {components[worst]} sits {z[worst]:+.2f} combined SDs from "
                f"the combined one (more than {TILTED_LIMIT}); EP has not matched this shard"
            )
    return {"method": "ep", "limit": TILTED_LIMIT, "shards": report, "warnings": warnings}


AVERAGED_ROUNDS = 3  # at most this many settled rounds at the end make the answer


def answer(states: list[RoundState]) -> ep.Gaussian:
    """The combined approximation: the sites averaged over the settled rounds at the end (at most
    AVERAGED_ROUNDS; the last round alone if it is not settled), which averages out the rounds'
    Monte Carlo noise without mixing in rounds that were still moving."""
    trailing = []
    for state in reversed(states):
        if not state.settled or len(trailing) == AVERAGED_ROUNDS:
            break
        trailing.append(state.ep_sites)
    return ep.approximation(ep.average(trailing or [states[-1].ep_sites]))


def convergence_report(states: list[RoundState]) -> dict:
    """The rounds' history for the summary: per round q's change and the damping used."""
    last = states[-1]
    history = [
        {"round": s.round, "mean_change": (s.change or {}).get("mean"), "sd_change": (s.change or {}).get("sd"),
         "noise": s.noise, "settled": s.settled, "damping": s.damping, "mean": s.mean, "sd": s.sd}
        for s in states
    ]
    return {"rounds": last.round, "converged": last.converged, "components": last.components, "history": history}


def convergence_warnings(report: dict, max_rounds: int) -> list[str]:
    if report["converged"]:
        return []
    last = report["history"][-1]
    return [
        f"EP did not converge in spec.combine.maxRounds = {max_rounds} rounds: in the last round the "
        f"means moved by up to {last['mean_change']:.3f} SD and the SDs by up to {100 * last['sd_change']:.1f}%; "
        "raise maxRounds or sampler.samples"
    ]


def gaussian_draws(q: ep.Gaussian, components: list[str], layout: dict[str, Site], shape, rng) -> np.ndarray:
    """Draws (*shape, D) of q, in the packed order of `layout` (runner/combine/packing.py)."""
    packed = [c for name, site in layout.items() for c in component_names(name, site.unconstrained_shape)]
    draws = rng.multivariate_normal(q.mean, q.cov, size=tuple(shape), method="cholesky")
    return draws[..., [components.index(c) for c in packed]]


def constrained_history(
    states: list[RoundState], layout: dict[str, Site], transforms: dict, rng, draws: int = 4000
) -> dict[str, list[tuple[float, float]]]:
    """Per global parameter (constrained components), q's mean and SD after every round."""
    history: dict[str, list[tuple[float, float]]] = {}
    for state in states:
        values = gaussian_draws(state.approximation, state.components, layout, (1, draws), rng)
        for name, column in scalar_components(constrain(unpack(values, layout), transforms)).items():
            history.setdefault(name, []).append((float(column.mean()), float(column.std())))
    return history
