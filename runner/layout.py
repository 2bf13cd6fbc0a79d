"""Every file of docs/contract.md, spelled once: where each step's files lie under a fit's ROOT.

    layout = FitLayout(root)
    layout.shard(3).draws          "shards/3/draws.parquet"
    layout.shard(3).marker         "shards/3/_SUCCESS.json"
    layout.partition.manifest      "partition/manifest.json"
    layout.combined.globals.marker "combined/globals/_SUCCESS.json"
    layout.combined.group(3).draws "combined/groups/3/draws.parquet"
    layout.store.read_bytes(layout.combined.summary)

Paths are store keys relative to ROOT (a local folder or `s3://bucket/prefix`); `layout.uri(key)`
is the full URI. A marker's `files` names its files relative to the marker's folder
(`Folder.name`). A new kind of step gets its folder here, as a `Folder` subclass and a method
or attribute of `FitLayout` (e.g. rounds of a later step: `layout.round(r).state`), and no path
string anywhere else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

from .store.storage import Store, open_store

DRAWS = "draws.parquet"
DIAGNOSTICS = "diagnostics.json"
SUCCESS = "_SUCCESS.json"
AGREEMENT = "agreement.json"
SUMMARY = "summary.json"
MANIFEST = "manifest.json"
STATE = "state.json"
MOMENTS = "moments.json"
ADAPTATION = "adaptation.npz"
POSTERIORS = "posteriors.png"
CONVERGENCE = "convergence.png"

# A shard's folder of rows: the partition's output, and already-sharded input data alike.
SHARD_FOLDER = re.compile(r"^shard=(\d+)$")


def shard_folder(shard: int | str) -> str:
    return f"shard={shard}"


@dataclass(frozen=True)
class Folder:
    """A folder under the fit's root; its files' keys are relative to the root."""

    path: str

    def key(self, name: str) -> str:
        return f"{self.path}/{name}"

    def name(self, key: str) -> str:
        """A key's name relative to this folder (how a marker lists its files)."""
        return key[len(self.path) + 1 :] if key.startswith(self.prefix) else key

    @property
    def prefix(self) -> str:
        return f"{self.path}/"

    @property
    def marker(self) -> str:
        """`_SUCCESS.json`: written last; the folder's step is complete (runner/store/completion.py)."""
        return self.key(SUCCESS)


class ShardFolder(Folder):
    """`shards/<k>/` (the sample step) or `combined/groups/<k>/` (the resample step)."""

    @property
    def draws(self) -> str:
        return self.key(DRAWS)

    @property
    def diagnostics(self) -> str:
        return self.key(DIAGNOSTICS)


class PartitionFolder(Folder):
    """`partition/`: the rows of every shard, the workers' reports, the manifest (written last)."""

    PART = re.compile(r"^partition/shard=(\d+)/part-(\d+)\.parquet$")

    @property
    def manifest(self) -> str:
        return self.key(MANIFEST)

    @property
    def workers(self) -> str:
        """The folder of the workers' reports, as a listing prefix."""
        return self.key("workers/")

    def worker(self, index: int) -> str:
        return self.key(f"workers/{index}.json")

    def shard(self, shard: int | str) -> str:
        """Shard `shard`'s folder of rows, as a prefix (`{shard}` stays a placeholder if given so)."""
        return self.key(f"{shard_folder(shard)}/")

    def part(self, shard: int, worker: int) -> str:
        return self.key(f"{shard_folder(shard)}/part-{worker}.parquet")


class CombinedFolder(Folder):
    """`combined/`: the combined draws, the agreement and the summary, and the stages' markers."""

    @property
    def draws(self) -> str:
        return self.key(DRAWS)

    @property
    def agreement(self) -> str:
        return self.key(AGREEMENT)

    @property
    def summary(self) -> str:
        return self.key(SUMMARY)

    @property
    def globals(self) -> Folder:
        """The globals stage's folder: only its marker."""
        return Folder(self.key("globals"))

    @property
    def groups(self) -> Folder:
        return Folder(self.key("groups"))

    def group(self, shard: int) -> ShardFolder:
        """Shard `shard`'s group-level draws given the combined draws (the resample step)."""
        return ShardFolder(self.groups.key(str(shard)))


class TiltedFolder(ShardFolder):
    """`rounds/<r>/shards/<k>/`: shard k's tilted draws in EP round r, their moments and where
    its chains ended (the next round's warm start)."""

    @property
    def moments(self) -> str:
        return self.key(MOMENTS)

    @property
    def adaptation(self) -> str:
        return self.key(ADAPTATION)


class RoundFolder(ShardFolder):
    """`rounds/<r>/`: EP round r, its shards' tilted draws and, from the update step, the state
    after it. Round 0 is the pilot: its draws and diagnostics, and the state EP starts from."""

    @property
    def state(self) -> str:
        return self.key(STATE)

    @property
    def shards(self) -> Folder:
        return Folder(self.key("shards"))

    def shard(self, shard: int) -> TiltedFolder:
        return TiltedFolder(self.shards.key(str(shard)))


class ReferenceFolder(Folder):
    """`reference/`: the full-data NUTS fit of local `run --reference`."""

    @property
    def summary(self) -> str:
        return self.key(SUMMARY)


class ReportFolder(Folder):
    """`report/`: what local `run` draws."""

    @property
    def posteriors(self) -> str:
        return self.key(POSTERIORS)

    @property
    def convergence(self) -> str:
        """EP: every global parameter's mean ± SD per round."""
        return self.key(CONVERGENCE)


@dataclass(frozen=True)
class FitLayout:
    """The files of one fit under `root` (docs/contract.md, "Files")."""

    root: str

    def __post_init__(self):
        object.__setattr__(self, "root", self.root.rstrip("/"))

    @cached_property
    def store(self) -> Store:
        return open_store(self.root)

    def uri(self, key: str) -> str:
        return f"{self.root}/{key}"

    shards = Folder("shards")
    partition = PartitionFolder("partition")
    combined = CombinedFolder("combined")
    reference = ReferenceFolder("reference")
    report = ReportFolder("report")

    def shard(self, shard: int) -> ShardFolder:
        return ShardFolder(self.shards.key(str(shard)))

    rounds = Folder("rounds")

    def round(self, round_: int) -> RoundFolder:
        """EP round `round_` (0: the pilot)."""
        return RoundFolder(self.rounds.key(str(round_)))

    def shard_data(self, shard: int, given: str | None = None) -> str:
        """Where shard `shard`'s rows are: `given` (a URI, `{shard}` filled in), else the partition's."""
        return (given or self.uri(self.partition.shard("{shard}"))).replace("{shard}", str(shard))
