"""A 2,000-shard fit on the real control plane: the Job controller creates 2,000 pods, the scheduler
binds them to the fake GPU nodes, kwok completes them with the runner's termination messages, and
the operator drives the fit to Succeeded. Measures the operator's API requests per shard and the
time from `kubectl apply` to Combining (benchmarks/control_plane.py reports the same numbers).
"""

from __future__ import annotations

import json

import pytest
from e2e_support import NAMESPACE, SCALE_FIT, measure_many_shards

SHARDS = 2000


@pytest.mark.timeout(1200)
def test_two_thousand_shards(cluster, operator, bucket):
    result = measure_many_shards(cluster, operator, NAMESPACE, SCALE_FIT, SHARDS, bucket)
    print("\ncontrol plane, 2,000 shards:", json.dumps(result, indent=1))
    assert result["phase"] == "Succeeded", result
    assert result["status_shards"]["succeeded"] == SHARDS
    assert result["seconds_apply_to_combining"] is not None
    # The operator watches and patches per fit, not per pod: far below one request per shard.
    assert result["operator_requests_per_shard"] < 0.5, result
    cluster.kubectl("delete", "consensusfit", SCALE_FIT, "-n", NAMESPACE, "--wait=false")
