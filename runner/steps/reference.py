"""The reference: one NUTS run over the whole data set, untempered, to check the combined answer.

Users ask "how do I know it is right?": on a sample of their data small enough for one machine, the
reference fit is the truth the consensus answer should match. Results go to `<root>/reference/`
(`summary.json`, then `_SUCCESS.json`), and a re-run reuses them. Local `run --reference` only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

from ..combine.summaries import group_summary
from ..contract import strict_json
from ..inference.diagnostics import parameter_diagnostics
from ..inference.nuts import SamplerSettings, run_nuts
from ..inference.tempering import resolve_global_sites
from ..layout import SUMMARY, FitLayout
from ..models.from_spec import model_and_data
from ..spec import FitSpec
from ..store.completion import completed, mark_complete
from .inputs import whole_data_stats


@dataclass(frozen=True)
class ReferenceOptions:
    data: str | None = None  # default: the spec's whole data set


def run(spec: FitSpec, layout: FitLayout, options: ReferenceOptions = ReferenceOptions()) -> dict:
    """Summaries of the globals ({component: mean, sd, q05, q50, q95, rhat, ess_bulk, ess_tail}) and
    of the group-level parameters (`name[label]`: mean, sd, q05, q50, q95)."""
    store, folder = layout.store, layout.reference
    fingerprint = spec.fingerprint()
    if completed(store, folder.marker, fingerprint):
        return json.loads(store.read_bytes(folder.summary))
    data_uri = options.data or spec.data["uri"]
    model, data = model_and_data(spec, whole_data_stats(layout), data_uri, "reference")
    arguments = model.prepare(data)
    global_sites = resolve_global_sites(model.fn, arguments, model.prepare(data.doubled()), spec.global_sites)
    settings = replace(SamplerSettings.from_spec(spec.sampler), seed=spec.seeds.reference)
    samples = run_nuts(model.fn, arguments, settings, model.data_as_arguments)
    summary = parameter_diagnostics(samples, global_sites.latent)
    # group-level sites by group label, as combined/summary.json names them
    local = {name: v for name, v in samples.constrained.items() if name in global_sites.local_shapes}
    summary.update(group_summary(local, [str(label) for label in data.group_labels], 0))
    encoded = strict_json(summary, indent=1, ensure_ascii=False).encode()
    store.write_bytes(folder.summary, encoded)
    mark_complete(store, folder.marker, fingerprint, {SUMMARY: len(encoded)})
    return summary


def reference_fit(spec: FitSpec, root: str) -> dict:
    """`run` under the fit's root URI."""
    return run(spec, FitLayout(root))
