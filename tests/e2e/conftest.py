"""Fixtures of the end-to-end tests: one real control plane per session (scripts/cluster.py), the
Helm chart installed into it, the operator running as the chart's ServiceAccount, and the executor
that runs runner pods in the runner image (or as local processes, see `launch`) against the
loopback S3 endpoint (tests/conftest.py).

Where the Go toolchain is missing (and the binaries are not cached), every test here is skipped
with a message saying so.
"""

from __future__ import annotations

import uuid
import warnings
from pathlib import Path

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from e2e_support import (
    NAMESPACE,
    REBORN_FIT,
    SCALE_FIT,
    Executor,
    Installation,
    Operator,
    can_i,
    clusterlib,
    install,
    pod_launch,
)

HERE = Path(__file__).resolve().parent
# Short, so that the tests of blocked fits see them fail; long enough that no healthy pod of the
# other tests is ever pending that long on this machine.
BLOCKED_GRACE_SECONDS = 30


def pytest_collection_modifyitems(items):
    """The uninstall test removes the chart and the CRD: it runs after every other test."""
    items.sort(key=lambda item: item.path.name == "test_e2e_uninstall.py")


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    if not clusterlib.built():
        why = clusterlib.missing_go()
        if why:
            pytest.skip(f"end-to-end tests skipped: {why}")
        clusterlib.build()
    if clusterlib.helm_path() is None:
        pytest.skip("end-to-end tests skipped: helm could not be built (scripts/tools.sh install helm)")
    work = tmp_path_factory.mktemp("cluster")
    control_plane = clusterlib.Cluster(work, complete_fits=(SCALE_FIT, REBORN_FIT), gpu_nodes=4, gpus_per_node=512)
    control_plane.start()
    yield control_plane
    control_plane.stop()


@pytest.fixture(scope="session")
def bucket(s3_endpoint):
    """One bucket for the session: the tiny data set and model, and every fit's results."""
    name = f"e2e-{uuid.uuid4().hex[:10]}"
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket=name)
    rng = np.random.default_rng(0)
    groups, per_group = 40, 6
    effects = rng.normal(0.0, 1.0, groups)
    table = pa.table({
        "g": np.repeat([f"p{i:02d}" for i in range(groups)], per_group),
        "y": 1.5 + 0.8 * np.repeat(effects, per_group) + rng.normal(0.0, 0.5, groups * per_group),
    })
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    s3.put_object(Bucket=name, Key="data/part-0.parquet", Body=sink.getvalue().to_pybytes())
    s3.put_object(Bucket=name, Key="models/e2e_model.py", Body=(HERE / "e2e_model.py").read_bytes())
    return f"s3://{name}"


@pytest.fixture(scope="session")
def launch():
    """How the executor runs runner pods, and the operator fixtures the operator: in the images
    (podman) unless they cannot run here or CONSENSUSFIT_E2E_PODS=process asks for local
    processes (CONSENSUSFIT_E2E_OPERATOR=process: the operator only); the warning summary says so."""
    chosen, why = pod_launch()
    if why:
        warnings.warn(f"end-to-end runner pods run as local processes, not in the runner image: {why}")
    return chosen


@pytest.fixture(scope="session")
def installation(cluster, s3_endpoint, launch) -> Installation:
    """The chart, installed with helm as a user would, watching the fits' namespace, where the API
    server admits pods under the restricted Pod Security Standard only."""
    cluster.kubectl("create", "namespace", NAMESPACE)
    cluster.kubectl("label", "namespace", NAMESPACE, "pod-security.kubernetes.io/enforce=restricted")
    cluster.kubectl("create", "secret", "generic", "s3-credentials", "-n", NAMESPACE,
                    "--from-literal=AWS_ACCESS_KEY_ID=testing", "--from-literal=AWS_SECRET_ACCESS_KEY=testing")
    installed = install(cluster, [
        f"watchNamespaces={{{NAMESPACE}}}",
        f"runner.s3.endpoint={s3_endpoint}",
        "runner.s3.region=us-east-1",
        "runner.s3.credentialsSecret=s3-credentials",
        "operator.resyncSeconds=1",
        f"operator.blockedGraceSeconds={BLOCKED_GRACE_SECONDS}",
        *launch.values,
    ])
    installed.can_update_finalizers = can_i(
        cluster, installed, "update", "consensusfits.consensusfit.dev", NAMESPACE, "finalizers")
    return installed


@pytest.fixture(scope="session")
def operator(cluster, installation, launch, tmp_path_factory):
    process = Operator(cluster, installation, tmp_path_factory.mktemp("operator"), image=launch.operator_image).start()
    yield process
    process.stop()


@pytest.fixture(scope="session")
def executor(cluster, operator, launch, tmp_path_factory):
    runner = Executor(cluster.kubeconfig, NAMESPACE, tmp_path_factory.mktemp("pods"), launch).start()
    yield runner
    runner.stop()

