"""OSIC-like demo data: lung function (FVC) of patients measured over weeks.

Shaped like the OSIC pulmonary fibrosis data of the forum thread (176 patients, 6–10 visits each,
weeks −5…133): every patient has an intercept α ~ N(2800, 700) and a slope β ~ N(−4, 5) per week,
and each visit adds noise N(0, 130). Seeded, so a demo and a benchmark see the same data.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

TRUTH = {"μ_α": 2800.0, "σ_α": 700.0, "μ_β": -4.0, "σ_β": 5.0, "σ": 130.0}


def osic_like(patients: int = 176, seed: int = 0) -> pa.Table:
    """Columns Patient (string id), Weeks (float), FVC (float); one row per visit."""
    rng = np.random.default_rng(seed)
    visits = rng.integers(6, 11, patients)
    patient = np.repeat(np.arange(patients), visits)
    weeks = np.concatenate([np.sort(rng.uniform(-5, 133, n)) for n in visits]).round()
    alpha = rng.normal(TRUTH["μ_α"], TRUTH["σ_α"], patients)
    beta = rng.normal(TRUTH["μ_β"], TRUTH["σ_β"], patients)
    fvc = alpha[patient] + beta[patient] * weeks + rng.normal(0, TRUTH["σ"], len(patient))
    return pa.table(
        {
            "Patient": np.array([f"ID{seed:02d}{p:07d}" for p in patient]),
            "Weeks": weeks,
            "FVC": fvc.round(),
        }
    )
