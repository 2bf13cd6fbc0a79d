"""The `update` step of EP round r: the K shards' tilted moments -> the state after round r.

Reads `rounds/<r-1>/state.json` (the sites the round's cavities came from) and every
`rounds/<r>/shards/<k>/moments.json`, moves every site a share δ (`spec.combine.damping`, shrunk
while Λ or a cavity is not positive definite) towards its EP update (runner/combine/ep.py), and
writes `rounds/<r>/state.json`, then the round's marker.

Stopping. With Monte Carlo moments q moves every round even at EP's fixed point: by about
δ·√(Σ_k 1/ESS_k) SDs in its means and δ·√(Σ_k 1/(2 ESS_k)) in its SDs (relative), the noise of K
tilted means and precisions. A round is `settled` when q's means moved by less than
`tolerance.mean` of their SD and its SDs by less than `tolerance.sd`, each plus twice that noise;
EP has `converged` after two settled rounds in a row, and the answer then averages the sites of
the settled rounds at the end (runner/combine/rounds.py). A state is `final` when converged or at
round `maxRounds`: what the operator and the local pipeline decide the next step by. A completed
round is never redone or rewritten.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..combine import ep
from ..combine.rounds import RoundState, read_moments, read_state, state_document, write_state
from ..errors import BadInput
from ..layout import STATE, FitLayout
from ..spec import FitSpec
from ..store.completion import completed, mark_complete
from .messages import describe_shards, update_message


@dataclass(frozen=True)
class UpdateOptions:
    round: int


def finished_state(spec: FitSpec, layout: FitLayout, round_: int) -> RoundState | None:
    """The state after round `round_` (0: the pilot's) if that round is complete, else None."""
    fingerprint = spec.fingerprint()
    folder = layout.round(round_)
    if not completed(layout.store, folder.marker, fingerprint):
        return None
    return read_state(layout.store, folder.state, fingerprint)


def require_rounds(spec: FitSpec) -> None:
    """Refuse an EP step (pilot, round, update) of a fit that runs no rounds."""
    if not spec.uses_rounds:
        raise BadInput(
            f"this fit has no EP rounds (spec.combine.method {spec.combine['method']!r}, {spec.shards} shard(s))"
        )


def check_round(spec: FitSpec, round_: int) -> None:
    require_rounds(spec)
    if not 1 <= round_ <= spec.combine["maxRounds"]:
        raise BadInput(f"round {round_} is out of range: spec.combine.maxRounds is {spec.combine['maxRounds']}")


def previous_state(spec: FitSpec, layout: FitLayout, round_: int) -> RoundState:
    """The state round `round_` starts from; refused (one line) before it exists or after the last round."""
    before = finished_state(spec, layout, round_ - 1)
    if before is None:
        step = "the pilot" if round_ == 1 else f"the update of round {round_ - 1}"
        raise BadInput(
            f"round {round_} cannot start: {step} is not complete (no {layout.uri(layout.round(round_ - 1).marker)})"
        )
    if before.final:
        raise BadInput(
            f"round {round_} does not exist: round {round_ - 1} was the last "
            f"({'converged' if before.converged else 'spec.combine.maxRounds reached'})"
        )
    return before


def run(spec: FitSpec, layout: FitLayout, options: UpdateOptions) -> dict:
    """The update step of one round; its termination message."""
    round_ = options.round
    check_round(spec, round_)
    done = finished_state(spec, layout, round_)
    if done is not None:
        return update_message(done)
    before = previous_state(spec, layout, round_)
    folder, store, fingerprint = layout.round(round_), layout.store, spec.fingerprint()
    missing = [k for k in range(spec.shards) if not completed(store, folder.shard(k).marker, fingerprint)]
    if missing:
        raise BadInput(
            f"cannot update round {round_}: {describe_shards(missing, spec.shards)} not sampled "
            f"(no _SUCCESS.json under {layout.uri(folder.shards.prefix)})"
        )
    documents = [json.loads(store.read_bytes(folder.shard(k).moments)) for k in range(spec.shards)]
    moments = [read_moments(document) for document in documents]
    combine = spec.combine
    updated = ep.update(before.ep_sites, moments, float(combine["damping"]))
    change = ep.change(before.approximation, ep.approximation(updated.sites))
    inverse_ess = sum(1.0 / max(document["ess"], 1.0) for document in documents)
    noise = {"mean": updated.damping * inverse_ess**0.5, "sd": updated.damping * (inverse_ess / 2) ** 0.5}
    tolerance = combine["tolerance"]
    settled = updated.damping > 0 and all(
        getattr(change, key) < tolerance[key] + 2 * noise[key] for key in ("mean", "sd")
    )
    converged = settled and before.settled
    estimators = {kind: sum(m.estimator == kind for m in moments) for kind in ("control variate", "sample")}
    state = state_document(
        fingerprint, round_, before.sites, before.components, updated.sites, change, updated.damping,
        noise, settled, converged, converged or round_ >= combine["maxRounds"], estimators,
    )
    size = write_state(store, folder.state, state)
    mark_complete(store, folder.marker, fingerprint, {STATE: size}, converged=state.converged, final=state.final)
    return update_message(state)


def round_states(spec: FitSpec, layout: FitLayout) -> list[RoundState]:
    """With EP, the state after every round, the first to the final one (each read once); else
    none. Refused while rounds remain."""
    if not spec.uses_rounds:
        return []
    states = []
    for round_ in range(1, spec.combine["maxRounds"] + 1):
        state = finished_state(spec, layout, round_)
        if state is None:
            raise BadInput(
                f"cannot combine: EP round {round_} is not complete (no {layout.uri(layout.round(round_).marker)})"
            )
        states.append(state)
        if state.final:
            return states
    raise BadInput("cannot combine: no EP round is final")  # maxRounds' state is always final
