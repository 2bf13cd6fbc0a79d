"""The reference: one NUTS run over the whole data set, untempered, to check the combined answer.

Users ask "how do I know it is right?": on a sample of their data small enough for one machine, the
reference fit is the truth the consensus answer should match. Results go to `<root>/reference/`
(`summary.json`, then `_SUCCESS.json`), and a re-run reuses them.
"""

from __future__ import annotations

import json

from .data import model_and_data, whole_data_stats
from .sampling import SamplerSettings, run_nuts
from .completion import completed, mark_complete
from .shard import parameter_diagnostics
from .spec import FitSpec
from .storage import open_store
from .tempering import resolve_global_sites


def reference_fit(spec: FitSpec, root: str) -> dict:
    """Summaries ({component: mean, sd, q05, q50, q95, rhat, ess_bulk, ess_tail}) of the globals."""
    folder = open_store(root).child("reference")
    fingerprint = spec.fingerprint()
    if completed(folder, fingerprint):
        return json.loads(folder.read_bytes("summary.json"))
    model, data = model_and_data(spec, whole_data_stats(root), spec.data["uri"], "reference")
    arguments = model.prepare(data)
    global_sites = resolve_global_sites(model.fn, arguments, model.prepare(data.doubled()), spec.global_sites)
    samples = run_nuts(model.fn, arguments, SamplerSettings.from_spec(spec.sampler), model.data_as_arguments)
    summary = parameter_diagnostics(samples, global_sites.latent)
    encoded = json.dumps(summary, indent=1, ensure_ascii=False).encode()
    folder.write_bytes("summary.json", encoded)
    mark_complete(folder, fingerprint, {"summary.json": len(encoded)})
    return summary
