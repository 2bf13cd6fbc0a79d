"""What a step reads besides its spec: which shards, their data, the partition manifest, whole-data
statistics, and one shard's model as the sample step prepared it.

Every step resolves its inputs here, from the spec, the layout and its options, so the CLI only
parses arguments and the steps need nothing from each other.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..contract import JOB_COMPLETION_INDEX
from ..errors import BadInput
from ..layout import FitLayout
from ..models.from_spec import model_and_data
from ..spec import FitSpec, pod_shards
from ..store.completion import read_json
from ..store.storage import split_uri


def completion_index() -> int:
    """The Indexed Job's $JOB_COMPLETION_INDEX, as an integer."""
    index = os.environ.get(JOB_COMPLETION_INDEX)
    if index is None:
        raise BadInput(f"no --shard given and {JOB_COMPLETION_INDEX} is not set")
    try:
        return int(index)
    except ValueError:
        raise BadInput(f"shard must be an integer, got {index!r}") from None


def pod_shard_list(spec: FitSpec, given: list[int] | None, per_pod: int = 1) -> list[int]:
    """The shards this pod takes: `given`, else those of its completion index (`per_pod` a pod)."""
    if given is not None:
        return given
    if per_pod < 1:
        raise BadInput(f"--shards-per-pod must be at least 1, got {per_pod}")
    index = completion_index()
    # an index past the last pod keeps its first shard, for the range check to name it
    return pod_shards(index, per_pod, spec.shards) or [index * per_pod]


def partition_manifest(layout: FitLayout) -> dict | None:
    """The partition step's manifest, if the data were partitioned under this fit."""
    return read_json(layout.store, layout.partition.manifest)


def whole_data_stats(layout: FitLayout, stats_uri: str | None = None) -> dict | None:
    """Whole-data statistics for priors: from `stats_uri` if given (it must exist), else from the
    partition manifest if there is one."""
    if stats_uri is None:
        return (partition_manifest(layout) or {}).get("stats")
    store, key = split_uri(stats_uri)
    document = read_json(store, key)
    if document is None:
        raise BadInput(f"{stats_uri} does not exist")
    return document.get("stats")


@dataclass(frozen=True)
class ShardModel:
    """One shard's model, its prepared arguments and its group labels."""

    fn: object
    arguments: dict
    groups: list[str]


def shard_model(
    spec: FitSpec, layout: FitLayout, shard: int, data_uri: str | None, stats_uri: str | None
) -> ShardModel:
    """The model and its arguments for one shard's data, prepared as the sample step did."""
    stats = whole_data_stats(layout, stats_uri)
    uri = layout.shard_data(shard, data_uri)
    model, data = model_and_data(spec, stats, uri, f"shard {shard} ({uri})")
    return ShardModel(model.fn, model.prepare(data), [str(label) for label in data.group_labels])
