"""Control-plane cost of a many-shard fit on a real Kubernetes control plane (issue 8).

Starts the e2e cluster (scripts/cluster.py: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler, kwok GPU nodes), installs the Helm chart, runs the operator as the chart's
ServiceAccount, and applies a fit of SHARDS shards whose pods kwok completes with the runner's
termination messages (the shard outputs are seeded in a loopback S3 store meanwhile). Reports the
seconds from `kubectl apply` to each phase and the operator's API requests (from the API server's
audit log), in total, per shard and by verb and resource.

    .venv/bin/python benchmarks/control_plane.py [--shards 2000] [--resync 1]

tests/e2e/test_e2e_scale.py runs the same measurement at 2,000 shards and asserts on it.

Measured (tests/e2e/test_e2e_scale.py, 2,000 shards, resync 1 s, 2 CPU cores shared with other
work, control plane, kwok, S3 and operator on one machine):
- operator API requests while the fit ran (apply -> Succeeded, 55.5 s): 64 in all, 0.032 per
  shard: 24 status patches, 3 Job creates, 4 Events, 15 pod watch (re)connections, and kopf's
  start-up discovery, lists and watches (the operator had just started). Nothing per pod: pods
  and Jobs are watched, never read one by one.
- seconds from `kubectl apply` to Partitioning 2.3, Sampling 4.3, Combining 53.5, Succeeded 55.5.
  Sampling -> Combining (49 s) is the Job controller creating 2,000 pods (client QPS 300), the
  scheduler binding them and kwok completing them, not the operator.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

from e2e_support import NAMESPACE, Operator, clusterlib, install, measure_many_shards  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=int, default=2000)
    parser.add_argument("--resync", type=float, default=1.0, help="the operator's resync period (s)")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)

    import boto3
    from moto.server import ThreadedMotoServer

    clusterlib.build()
    name = f"bench-{args.shards}"
    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    s3.start()
    host, port = s3.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    import os

    os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    work = Path(tempfile.mkdtemp(prefix="consensusfit-bench-"))
    with clusterlib.Cluster(work / "cluster", complete_fits=(name,), gpu_nodes=4,
                            gpus_per_node=max(512, args.shards // 4 + 1)) as cluster:
        cluster.kubectl("create", "namespace", NAMESPACE)
        installation = install(cluster, [f"watchNamespaces={{{NAMESPACE}}}", f"runner.s3.endpoint={endpoint}",
                                         f"operator.resyncSeconds={args.resync}"])
        (work / "operator").mkdir()
        operator = Operator(cluster, installation, work / "operator", resync_seconds=args.resync).start()
        try:
            result = measure_many_shards(cluster, operator, NAMESPACE, name, args.shards, f"s3://{bucket}")
        finally:
            operator.stop()
    s3.stop()
    print(json.dumps(result, indent=1))
    print(f"\n{args.shards} shards: {result['operator_requests']} operator API requests "
          f"({result['operator_requests_per_shard']} per shard); apply -> Combining "
          f"{result['seconds_apply_to_combining']} s; phases {result['seconds_to_phase']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
