"""Simulated data for the demo and the examples, seeded so a demo and a benchmark see the same data.

`osic_like` is the forum thread's data set: lung function (FVC) of patients measured over weeks,
shaped like the OSIC pulmonary fibrosis data of the forum thread (176 patients, 6–10 visits each,
weeks −5…133): every patient has an intercept α ~ N(2800, 700) and a slope β ~ N(−4, 5) per week,
and each visit adds noise N(0, 130). The others feed `examples/*.yaml` (`consensusfit simulate`).
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


def sleep_like(subjects: int = 400, seed: int = 0) -> pa.Table:
    """Reaction time over 10 days of sleep deprivation; correlated intercept and slope per subject."""
    rng = np.random.default_rng(seed)
    days = np.tile(np.arange(10.0), subjects)
    subject = np.repeat(np.arange(subjects), 10)
    cov = np.array([[25.0**2, 0.2 * 25 * 6], [0.2 * 25 * 6, 6.0**2]])
    effects = rng.multivariate_normal([0, 0], cov, subjects)
    reaction = 250 + effects[subject, 0] + (10 + effects[subject, 1]) * days
    return pa.table(
        {
            "reaction": reaction + rng.normal(0, 25, len(days)),
            "days": days,
            "subject": np.array([f"S{s:05d}" for s in subject]),
        }
    )


def clicks_like(users: int = 2000, seed: int = 0) -> pa.Table:
    """Whether a user clicked an offer, by price and device; random intercepts per user and campaign."""
    rng = np.random.default_rng(seed)
    shown = rng.integers(5, 16, users)
    user = np.repeat(np.arange(users), shown)
    rows = len(user)
    price = rng.uniform(1, 20, rows).round(2)
    device = rng.choice(["desktop", "mobile", "tablet"], rows, p=[0.5, 0.4, 0.1])
    campaign = rng.integers(0, 12, rows)
    device_effect = np.select([device == "mobile", device == "tablet"], [0.4, -0.3], 0.0)
    logit = (
        -0.5
        - 0.08 * price
        + device_effect
        + rng.normal(0, 0.8, users)[user]
        + rng.normal(0, 0.5, 12)[campaign]
    )
    return pa.table(
        {
            "clicked": (rng.uniform(size=rows) < 1 / (1 + np.exp(-logit))).astype(np.int64),
            "price": price,
            "device": device,
            "user": np.array([f"U{u:06d}" for u in user]),
            "campaign": np.array([f"C{c:02d}" for c in campaign]),
        }
    )


def visits_like(stores: int = 300, days: int = 60, seed: int = 0) -> pa.Table:
    """Daily visits per store, by temperature and weekend; uncorrelated intercept and slope per store."""
    rng = np.random.default_rng(seed)
    store = np.repeat(np.arange(stores), days)
    day = np.tile(np.arange(days), stores)
    temperature = (15 + 8 * np.sin(day / 9) + rng.normal(0, 3, len(day))).round(1)
    weekend = (day % 7 >= 5).astype(np.int64)
    log_rate = (
        2.0
        + rng.normal(0, 0.4, stores)[store]
        + (0.03 + rng.normal(0, 0.01, stores)[store]) * temperature
        + 0.3 * weekend
    )
    return pa.table(
        {
            "visits": rng.poisson(np.exp(log_rate)),
            "temperature": temperature,
            "weekend": weekend,
            "store": np.array([f"store{s:04d}" for s in store]),
        }
    )


# What `consensusfit simulate` writes, and where the examples expect it (relative to examples/).
DATASETS = {
    "osic": (osic_like, "data/osic.parquet"),
    "sleep": (sleep_like, "data/sleep.parquet"),
    "clicks": (clicks_like, "data/clicks.parquet"),
    "visits": (visits_like, "data/visits.parquet"),
}
