"""Upgrading the chart with a fit in flight, as the README says: the CRD first (server-side apply:
Helm never upgrades a chart's crds/), then `helm upgrade`, then the operator's new Deployment.

On a control plane of its own, so that the previous chart's CRD is what the API server starts with.
The previous chart is the packaged release in data/ (`helm package` of chart 0.1.0). The operator's
code is this tree's on both sides of the upgrade (it runs as a local process until the images
exist): what changes is what the chart installs, the CRD and its stored fits, RBAC and the
operator's environment.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from e2e_support import (
    CHART,
    FIT_LABEL,
    GROUP,
    NAMESPACE,
    PLURAL,
    Executor,
    Operator,
    clusterlib,
    install,
    render_fit,
    upgrade,
    wait_for,
)

pytestmark = pytest.mark.timeout(900)
PREVIOUS_CHART = Path(__file__).resolve().parent / "data" / "consensusfit-0.1.0.tgz"
CRD = f"{PLURAL}.{GROUP}"


@pytest.fixture(scope="module")
def fresh_cluster(cluster, tmp_path_factory):
    """A second control plane (the session's `cluster` fixture decides whether one can run here)."""
    control_plane = clusterlib.Cluster(tmp_path_factory.mktemp("upgrade-cluster"), gpu_nodes=1, gpus_per_node=8)
    control_plane.start()
    yield control_plane
    control_plane.stop()


def _schema(crd: dict) -> list:
    return [(v["name"], v["schema"]) for v in crd["spec"]["versions"]]


def test_a_fit_created_under_the_previous_chart_finishes_after_helm_upgrade(fresh_cluster, bucket, s3_endpoint,
                                                                           launch, tmp_path):
    cluster, name = fresh_cluster, "upgraded"
    values = [f"watchNamespaces={{{NAMESPACE}}}", f"runner.s3.endpoint={s3_endpoint}", "runner.s3.region=us-east-1",
              "runner.s3.credentialsSecret=s3-credentials", "operator.resyncSeconds=1", *launch.values]
    cluster.kubectl("create", "namespace", NAMESPACE)
    cluster.kubectl("create", "secret", "generic", "s3-credentials", "-n", NAMESPACE,
                    "--from-literal=AWS_ACCESS_KEY_ID=testing", "--from-literal=AWS_SECRET_ACCESS_KEY=testing")

    def fit() -> dict:
        return json.loads(cluster.kubectl("get", CRD, name, "-n", NAMESPACE, "-o", "json").stdout)

    def crd() -> dict:
        return json.loads(cluster.kubectl("get", "crd", CRD, "-o", "json").stdout)

    for folder in ("previous", "upgraded", "pods"):
        (tmp_path / folder).mkdir()
    previous = install(cluster, values, chart=PREVIOUS_CHART)
    before = Operator(cluster, previous, tmp_path / "previous", image=launch.operator_image).start()
    executor = Executor(cluster.kubeconfig, NAMESPACE, tmp_path / "pods", launch).start()
    try:
        executor.fits.add(name)
        cluster.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=render_fit(name, bucket))
        wait_for(lambda: fit().get("status", {}).get("phase") == "Sampling", 300, "the fit to sample")
        before.kill()  # the old Deployment's pod, replaced by the upgrade

        upgraded = upgrade(cluster, values)
        chart_crd = yaml.safe_load(next((CHART / "crds").glob("*.yaml")).read_text())
        assert _schema(crd()) == _schema(chart_crd), "the CRD in the cluster is not the new chart's"
        # The fit stored under the previous schema is still valid under the new one: an update passes.
        cluster.kubectl("annotate", CRD, name, "-n", NAMESPACE, "consensusfit.dev/upgraded=true")
        # A field the previous schema pruned: its Jobs stay after it succeeded, to be counted below.
        cluster.kubectl("patch", CRD, name, "-n", NAMESPACE, "--type=merge",
                        "-p", json.dumps({"spec": {"cleanupPolicy": {"onSuccess": "Keep"}}}))
        after = Operator(cluster, upgraded, tmp_path / "upgraded", image=launch.operator_image).start()
        try:
            done = wait_for(lambda: fit() if fit().get("status", {}).get("phase") in ("Succeeded", "Failed") else None,
                            600, "the fit to finish after the upgrade")
            assert done["status"]["phase"] == "Succeeded", (json.dumps(done["status"], indent=1), after.log_tail())
        finally:
            after.stop()
    finally:
        executor.stop()
        before.stop()

    # Each of its Jobs was created once, across both operators.
    jobs = json.loads(cluster.kubectl("get", "jobs", "-n", NAMESPACE, "-l", f"{FIT_LABEL}={name}", "-o", "json").stdout)
    names = sorted(job["metadata"]["name"] for job in jobs["items"])
    created = sorted(e["objectRef"]["name"] for e in cluster.audit_events()
                     if e["verb"] == "create" and (e.get("objectRef") or {}).get("resource") == "jobs"
                     and e["responseStatus"]["code"] == 201 and e["objectRef"].get("name", "").startswith(f"{name}-"))
    assert created == names, (created, names)
    assert {f"{name}-partition", f"{name}-shards", f"{name}-combine"} <= set(names)
    assert upgraded.how == "helm upgrade" and before.user == after.user
